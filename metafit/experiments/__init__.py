"""Registered experiments: what ``metafit run CONFIG`` calls.

An experiment is a function ``(cfg: RunConfig, run: RunDir) -> results`` registered
with its own frozen ``args`` dataclass and, if its arguments need checks that span
several sections, a ``validate`` hook::

    @experiment("quickstart", config=QuickstartArgs)
    def quickstart(cfg, run):
        ...
        return {"metrics": {"test_accuracy": 0.97}}

Run configs are YAML::

    experiment: quickstart
    seed: 0
    train: {steps: 300, lr: 1.0e-3}   # metafit.train.TrainConfig
    mesh: {data: -1}                  # metafit.parallel.MeshConfig
    args: {hidden: 128}               # the experiment's own dataclass

**Lazy loading.** :data:`EXPERIMENT_MODULES` maps each built-in experiment name to
the module that registers it, and :func:`get_experiment` imports only that module
(and so only its method family) on first use: ``metafit run`` of a meta-learning
config never imports the merging or Bayesian code. A new module under
``metafit/experiments/`` adds its names to the table; ``tests/test_experiments_api.py``
fails if a name registered by ``@experiment("...")`` in the package is missing from it.
:func:`load_all` imports every module (``metafit list`` uses it).

**User experiments.** ``experiment: package.module:function`` runs a function from
any importable module (``metafit run`` also looks in the current directory): either
decorated with ``@experiment(config=Args)`` (the name is optional) to take an
``args:`` section, or a plain ``(cfg, run)`` function without arguments.

**Validate before write.** :func:`run_experiment` resolves and validates everything
before it creates the run folder (:func:`validate_config`): types and unknown keys,
each dataclass's ``__post_init__`` checks, ``seed >= 0``, the optimiser and its
settings, the mesh against the devices present, and the experiment's ``validate``
hook. A bad setting is a :class:`~metafit.config.ConfigError` naming the key, and
the corrected command then runs in the same ``--workdir``. A run that fails before it
writes anything removes the folder it created, for the same reason.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import math
import os
import pkgutil
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from metafit.config import ConfigError, apply_overrides, dump_yaml, dump_yaml_documented, from_dict, load_yaml
from metafit.parallel.mesh import MeshConfig, mesh_axis_sizes
from metafit.registry import Registry, UnknownNameError, did_you_mean
from metafit.runs import LOCK, MARKER, RunDir, plot_curves
from metafit.train.config import TrainConfig

ExperimentFn = Callable[["RunConfig", RunDir], Mapping[str, Any]]
ValidateFn = Callable[["RunConfig"], None]
EXPERIMENTS: Registry[ExperimentFn] = Registry("experiment")

# Built-in experiment name -> module under metafit.experiments that registers it (imported on use).
EXPERIMENT_MODULES: dict[str, str] = {
    "quickstart": "quickstart",
    "meta": "meta",
    "meta_compare": "meta",
    "prompt_transfer": "bayes",
    "lora_sft": "finetune",
    "merge_atm": "merge",
    "merge_compatible": "merge",
    "merge_lm": "merge_lm",
    "robust": "robust",
    "pretrain_small_lm": "small_lm",
    "posttrain_data": "posttrain",
    "posttrain_train": "posttrain",
    "posttrain_merge": "posttrain",
    "context_nih": "context",
    "context_sft": "context",
    "delift": "select",
    "multitask": "multitask",
}


@dataclasses.dataclass(frozen=True)
class NoArgs:
    """For experiments without options of their own."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: which experiment, its seed, trainer, mesh and experiment arguments.

    Attributes:
      experiment: a registered experiment (``metafit list``) or ``package.module:function``.
      seed: every random choice of the run derives from this seed (0 <= seed < 2**32).
      train: the trainer (``metafit.train.TrainConfig``).
      mesh: device mesh axis sizes (``metafit.parallel.MeshConfig``); -1 = all remaining devices.
      args: the experiment's own options (its registered dataclass).
    """

    experiment: str
    seed: int = 0
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    args: Any = NoArgs()

    def __post_init__(self):
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed} (jax.random.key takes a 32-bit seed)")


class Experiment(NamedTuple):
    """A resolved experiment: its function, its ``args`` dataclass and its optional ``validate`` hook."""

    name: str
    fn: ExperimentFn
    config: type
    validate: ValidateFn | None = None


def experiment(name: str | None = None, *, config: type = NoArgs,
               validate: ValidateFn | None = None) -> Callable[[ExperimentFn], ExperimentFn]:
    """Registers an experiment under ``name`` whose ``args:`` section is the dataclass ``config``.

    Args:
      name: the name configs give as ``experiment:``. Optional for user experiments, which
        configs name by ``package.module:function``.
      config: the frozen dataclass of its ``args:`` section (validated before any compute).
      validate: ``validate(cfg)`` raising ``ValueError`` (or ``ConfigError``) that names the key,
        for checks a dataclass cannot do alone (e.g. ``args.atm_rounds`` must divide
        ``train.steps``). It runs before the run folder is created, so it must be cheap and
        must not write anything.

    Example:
        >>> @experiment(config=ToyArgs)
        ... def toy(cfg, run):
        ...     return {"metrics": {"twice": 2 * cfg.args.x}}
    """
    if callable(name) and not isinstance(name, str):  # bare @experiment on a plain (cfg, run) function
        return experiment()(name)
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"experiment '{name}': config must be a dataclass, got {config}")

    def register(fn: ExperimentFn) -> ExperimentFn:
        owner = EXPERIMENT_MODULES.get(name or "")
        if owner is not None and fn.__module__ != f"{__name__}.{owner}":
            raise ValueError(f"experiment name '{name}' belongs to {__name__}.{owner}; choose another name "
                             f"(or none, and name it '{fn.__module__}:{fn.__qualname__}' in configs)")
        fn.__metafit_experiment__ = Experiment(name or f"{fn.__module__}:{fn.__qualname__}", fn, config, validate)
        if name is not None:
            EXPERIMENTS.register(name, fn, config=config, validate=validate)
        return fn

    return register


def experiment_names() -> list[str]:
    """Every built-in experiment name and every name registered so far, without importing anything."""
    return sorted(set(EXPERIMENT_MODULES) | set(EXPERIMENTS.names()))


def get_experiment(name: str) -> Experiment:
    """The experiment ``name``, importing only the module that defines it.

    Args:
      name: a registered name (``quickstart``) or ``package.module:function``.

    Raises:
      ConfigError: for an unknown name (with the valid names and a did-you-mean), a module
        or attribute that does not exist, or a function that cannot be called as ``fn(cfg, run)``.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"experiment: expected a name or 'package.module:function', got {name!r}")
    if ":" in name:
        return _user_experiment(name)
    if name not in EXPERIMENTS and name in EXPERIMENT_MODULES:
        module = importlib.import_module(f"{__name__}.{EXPERIMENT_MODULES[name]}")
        if name not in EXPERIMENTS:
            raise RuntimeError(f"{module.__name__} does not register experiment '{name}': "
                               f"fix EXPERIMENT_MODULES in {__file__}")
    if name not in EXPERIMENTS:
        hint = ""
        declared = _declared_in_sources().get(name)
        if declared:  # a new module whose author forgot the table
            hint = (f" ({__name__}.{declared} declares it but EXPERIMENT_MODULES in {__file__} does not list it:"
                    " add it there)")
        names = experiment_names()
        raise ConfigError(f"unknown experiment '{name}';{did_you_mean(name, names)} valid names: "
                          f"{', '.join(names)}, or 'package.module:function' for your own{hint}")
    meta = EXPERIMENTS.meta(name)
    return Experiment(name, EXPERIMENTS.get(name), meta["config"], meta.get("validate"))


def _user_experiment(name: str) -> Experiment:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ConfigError(f"experiment '{name}': expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise  # the module exists but one of its own imports is missing: show that error
        raise ConfigError(f"experiment '{name}': no module named '{err.name}' (it must be importable: install "
                          f"its package, add its folder to PYTHONPATH, or run from the folder that holds it)"
                          ) from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ConfigError(f"experiment '{name}': module '{module_name}' ({getattr(module, '__file__', '?')}) "
                              f"has no attribute '{attr}';{did_you_mean(attr, public)} its functions: "
                              f"{', '.join(public) or '(none)'}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"experiment '{name}': '{attr}' is a {type(target).__name__}, not a function")
    spec = getattr(target, "__metafit_experiment__", None) or Experiment(name, target, NoArgs, None)
    try:
        inspect.signature(target).bind(None, None)
    except TypeError:
        raise ConfigError(f"experiment '{name}': {attr}{inspect.signature(target)} cannot be called as "
                          f"{attr}(cfg, run); an experiment takes the run config and the run folder "
                          "(give it options with @metafit.experiments.experiment(config=ArgsDataclass))") from None
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    return spec._replace(name=name)


def _declared_in_sources() -> dict[str, str]:
    """``{name: module}`` for every ``@experiment("name", ...)`` in this package's sources (parsed, not imported).

    ``module`` is relative to this package, as in :data:`EXPERIMENT_MODULES`.
    """
    here = Path(__file__).parent
    found = {}
    for path in sorted(here.rglob("*.py")):
        module = ".".join(path.relative_to(here).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(), str(path))
        except SyntaxError:  # importing that module will report it
            continue
        for node in ast.walk(tree):
            for decorator in getattr(node, "decorator_list", ()):
                name = _experiment_decorator_name(decorator)
                if name is not None:
                    found[name] = module
    return found


def _experiment_decorator_name(decorator: ast.expr) -> str | None:
    """``"x"`` for a decorator ``@experiment("x", ...)`` (or ``name="x"``, or ``@<module>.experiment(...)``)."""
    if not isinstance(decorator, ast.Call):
        return None
    func = decorator.func
    if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) != "experiment":
        return None
    given = decorator.args[:1] + [k.value for k in decorator.keywords if k.arg == "name"]
    if given and isinstance(given[0], ast.Constant) and isinstance(given[0].value, str):
        return given[0].value
    return None


def load_all() -> None:
    """Imports every experiment module (and so every library family); ``metafit list`` uses it."""
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module.name}")


def resolve_config(raw: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Validates a raw mapping into a :class:`RunConfig` (before any compute).

    Runs every check of :func:`validate_config` except the one against the devices
    present (a config for 8 devices still resolves on a laptop).
    """
    return validate_config(_parse(raw, source), check_devices=False)


def _parse(raw: Mapping[str, Any], source: str) -> RunConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    if "experiment" not in raw:
        raise ConfigError(f"{source}: missing required key 'experiment' (one of: {', '.join(experiment_names())}, "
                          "or 'package.module:function')")
    spec = get_experiment(raw["experiment"])
    top = {k: v for k, v in raw.items() if k != "args"}
    cfg = _checked(from_dict, RunConfig, top)
    return dataclasses.replace(cfg, experiment=spec.name, args=_args(spec, raw.get("args")))


def _checked(build: Callable, *args: Any, **kwargs: Any) -> Any:
    try:
        return build(*args, **kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # __post_init__ checks raise ValueError
        raise ConfigError(str(err)) from None


def _args(spec: Experiment, args: Any) -> Any:
    """The ``args:`` section as ``spec.config``: from a mapping, kept if already one, defaults if absent."""
    if isinstance(args, spec.config):
        return args
    if args is None or (isinstance(args, NoArgs) and spec.config is not NoArgs):
        args = {}
    if spec.config is NoArgs and isinstance(args, Mapping) and args:
        raise ConfigError(f"args: experiment '{spec.name}' takes no arguments, got {sorted(args)} (give it an "
                          "args dataclass with @metafit.experiments.experiment(config=...))")
    if not isinstance(args, Mapping):
        raise ConfigError(f"args: experiment '{spec.name}' takes {spec.config.__name__}, got {args!r}")
    return _checked(from_dict, spec.config, args, "args")


def validate_config(cfg: RunConfig, *, check_devices: bool = True) -> RunConfig:
    """The validate step: every check a run makes before its run folder exists.

    Checks the experiment (importing only its module), its ``args`` (types,
    ``__post_init__``), ``seed >= 0``, the ``train:`` section with the optimiser it names
    (``metafit.train.optim.validate_train_config`` if the trainer has it, else by building
    the optimiser), the ``mesh:`` axis sizes (against ``jax.device_count()`` when
    ``check_devices``), and finally the experiment's ``validate`` hook.

    Args:
      cfg: a run config, e.g. from :func:`resolve_config` or built in Python (an ``args``
        mapping or the default ``NoArgs()`` becomes the experiment's dataclass).
      check_devices: also check that the mesh fits the devices present.

    Returns:
      ``cfg`` with ``args`` as the experiment's dataclass.

    Raises:
      ConfigError: naming the offending key.
    """
    spec = get_experiment(cfg.experiment)
    cfg = _checked(dataclasses.replace, cfg, experiment=spec.name, args=_args(spec, cfg.args))
    _validate_train(cfg.train)
    _validate_mesh(cfg.mesh, check_devices)
    if spec.validate is not None:
        try:
            spec.validate(cfg)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None
        except UnknownNameError as err:
            raise ConfigError(f"args: {err}") from None
    return cfg


def _validate_train(train: TrainConfig) -> None:
    from metafit.train import optim  # looked up on use: the trainer may gain validate_train_config

    check = getattr(optim, "validate_train_config", None) or optim.make_optimizer
    try:
        check(train)
    except ConfigError:
        raise
    except UnknownNameError as err:  # an unknown optimiser name
        raise ConfigError(f"train.optimizer: {err}") from None
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if "train." in message else f"train: {message}") from None


def _validate_mesh(mesh: MeshConfig, check_devices: bool) -> None:
    import jax

    try:
        if check_devices:
            mesh_axis_sizes(mesh, jax.device_count())
        else:  # the static checks only, on as many devices as the fixed axes need
            mesh_axis_sizes(mesh, math.prod(max(getattr(mesh, axis), 1) for axis in ("data", "fsdp", "tensor")))
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if message.startswith("mesh") else f"mesh: {message}") from None


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML run config, applies ``key=value`` overrides and validates it."""
    raw = apply_overrides(load_yaml(path), list(overrides))
    return resolve_config(raw, str(path))


def default_config(experiment_name: str) -> RunConfig:
    """The config of ``experiment_name`` with every section at its dataclass defaults."""
    spec = get_experiment(experiment_name)
    return validate_config(RunConfig(spec.name, args=_args(spec, None)), check_devices=False)


def config_text(cfg: RunConfig, header: str = "") -> str:
    """YAML of a run config with every field's documentation as a comment; runs as-is with ``metafit run``."""
    return dump_yaml_documented(cfg, header=header)


def run_experiment(
    config: str | Path | RunConfig,
    overrides: Sequence[str] = (),
    *,
    workdir: str | Path | None = None,
    force_new: bool = False,
) -> tuple[RunDir, dict[str, Any]]:
    """Runs (or resumes) an experiment into its run folder and writes its results.

    Everything is resolved and validated (:func:`validate_config`) before the run
    folder is created or touched, so a bad setting leaves nothing behind and the
    corrected command runs in the same folder.

    Args:
      config: a YAML path or a :class:`RunConfig`.
      overrides: ``a.b=c`` strings applied to the YAML.
      workdir: the run folder (default ``runs/<config file stem>``).
      force_new: move a run of a different config aside instead of refusing.

    Returns:
      ``(run_dir, results)``.
    """
    if isinstance(config, RunConfig):
        if overrides:
            raise TypeError("overrides apply to a YAML config; pass a RunConfig with the values set instead")
        cfg, stem = config, config.experiment.replace(":", ".")
    else:
        raw = apply_overrides(load_yaml(config), list(overrides))
        cfg, stem = _parse(raw, str(config)), Path(config).stem
    cfg = validate_config(cfg)
    path = Path(workdir or Path("runs") / stem)
    existed = path.exists()
    run = RunDir.open(path, dump_yaml(cfg), force_new=force_new)
    try:
        results = dict(get_experiment(cfg.experiment).fn(cfg, run))
        run.write_results(results, title=f"{cfg.experiment} ({stem})")
    except BaseException:
        if not existed and _holds_nothing(run.path):
            shutil.rmtree(run.path, ignore_errors=True)  # failed before writing anything: leave no trace
        raise
    finally:
        run.close()
    return run, results


def _holds_nothing(path: Path) -> bool:
    """True if the run folder holds only its config and empty files or folders (nothing a rerun could resume)."""
    bookkeeping = {path / "config.yaml", path / MARKER, path / LOCK}
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if file not in bookkeeping and file.stat().st_size > 0:
                return False
    return True


__all__ = [
    "EXPERIMENTS", "EXPERIMENT_MODULES", "Experiment", "RunConfig", "NoArgs", "experiment", "experiment_names",
    "get_experiment", "load_all", "resolve_config", "validate_config", "load_run_config", "default_config",
    "config_text", "run_experiment", "RunDir", "plot_curves",
]
