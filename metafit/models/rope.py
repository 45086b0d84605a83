r"""Rotary position embeddings (RoPE) and the scaling variants HF configs express.

A pair of channels :math:`(x_i, x_{i + d/2})` at position :math:`p` is rotated by the angle
:math:`p\,\omega_i` with :math:`\omega_i = \theta^{-2i/d}` ("rotate-half" layout, as in HF):

.. math:: x' = x \cos(p\omega) + \mathrm{rotate\_half}(x) \sin(p\omega).

Scaling variants change :math:`\omega` (and sometimes a factor on cos/sin):

* ``linear`` (position interpolation): :math:`\omega_i / s`.
* ``dynamic`` (NTK-aware, dynamic): for sequences longer than ``max_position_embeddings``
  :math:`L`, :math:`\theta \leftarrow \theta\,(sL'/L - (s - 1))^{d/(d-2)}` with :math:`L'` the
  current length; computed inside jit from the positions, so it needs no recompilation.
* ``llama3``: low frequencies (wavelength > ``original_max / low_freq_factor``) divided by
  :math:`s`, high ones kept, a linear blend in between (Llama 3.1).
* ``yarn``: per-frequency blend of interpolation and extrapolation with an attention factor
  :math:`0.1 \ln s + 1` on cos/sin.

References: Su et al. 2021 (RoFormer); kaiokendev 2023 (linear); bloc97/emozilla 2023
(dynamic NTK); Peng et al. 2023 (YaRN); Meta 2024 (Llama 3.1).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE settings (HF ``rope_parameters``). Fields unused by ``rope_type`` are ignored."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: Optional[int] = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    attention_factor: Optional[float] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type '{self.rope_type}'; supported: {', '.join(ROPE_TYPES)}")

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, max_position_embeddings: int, default_theta: float = 10000.0):
        """From a transformers ``rope_parameters`` dict (or a v4 ``rope_scaling`` dict)."""
        params = dict(params or {})
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known and k not in ("rope_type", "theta")}
        for k in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            if kwargs.get(k) is None:
                kwargs.pop(k, None)
        unsupported = set(params) - known - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
        if unsupported or params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"rope parameters not supported by metafit: {sorted(unsupported) or params}")
        return cls(
            rope_type=rope_type,
            theta=float(params.get("rope_theta", default_theta)),
            max_position_embeddings=int(max_position_embeddings),
            **kwargs,
        )

    def to_hf(self) -> dict[str, Any]:
        """The transformers ``rope_parameters`` dict for this config."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type in ("linear", "dynamic", "llama3", "yarn"):
            out["factor"] = self.factor
        if self.rope_type in ("llama3", "yarn"):
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        if self.rope_type == "yarn":
            out.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow)
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, k) is not None:
                    out[k] = getattr(self, k)
            if not self.truncate:
                out["truncate"] = False
        return out


def _base_inv_freq(theta, dim: int) -> Array:
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _llama3(cfg: RopeConfig, inv_freq: Array) -> Array:
    old_len = cfg.original_max_position_embeddings
    low_wavelen = old_len / cfg.low_freq_factor
    high_wavelen = old_len / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def _yarn(cfg: RopeConfig, dim: int) -> tuple[Array, float]:
    factor = cfg.factor
    original = cfg.original_max_position_embeddings or cfg.max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = cfg.attention_factor
    if attention_factor is None:
        if cfg.mscale and cfg.mscale_all_dim:
            attention_factor = mscale(factor, cfg.mscale) / mscale(factor, cfg.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = cfg.theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def inv_frequencies(cfg: RopeConfig, dim: int, positions: Array | None = None) -> tuple[Array, float]:
    """``(inv_freq [dim // 2] float32, cos/sin scale)`` for ``cfg``.

    ``positions`` (any shape) is only read by ``dynamic`` scaling, whose frequencies depend on
    the current length ``max(positions) + 1``.
    """
    if cfg.rope_type == "default":
        return _base_inv_freq(cfg.theta, dim), 1.0
    if cfg.rope_type == "linear":
        return _base_inv_freq(cfg.theta, dim) / cfg.factor, 1.0
    if cfg.rope_type == "llama3":
        return _llama3(cfg, _base_inv_freq(cfg.theta, dim)), 1.0
    if cfg.rope_type == "yarn":
        return _yarn(cfg, dim)
    # dynamic NTK: grow the base once the sequence outruns the trained length.
    max_len = cfg.max_position_embeddings
    seq_len = max_len if positions is None else jnp.maximum(jnp.max(positions) + 1, max_len)
    theta = cfg.theta * ((cfg.factor * seq_len / max_len) - (cfg.factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(jnp.asarray(theta, jnp.float32), dim), 1.0


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def cos_sin(cfg: RopeConfig, dim: int, positions: Array, dtype) -> tuple[Array, Array]:
    """``cos, sin`` of shape ``[b, s, dim]`` for integer ``positions`` ``[b, s]``, cast to ``dtype``."""
    inv_freq, scale = inv_frequencies(cfg, dim, positions)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x`` ``[b, s, heads, dim]`` by ``cos``/``sin`` ``[b, s, dim]``."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]
