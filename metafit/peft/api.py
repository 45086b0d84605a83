"""Applying PEFT methods to NNX models, selecting what trains, merging back.

:func:`apply` edits the model **in place** (as HF PEFT's
``get_peft_model``): each targeted submodule is replaced by a wrapper that keeps the original
as ``base_layer``. It returns the same model for chaining; ``nnx.clone(model)`` first keeps an
unwrapped copy. Several methods stack by calling :func:`apply` repeatedly.

Only adapter weights train: they are all :class:`flax.nnx.LoRAParam` (or subclasses), so::

    graphdef, adapter_params, frozen = metafit.peft.split(model)   # = nnx.split(model, nnx.LoRAParam, ...)
    opt_state = optax.adamw(1e-3).init(adapter_params)              # optimiser state for adapters only

and the base weights stay bit-identical however long one trains.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from metafit.peft.adapter import BottleneckAdapter
from metafit.peft.bitfit import BitFitBias
from metafit.peft.config import (ATTENTION_OUTPUT, FFN_OUTPUT, AdapterConfig, BitFitConfig, IA3Config, LoraConfig,
                                 PeftConfig, PrefixConfig)
from metafit.peft.core import (PeftWrapper, bias_of, iter_modules, matches_any, path_str, select_modules, set_at,
                               wrap_selected)
from metafit.peft.ia3 import IA3Linear
from metafit.peft.lora import LoRALinear
from metafit.peft.prefix import KVPrefix, attention_shape
from metafit.registry import Registry

# name -> fn(model, PeftConfig, rngs) -> list of adapted module paths
PEFT_METHODS: Registry[Callable[[nnx.Module, PeftConfig, nnx.Rngs], list[str]]] = Registry("peft-method")


@PEFT_METHODS.register("lora")
def _apply_lora(model: nnx.Module, config: PeftConfig, rngs: nnx.Rngs) -> list[str]:
    cfg = config.lora
    selected = select_modules(model, cfg.targets, cfg.target_types, cfg.exclude)
    return wrap_selected(model, selected, lambda _, m: LoRALinear(
        m, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora, init=cfg.init, rngs=rngs))


@PEFT_METHODS.register("dora")
def _apply_dora(model: nnx.Module, config: PeftConfig, rngs: nnx.Rngs) -> list[str]:
    return _apply_lora(model, dataclasses.replace(config, lora=dataclasses.replace(config.lora, use_dora=True)), rngs)


@PEFT_METHODS.register("adapter")
def _apply_adapter(model: nnx.Module, config: PeftConfig, rngs: nnx.Rngs) -> list[str]:
    cfg = config.adapter
    targets = cfg.targets or (ATTENTION_OUTPUT + FFN_OUTPUT if cfg.style == "houlsby" else FFN_OUTPUT)
    selected = select_modules(model, targets, cfg.target_types, cfg.exclude)
    return wrap_selected(model, selected, lambda _, m: BottleneckAdapter(
        m, bottleneck=cfg.bottleneck, activation=cfg.activation, init_scale=cfg.init_scale, rngs=rngs))


@PEFT_METHODS.register("ia3")
def _apply_ia3(model: nnx.Module, config: PeftConfig, rngs: nnx.Rngs) -> list[str]:
    cfg = config.ia3
    selected = select_modules(model, cfg.targets, cfg.target_types, cfg.exclude)
    return wrap_selected(model, selected, lambda path, m: IA3Linear(
        m, feedforward=matches_any(path_str(path), cfg.feedforward)))


@PEFT_METHODS.register("bitfit")
def _apply_bitfit(model: nnx.Module, config: PeftConfig, rngs: nnx.Rngs) -> list[str]:
    cfg = config.bitfit
    selected = select_modules(model, cfg.targets, cfg.target_types, cfg.exclude)
    if not cfg.add_missing_bias:
        selected = [(p, m) for p, m in selected if bias_of(m) is not None]
    return wrap_selected(model, selected, lambda _, m: BitFitBias(m))


@PEFT_METHODS.register("prefix")
def _apply_prefix(model: nnx.Module, config: PeftConfig, rngs: nnx.Rngs) -> list[str]:
    cfg = config.prefix
    names = []
    for path, module in iter_modules(model):
        name = path_str(path)
        if not hasattr(module, "kv_prefix") or module.kv_prefix is not None:
            continue
        if (cfg.targets and not matches_any(name, cfg.targets)) or matches_any(name, cfg.exclude):
            continue
        heads, head_dim = attention_shape(module)
        # kv_prefix starts as a static None on the model's attention module; nnx.data marks it as state.
        module.kv_prefix = nnx.data(KVPrefix(cfg.num_prefix, heads, head_dim, init_scale=cfg.init_scale,
                                             rngs=rngs))
        names.append(name)
    if not names:
        raise ValueError(
            "prefix tuning found no attention module with a 'kv_prefix' hook; the model's attention must "
            "define `self.kv_prefix = None` and call it (see metafit.peft.prefix)"
        )
    return names


_METHOD_OF_CONFIG = {AdapterConfig: "adapter", PrefixConfig: "prefix", BitFitConfig: "bitfit", IA3Config: "ia3"}


def as_peft_config(config: Any) -> PeftConfig:
    """Accepts a :class:`PeftConfig` or one method's config (``LoraConfig(use_dora=True)`` -> dora)."""
    if isinstance(config, PeftConfig):
        return config
    if isinstance(config, LoraConfig):
        return PeftConfig(method="dora" if config.use_dora else "lora", lora=config)
    for cls, method in _METHOD_OF_CONFIG.items():
        if isinstance(config, cls):
            return PeftConfig(method=method, **{method: config})
    raise TypeError(f"expected a PeftConfig or a method config, got {type(config).__name__}")


def apply(model: nnx.Module, config: Any, *, rngs: nnx.Rngs) -> nnx.Module:
    """Adds the PEFT method of ``config`` to ``model`` in place and returns ``model``.

    Args:
      model: an NNX model (e.g. from :func:`metafit.models.load`).
      config: a :class:`PeftConfig` (``method`` picks the registered method) or a method config
        (:class:`LoraConfig`, :class:`AdapterConfig`, :class:`PrefixConfig`, :class:`BitFitConfig`,
        :class:`IA3Config`).
      rngs: initialises adapter weights (``params`` stream) and LoRA dropout (``dropout`` stream).

    Returns:
      ``model``, now holding gated PEFT modules (gate 1 = plain PEFT; see :mod:`metafit.peft.gates`).

    Example:
      >>> model = metafit.peft.apply(model, LoraConfig(rank=8, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(0))
    """
    config = as_peft_config(config)
    PEFT_METHODS.get(config.method)(model, config, rngs)
    return model


# ----------------------------------------------------------------------------- what trains


def trainable_filter() -> type:
    """The NNX filter of trainable PEFT weights: ``nnx.LoRAParam`` (all adapter params subclass it)."""
    return nnx.LoRAParam


def split(model: nnx.Module):
    """``(graphdef, adapter_params, frozen)`` = ``nnx.split(model, nnx.LoRAParam, ...)``.

    ``frozen`` holds base weights, gates and RNG state; rebuild with ``nnx.merge(graphdef, adapter_params, frozen)``.
    """
    return nnx.split(model, nnx.LoRAParam, ...)


def trainable_mask(state: nnx.State) -> nnx.State:
    """A pytree of bools with the structure of ``state`` (True at PEFT weights).

    For :func:`metafit.train.fit`'s ``trainable=`` when training a full ``nnx.state(model, nnx.Param)``.
    """
    return jax.tree.map(lambda v: v.replace(isinstance(v, nnx.LoRAParam)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


# ----------------------------------------------------------------------------- merging back


def _unwrap(model: nnx.Module, keep: Callable[[PeftWrapper], bool], merge: bool) -> list[str]:
    # Innermost wrappers first: iter_graph is post-order, so a stacked wrapper's base is visited first.
    names = []
    for path, module in list(iter_modules(model)):
        if isinstance(module, PeftWrapper) and not keep(module):
            set_at(model, path, module.merged() if merge else module.base_layer)
            names.append(path_str(path))
    return names


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every LoRA/DoRA wrapper into its base kernel (``W <- W + g delta_W``) and unwraps it, in place.

    Returns ``model`` (other PEFT modules are left as they are). Gates must be scalars.
    """
    _unwrap(model, keep=lambda m: not isinstance(m, LoRALinear), merge=True)
    return model


def merge_all(model: nnx.Module) -> nnx.Module:
    """Folds every mergeable wrapper (LoRA, DoRA, IA3, BitFit-with-bias) into its base, in place."""
    _unwrap(model, keep=lambda m: type(m).merged is PeftWrapper.merged, merge=True)
    return model


def remove_peft(model: nnx.Module) -> nnx.Module:
    """Drops every PEFT wrapper and prefix (the base model comes back, unchanged), in place."""
    _unwrap(model, keep=lambda m: False, merge=False)
    for _, module in iter_modules(model):
        if isinstance(getattr(module, "kv_prefix", None), KVPrefix):
            module.kv_prefix = None
    return model
