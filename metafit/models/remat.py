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
from flax import nnx

REMAT_POLICIES = ("none", "block", "dots_saveable")
_active = ["none"]


@contextlib.contextmanager
def remat_policy(name: str) -> Iterator[None]:
    """Decoder blocks traced inside this context are rematerialised by policy ``name``."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy '{name}'; valid: {', '.join(REMAT_POLICIES)}")
    _active.append(name)
    try:
        yield
    finally:
        _active.pop()


def current_policy() -> str:
    return _active[-1]


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
