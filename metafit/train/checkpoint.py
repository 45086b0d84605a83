"""Orbax checkpoints of the trainer state: exact restore, a clear error on a structure change.

Each checkpoint holds two Orbax items:

* ``state`` -- ``{"step": array, "state": named}``: the arrays under their names, ``named`` being the
  state as nested mappings keyed by each leaf's key path (``train/trainable/model/layers/0/...``),
  so :func:`load_checkpoint` (or Orbax alone) reads a run without the code that trained it. Any
  pytree (NNX state, optax NamedTuples, callback states) round-trips exactly: the tree structure
  comes from the live state, only the arrays come from disk;
* ``structure`` -- JSON naming every leaf (its key path), shape and dtype, read first and cheaply.

Checkpoints written before names were kept (one item of flat ``leaves/00000`` arrays) are still
restored, by leaf order with the shapes checked: a layout difference, not a structure change.

On restore the ``structure`` item is read first and compared with the live state. A different
structure (the code or the config changed since the checkpoint was written) is a
:class:`CheckpointMismatchError` naming the first differing leaf: silently restarting from step 0
would throw away the finished steps and hide the change. Only a checkpoint that cannot be read at
all (a partial write, corrupted files) is set aside with a :class:`CheckpointWarning`, and the
next older one is used. Orbax writes each step into a temporary folder and renames it when
complete, so a run killed mid-save leaves the previous checkpoints intact.
"""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from metafit.tree import key_name


class _ImportedOnFirstUse:
    """A module imported on its first attribute access.

    Orbax costs a start-up of ~0.6 s CPU that runs without checkpoints (``fit`` without a workdir,
    multi-device workers, ``metafit --help``) need not pay.
    """

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


ocp = _ImportedOnFirstUse("orbax.checkpoint")


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
        payload = {"step": np.asarray(step), "state": named_tree(state)}
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
        if (self.directory / str(step) / "default").is_dir():
            return self._restore_flat(step, like)
        saved = self._manager.restore(step, args=ocp.args.Composite(structure=ocp.args.JsonRestore()))
        self._check_structure(step, saved["structure"], describe(like))
        target = {"step": np.asarray(0), "state": named_tree(jax.tree.map(_abstract, like))}
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        if int(restored["state"]["step"]) != step:
            raise ValueError(f"checkpoint folder {step} holds step {int(restored['state']['step'])}")
        return from_named_tree(restored["state"]["state"], like)

    def _restore_flat(self, step: int, like: Any) -> Any:
        """A checkpoint of the earlier flat layout (``leaves/00000``, no names): by leaf order."""
        leaves, treedef = jax.tree.flatten(like)
        target = {"leaves": {f"{i:05d}": _abstract(leaf) for i, leaf in enumerate(leaves)}, "step": np.asarray(0)}
        try:
            with ocp.StandardCheckpointer() as reader:  # the manager here is multi-item; that layout is not
                restored = {"default": reader.restore(self.directory / str(step) / "default", target)}
        except (KeyError, ValueError) as err:
            live = describe(like)["paths"]
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} (earlier flat layout) does not hold the {len(leaves)} "
                f"leaves of this run ({live[:1]} ...): {str(err)[:200]}. Rerun with --force-new to start afresh."
            ) from None
        arrays = [restored["default"]["leaves"][f"{i:05d}"] for i in range(len(leaves))]
        for path, got, want in zip(describe(like)["paths"], arrays, leaves):
            if np.shape(got) != np.shape(want):
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory / str(step)} (earlier flat layout): leaf {path} has shape "
                    f"{list(np.shape(got))} on disk but {list(np.shape(want))} now. Rerun with --force-new.")
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


def load_checkpoint(path: str | Path, step: int | None = None) -> dict[str, Any]:
    """The named arrays of a checkpoint, without the code that trained it.

    Args:
      path: a stage's checkpoint folder (``RUN/checkpoints/<stage>``) or one step folder in it.
      step: which step (default: the newest; ignored when ``path`` is a step folder).

    Returns:
      ``{"step": int, "state": nested mapping of arrays}``; the trainer's own checkpoints hold
      ``state["train"]["trainable"]`` (the trained parameters by name), ``["opt_state"]`` and
      ``state["callbacks"]``.

    Example:
        >>> ckpt = load_checkpoint("runs/quickstart/checkpoints/train")
        >>> ckpt["state"]["train"]["trainable"]["layers"]["0"]["kernel"].shape
    """
    path = Path(path).absolute()
    if path.name.isdigit() and (path / "structure").is_dir():
        path, step = path.parent, int(path.name)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{path} holds no checkpoints (expected numbered step folders)")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{path} has no checkpoint of step {step}; it has {steps}")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    return {"step": int(restored["state"]["step"]), "state": restored["state"]["state"]}


def named_tree(tree: Any) -> dict[str, Any]:
    """``tree``'s leaves in nested dicts keyed by their key-path components (the on-disk layout)."""
    named: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [key_name(entry) for entry in path]
        node = named
        for i, name in enumerate(names[:-1]):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"cannot name leaf {jax.tree_util.keystr(path)}: '{'/'.join(names[:i + 1])}' is a leaf")
        if names[-1] in node:
            raise ValueError(f"two leaves share the name {'/'.join(names)} (keys 0 and '0' in one mapping?)")
        node[names[-1]] = leaf
    return named


def from_named_tree(named: dict[str, Any], like: Any) -> Any:
    """Inverse of :func:`named_tree`: the leaves of ``named`` in the structure of ``like``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in flat:
        node = named
        for name in [key_name(entry) for entry in path]:
            node = node[name]
        leaves.append(node)
    return jax.tree.unflatten(treedef, leaves)


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
