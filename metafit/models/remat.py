"""Rematerialisation of decoder blocks during training (``train.remat``).

Backpropagation keeps every block's intermediate activations until the backward pass reaches
it. Rematerialisation (gradient checkpointing, Chen et al. 2016) keeps less and recomputes the
rest in the backward pass:

* ``none``: keep everything (fastest; memory grows with layers x tokens x intermediate size);
* ``block``: keep only each block's input and recompute the block (one extra forward pass,
  about +33 % FLOPs; activation memory of one block plus one ``[b, s, hidden]`` per layer);
* ``dots_saveable``: keep the matmul outputs and recompute only the elementwise work (norms,
  activations, softmax), a middle ground.

:func:`metafit.train.fit` sets the policy from ``TrainConfig.remat`` while it traces the loss
(:func:`remat_policy`), and the decoder stacks wrap each block through :func:`maybe_remat`, so
any loss that calls a metafit model gets it without changing the model or the loss.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = ("none", "block", "dots_saveable")
_active = [("none", False)]


@contextlib.contextmanager
def remat_policy(name: str, scan_layers: bool = False) -> Iterator[None]:
    """Decoder blocks traced inside this context are rematerialised by policy ``name``.

    With ``scan_layers``, the Llama stack runs its blocks as one ``lax.scan`` over their stacked
    states (see :func:`scan_blocks`), so XLA compiles one block instead of every layer.
    """
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy '{name}'; valid: {', '.join(REMAT_POLICIES)}")
    _active.append((name, bool(scan_layers)))
    try:
        yield
    finally:
        _active.pop()


def current_policy() -> str:
    return _active[-1][0]


def scanning() -> bool:
    return _active[-1][1]


def scan_blocks(call: Callable, blocks, x, per_layer_inputs, stacked=None):
    """``x`` through ``call(block_i, x, *per_layer_inputs[i])`` for every block, as one ``lax.scan``.

    The blocks' states are stacked inside the traced function (the module tree, and so every
    ``model.layers[i]`` path that PEFT targets, sharding rules and checkpoints use, is unchanged);
    ``per_layer_inputs[i]`` (e.g. each layer's mask and attention bias) are stacked alongside.

    ``stacked``: a pytree whose arrays already have a leading layer axis (the KV cache during
    generation); layer ``i`` gets its slice ``stacked[i]`` as the last argument, ``call`` returns
    ``(x, y_i)`` and the result is ``(x, ys)`` with the ``y_i`` stacked the same way.

    Returns None when the blocks differ in structure (e.g. LoRA on some layers only) or their
    inputs do not stack; the caller then runs them one by one.
    """
    splits = [nnx.split(block) for block in blocks]
    graphdef = splits[0][0]
    if any(g != graphdef for g, _ in splits[1:]):
        return None
    leaves = [jax.tree.structure(inputs) for inputs in per_layer_inputs]
    if any(structure != leaves[0] for structure in leaves[1:]):
        return None
    try:
        states = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in splits])
        inputs = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer_inputs)
    except (ValueError, TypeError):  # shapes differ between layers
        return None
    block_call = maybe_remat(call)

    def body(h, layer):
        state, layer_inputs, layer_stacked = layer
        if stacked is None:
            return block_call(nnx.merge(graphdef, state), h, *layer_inputs), None
        return block_call(nnx.merge(graphdef, state), h, *layer_inputs, layer_stacked)

    h, ys = jax.lax.scan(body, x, (states, inputs, stacked))
    return h if stacked is None else (h, ys)


def maybe_remat(call: Callable) -> Callable:
    """``call(module, *arrays)`` rematerialised under the active policy (unchanged for ``none``).

    The module enters ``jax.checkpoint`` as its split state and is merged inside, a pure function:
    nothing is written back to the module (a forward pass changes no state), so this works for
    models merged from states created outside the trace, where ``nnx.remat``'s write-back fails.
    """
    name = current_policy()
    if name == "none":
        return call
    policy = jax.checkpoint_policies.dots_saveable if name == "dots_saveable" else None

    def rematerialised(module, *args):
        graphdef, state = nnx.split(module)
        pure = lambda state, *args: call(nnx.merge(graphdef, state), *args)  # noqa: E731
        return jax.checkpoint(pure, policy=policy)(state, *args)

    return rematerialised
