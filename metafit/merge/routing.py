"""Composing experts' MLPs: activation interpolation and learned routing (Pari et al. 2024).

Experts fine-tuned from one base with **only MLP weights trained** share every other
weight, so at each layer ``i`` they differ only in their MLP ``f_e^i``. With ``z`` the
layer's (normalised) MLP input:

* activation interpolation: ``y = α f_A^i(z) + (1 − α) f_B^i(z)`` at every layer
  (weight interpolation instead averages the MLP *weights*: ``f^i_{αθ_A + (1−α)θ_B}``);
* per-layer routing: a router ``r_i(z) = softmax(W_i z + b_i)`` over the E experts, keep the
  top-k probabilities (renormalised), ``y = Σ_{e ∈ top-k} p_e f_e^i(z)``;
* multi-layer routing with window n: the router at layer ``i`` chooses among the MLPs of
  every expert at layers ``i .. i+n−1`` (shifted to stay inside the stack), E·n
  candidates, top-k = 2n; ``n = 1`` is per-layer routing.

Only the routers train (the experts are closed-over constants), through the one trainer
(:func:`fit_routers`). :func:`mlp_mask` selects the MLP weights for training the experts.

The forward pass is written for GPT-2 style blocks (``ln_1, attn, ln_2, mlp``; see
:class:`metafit.models.gpt2.GPT2LMHeadModel`) with a pluggable MLP, and returns every
block's residual stream (for CKA, :func:`metafit.merge.cka`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from metafit.tree import path_name
from metafit.models import layers as L
from metafit.train import TrainConfig, fit
from metafit.train.losses import lm_batch_loss
from metafit.train.metrics import MetricsWriter

Array = jax.Array
MlpFn = Callable[[int, Array], Array]  # (layer, normalised input) -> MLP output
TokenLoss = Callable[[Array, Any], Array]  # (logits, batch) -> scalar loss, e.g. metafit.train.losses.lm_batch_loss


def forward(model, ids: Array, mlp_fn: MlpFn | None = None) -> tuple[Array, list[Array]]:
    """Causal GPT-2 forward with the MLP of layer ``i`` replaced by ``mlp_fn(i, z)``.

    Returns:
      (logits ``[b, s, vocab]``, residual stream after each block ``[b, s, d]``).
    """
    t = model.transformer
    slots = jnp.arange(ids.shape[1])
    x = t.wte(ids) + t.wpe(jnp.broadcast_to(slots, ids.shape))
    allowed = L.attention_allowed(None, slots, slots, causal=True)
    hiddens = []
    for i, block in enumerate(t.h):
        attended, _, _ = block.attn(block.ln_1(x), allowed)
        x = x + attended
        z = block.ln_2(x)
        x = x + (block.mlp(z) if mlp_fn is None else mlp_fn(i, z))
        hiddens.append(x)
    return model.logits(t.ln_f(x)), hiddens


def expert_mlps(experts: Sequence[Any]) -> list[list[Any]]:
    """``[layer][expert]`` MLP modules of GPT-2 experts (the rest of each expert is unused)."""
    return [[e.transformer.h[i].mlp for e in experts] for i in range(len(experts[0].transformer.h))]


def interpolate_activations(mlps: list[list[Any]], alpha: float | Array) -> MlpFn:
    """``α f_A^i(z) + (1 − α) f_B^i(z)`` for two experts."""
    return lambda i, z: alpha * mlps[i][0](z) + (1.0 - alpha) * mlps[i][1](z)


def window(layer: int, n: int, num_layers: int) -> list[int]:
    """Layers ``i .. i+n−1`` a multi-layer router may use, shifted to stay inside the stack."""
    start = max(0, min(layer, num_layers - n))
    return list(range(start, start + n))


def top_k_gates(logits: Array, k: int) -> Array:
    """Softmax over the top-k logits (others get weight 0), along the last axis."""
    if k >= logits.shape[-1]:
        return jax.nn.softmax(logits, axis=-1)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jax.nn.softmax(jnp.where(logits >= kth, logits, -jnp.inf), axis=-1)


class Routers(nnx.Module):
    """One linear router per layer over ``num_candidates`` MLPs (E experts × n layers)."""

    def __init__(self, num_layers: int, features: int, num_candidates: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List([
            nnx.Linear(features, num_candidates, kernel_init=nnx.initializers.zeros, rngs=rngs)
            for _ in range(num_layers)
        ])


def routed(routers: Routers, mlps: list[list[Any]], n: int, k: int) -> MlpFn:
    """The MLP function of multi-layer routing with window ``n`` and top-``k`` gates.

    Zero-initialised routers start as the uniform average of the candidates.
    """
    num_layers = len(mlps)

    def mlp_fn(i, z):
        candidates = [mlp for j in window(i, n, num_layers) for mlp in mlps[j]]
        gates = top_k_gates(routers.layers[i](z), k)
        outputs = jnp.stack([mlp(z) for mlp in candidates], axis=-1)  # [b, s, d, C]
        return jnp.einsum("bsdc,bsc->bsd", outputs, gates)

    return mlp_fn


def mlp_mask(params: Any) -> Any:
    """Trainable mask (a pytree of bools like ``params``) that is True on the blocks' MLP weights only."""
    return jax.tree_util.tree_map_with_path(lambda path, _: ".mlp." in f".{path_name(path)}.", params)


def residual_streams(graphdef: nnx.GraphDef, ids: Array) -> Callable[[Any], list[Array]]:
    """Jitted ``params -> [b, s, d]`` residual stream after each block on the fixed inputs ``ids``.

    ``ids`` enter the compiled program as an argument, so every call for one architecture and
    input shape shares one compilation.
    """
    streams = _residual_streams_jit(graphdef)
    return lambda params: streams(params, ids)


@functools.lru_cache(maxsize=32)
def _residual_streams_jit(graphdef: nnx.GraphDef):
    return jax.jit(lambda params, ids: forward(nnx.merge(graphdef, params), ids)[1])


def answer_exact_match(logits: Array, batch) -> Array:
    """Fraction of the batch's strings whose every answer token (``loss_mask`` = 1) is the argmax prediction.

    Position ``t`` predicts token ``t + 1``; with teacher forcing, all answer tokens right is
    exactly what greedy decoding from the prompt would produce. A ``token_loss`` for :func:`forward_loss`.
    """
    right = jnp.argmax(logits[:, :-1], axis=-1) == batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, :-1] > 0
    return jnp.mean(jnp.all(right | ~mask, axis=-1).astype(jnp.float32))


@functools.lru_cache(maxsize=32)
def forward_loss(graphdef: nnx.GraphDef, token_loss: TokenLoss = lm_batch_loss) -> Callable[[Any, Any], Array]:
    """Jitted ``(params, batch) -> loss`` of the plain model.

    Cached per ``(graphdef, token_loss)``: equal architectures share one jitted function and its compilations.
    """
    return jax.jit(lambda params, batch: token_loss(forward(nnx.merge(graphdef, params), batch["input_ids"])[0], batch))


@functools.lru_cache(maxsize=32)
def interpolation_loss(graphdef: nnx.GraphDef, token_loss: TokenLoss = lm_batch_loss):
    """Jitted ``(params_a, params_b, alpha, batch) -> loss`` under activation interpolation of two experts.

    The non-MLP weights are expert A's (equal to B's when only MLPs were fine-tuned). Cached like
    :func:`forward_loss`.
    """

    @jax.jit
    def loss(params_a, params_b, alpha, batch):
        a, b = nnx.merge(graphdef, params_a), nnx.merge(graphdef, params_b)
        mlp_fn = interpolate_activations(expert_mlps([a, b]), alpha)
        return token_loss(forward(a, batch["input_ids"], mlp_fn)[0], batch)

    return loss


def fit_routers(graphdef: nnx.GraphDef, experts: Sequence[Any], data: Callable[[int], Any], config: TrainConfig, *,
                window: int, key: jax.Array, token_loss: TokenLoss = lm_batch_loss, name: str = "routers",
                log: MetricsWriter | None = None) -> tuple[Any, Callable[[Any, Any], Array]]:
    """Trains multi-layer routers (window ``n``, top-``2n`` gates) over frozen experts.

    The routers start at zero (the uniform average of the candidates); only they train, through
    :func:`metafit.train.fit` on ``data``. The experts' non-MLP weights are the first expert's.
    The experts enter the compiled step as frozen arguments, not as constants, so runs of one
    architecture, expert count, window and loss (early and late experts, a control) share one
    compiled step and one compiled evaluation.

    Args:
      graphdef: the experts' architecture (GPT-2 style).
      experts: the experts' parameters (two in the paper's setting).
      data: ``batch_at(step)`` of the target task.
      config: the trainer config of the router run.
      window: n (1 = per-layer routing); each router gates the top ``2n`` of the ``E·n`` candidates.
      key: the run's key.
      token_loss: ``(logits, batch) -> loss``.
      name, log: stage name and metrics writer.

    Returns:
      ``(router params, jitted (router params, batch) -> loss)``.
    """
    experts = list(experts)
    first = nnx.merge(graphdef, experts[0])
    num_layers, features = len(first.transformer.h), first.transformer.wte.features
    router_def, router_params = nnx.split(Routers(num_layers, features, len(experts) * window, rngs=nnx.Rngs(0)),
                                          nnx.Param)
    loss_fn, eval_loss = _router_losses(graphdef, router_def, window, token_loss)
    params = {"routers": router_params, "experts": experts}
    trainable = {"routers": jax.tree.map(lambda _: True, router_params), "experts": jax.tree.map(lambda _: False, experts)}
    result = fit(loss_fn, params, data, config, key=key, trainable=trainable, progress=False, name=name, log=log)
    return result.params["routers"], lambda router_params, batch: eval_loss(router_params, experts, batch)


@functools.lru_cache(maxsize=32)
def _router_losses(graphdef: nnx.GraphDef, router_def: nnx.GraphDef, window: int, token_loss: TokenLoss):
    """``(train loss {routers, experts}, jitted (routers, experts, batch) -> loss)``, one pair per setting.

    Cached: :func:`metafit.train.fit` reuses its compiled step for the same loss function object.
    """

    def routed_loss(router_params, experts, batch):
        models = [nnx.merge(graphdef, p) for p in experts]
        mlp_fn = routed(nnx.merge(router_def, router_params), expert_mlps(models), window, k=2 * window)
        return token_loss(forward(models[0], batch["input_ids"], mlp_fn)[0], batch)

    def loss_fn(params, batch, key):
        return routed_loss(params["routers"], params["experts"], batch), {}

    return loss_fn, jax.jit(routed_loss)
