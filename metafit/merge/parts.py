"""Per-tensor parts that merges are composed from: sparsify -> elect sign -> combine.

Every part acts on one tensor at a time. ``deltas`` is the list of the ``M`` models'
task vectors for that tensor (float32, same shape); ``weights`` has shape ``[M]``. A merge preset (see :mod:`metafit.merge.methods`)
is one choice of each part, as in mergekit's "generalised task arithmetic":

    δ̃_m = sparsify(δ_m)                      (top-k, random drop, breadcrumbs, none)
    s   = elect(w ⊙ δ̃)                       (sign of Σ_m w_m δ̃_m per entry, or none)
    a_m = [sign(δ̃_m) = s]                    (agreement mask; all ones without election)
    δ   = combine(w, δ̃, a)                   (sum, weighted mean, disjoint mean)
    θ   = θ_base + λ δ

Exact top-k. ``magnitude_mask`` keeps exactly ``k`` entries (ties at the
threshold broken toward the lower flat index) without sorting: the k-th largest
magnitude is found by bisection on its float bit pattern (non-negative IEEE
floats order like their int32 bit patterns), 31 counting passes that XLA fuses
and that shard like any reduction. Sorting (``argsort``/``top_k``) of a 28M-entry
embedding is much slower on CPU and materialises int64 indices.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def keep_count(density: float, size: int) -> int:
    """Entries kept by magnitude sparsification: ``max(1, floor(density * size))``.

    Computed on the host in float64 so it equals mergekit's ``int(density * numel)``.
    """
    if size == 0:
        return 0
    return max(1, int(density * size))


def _kth_largest_bits(bits: Array, k: Array) -> Array:
    """Largest ``t`` with ``#{bits >= t} >= k`` (bits: non-negative int32), by bisection."""

    def step(i, t):
        candidate = t | jnp.left_shift(jnp.int32(1), 30 - i)
        return jnp.where(jnp.sum(bits >= candidate, dtype=jnp.int32) >= k, candidate, t)

    return lax.fori_loop(0, 31, step, jnp.int32(0))


def _last_kept_tie(mask: Array, m: Array) -> Array:
    """Index of the ``m``-th True entry of a flat boolean ``mask``."""
    index = jnp.arange(mask.size, dtype=jnp.int32)
    nbits = max(1, int(mask.size - 1).bit_length())

    # Largest cutoff j with #{mask & index < j} < m: index j is then the m-th True entry.
    def step(i, j):
        candidate = j | jnp.left_shift(jnp.int32(1), nbits - 1 - i)
        return jnp.where(jnp.sum(mask & (index < candidate), dtype=jnp.int32) < m, candidate, j)

    return lax.fori_loop(0, nbits, step, jnp.int32(0))


def magnitude_threshold(x: Array, k: Array | int) -> tuple[Array, Array]:
    """The cut that keeps the ``k`` largest ``|x|`` entries: ``(threshold bits, last tie index)``.

    Entry ``j`` is kept iff ``bits_j > t`` or (``bits_j == t`` and ``j <= last``), see
    :func:`keep_mask`. Only scalars come out, so a caller can recompute the mask elementwise
    (fused into the merge) instead of holding one mask or trimmed copy per model.
    """
    bits = _magnitude_bits(x)
    k = jnp.asarray(k, jnp.int32)
    threshold = _kth_largest_bits(bits, k)
    ties = bits == threshold
    missing = k - jnp.sum(bits > threshold, dtype=jnp.int32)
    # Resolving ties costs another bisection; skip it when the tie set fits exactly (the usual
    # case for float32 task vectors).
    needs_tie_break = jnp.sum(ties, dtype=jnp.int32) > missing
    last = lax.cond(needs_tie_break, lambda: _last_kept_tie(ties, missing), lambda: jnp.int32(x.size))
    # k = 0 keeps nothing: a threshold above every bit pattern.
    return jnp.where(k > 0, threshold, jnp.int32(2**31 - 1)), jnp.where(k > 0, last, jnp.int32(-1))


def keep_mask(x: Array, threshold: Array, last: Array) -> Array:
    """Elementwise mask of :func:`magnitude_threshold`'s cut (shape of ``x``)."""
    bits = _magnitude_bits(x).reshape(x.shape)
    index = jnp.arange(x.size, dtype=jnp.int32).reshape(x.shape)
    return (bits > threshold) | ((bits == threshold) & (index <= last))


def magnitude_mask(x: Array, k: Array | int) -> Array:
    """Boolean mask of the ``k`` largest ``|x|`` entries (exactly ``k``; ties -> lower index).

    Args:
      x: any-shape float array.
      k: number of entries to keep, ``0 <= k <= x.size`` (may be traced).
    Returns:
      bool array of ``x.shape``.
    """
    return keep_mask(x, *magnitude_threshold(x, k))


def _magnitude_bits(x: Array) -> Array:
    return lax.bitcast_convert_type(jnp.abs(x.reshape(-1).astype(jnp.float32)), jnp.int32)


# ----------------------------------------------------------------------------- sparsify
# One task-vector tensor in, one out. Magnitude rules find scalar cuts first and then apply
# them elementwise, so XLA fuses the whole merge into one pass over the entries.


def sparsify_magnitude(delta: Array, k: Array | int) -> Array:
    """TIES trim: keep the ``k`` largest-magnitude entries of one task vector tensor."""
    return jnp.where(keep_mask(delta, *magnitude_threshold(delta, k)), delta, 0.0)


def sparsify_breadcrumbs(delta: Array, k_keep: Array | int, k_top: Array | int) -> Array:
    """Model Breadcrumbs: drop the ``k_top`` largest outliers, keep the next ``k_keep``.

    ``k_top = floor(γ n)`` (γ = fraction of largest entries removed), ``k_keep = floor(density n)``;
    entries ranked ``k_top < rank <= k_top + k_keep`` by magnitude survive.
    """
    window = keep_mask(delta, *magnitude_threshold(delta, k_top + k_keep)) & ~keep_mask(
        delta, *magnitude_threshold(delta, k_top))
    return jnp.where(window, delta, 0.0)


def sparsify_random(delta: Array, drop_rate: Array | float, key: Array, rescale: bool = True) -> Array:
    """DARE: drop each entry with probability ``p``, rescale survivors by ``1 / (1 - p)``.

    With the rescale, ``E[sparsify(δ)] = δ``; ``p = 0`` returns ``δ`` exactly.
    """
    keep_prob = 1.0 - jnp.asarray(drop_rate, jnp.float32)
    keep = jax.random.bernoulli(key, keep_prob, delta.shape)
    kept = jnp.where(keep, delta, 0.0)
    return kept / keep_prob if rescale else kept


# ----------------------------------------------------------------------------- elect sign
# Models come as a list of same-shape tensors (not a stacked [M, ...] array): the list keeps
# the merge elementwise, so XLA need not materialise M-times-the-tensor temporaries.


def elect_sign_sum(weighted_deltas: Sequence[Array]) -> Array:
    """TIES sign election: ``s = sign(Σ_m w_m δ̃_m)``, ties at 0 elect ``+1``."""
    return jnp.where(sum(weighted_deltas) >= 0, 1.0, -1.0)


def elect_sign_count(weighted_deltas: Sequence[Array]) -> Array:
    """Majority vote of signs (each model one vote), ties elect ``+1``."""
    return jnp.where(sum(jnp.sign(d) for d in weighted_deltas) >= 0, 1.0, -1.0)


def agreement(deltas: Sequence[Array], sign: Array) -> list[Array]:
    """``a_m = [sign(δ̃_m) = s]``: zero (trimmed) entries agree with nothing."""
    return [(jnp.sign(d) == sign).astype(d.dtype) for d in deltas]


# ----------------------------------------------------------------------------- combine


def combine_sum(deltas: Sequence[Array], weights: Array, agree: Sequence[Array] | None = None) -> Array:
    """Task arithmetic: ``Σ_m a_m w_m δ̃_m``."""
    if agree is None:
        return sum(w * d for w, d in zip(weights, deltas))
    return sum(w * d * a for w, d, a in zip(weights, deltas, agree))


def combine_mean(deltas: Sequence[Array], weights: Array, agree: Sequence[Array] | None = None) -> Array:
    """Weighted mean ``Σ_m w_m δ̃_m / Σ_m w_m`` (agreement ignored; guards Σw ≈ 0)."""
    total = jnp.sum(weights)
    total = jnp.where(jnp.abs(total) < 1e-8, 1.0, total)
    return combine_sum(deltas, weights) / total


def combine_disjoint_mean(deltas: Sequence[Array], weights: Array, agree: Sequence[Array] | None = None) -> Array:
    """TIES disjoint mean: ``Σ_m a_m w_m δ̃_m / Σ_m a_m w_m`` per entry (0/0 -> 0)."""
    if agree is None:
        return combine_mean(deltas, weights)
    divisor = sum(w * a for w, a in zip(weights, agree))
    divisor = jnp.where(divisor == 0, 1.0, divisor)
    return combine_sum(deltas, weights, agree) / divisor


SPARSIFIERS = ("none", "magnitude", "random", "breadcrumbs")
ELECTIONS = {"none": None, "sum": elect_sign_sum, "count": elect_sign_count}
COMBINERS = {"sum": combine_sum, "mean": combine_mean, "disjoint_mean": combine_disjoint_mean}
