"""Run folders: resolved config, metrics, checkpoints, results and plots in one place.

A run folder holds::

    config.yaml      the resolved config (defaults filled in, overrides applied)
    metrics.jsonl    one JSON object per log/eval line, per stage
    tensorboard/     the same scalars (and the plots) as TensorBoard event files, one folder per stage
    checkpoints/     Orbax checkpoints, one sub-folder per training stage
    results.json     {"metrics": {name: value}} or {"methods": {method: {name: value}}}
    results.md       the same as a Markdown table
    *.png            plots

Re-running the same config on the same folder resumes; a folder that holds a run
of a *different* config is refused unless ``force_new`` is set, in which case the
old folder is renamed (``DIR.old-1``, ...) so nothing is lost.

Two guards keep runs from destroying each other's files:

* a marker, ``.metafit-run`` (JSON: the SHA-256 of the resolved config), written when metafit
  creates the folder. Only marked folders are resumed or moved aside by ``force_new``: a plain
  folder (a project root, ``--workdir .``) is never renamed or written into unless it is empty,
  and deleting ``config.yaml`` does not let another config resume the old checkpoints. Folders
  written by earlier versions (``config.yaml`` + ``checkpoints/`` or ``metrics.jsonl``, no marker)
  are recognised and get the marker on their first resume;
* an exclusive lock (``fcntl.flock`` on ``.lock``) held for the life of the run: a second
  ``metafit run`` on the same folder, or ``force_new`` against a live run, fails naming the
  holder's PID. The kernel drops the lock when its process exits, however it exits, so a killed
  run never leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping


class RunDirError(RuntimeError):
    """The run folder cannot be used (different config, not writable, ...)."""


MARKER = ".metafit-run"
LOCK = ".lock"


class RunDir:
    """A run folder (see the module docstring). Create with :meth:`open`; :meth:`close` releases its lock."""

    def __init__(self, path: Path, lock_fd: int | None = None):
        from metafit.train.metrics import MetricsWriter  # here, not at the top: reading results needs no JAX

        self.path = path
        self.metrics = MetricsWriter(path / "metrics.jsonl", tensorboard=path / "tensorboard")
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: str | Path, config_text: str, *, force_new: bool = False) -> "RunDir":
        """Creates or reopens the run folder ``path`` for the resolved config ``config_text``, locked.

        Raises:
          RunDirError: the folder is in use by another run, holds a run of another config (without
            ``force_new``), is not a run folder and not empty, or is not writable.
        """
        path = Path(os.path.abspath(path))
        lock_fd = _lock(path)
        try:
            if _holds_other_run(path, config_text):
                if not force_new:
                    raise RunDirError(
                        f"{path} holds a run of a different config (see {path / 'config.yaml'}); refusing to resume "
                        "into it. Use another --workdir, or pass --force-new to move the old run aside and start fresh."
                    )
                _move_aside(path)
                os.close(lock_fd)  # the lock moved with the old run; take one on the new folder
                lock_fd = _lock(path)
            _write_marker(path, config_text)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, lock_fd)

    def close(self) -> None:
        """Flushes TensorBoard and releases the run's lock (the process exiting releases it too)."""
        self.metrics.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        for plot in sorted(self.path.glob("*.png")):  # the run's plots beside its scalars
            self.metrics.tensorboard.add_image(plot.stem, plot)
        atomic_write(self.path / "results.json", json.dumps(results, indent=2, default=_float) + "\n")
        atomic_write(self.path / "results.md", results_markdown(results, title))


def validate_results(results: Mapping[str, Any]) -> None:
    """Checks the ``{"metrics": ...}`` / ``{"methods": ...}`` shape of an experiment's return value."""
    if not isinstance(results, Mapping) or not ({"metrics", "methods"} & set(results)):
        raise ValueError('an experiment must return {"metrics": {...}} or {"methods": {method: {...}}}')
    if "metrics" in results and not isinstance(results["metrics"], Mapping):
        raise ValueError('results["metrics"] must be a {metric: value} mapping')
    methods = results.get("methods", {})
    if not isinstance(methods, Mapping) or not all(isinstance(v, Mapping) for v in methods.values()):
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
    try:
        results = json.loads(file.read_text())
        validate_results(results)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise RunDirError(f"{file} is not a metafit results file ({str(err)[:200]}); rerun the experiment to "
                          "rewrite it") from None
    return results


def figure(figsize: tuple[float, float]):
    """A matplotlib ``Figure`` that saves through the Agg canvas, made without pyplot.

    pyplot would need ``matplotlib.use("Agg")`` on a machine without a display, which switches the
    backend of the whole process (a notebook's inline plots included) and keeps every figure open
    until closed; a bare ``Figure`` touches no global state and is freed with its last reference.
    """
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def plot_curves(path: str | Path, series: Mapping[str, tuple[Any, Any]], *, xlabel: str, ylabel: str,
                title: str = "", logy: bool = False, points: Mapping[str, tuple[Any, Any]] | None = None) -> Path:
    """Saves a PNG line plot of named ``(x, y)`` series, and of named ``points`` as markers."""
    fig = figure((6, 4))
    ax = fig.subplots()
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    for label, (x, y) in (points or {}).items():
        ax.scatter(x, y, label=label, color="black", zorder=3)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    if len(series) + len(points or {}) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _float(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def atomic_write(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file: a killed process leaves the old file or none, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _lock(path: Path) -> int:
    """Creates ``path`` if needed and takes its exclusive lock; the descriptor holds it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(f"cannot write to run folder {path}: {err.strerror}; choose a writable --workdir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(f"{path} is in use by another metafit run (PID {holder}); wait for it to finish, "
                          "stop it, or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _config_hash(config_text: str) -> str:
    return hashlib.sha256(config_text.encode()).hexdigest()


def _holds_other_run(path: Path, config_text: str) -> bool:
    """Whether ``path`` holds a run of another config; raises if it is a foreign, non-empty folder."""
    marker, saved = path / MARKER, path / "config.yaml"
    if marker.exists():
        try:
            recorded = json.loads(marker.read_text())["config_sha256"]
        except (ValueError, KeyError, TypeError):
            raise RunDirError(f"{marker} is damaged; this run folder cannot be identified. Use another --workdir "
                              "(or delete the folder yourself if it is yours)") from None
        return recorded != _config_hash(config_text) or (saved.exists() and saved.read_text() != config_text)
    if saved.exists() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists()):
        return saved.read_text() != config_text  # written by an earlier metafit, before markers
    foreign = sorted(p.name for p in path.iterdir() if p.name != LOCK)
    if foreign:
        raise RunDirError(
            f"{path} is not a metafit run folder (no {MARKER}) and is not empty ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); refusing to write into it or move it. "
            "Choose a new or empty --workdir."
        )
    return False


def _move_aside(path: Path) -> None:
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise RunDirError(f"--force-new would move {path}, which holds the current directory; run from elsewhere")
    path.rename(_free_sibling(path))


def _write_marker(path: Path, config_text: str) -> None:
    try:
        if not (path / MARKER).exists():
            atomic_write(path / MARKER, json.dumps({"config_sha256": _config_hash(config_text)}) + "\n")
        if not (path / "config.yaml").exists():
            atomic_write(path / "config.yaml", config_text)
    except OSError as err:
        raise RunDirError(f"cannot write to run folder {path}: {err.strerror}; choose a writable --workdir") from None


def _free_sibling(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.old-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.old-{n}")
