"""Shared parts of metafit.peft: variable types, the gated-wrapper base, target selection.

Variable types (selected by TYPE, never by name):

* every adapter weight is a subclass of :class:`flax.nnx.LoRAParam`, so
  ``nnx.split(model, nnx.LoRAParam, ...)`` gives exactly the trainable PEFT state
  (``nnx.LoRAParam`` itself is used for LoRA's A and B);
* :class:`Gate` (an ``nnx.Variable``, not a ``Param``) holds each PEFT module's gate,
  so it is never trained and travels in the "rest" state through ``nnx.split``/``merge``.

Module wrappers keep the wrapped module as the child ``base_layer`` (the name HF PEFT
uses), so a wrapped projection's base weight lives at ``...q_proj.base_layer.kernel``.
"""
from __future__ import annotations

import contextlib
import fnmatch
import re
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.tree import path_name

PathKey = tuple[Any, ...]

_dropout_active = [False]


@contextlib.contextmanager
def dropout_enabled(active: bool = True) -> Iterator[None]:
    """PEFT dropout (LoRA's ``dropout``) applies only to forward passes traced inside this context.

    :func:`metafit.train.fit` enters it while it traces the loss, so adapters are regularised in
    training steps and nowhere else: evaluation, scoring, generation, serving and export see the
    deterministic model without a ``model.eval()`` call to forget. A loop of your own enters it
    around its loss. The flag is read when a forward is traced: a function jitted outside the
    context keeps its dropout-free trace. ``model.eval()`` (``deterministic=True``) still turns dropout off inside it.
    """
    _dropout_active.append(bool(active))
    try:
        yield
    finally:
        _dropout_active.pop()


def dropout_is_enabled() -> bool:
    """Whether a forward traced now applies PEFT dropout (see :func:`dropout_enabled`)."""
    return _dropout_active[-1]


class PeftParam(nnx.LoRAParam):
    """Base type of all non-LoRA adapter weights (a LoRAParam, so ``nnx.LoRAParam`` selects it)."""


class DoRAMagnitude(PeftParam):
    """DoRA's per-output-row magnitude vector m."""


class AdapterParam(PeftParam):
    """Bottleneck-adapter weights."""


class PrefixParam(PeftParam):
    """Prefix-tuning key/value vectors."""


class BitFitParam(PeftParam):
    """BitFit bias offsets (trained bias minus the frozen original bias)."""


class IA3Param(PeftParam):
    """IA3 rescaling vectors."""


class Gate(nnx.Variable):
    """A PEFT module's gate g: its contribution is scaled by g (1 = plain PEFT, 0 = base model).

    Shape ``()`` (one gate for the batch) or ``[batch]`` / ``[batch, seq]`` (per sample / token);
    broadcast against the contribution from the left (see :func:`broadcast_gate`).
    """


def check_weights(weights: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], dtype,
                  what: str) -> dict[str, jnp.ndarray]:
    """Given adapter weights as arrays of ``dtype``, after checking their names and shapes against ``shapes``."""
    if set(weights) != set(shapes):
        raise ValueError(f"{what} takes weights {sorted(shapes)}, got {sorted(weights)}")
    wrong = {k: tuple(jnp.shape(v)) for k, v in weights.items() if tuple(jnp.shape(v)) != tuple(shapes[k])}
    if wrong:
        raise ValueError(f"{what}: " + ", ".join(f"{k} has shape {s}, expected {tuple(shapes[k])}"
                                                 for k, s in wrong.items()))
    return {k: jnp.asarray(v, dtype) for k, v in weights.items()}


def filled(shape: tuple[int, ...], dtype: Any, value: float) -> jax.Array:
    """A constant array put on the device from the host.

    Eager ``jnp.zeros``/``jnp.ones`` compile one XLA program per shape; a PEFT method applied
    to a model with many differently shaped targets would compile a dozen tiny programs. So does
    ``jnp.asarray`` of a numpy array (JAX >= 0.10 lifts it with an eager ``lax.stage``);
    ``jax.device_put`` only copies.
    """
    return jax.device_put(np.full(shape, value, dtype))


def new_gate() -> Gate:
    return Gate(jnp.ones((), jnp.float32))


def broadcast_gate(gate: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
    """Reshapes gate ``[*lead]`` to ``[*lead, 1, ..., 1]`` so it multiplies ``like [*lead, ...]``."""
    gate = jnp.asarray(gate, like.dtype)
    if gate.ndim > like.ndim:
        raise ValueError(f"gate of shape {gate.shape} has more axes than the activation {like.shape}")
    return gate.reshape(gate.shape + (1,) * (like.ndim - gate.ndim))


class PeftModule(nnx.Module):
    """Base class of every gated PEFT module (wrappers and prefixes). Has ``self.gate: Gate``."""

    gate: Gate

    def gate_like(self, like: jnp.ndarray) -> jnp.ndarray:
        return broadcast_gate(self.gate.get_value(), like)


class PeftWrapper(PeftModule):
    """A PEFT module that wraps ``base_layer`` and is called in its place."""

    base_layer: nnx.Module

    def merged(self) -> nnx.Module:
        """Returns ``base_layer`` with this adapter folded in (the gate's scalar value applied).

        Raises for methods that cannot be folded into the base weights (adapters, prefixes).
        """
        raise TypeError(f"{type(self).__name__} cannot be merged into its base layer")


# ----------------------------------------------------------------------------- paths


def path_str(path: PathKey) -> str:
    """Dotted path of a module, leaving out ``base_layer`` links of PEFT wrappers."""
    return path_name(path, skip=("base_layer",))


def _compile(pattern: str):
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda path: regex.fullmatch(path) is not None
    if any(ch in pattern for ch in "*?["):
        return lambda path: fnmatch.fnmatchcase(path, pattern)
    return lambda path: path == pattern or path.endswith("." + pattern)


def matches_any(path: str, patterns: Iterable[str]) -> bool:
    return any(_compile(p)(path) for p in patterns)


def _has_type_name(module: object, names: Iterable[str]) -> bool:
    names = set(names)
    return any(cls.__name__ in names for cls in type(module).__mro__)


def iter_modules(model: nnx.Module) -> Iterator[tuple[PathKey, nnx.Module]]:
    """All modules (each once), in NNX's deterministic graph order (attributes sorted, ints numerically)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            yield tuple(path), node


def select_modules(
    model: nnx.Module,
    targets: Iterable[str],
    target_types: Iterable[str],
    exclude: Iterable[str] = (),
) -> list[tuple[PathKey, nnx.Module]]:
    """Modules whose type is in ``target_types`` and whose path matches ``targets`` (empty = all)."""
    targets, target_types, exclude = tuple(targets), tuple(target_types), tuple(exclude)
    if not target_types:
        raise ValueError("target_types is empty: name the module classes to wrap, e.g. ('Linear',)")
    chosen = []
    for path, module in iter_modules(model):
        name = path_str(path)
        if isinstance(module, PeftModule) or not _has_type_name(module, target_types):
            continue
        if targets and not matches_any(name, targets):
            continue
        if exclude and matches_any(name, exclude):
            continue
        chosen.append((path, module))
    return chosen


def _child(parent: Any, key: Any) -> Any:
    if isinstance(key, int) or isinstance(parent, dict) or isinstance(parent, nnx.Dict):
        return parent[key]
    return getattr(parent, key)


def get_at(model: nnx.Module, path: PathKey) -> Any:
    node = model
    for key in path:
        node = _child(node, key)
    return node


def set_at(model: nnx.Module, path: PathKey, value: Any) -> None:
    """Replaces the node at ``path`` (attribute, list index or dict key) by ``value``."""
    if not path:
        raise ValueError("cannot replace the root module; wrap a submodule instead")
    parent = get_at(model, path[:-1])
    key = path[-1]
    if isinstance(key, int) or isinstance(parent, dict) or isinstance(parent, nnx.Dict):
        parent[key] = value
    else:
        setattr(parent, key, value)


def peft_modules(model: nnx.Module) -> list[tuple[PathKey, PeftModule]]:
    """All gated PEFT modules of ``model`` with their paths, in graph order (the gate order)."""
    return [(p, m) for p, m in iter_modules(model) if isinstance(m, PeftModule)]


def wrap_selected(model, selected, make_wrapper) -> list[str]:
    """Replaces each selected ``(path, module)`` by ``make_wrapper(path, module)``; returns the paths."""
    if not selected:
        raise ValueError(
            "no module matched the PEFT targets; list the module paths with "
            "[metafit.peft.core.path_str(p) for p, _ in metafit.peft.core.iter_modules(model)]"
        )
    names = []
    for path, module in selected:
        set_at(model, path, make_wrapper(path, module))
        names.append(path_str(path))
    return names


def kernel_of(module: nnx.Module) -> nnx.Variable:
    """The ``[in, out]`` kernel of a Linear-like module (raises with a clear message otherwise)."""
    kernel = getattr(module, "kernel", None)
    if kernel is None or kernel.get_value().ndim != 2:
        raise TypeError(
            f"{type(module).__name__} has no 2-D 'kernel' [in, out]; LoRA/DoRA/IA3 wrap Linear-like modules"
        )
    return kernel


def bias_of(module: nnx.Module) -> nnx.Variable | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, nnx.Variable) else None


def replace_value(module: nnx.Module, name: str, value: jnp.ndarray) -> None:
    """Gives ``module.<name>`` a new Variable holding ``value`` (same type and metadata).

    Never ``variable.set_value``: ``nnx.merge(graphdef, state)`` reuses the Variable objects of
    ``state``, so every model merged from one state shares them, and writing through one would
    silently change the others (a served base model, the other experts of a merge, the state a
    caller still holds). A fresh Variable changes this module only.
    """
    variable = getattr(module, name)
    setattr(module, name, variable.replace(jnp.asarray(value, variable.get_value().dtype)))
