"""Orbax checkpoints of the trainer state: exact restore, a clear error on a structure change.

Each checkpoint holds two Orbax items:

* ``state`` -- the arrays as a flat ``{"leaves": {"00000": array, ...}, "step": array}`` mapping, so
  any pytree (NNX state, optax NamedTuples, callback states) round-trips exactly: the tree
  structure comes from the live state, only the arrays come from disk;
* ``structure`` -- JSON naming every leaf (its key path), shape and dtype.

On restore the ``structure`` item is read first and compared with the live state. A different
structure (the code or the config changed since the checkpoint was written) is a
:class:`CheckpointMismatchError` naming the first differing leaf: silently restarting from step 0
would throw away the finished steps and hide the change. Only a checkpoint that cannot be read at
all (a partial write, corrupted files) is set aside with a :class:`CheckpointWarning`, and the
next older one is used. Orbax writes each step into a temporary folder and renames it when
complete, so a run killed mid-save leaves the previous checkpoints intact.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointWarning(UserWarning):
    """A checkpoint could not be read and an older one (or a fresh start) is used instead."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint holds a state of another structure than the run being resumed."""


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
        args = ocp.args.Composite(state=ocp.args.StandardSave(payload),
                                  structure=ocp.args.JsonSave(describe(state)))
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, like: Any) -> tuple[int, Any] | None:
        """Restores the newest readable checkpoint into the structure of ``like``.

        Unreadable checkpoints (partial writes, corrupted files) are moved aside with a
        :class:`CheckpointWarning` and the next older one is tried.

        Returns:
          ``(step, state)`` or ``None`` when there is no readable checkpoint.

        Raises:
          CheckpointMismatchError: a readable checkpoint holds a state of another structure.
        """
        unreadable = []
        try:
            for step in reversed(self.steps()):
                try:
                    state = self.restore(step, like)
                except CheckpointMismatchError:
                    raise
                except Exception as err:  # any failure to *read* means: set it aside, try an older one
                    warnings.warn(
                        f"checkpoint {self.directory / str(step)} is unreadable ({type(err).__name__}: "
                        f"{str(err)[:200]}); falling back to an older checkpoint",
                        CheckpointWarning,
                        stacklevel=2,
                    )
                    unreadable.append(step)
                    continue
                return step, state
            return None
        finally:
            self._set_aside(unreadable)

    def restore(self, step: int, like: Any) -> Any:
        """The checkpoint of ``step`` in the structure of ``like``.

        Raises:
          CheckpointMismatchError: the checkpoint's structure differs from ``like``'s.
          Exception: whatever Orbax raises for a missing or unreadable checkpoint.
        """
        saved = self._manager.restore(step, args=ocp.args.Composite(structure=ocp.args.JsonRestore()))
        self._check_structure(step, saved["structure"], describe(like))
        leaves, treedef = jax.tree.flatten(like)
        target = {"leaves": {f"{i:05d}": _abstract(leaf) for i, leaf in enumerate(leaves)}, "step": np.asarray(0)}
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        arrays = [restored["state"]["leaves"][f"{i:05d}"] for i in range(len(leaves))]
        if int(restored["state"]["step"]) != step:
            raise ValueError(f"checkpoint folder {step} holds step {int(restored['state']['step'])}")
        return jax.tree.unflatten(treedef, arrays)

    def _check_structure(self, step: int, saved: dict, live: dict) -> None:
        difference = first_difference(saved, live)
        if difference is not None:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} holds a training state of another structure than "
                f"this run: {difference}. The code or the config changed since it was written, so resuming "
                "it would be wrong. To start afresh, rerun with --force-new (moves the old run folder aside; "
                "nothing is deleted) or choose another --workdir; to resume, restore the code/config that "
                "wrote it."
            )

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


def describe(tree: Any) -> dict[str, list]:
    """The JSON description of a pytree's leaves: key paths, shapes and dtypes, in leaf order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        "paths": [jax.tree_util.keystr(path) for path, _ in flat],
        "shapes": [list(np.shape(leaf)) for _, leaf in flat],
        "dtypes": [str(_dtype(leaf)) for _, leaf in flat],
    }


def first_difference(saved: dict, live: dict) -> str | None:
    """Where two :func:`describe` results first differ (a sentence), or None when they agree."""
    rows = lambda d: list(zip(d["paths"], map(tuple, d["shapes"]), d["dtypes"]))
    on_disk, now = rows(saved), rows(live)
    for i, (disk, current) in enumerate(zip(on_disk, now)):
        if disk[0] != current[0]:
            return f"leaf {i} is {disk[0]} on disk but {current[0]} now"
        if disk[1:] != current[1:]:
            return (f"leaf {disk[0]} has shape {list(disk[1])} {disk[2]} on disk but "
                    f"{list(current[1])} {current[2]} now")
    if len(on_disk) > len(now):
        return f"leaf {on_disk[len(now)][0]} is on disk but not in the state now ({len(on_disk)} vs {len(now)} leaves)"
    if len(now) > len(on_disk):
        return f"leaf {now[len(on_disk)][0]} is in the state now but not on disk ({len(now)} vs {len(on_disk)} leaves)"
    return None


def _dtype(leaf: Any) -> Any:
    dtype = getattr(leaf, "dtype", None)
    return dtype if dtype is not None else np.asarray(leaf).dtype


def _abstract(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return np.asarray(leaf)
