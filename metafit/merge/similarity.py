"""Centered kernel alignment between representations (Kornblith et al. 2019).

For features ``X ∈ R^{n×p}``, ``Y ∈ R^{n×q}`` of the same ``n`` inputs, linear kernels
``K = XXᵀ``, ``L = YYᵀ`` and centring ``H = I − 11ᵀ/n``:

    HSIC(K, L) = tr(KHLH) / (n−1)²,      CKA = HSIC(K, L) / √(HSIC(K, K) HSIC(L, L)).

With column-centred features ``X̄ = HX`` this is ``‖ȲᵀX̄‖²_F / (‖X̄ᵀX̄‖_F ‖ȲᵀȲ‖_F)``, which
costs ``O(n p q)`` instead of ``O(n²)`` memory. CKA is invariant to orthogonal transforms
and isotropic scaling of either representation, and equals 1 for ``X = Y``.

The debiased variant replaces HSIC by the unbiased estimator of Song et al. (2012), as in
Nguyen et al. (2021): with ``K̃, L̃`` the kernels with zeroed diagonals,

    HSIC_u = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).

It removes the upward bias of linear CKA when ``p`` is large relative to ``n``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from metafit.tree import path_name

Array = jax.Array


def _flatten(x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(x.shape[0], -1)


@jax.jit
def cka(x: Array, y: Array) -> Array:
    """Linear CKA between ``x [n, ...]`` and ``y [n, ...]`` (trailing axes are flattened).

    Example:
        >>> cka(h_a, h_b)    # hidden states of two models on the same probe batch
    """
    x, y = _flatten(x), _flatten(y)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = jnp.sum((y.T @ x) ** 2)
    return cross / (jnp.linalg.norm(x.T @ x) * jnp.linalg.norm(y.T @ y))


def _unbiased_hsic(k: Array, l: Array) -> Array:
    n = k.shape[0]
    k = k * (1.0 - jnp.eye(n, dtype=k.dtype))
    l = l * (1.0 - jnp.eye(n, dtype=l.dtype))
    trace = jnp.sum(k * l)
    sums = jnp.sum(k) * jnp.sum(l) / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * jnp.sum(k.sum(axis=0) * l.sum(axis=0))
    return (trace + sums - cross) / (n * (n - 3))


@jax.jit
def cka_debiased(x: Array, y: Array) -> Array:
    """Debiased linear CKA (unbiased HSIC estimator; needs ``n >= 4``)."""
    x, y = _flatten(x), _flatten(y)
    k, l = x @ x.T, y @ y.T
    return _unbiased_hsic(k, l) / jnp.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(l, l))


def layer_cka(hiddens_a, hiddens_b) -> list[float]:
    """Linear CKA per layer between two models' hidden states ``[b, s, d]`` on the same inputs.

    Every token position is one sample (``b·s`` rows of ``d`` features).
    """
    return [float(cka(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))) for a, b in zip(hiddens_a, hiddens_b)]


def relative_change(base, params, include=lambda name: True) -> float:
    """Mean over the selected tensors of ``‖θ − θ_base‖_F / ‖θ_base‖_F``: how far a model moved from its base.

    Args:
      base, params: pytrees of the same structure (e.g. ``nnx.state(model, nnx.Param)``).
      include: ``path name -> bool`` choosing the tensors (e.g. the LoRA targets).
    """
    named = lambda tree: {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    base_leaves, leaves = named(base), named(params)
    if base_leaves.keys() != leaves.keys():
        raise ValueError(f"relative_change: the two models' parameter names differ "
                         f"(only in one: {sorted(base_leaves.keys() ^ leaves.keys())[:5]})")
    ratios = [float(jnp.linalg.norm(jnp.asarray(leaves[name], jnp.float32) - jnp.asarray(b, jnp.float32))
                    / jnp.linalg.norm(jnp.asarray(b, jnp.float32)))
              for name, b in base_leaves.items() if include(name)]
    if not ratios:
        raise ValueError("relative_change: no tensor selected; check the include predicate against the parameter names")
    return sum(ratios) / len(ratios)
