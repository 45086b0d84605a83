"""Run folders: resolved config, metrics, checkpoints, results and plots in one place.

A run folder holds::

    config.yaml      the resolved config (defaults filled in, overrides applied)
    metrics.jsonl    one JSON object per log/eval line, per stage
    checkpoints/     Orbax checkpoints, one sub-folder per training stage
    results.json     {"metrics": {name: value}} or {"methods": {method: {name: value}}}
    results.md       the same as a Markdown table
    *.png            plots

Re-running the same config on the same folder resumes; a folder that holds a run
of a *different* config is refused unless ``force_new`` is set, in which case the
old folder is renamed (``DIR.old-1``, ...) so nothing is lost.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from metafit.train.metrics import MetricsWriter


class RunDirError(RuntimeError):
    """The run folder cannot be used (different config, not writable, ...)."""


class RunDir:
    """A run folder (see the module docstring). Create with :meth:`open`."""

    def __init__(self, path: Path):
        self.path = path
        self.metrics = MetricsWriter(path / "metrics.jsonl")

    @classmethod
    def open(cls, path: str | Path, config_text: str, *, force_new: bool = False) -> "RunDir":
        """Creates or reopens the run folder ``path`` for the resolved config ``config_text``."""
        path = Path(path)
        saved = path / "config.yaml"
        if saved.exists() and saved.read_text() != config_text:
            if not force_new:
                raise RunDirError(
                    f"{path} holds a run of a different config (see {saved}); refusing to resume into it. "
                    "Use another --workdir, or pass --force-new to move the old run aside and start fresh."
                )
            path.rename(_free_sibling(path))
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise RunDirError(f"cannot write to run folder {path}: {err.strerror}; choose a writable --workdir") from None
        if not saved.exists():
            _atomic_write(saved, config_text)
        return cls(path)

    def subdir(self, name: str) -> Path:
        """A folder inside the run (e.g. checkpoints of one stage); created on demand."""
        sub = self.path / name
        sub.mkdir(parents=True, exist_ok=True)
        return sub

    def checkpoint_dir(self, stage: str) -> Path:
        return self.path / "checkpoints" / stage

    def plot_path(self, name: str) -> Path:
        return self.path / f"{name}.png"

    def log(self, metrics: Mapping[str, Any], step: int, stage: str) -> None:
        """Appends one metrics line for ``stage`` at ``step``."""
        self.metrics.write({"stage": stage, "step": step, **metrics})

    def write_results(self, results: Mapping[str, Any], title: str = "") -> None:
        """Writes ``results.json`` and ``results.md`` (validated shape, atomic writes)."""
        validate_results(results)
        _atomic_write(self.path / "results.json", json.dumps(results, indent=2, default=_float) + "\n")
        _atomic_write(self.path / "results.md", results_markdown(results, title))


def validate_results(results: Mapping[str, Any]) -> None:
    """Checks the ``{"metrics": ...}`` / ``{"methods": ...}`` shape of an experiment's return value."""
    if not isinstance(results, Mapping) or not ({"metrics", "methods"} & set(results)):
        raise ValueError('an experiment must return {"metrics": {...}} or {"methods": {method: {...}}}')
    if "methods" in results and not all(isinstance(v, Mapping) for v in results["methods"].values()):
        raise ValueError('results["methods"] must map each method to a {metric: value} mapping')


def results_markdown(results: Mapping[str, Any], title: str = "") -> str:
    """A Markdown table of results (rows = methods, columns = metrics)."""
    lines = [f"# {title}", ""] if title else []
    if "methods" in results:
        methods = results["methods"]
        columns = list(dict.fromkeys(k for row in methods.values() for k in row))
        lines.append("| method | " + " | ".join(columns) + " |")
        lines.append("|---" * (len(columns) + 1) + "|")
        for method, row in methods.items():
            lines.append(f"| {method} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
        lines.append("")
    if "metrics" in results:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in results["metrics"].items()]
        lines.append("")
    return "\n".join(lines)


def load_results(path: str | Path) -> dict[str, Any]:
    """Reads ``results.json`` of a finished run folder."""
    file = Path(path) / "results.json"
    if not file.exists():
        raise RunDirError(f"{path} has no results.json: the run has not finished (rerun it to resume)")
    return json.loads(file.read_text())


def plot_curves(path: str | Path, series: Mapping[str, tuple[Any, Any]], *, xlabel: str, ylabel: str,
                title: str = "", logy: bool = False) -> Path:
    """Saves a PNG line plot of named ``(x, y)`` series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _float(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _free_sibling(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.old-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.old-{n}")
