"""Registered experiments: what ``metafit run CONFIG`` calls.

An experiment is a function ``(cfg: RunConfig, run: RunDir) -> results`` registered
with its own frozen ``args`` dataclass::

    @experiment("quickstart", config=QuickstartArgs)
    def quickstart(cfg, run):
        ...
        return {"metrics": {"test_accuracy": 0.97}}

Every module in this package is imported by :func:`load_all`, so adding a file
registers its experiments. Run configs are YAML::

    experiment: quickstart
    seed: 0
    train: {steps: 300, lr: 1.0e-3}   # metafit.train.TrainConfig
    mesh: {data: -1}                  # metafit.parallel.MeshConfig
    args: {hidden: 128}               # the experiment's own dataclass
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from metafit.config import ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml
from metafit.parallel.mesh import MeshConfig
from metafit.registry import Registry
from metafit.runs import RunDir, plot_curves
from metafit.train.config import TrainConfig

ExperimentFn = Callable[["RunConfig", RunDir], Mapping[str, Any]]
EXPERIMENTS: Registry[ExperimentFn] = Registry("experiment")


@dataclasses.dataclass(frozen=True)
class NoArgs:
    """For experiments without options of their own."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: which experiment, its seed, trainer, mesh and experiment arguments."""

    experiment: str
    seed: int = 0
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    args: Any = NoArgs()


def experiment(name: str, *, config: type = NoArgs) -> Callable[[ExperimentFn], ExperimentFn]:
    """Registers an experiment under ``name`` whose ``args:`` section is the dataclass ``config``."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"experiment '{name}': config must be a dataclass, got {config}")
    return EXPERIMENTS.register(name, config=config)


_LOADED = False


def load_all() -> None:
    """Imports every experiment module (and so every library family) once."""
    global _LOADED
    if _LOADED:
        return
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module.name}")
    _LOADED = True


def resolve_config(raw: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Validates a raw mapping into a :class:`RunConfig` (before any compute)."""
    load_all()
    if "experiment" not in raw:
        raise ConfigError(f"{source}: missing required key 'experiment' (one of: {', '.join(EXPERIMENTS.names())})")
    name = raw["experiment"]
    if not isinstance(name, str):
        raise ConfigError(f"experiment: expected str, got {name!r}")
    try:
        args_cls = EXPERIMENTS.meta(name)["config"]
    except KeyError as err:
        raise ConfigError(str(err)) from None
    top = {k: v for k, v in raw.items() if k != "args"}
    try:
        cfg = from_dict(RunConfig, top)
        args = from_dict(args_cls, raw.get("args"), "args")
    except ValueError as err:  # __post_init__ checks raise ValueError
        raise ConfigError(str(err)) from None
    return dataclasses.replace(cfg, args=args)


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML run config, applies ``key=value`` overrides and validates it."""
    raw = apply_overrides(load_yaml(path), list(overrides))
    return resolve_config(raw, str(path))


def run_experiment(
    config: str | Path | RunConfig,
    overrides: Sequence[str] = (),
    *,
    workdir: str | Path | None = None,
    force_new: bool = False,
) -> tuple[RunDir, dict[str, Any]]:
    """Runs (or resumes) an experiment into its run folder and writes its results.

    Args:
      config: a YAML path or a :class:`RunConfig`.
      overrides: ``a.b=c`` strings applied to the YAML.
      workdir: the run folder (default ``runs/<config file stem>``).
      force_new: move a run of a different config aside instead of refusing.

    Returns:
      ``(run_dir, results)``.
    """
    if isinstance(config, RunConfig):
        cfg, stem = config, config.experiment
    else:
        cfg, stem = load_run_config(config, overrides), Path(config).stem
    run = RunDir.open(workdir or Path("runs") / stem, dump_yaml(cfg), force_new=force_new)
    results = dict(EXPERIMENTS.get(cfg.experiment)(cfg, run))
    run.write_results(results, title=f"{cfg.experiment} ({stem})")
    return run, results


__all__ = [
    "EXPERIMENTS", "RunConfig", "NoArgs", "experiment", "load_all", "resolve_config", "load_run_config",
    "run_experiment", "RunDir", "plot_curves",
]
