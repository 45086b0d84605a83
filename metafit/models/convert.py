"""NNX parameters <-> HF tensor names, derived from attribute paths (no per-model tables).

Module attribute paths mirror HF's, so the HF name of a parameter is its path joined by dots,
with NNX leaf names renamed (``kernel`` and ``embedding`` -> ``weight``). ``nnx.Linear``
kernels are ``[in, out]`` while PyTorch ``nn.Linear`` weights are ``[out, in]``: they are
transposed, except in :class:`~metafit.models.layers.Conv1D` (GPT-2 stores ``[in, out]``).
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import Conv1D

_LEAF_NAMES = {"kernel": "weight", "embedding": "weight"}

# Checkpoint entries that are buffers, not parameters: never an error when left unused.
_IGNORED_SUFFIXES = (
    "rotary_emb.inv_freq",
    "attn.bias",
    "attn.masked_bias",
    "embeddings.position_ids",
    # A tied-embedding model reads the output projection from the input embedding.
    "lm_head.weight",
)

# Legacy HF layer-norm names.
_LEGACY = {".gamma": ".weight", ".beta": ".bias"}


def _base_params(model) -> nnx.State:
    # LoRA and other adapter parameters are not part of the HF base checkpoint.
    return nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))


def _owner(model, path) -> nnx.Module:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def hf_name(path: tuple) -> str:
    """HF tensor name of the parameter at NNX ``path`` (e.g. ``('lm_head', 'kernel')``)."""
    # PEFT wrappers keep the wrapped layer as ``.base_layer`` (HF PEFT's name); HF base names lack it.
    *owner, leaf = (str(p) for p in path if p != "base_layer")
    return ".".join(owner + [_LEAF_NAMES.get(leaf, leaf)])


def _transposed(model, path) -> bool:
    return path[-1] == "kernel" and not isinstance(_owner(model, path[:-1]), Conv1D)


def hf_layout(model) -> Iterator[tuple[tuple, str, bool]]:
    """``(nnx_path, hf_name, transposed)`` for every base parameter of ``model``."""
    for path, _ in nnx.to_flat_state(_base_params(model)):
        yield path, hf_name(path), _transposed(model, path)


def to_hf_tensors(model, dtype=None) -> dict[str, np.ndarray]:
    """The model's parameters as an HF state dict of numpy arrays (PyTorch layouts)."""
    out = {}
    flat = dict(nnx.to_flat_state(_base_params(model)))
    for path, name, transposed in hf_layout(model):
        value = np.asarray(jax.device_get(flat[path][...]))
        if dtype is not None:
            value = value.astype(dtype)
        out[name] = np.ascontiguousarray(value.T if transposed else value)
    return out


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the architecture its config describes."""


def load_hf_tensors(
    model,
    get_tensor: Callable[[str], np.ndarray],
    names: set[str],
    *,
    base_prefix: str,
    source: str,
):
    """Fills ``model``'s parameters from HF-named tensors, in place; returns ``model``.

    Args:
      model: an NNX model (may be abstract, from ``nnx.eval_shape``).
      get_tensor: reads one tensor (numpy, PyTorch layout) by its checkpoint name.
      names: all tensor names in the checkpoint.
      base_prefix: HF ``base_model_prefix`` (``"model"``, ``"transformer"``, ``"bert"``);
        checkpoints saved from a base model lack it, those from a head model have it.
      source: checkpoint description for error messages.

    Raises:
      CheckpointMismatch: a tensor is missing or its shape differs (the message names the
        tensor and both shapes).
    """
    aliases = {}
    for name in names:
        canonical = name
        for old, new in _LEGACY.items():
            if canonical.endswith(old):
                canonical = canonical[: -len(old)] + new
        aliases[canonical] = name

    def find(name: str) -> str | None:
        prefix = base_prefix + "."
        candidates = [name, name[len(prefix):] if name.startswith(prefix) else prefix + name]
        return next((aliases[c] for c in candidates if c in aliases), None)

    state = _base_params(model)
    flat = dict(nnx.to_flat_state(state))
    used, missing = set(), []
    for path, name, transposed in hf_layout(model):
        key = find(name)
        if key is None:
            missing.append(name)
            continue
        variable = flat[path]
        expected = tuple(variable.shape)
        expected_hf = expected[::-1] if transposed else expected
        tensor = np.asarray(get_tensor(key))
        if tuple(tensor.shape) != expected_hf:
            raise CheckpointMismatch(
                f"tensor '{key}' in {source} has shape {tuple(tensor.shape)}, but the architecture in its "
                f"config expects {expected_hf} for {type(model).__name__}"
            )
        value = tensor.T if transposed else tensor
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
        used.add(key)
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise CheckpointMismatch(f"{source} lacks tensors that {type(model).__name__} needs: {shown}")
    unused = sorted(n for n in names - used if not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        shown = ", ".join(unused[:8]) + (f" (+{len(unused) - 8} more)" if len(unused) > 8 else "")
        warnings.warn(f"{source}: {len(unused)} tensors unused by {type(model).__name__}: {shown}", stacklevel=3)
    nnx.update(model, state)
    return model
