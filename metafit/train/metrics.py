"""Metrics to ``metrics.jsonl`` (and TensorBoard), progress to the terminal (rich) or plain lines (CI, pipes).

TensorBoard event files (written with ``tensorboardX``: no TensorFlow) sit beside the JSONL file,
one folder per stage (``tensorboard/<stage>/``), scalars tagged ``<split>/<metric>``. A resumed
stage reopens its writer with ``purge_step`` = the restored step + 1, so TensorBoard hides the
points a killed run wrote after its last checkpoint, as :meth:`MetricsWriter.truncate` drops them
from the JSONL file.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends one JSON object per line: ``{"stage": ..., "step": ..., "split": ..., name: value}``.

    On resume, :meth:`truncate` drops lines of a stage written after the restored
    step, so the file of a resumed run equals that of an uninterrupted one.
    """

    def __init__(self, path: str | Path, *, tensorboard: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        self.tensorboard = TensorBoardWriter(tensorboard) if tensorboard is not None else None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def truncate(self, stage: str, after_step: int) -> None:
        kept = [json.dumps(r) for r in self._records() if not _is_after(r, stage, after_step)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        if self.tensorboard is not None:
            self.tensorboard.purge_after(stage, after_step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def read(self, stage: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self._records() if stage is None or r.get("stage") == stage]

    def _records(self) -> list[dict[str, Any]]:
        """The parsed lines; a torn last line (a kill mid-write) is dropped with a warning.

        A malformed line anywhere else is not a kill artefact: it is an error naming the line.
        """
        lines = self.path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                if number == len(lines):
                    warnings.warn(f"{self.path}: dropping a torn last line (the run was killed mid-write): "
                                  f"{line[:80]!r}", RuntimeWarning, stacklevel=3)
                    continue
                raise ValueError(f"{self.path}, line {number}: not a JSON object ({line[:80]!r}); the metrics "
                                 "file was edited or damaged. Fix or delete that line, then rerun.")
            records.append(record)
        return records


class TensorBoardWriter:
    """Scalars of metric records (and images) as TensorBoard event files, one folder per stage.

    Args:
      directory: the folder holding ``<stage>/`` event folders (created on the first write).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._writers: dict[str, Any] = {}
        self._purge: dict[str, int] = {}
        self._opened = 0

    def _writer(self, stage: str):
        if stage not in self._writers:
            SummaryWriter = _summary_writer_class()
            # Event file names carry the time in whole seconds: a writer reopened within the same second
            # (a resumed stage) would truncate the previous file without a suffix of its own.
            self._opened += 1
            self._writers[stage] = SummaryWriter(str(self.directory / _safe_name(stage)),
                                                 purge_step=self._purge.pop(stage, None), flush_secs=10,
                                                 filename_suffix=f".{os.getpid()}.{self._opened}")
        return self._writers[stage]

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        writer = self._writer(str(record.get("stage", "run")))
        split = record.get("split", "train")
        for name, value in record.items():
            if name in ("stage", "split", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            writer.add_scalar(f"{split}/{name}", value, step)
        writer.flush()

    def purge_after(self, stage: str, step: int) -> None:
        """Points of ``stage`` after ``step`` are hidden from TensorBoard (a resumed stage rewrites them)."""
        if stage in self._writers:
            self._writers.pop(stage).close()
        self._purge[stage] = step + 1

    def add_image(self, tag: str, png: str | Path, step: int = 0, stage: str = "plots") -> None:
        """Adds a PNG file (a run's plot) as an image."""
        import matplotlib.image

        image = matplotlib.image.imread(str(png))[..., :3]
        self._writer(stage).add_image(tag, image, step, dataformats="HWC")
        self._writers[stage].flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _summary_writer_class():
    """``tensorboardX.SummaryWriter``, imported without importing torch.

    tensorboardX imports torch when it is installed, only to accept torch tensors, which
    metafit never passes (it logs Python floats and numpy images). Importing torch costs seconds
    and hundreds of MB in every run; so unless torch is already loaded, it is hidden while
    tensorboardX loads, and unhidden at once (a later ``import torch`` works as usual).
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # ``import torch`` raises ImportError: tensorboardX's own fallback
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _safe_name(stage: str) -> str:
    """A stage name as one folder name (no separators, no parent references)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stage).strip(".")
    return cleaned or "stage"


def _is_after(record: dict[str, Any], stage: str, step: int) -> bool:
    return record.get("stage") == stage and record.get("step", -1) > step


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Progress:
    """A rich progress bar on a terminal; plain ``step i/n key=value`` lines otherwise."""

    def __init__(self, total: int, description: str, start: int = 0, enabled: bool = True):
        self.total, self.description, self.enabled = total, description, enabled
        self._bar = None
        self._start_time = time.perf_counter()
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, completed=start, info="")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        info = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step" and isinstance(v, (int, float)))
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            elapsed = time.perf_counter() - self._start_time
            print(f"[{self.description}] step {step}/{self.total} {info} ({elapsed:.1f}s)", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
