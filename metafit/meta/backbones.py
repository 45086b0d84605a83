"""Meta-learning backbones (MLP, Conv4) and their functional view for pure learners.

Every backbone is an NNX module with a ``body`` (``features(x)``) and a linear
``head``, so learners can adapt the head alone (ANIL), replace it with a
closed-form solver (ProtoNet, R2-D2), or adapt everything (MAML). Learners never
see the module: :func:`functional` splits it once into a :class:`Network` of pure
functions over a plain nested ``dict`` of parameters (keys are strings, so
checkpoints and tree paths are stable), and every meta-step re-merges inside jit.

Example:
    >>> net, params = functional(MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
    >>> net.apply(params, jnp.zeros((5, 1))).shape
    (5, 1)
"""
from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Params = Any
Array = jax.Array


class Network(NamedTuple):
    """A backbone as pure functions of a parameter dict ``{"body": ..., "head": ...}``.

    Attributes:
      apply: ``(params, x[n, ...]) -> outputs[n, out]``.
      features: ``(params, x) -> features[n, d]`` (the body only).
      head: ``(head_params, features) -> outputs`` (the linear head only).
    """

    apply: Callable[[Params, Array], Array]
    features: Callable[[Params, Array], Array]
    head: Callable[[Params, Array], Array]


def functional(model: nnx.Module) -> tuple[Network, Params]:
    """Splits an NNX backbone (with ``features`` and ``head``) into a :class:`Network` and its params.

    Only ``nnx.Param`` variables are parameters; the backbones here hold no other
    state (their batch norm uses batch statistics, see :class:`Conv4`).
    """
    graphdef, state = nnx.split(model, nnx.Param)
    head_graphdef, _ = nnx.split(model.head, nnx.Param)

    def apply(params: Params, x: Array) -> Array:
        return nnx.merge(graphdef, params)(x)

    def features(params: Params, x: Array) -> Array:
        return nnx.merge(graphdef, params).features(x)

    def head(head_params: Params, feats: Array) -> Array:
        return nnx.merge(head_graphdef, head_params)(feats)

    return Network(apply, features, head), state.to_pure_dict()


class MLP(nnx.Module):
    """``in -> widths -> out`` with ReLU; e.g. the 1-40-40-1 sinusoid regressor of MAML.

    Args:
      in_features: input size (inputs are flattened after the batch axis).
      widths: hidden sizes (the body); the head maps ``widths[-1] -> out_features``.
      out_features: output size.
      rngs: NNX random streams (keyword-only).
    """

    def __init__(self, in_features: int, widths: Sequence[int], out_features: int, *, rngs: nnx.Rngs,
                 activation: Callable[[Array], Array] = jax.nn.relu):
        sizes = [in_features, *widths]
        self.depth = len(widths)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            setattr(self, f"dense{i}", nnx.Linear(a, b, rngs=rngs))  # string names: stable tree paths
        self.head = nnx.Linear(sizes[-1], out_features, rngs=rngs)
        self.activation = activation

    def features(self, x: Array) -> Array:
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            x = self.activation(getattr(self, f"dense{i}")(x))
        return x

    def __call__(self, x: Array) -> Array:
        return self.head(self.features(x))


class ConvBlock(nnx.Module):
    """3x3 conv -> normalisation -> ReLU -> 2x2 max-pool (the block of Vinyals et al. / MAML)."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: str, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), padding="SAME", rngs=rngs)
        self.norm = norm
        if norm != "none":
            self.scale = nnx.Param(jnp.ones((out_channels,)))
            self.bias = nnx.Param(jnp.zeros((out_channels,)))

    def __call__(self, x: Array) -> Array:
        x = self.conv(x)
        if self.norm != "none":
            # "batch": statistics of the current batch, never running averages -- the
            # transductive batch norm of MAML's reference code, which keeps the network
            # a pure function of (params, x). "layer": per-example statistics.
            axes = (0, 1, 2) if self.norm == "batch" else (1, 2, 3)
            mean = x.mean(axes, keepdims=True)
            var = x.var(axes, keepdims=True)
            x = (x - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]
        x = jax.nn.relu(x)
        return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class Conv4(nnx.Module):
    """Four conv blocks and a linear head: the few-shot image backbone (Omniglot/miniImageNet).

    A 28x28 input is pooled to 2x2 (``SAME`` pooling: 28 -> 14 -> 7 -> 4 -> 2), so
    the feature size is ``4 * hidden``.

    Args:
      in_channels: input channels (1 for glyphs and digits).
      num_classes: head outputs (the ways).
      hidden: filters per block (64 in the papers).
      norm: ``"batch"`` (transductive, as MAML), ``"layer"`` (per example) or ``"none"``.
      image_size: input height/width, used to size the head.
      rngs: NNX random streams (keyword-only).
    """

    def __init__(self, in_channels: int, num_classes: int, *, hidden: int = 64,
                 norm: Literal["batch", "layer", "none"] = "batch", image_size: int = 28, rngs: nnx.Rngs):
        if norm not in ("batch", "layer", "none"):
            raise ValueError(f"Conv4: norm must be 'batch', 'layer' or 'none', got {norm!r}")
        for i in range(4):
            setattr(self, f"block{i}", ConvBlock(in_channels if i == 0 else hidden, hidden, norm=norm, rngs=rngs))
        side = image_size
        for _ in range(4):
            side = -(-side // 2)
        self.head = nnx.Linear(hidden * side * side, num_classes, rngs=rngs)

    def features(self, x: Array) -> Array:
        for i in range(4):
            x = getattr(self, f"block{i}")(x)
        return x.reshape(x.shape[0], -1)

    def __call__(self, x: Array) -> Array:
        return self.head(self.features(x))
