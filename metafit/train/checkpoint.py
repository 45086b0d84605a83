"""Orbax checkpoints of the trainer state with fallback past unreadable ones.

The state is saved as a flat ``{"leaves": {"00000": array, ...}, "step": array}``
mapping so any pytree (NNX state, optax NamedTuples) round-trips exactly: the
tree structure comes from the live state, only the arrays come from disk.
Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoints intact.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointWarning(UserWarning):
    """A checkpoint could not be read and an older one (or a fresh start) is used instead."""


class Checkpointer:
    """Saves and restores a trainer state pytree under ``directory``.

    Args:
      directory: folder of numbered step sub-folders (created if needed).
      keep: number of most recent checkpoints kept on disk.
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        leaves = jax.tree.leaves(state)
        payload = {"leaves": {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}, "step": np.asarray(step)}
        self._manager.save(step, args=ocp.args.StandardSave(payload), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, like: Any) -> tuple[int, Any] | None:
        """Restores the newest readable checkpoint into the structure of ``like``.

        Unreadable checkpoints (partial writes, corrupted files, a different
        state structure) are skipped with a :class:`CheckpointWarning`.

        Returns:
          ``(step, state)`` or ``None`` when no checkpoint could be read.
        """
        unreadable = []
        for step in reversed(self.steps()):
            try:
                state = self.restore(step, like)
            except Exception as err:  # any failure to read means: try an older one
                warnings.warn(
                    f"checkpoint {self.directory / str(step)} is unreadable ({type(err).__name__}: "
                    f"{str(err)[:200]}); falling back to an older checkpoint",
                    CheckpointWarning,
                    stacklevel=2,
                )
                unreadable.append(step)
                continue
            self._set_aside(unreadable)
            return step, state
        self._set_aside(unreadable)
        return None

    def restore(self, step: int, like: Any) -> Any:
        """The checkpoint of ``step`` in the structure of ``like`` (raises if missing or unreadable)."""
        leaves, treedef = jax.tree.flatten(like)
        target = {
            "leaves": {f"{i:05d}": _abstract(leaf) for i, leaf in enumerate(leaves)},
            "step": np.asarray(0),
        }
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        arrays = [restored["leaves"][f"{i:05d}"] for i in range(len(leaves))]
        _check_shapes(arrays, leaves)
        if int(restored["step"]) != step:
            raise ValueError(f"checkpoint folder {step} holds step {int(restored['step'])}")
        return jax.tree.unflatten(treedef, arrays)

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints to ``<directory>.unreadable/`` (kept for inspection, out of the way)."""
        if not steps:
            return
        aside = self.directory.with_name(self.directory.name + ".unreadable")
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = aside / str(step)
            n = 1
            while target.exists():
                target, n = aside / f"{step}-{n}", n + 1
            (self.directory / str(step)).rename(target)
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return np.asarray(leaf)


def _check_shapes(arrays: list[Any], like: list[Any]) -> None:
    for i, (got, want) in enumerate(zip(arrays, like)):
        if np.shape(got) != np.shape(want):
            raise ValueError(f"leaf {i} has shape {np.shape(got)} on disk, expected {np.shape(want)}")
