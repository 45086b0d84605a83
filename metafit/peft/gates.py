"""Per-sample gating of PEFT modules (what CleaR's routing needs).

Every PEFT module (LoRA/DoRA, adapter, IA3, BitFit, prefix) has a gate g stored in a
:class:`~metafit.peft.core.Gate` variable. Its contribution is multiplied by g:

    LoRA/DoRA  y = base(x) + g * delta(x)          adapter  h' = h + g * A(h)
    IA3        y = base(x) * (1 + g (l - 1))       BitFit   y = base(x) + g * delta_b
    prefix     prefix attention weights scaled by g (score bias log g; see metafit.peft.prefix)

g = 1 (the default, a scalar) is plain PEFT; g = 0 is exactly the base model, and the adapter
parameters then get exactly zero gradient. A gate may be a scalar (one gate for the batch),
``[batch]`` (per sample) or ``[batch, seq]`` (per token); it broadcasts from the left.

Gated modules are numbered in NNX graph order (:func:`gated_paths`), which is deterministic
(attributes sorted, list indices numerically: layer 0, 1, ..., 10, 11).

Inside ``jax.jit`` merge the model from its state and set the gates on the merged copy::

    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def loss(lora, rest, gates, x, y):            # gates: [count_gated_modules(model), batch]
        m = nnx.merge(graphdef, lora, rest)
        metafit.peft.set_gates(m, gates)
        return ((m(x) - y) ** 2).mean()
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from metafit.peft.core import Gate, peft_modules, path_str


def gated_paths(model: nnx.Module) -> list[str]:
    """Dotted paths of the gated PEFT modules, in gate order (row i of ``set_gates``' array)."""
    return [path_str(path) for path, _ in peft_modules(model)]


def count_gated_modules(model: nnx.Module) -> int:
    """Number of gated PEFT modules (the leading size of the ``gates`` array of :func:`set_gates`)."""
    return len(peft_modules(model))


def set_gates(model: nnx.Module, gates) -> None:
    """Sets the gates of ``model``'s PEFT modules in place (works on a merged copy inside jit).

    Args:
      model: a model with PEFT modules.
      gates: one of
        * an array ``[num_gated, *gate_shape]``: row i goes to the i-th module of :func:`gated_paths`
          (``gate_shape`` = ``()`` for one gate per module, ``(batch,)`` per sample, ``(batch, seq)``);
        * an array ``[1, *gate_shape]`` or a scalar: the same gate for every module;
        * a mapping ``{path: gate}`` setting only the named modules.
    """
    modules = peft_modules(model)
    if isinstance(gates, Mapping):
        by_path = {path_str(p): m for p, m in modules}
        for name, gate in gates.items():
            if name not in by_path:
                raise KeyError(f"no gated PEFT module at '{name}'; gated paths: {', '.join(by_path)}")
            _replace_gate(by_path[name], gate)
        return
    gates = jnp.asarray(gates, jnp.float32)
    if gates.ndim == 0:
        gates = gates[None]
    if gates.shape[0] not in (1, len(modules)):
        raise ValueError(
            f"gates has leading size {gates.shape[0]} but the model has {len(modules)} gated modules "
            "(metafit.peft.count_gated_modules); pass [num_gated, ...] or [1, ...] to share one gate"
        )
    for i, (_, module) in enumerate(modules):
        _replace_gate(module, gates[i if gates.shape[0] > 1 else 0])


def _replace_gate(module, gate) -> None:
    # A fresh Gate rather than gate.set_value(): nnx.merge may reuse the Variable objects of a state
    # that a traced function closes over (created outside the trace, so not mutable inside it),
    # and mutating them would also leak the gates back into that state.
    module.gate = Gate(jnp.asarray(gate, jnp.float32))


def get_gates(model: nnx.Module) -> dict[str, jax.Array]:
    """Current gates by path."""
    return {path_str(p): m.gate.get_value() for p, m in peft_modules(model)}


def reset_gates(model: nnx.Module) -> None:
    """Sets every gate back to the scalar 1 (plain PEFT)."""
    set_gates(model, jnp.ones((), jnp.float32))


def bernoulli_gates(key: jax.Array, prob, num_gated: int) -> jax.Array:
    """Samples independent gates ``g[l, ...] ~ Bernoulli(prob[...])`` for ``num_gated`` modules.

    ``prob`` is a scalar (one gate per module: CleaR's LoRA routing) or ``[batch]`` (per-sample:
    CleaR's ``r * p_i``). Returns float32 ``[num_gated, *prob.shape]``. The expectation routing of
    CleaR at inference is simply ``set_gates(model, prob[None])``.
    """
    prob = jnp.asarray(prob, jnp.float32)
    return jax.random.bernoulli(key, prob, (num_gated,) + prob.shape).astype(jnp.float32)
