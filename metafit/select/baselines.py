r"""Data-selection baselines DELIFT is compared with; each returns pool indices (best first).

=====================  ============================================================================
baseline               rule
=====================  ============================================================================
``random``             a uniform random subset (from a ``jax.random`` key)
``self_uncertainty``   SelectIT-style: the model rates its own training pairs; keep the pairs whose
                       response it is most sure of, lowest :math:`-\frac1T\sum_t\log p(y_t|x)`
                       (no-example prompt; the same pass as DELIFT's baseline column)
``gradient``           LESS-style: per-example LoRA gradients of the response loss, a Gaussian
                       random projection to ``dim`` features, L2-normalised; score = mean cosine to
                       the target set's features (the pool itself when there is no target)
``kmeans``             DEFT-UCS-style: k-means on sentence embeddings; from each cluster a share of
                       the budget proportional to its size, half nearest its centroid (easy), half
                       farthest (hard)
``embedding kernel``   DELIFT(SE): the same submodular objectives on the min-max scaled cosine
                       similarity of sentence embeddings (:func:`embedding_kernel`)
=====================  ============================================================================

LESS warms its LoRA up first; here the adapter is fresh (``B = 0``), so only the ``B`` factors
have gradients: :math:`\nabla_B L = \sum_t \delta_t (A x_t)^\top`, a random-feature sketch of the
per-example (input, output-gradient) products.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit import peft
from metafit.data.instructions import Instruction, encode_sft
from metafit.train.losses import next_token_loss

from .objectives import _check_budget
from .utility import similarity_from_utility


def random_subset(n: int, budget: int, *, key: jax.Array) -> np.ndarray:
    """``budget`` distinct indices drawn uniformly from ``range(n)``."""
    _check_budget(budget, n)
    return np.asarray(jax.random.permutation(key, n)[:budget])


def top_scores(scores, budget: int) -> np.ndarray:
    """Indices of the ``budget`` largest scores, largest first (ties: lowest index)."""
    scores = np.asarray(scores, np.float64)
    _check_budget(budget, len(scores))
    return np.argsort(-scores, kind="stable")[:budget]


def self_uncertainty_subset(uncertainty, budget: int) -> np.ndarray:
    """SelectIT-style: the ``budget`` pairs with the lowest self-uncertainty."""
    return top_scores(-np.asarray(uncertainty, np.float64), budget)


def embedding_kernel(embeddings, others=None) -> np.ndarray:
    """Min-max scaled cosine similarity ``[n, m]`` of row embeddings (``others`` default: the same rows)."""
    a = _normalise(embeddings)
    b = a if others is None else _normalise(others)
    return similarity_from_utility(a @ b.T, exclude_diagonal=others is None)


def _normalise(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kmeans_subset(embeddings, budget: int, *, clusters: int = 8, seed: int = 0) -> np.ndarray:
    """DEFT-UCS-style: per k-means cluster, half the share nearest the centroid and half farthest."""
    from sklearn.cluster import KMeans

    x = _normalise(embeddings)
    _check_budget(budget, len(x))
    fit = KMeans(n_clusters=min(clusters, len(x)), n_init=4, random_state=seed).fit(x)
    distance = np.linalg.norm(x - fit.cluster_centers_[fit.labels_], axis=1)
    sizes = np.bincount(fit.labels_)
    shares = np.floor(budget * sizes / len(x)).astype(int)
    for c in np.argsort(-(budget * sizes / len(x) - shares), kind="stable")[: budget - shares.sum()]:
        shares[c] += 1  # largest remainders get the leftover budget
    chosen = []
    for c, share in enumerate(shares):
        members = np.flatnonzero(fit.labels_ == c)[np.argsort(distance[fit.labels_ == c], kind="stable")]
        easy = share - share // 2
        chosen += list(members[:easy]) + list(members[::-1][: share // 2][::-1] if share // 2 else [])
    return np.array(chosen[:budget])


def gradient_features(model, tokenizer, examples: Sequence[Instruction], *, lora: peft.LoraConfig, dim: int = 256,
                      key: jax.Array, buckets: Sequence[int] = (64, 128), batch_size: int = 16) -> np.ndarray:
    """LESS-style features ``[n, dim]``: projected, normalised per-example LoRA gradients."""
    adapted = peft.apply(nnx.clone(model), lora, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 2**31 - 1))))
    graphdef, adapter, frozen = peft.split(adapted)
    sizes = [leaf.size for leaf in jax.tree.leaves(adapter)]
    projection = jax.random.normal(jax.random.fold_in(key, 1), (sum(sizes), dim)) / np.sqrt(dim)
    arrays = encode_sft(tokenizer, examples, buckets)
    n = len(examples)
    padded = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], -n % batch_size, 0)]), arrays)
    out = [np.asarray(_sketch(graphdef, adapter, frozen, projection,
                              jax.tree.map(lambda a: jnp.asarray(a[s:s + batch_size]), padded)))
           for s in range(0, n, batch_size)]
    return _normalise(np.concatenate(out)[:n])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sketch(graphdef, adapter, frozen, projection, batch) -> jax.Array:
    """Projected per-example adapter gradients ``[b, dim]``.

    The weights and the projection are arguments, not closed over: captured as constants they were
    folded at compile time (3 GB and minutes for SmolLM2-135M with LoRA on every linear layer, whose
    projection alone is 2.4M x 256 floats), and every call recompiled.
    """
    loss_fn = next_token_loss(graphdef)

    def one(adapter_params, row):
        params = nnx.merge_state(adapter_params, frozen)
        return loss_fn(params, jax.tree.map(lambda a: a[None], row), None)[0]

    grads = jax.vmap(jax.grad(one), in_axes=(None, 0))(adapter, batch)
    flat = jnp.concatenate([g.reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)], axis=1)
    return flat @ projection


def gradient_subset(pool_features, budget: int, target_features=None) -> np.ndarray:
    """LESS-style: the pool rows with the highest mean cosine to the target features."""
    target = pool_features if target_features is None else target_features
    return top_scores(_normalise(pool_features) @ _normalise(target).mean(0), budget)
