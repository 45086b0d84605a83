"""Parameter and optimiser-state memory of PEFT vs full fine-tuning, from shapes alone.

``python -m metafit.peft`` prints the numbers for SmolLM2-135M's architecture (built
abstractly with ``nnx.eval_shape``: nothing is allocated, so it runs in seconds on a laptop).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx


def num_params(tree: Any) -> int:
    """Number of scalars in the array leaves of ``tree``."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def tree_bytes(tree: Any) -> int:
    """Bytes of the array leaves of ``tree`` (works on ``jax.ShapeDtypeStruct`` trees too)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def optimizer_state_bytes(optimizer: optax.GradientTransformation, params: Any) -> int:
    """Bytes of ``optimizer.init(params)``, computed from shapes only (nothing is allocated)."""
    return tree_bytes(jax.eval_shape(optimizer.init, params))


def memory_report(build: Callable[[], nnx.Module], config: Any,
                  optimizer: optax.GradientTransformation | None = None) -> dict[str, int]:
    """Trainable parameters and optimiser-state bytes: full fine-tuning vs the PEFT ``config``.

    Args:
      build: makes the base model (called under ``nnx.eval_shape``: abstract, no memory).
      config: anything :func:`metafit.peft.apply` accepts.
      optimizer: default ``optax.adamw(1e-4)`` (two moments per trainable scalar).
    """
    from metafit.peft.api import apply

    optimizer = optimizer or optax.adamw(1e-4)
    base = nnx.eval_shape(build)
    peft_model = nnx.eval_shape(lambda: apply(build(), config, rngs=nnx.Rngs(0)))
    full_params = nnx.state(base, nnx.Param)
    adapter_params = nnx.state(peft_model, nnx.LoRAParam)
    return {
        "base_params": num_params(full_params),
        "adapter_params": num_params(adapter_params),
        "full_ft_opt_state_bytes": optimizer_state_bytes(optimizer, full_params),
        "peft_opt_state_bytes": optimizer_state_bytes(optimizer, adapter_params),
    }

