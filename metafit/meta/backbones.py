"""Meta-learning backbones (MLP, Conv4) and their functional view for pure learners.

Every backbone is an NNX module with a body (``features(x)``) and a linear
``head`` (the MLP is metafit's one :class:`metafit.models.mlp.MLP`), so learners
can adapt the head alone (ANIL), replace it with a closed-form solver (ProtoNet,
R2-D2), or adapt everything (MAML). :func:`build_backbone` builds one by name. Learners never
see the module: :func:`functional` splits it once into a :class:`Network` of pure
functions over a plain nested ``dict`` of parameters (keys are strings, so
checkpoints and tree paths are stable), and every meta-step re-merges inside jit.

Example:
    >>> net, params = functional(MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
    >>> net.apply(params, jnp.zeros((5, 1))).shape
    (5, 1)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from metafit.models.mlp import MLP

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
    return _network(graphdef, head_graphdef), state.to_pure_dict()


@functools.lru_cache(maxsize=64)
def _network(graphdef, head_graphdef) -> Network:
    """One :class:`Network` per backbone structure: learners built on it (and the jitted
    evaluation that takes a learner as a static argument) are then equal across runs, so a
    second run, a resumed run or a baseline evaluation of the same backbone compiles nothing new."""

    def apply(params: Params, x: Array) -> Array:
        return nnx.merge(graphdef, params)(x)

    def features(params: Params, x: Array) -> Array:
        return nnx.merge(graphdef, params).features(x)

    def head(head_params: Params, feats: Array) -> Array:
        return nnx.merge(head_graphdef, head_params)(feats)

    return Network(apply, features, head)


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


BACKBONES = ("mlp", "conv4")


def build_backbone(name: Literal["mlp", "conv4"], input_shape: Sequence[int], output_dim: int, *, seed: int,
                   widths: Sequence[int] = (40, 40), conv_hidden: int = 64,
                   conv_norm: Literal["batch", "layer", "none"] = "batch") -> tuple[Network, Params]:
    """The backbone ``name`` for inputs of ``input_shape`` as ``(Network, params)``, initialised from ``seed``.

    Args:
      name: ``mlp`` (inputs flattened; hidden ``widths``) or ``conv4`` (images ``(H, W, C)``;
        ``conv_hidden`` filters per block, ``conv_norm`` normalisation).
      input_shape: shape of one input, e.g. a task set's ``input_shape``.
      output_dim: outputs of the head (the ways, or the regression target size).
      seed: ``nnx.Rngs(seed)`` initialises the parameters.

    Raises:
      ValueError: an unknown name, or ``conv4`` on inputs that are not images.
    """
    rngs = nnx.Rngs(seed)
    if name == "mlp":
        return functional(MLP(math.prod(input_shape), widths, output_dim, rngs=rngs))
    if name != "conv4":
        raise ValueError(f"unknown backbone '{name}'; valid: {', '.join(BACKBONES)}")
    if len(input_shape) != 3:
        raise ValueError(f"conv4 needs image inputs (H, W, C); got inputs of shape {tuple(input_shape)}")
    return functional(Conv4(input_shape[-1], output_dim, hidden=conv_hidden, norm=conv_norm,
                            image_size=input_shape[0], rngs=rngs))
