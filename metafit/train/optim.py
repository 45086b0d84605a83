"""Optimisers and learning-rate schedules built from a :class:`TrainConfig`.

``train.optimizer`` names any optax optimiser (``optax.<name>(learning_rate, ...)``: adamw, sgd,
lion, adafactor, lamb, ...) or one registered in :data:`OPTIMIZERS`; ``train.optimizer_args``
holds its own keyword arguments. :func:`validate_train_config` checks the name and every
argument against the optimiser's signature before any run folder exists, and refuses a
shared setting the optimiser would ignore (``weight_decay`` for adam/sgd, ``momentum`` for adam):
a silently ignored setting makes a run differ from what its config says.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import optax

from metafit.registry import Registry, did_you_mean
from metafit.train.config import TrainConfig

# name -> factory(learning_rate, **kwargs) -> GradientTransformation; optax's own optimisers need no entry.
OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry("optimizer")

# optax optimisers the trainer cannot drive: their update needs more than (grads, state, params).
_UNSUPPORTED = {"lbfgs": "its update needs the loss value and function (use a grad_fn-free method such as adam)"}


def optimizer_names() -> list[str]:
    """Every name ``train.optimizer`` accepts."""
    optax_names = [n for n in dir(optax) if _is_optax_optimizer(n)]
    return sorted(set(optax_names) | set(OPTIMIZERS.names()))


def _is_optax_optimizer(name: str) -> bool:
    factory = getattr(optax, name, None)
    if name.startswith(("_", "scale_by")) or name in _UNSUPPORTED or not inspect.isfunction(factory):
        return False
    try:
        return list(inspect.signature(factory).parameters)[:1] == ["learning_rate"]
    except (TypeError, ValueError):
        return False


def traceable_hyperparameters(cfg: TrainConfig) -> bool:
    """Whether the trainer may pass ``lr`` / ``weight_decay`` as traced values: optax's own optimisers only.

    They read both through arithmetic alone; an optimiser registered in :data:`OPTIMIZERS` may branch
    on a value in Python, so its values stay compile-time constants.
    """
    if cfg.optimizer in OPTIMIZERS:
        return False
    try:
        # rprop's state starts from its learning rate: a placeholder traced in its place would be kept
        return _takes_schedule(_factory(cfg.optimizer))
    except ValueError:
        return False


def _takes_schedule(factory: Callable[..., optax.GradientTransformation]) -> bool:
    """Whether the optimiser's ``learning_rate`` may be a schedule (a callable of the step).

    optax.rprop, sm3 and optimistic_adam take a scalar only: rprop keeps it in its state as each
    parameter's first step size.
    """
    annotation = inspect.signature(factory).parameters["learning_rate"].annotation
    return annotation is inspect.Parameter.empty or "Callable" in str(annotation) or "Schedule" in str(annotation)


def _factory(name: str) -> Callable[..., optax.GradientTransformation]:
    if name in OPTIMIZERS:
        return OPTIMIZERS.get(name)
    if name in _UNSUPPORTED:
        raise ValueError(f"train.optimizer: optax.{name} is not supported by the trainer: {_UNSUPPORTED[name]}")
    if not _is_optax_optimizer(name):
        valid = optimizer_names()
        raise ValueError(f"train.optimizer: unknown optimizer '{name}';{did_you_mean(name, valid)} "
                         f"valid names: {', '.join(valid)}")
    return getattr(optax, name)


def optimizer_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The keyword arguments the optimiser gets: ``optimizer_args`` plus the shared settings it takes.

    Raises:
      ValueError: naming the setting, when an argument is unknown to the optimiser, given twice,
        or a non-zero shared setting (weight_decay, momentum) would be ignored.
    """
    factory = _factory(cfg.optimizer)
    parameters = inspect.signature(factory).parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    accepted = [n for n in parameters if n != "learning_rate"]
    kwargs = {k: _yaml_number(v) for k, v in cfg.optimizer_args.items()}
    for key in kwargs:
        if key == "learning_rate":
            raise ValueError("train.optimizer_args.learning_rate: set train.lr (and train.schedule) instead")
        if key not in parameters and not accepts_any:
            raise ValueError(f"train.optimizer_args.{key}: {cfg.optimizer} takes no argument '{key}';"
                             f"{did_you_mean(key, accepted)} its arguments: {', '.join(accepted)}")
    for shared, value, passed_when_zero in (("weight_decay", cfg.weight_decay, True), ("momentum", cfg.momentum, False)):
        takes_it = shared in parameters or accepts_any
        if shared in kwargs:
            if value:
                raise ValueError(f"train.{shared} and train.optimizer_args.{shared} are both set; keep one")
            continue
        if value and not takes_it:
            raise ValueError(f"train.{shared}={value} would be ignored: {cfg.optimizer} has no {shared} argument. "
                             f"Set train.{shared}=0, or pick an optimizer that takes it "
                             f"({'adamw' if shared == 'weight_decay' else 'sgd'}).")
        if takes_it and (value or passed_when_zero):
            kwargs[shared] = value  # explicit 0.0 weight decay: optax.adamw's own default is 1e-4
    return kwargs


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-8`` as a string; optimiser arguments that look like floats are floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def validate_train_config(cfg: TrainConfig) -> None:
    """Builds the optimiser once (no arrays touched) so every bad setting fails before a run starts.

    Raises:
      ValueError: naming the ``train.`` key and what to do.
    """
    kwargs = optimizer_kwargs(cfg)
    if not _takes_schedule(_factory(cfg.optimizer)) and (cfg.schedule != "constant" or cfg.warmup_steps):
        raise ValueError(f"train.schedule={cfg.schedule}, train.warmup_steps={cfg.warmup_steps}: optax.{cfg.optimizer} "
                         "takes a constant learning rate only; set train.schedule=constant and train.warmup_steps=0")
    try:
        _factory(cfg.optimizer)(_learning_rate(cfg), **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"train.optimizer_args: optax.{cfg.optimizer}({kwargs}) failed: {err}") from None


def make_schedule(cfg: TrainConfig, lr: Any = None) -> optax.Schedule:
    """Linear warm-up to the peak ``lr`` (default ``cfg.lr``) then constant, cosine or linear decay to zero."""
    peak = cfg.lr if lr is None else lr
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    after = {
        "constant": optax.constant_schedule(peak),
        "cosine": optax.cosine_decay_schedule(peak, decay_steps),
        "linear": optax.linear_schedule(peak, 0.0, decay_steps),
    }[cfg.schedule]
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _learning_rate(cfg: TrainConfig, lr: Any = None) -> Any:
    """The optimiser's ``learning_rate``: the schedule, or the constant peak for a scalar-only optimiser."""
    if _takes_schedule(_factory(cfg.optimizer)):
        return make_schedule(cfg, lr)
    return cfg.lr if lr is None else lr


def make_optimizer(cfg: TrainConfig, *, lr: Any = None, weight_decay: Any = None) -> optax.GradientTransformation:
    """The optimiser named by ``cfg.optimizer`` with schedule and optional clipping.

    ``lr`` / ``weight_decay``, when given, replace ``cfg.lr`` / ``cfg.weight_decay`` (the trainer passes
    traced scalars, so runs differing only in them share one compiled step); the optimiser's state
    structure does not depend on either.

    Example:
        >>> tx = make_optimizer(TrainConfig(optimizer="adamw", lr=3e-4, clip_norm=1.0))
        >>> tx = make_optimizer(TrainConfig(optimizer="lion", optimizer_args={"b1": 0.95}, weight_decay=0.1))
    """
    kwargs = optimizer_kwargs(cfg)
    if weight_decay is not None and "weight_decay" in kwargs and "weight_decay" not in cfg.optimizer_args:
        kwargs["weight_decay"] = weight_decay
    tx = _factory(cfg.optimizer)(_learning_rate(cfg, lr), **kwargs)
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
