"""Few-shot task sets from your own labelled data: arrays ``x [n, ...]``, ``y [n]`` or an image folder tree.

Both go through :func:`metafit.data.tasks.pooled_taskset`, the builder of the ``digits`` and
``glyphs`` sets, so tasks are sampled by the same N-way K-shot code:

* :func:`labelled_taskset` (registered as ``arrays``): any labels (ints or strings). Classes,
  not examples, are split into train / validation / test by a permutation of ``seed`` (so a
  test task never shows a class seen in meta-training), or by explicit class lists. Every class
  must hold at least ``shots + queries`` examples (the error names the first one that does
  not); within a split, classes are truncated to the split's smallest class so the pool is a
  rectangular array ``[classes, per_class, *shape]`` (as ``digits`` does).
* :func:`image_folder_taskset` (``image_folder``): ``root/<class>/*.png|jpg|jpeg``, one folder
  per class, read with Pillow into ``uint8`` ``(H, W, C)`` and scaled to ``[0, 1]`` when sampled.

Example:
    >>> x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    >>> y = np.repeat(np.arange(12), 5)
    >>> tasks = get_tasksets("arrays", ways=2, shots=2, queries=3, x=x, y=y)
    >>> tasks.train.sample(jax.random.key(0)).support[0].shape
    (4, 4)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from metafit.data.tasks import TASKSETS, TaskSet, pooled_taskset, sample_float_images, sample_scaled_images

SPLITS = ("train", "validation", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def split_classes(classes: Sequence[Any], fractions: Sequence[float], seed: int) -> dict[str, list[Any]]:
    """Classes split by a permutation of ``seed``: the first ``round(f_train * C)`` to train, the next
    ``round(f_val * C)`` to validation, the rest to test (each split's classes in sorted order)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"class_fractions must be three non-negative shares of train/validation/test summing to 1, "
                         f"got {list(fractions)}")
    order = [classes[i] for i in np.random.default_rng(seed).permutation(len(classes))]
    n_train = int(round(fractions[0] * len(classes)))
    n_val = int(round(fractions[1] * len(classes)))
    parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    return {split: sorted(part) for split, part in zip(SPLITS, parts)}


def class_pools(x: np.ndarray, y: np.ndarray, split_to_classes: dict[str, Sequence[Any]], *, name: str, ways: int,
                shots: int, queries: int) -> dict[str, np.ndarray]:
    """``{split: pool [classes, per_class, *shape]}``, checked before anything is stacked.

    Raises:
      ValueError: ``x``/``y`` lengths differ; a class listed twice or absent from ``y``; a split with
        fewer than ``ways`` classes; a class with fewer than ``shots + queries`` examples (named).
    """
    if len(x) != len(y):
        raise ValueError(f"{name}: x has {len(x)} examples but y has {len(y)} labels; give one label per example")
    present = {label.item() if hasattr(label, "item") else label for label in np.unique(y)}
    seen: dict[Any, str] = {}
    for split in SPLITS:
        for label in split_to_classes[split]:
            if label not in present:
                raise ValueError(f"{name}: class {label!r} of the {split} split has no examples; "
                                 f"classes present: {sorted(present)[:20]}")
            if label in seen:
                raise ValueError(f"{name}: class {label!r} is in both the {seen[label]} and the {split} split; "
                                 "splits are by class and must be disjoint")
            seen[label] = split
    pools = {}
    for split in SPLITS:
        classes = list(split_to_classes[split])
        if len(classes) < ways:
            raise ValueError(f"{name}: ways={ways} but the {split} split has only {len(classes)} classes "
                             f"({classes}); use ways <= {len(classes)} or give the {split} split more classes")
        members = {label: np.flatnonzero(y == label) for label in classes}
        for label, rows in members.items():
            if len(rows) < shots + queries:
                raise ValueError(f"{name}: class {label!r} ({split} split) has {len(rows)} examples but shots + "
                                 f"queries = {shots} + {queries} = {shots + queries}; lower shots or queries, or "
                                 "drop that class")
        per_class = min(len(rows) for rows in members.values())
        pools[split] = np.stack([x[rows[:per_class]] for rows in members.values()])
    return pools


@TASKSETS.register("arrays")
def labelled_taskset(*, ways: int | None, shots: int, queries: int, x: Any, y: Any,
                     class_fractions: Sequence[float] = (0.6, 0.2, 0.2), classes: dict[str, Sequence[Any]] | None = None,
                     seed: int = 0, name: str = "arrays") -> TaskSet:
    """N-way K-shot tasks from labelled arrays.

    Args:
      x: inputs ``[n, *shape]``; ``uint8`` inputs are scaled to ``[0, 1]`` when sampled, others
        are used as float32 as they are.
      y: labels ``[n]`` (any hashable values; tasks relabel classes ``0..ways-1``).
      class_fractions: train / validation / test shares of the *classes* (ignored with ``classes``).
      classes: explicit ``{"train": [...], "validation": [...], "test": [...]}`` class lists.
      seed: seed of the class permutation.
    """
    ways = 5 if ways is None else ways
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name}: y must be one label per example, shape [n], got shape {y.shape}")
    labels = sorted(label.item() if hasattr(label, "item") else label for label in np.unique(y))
    if classes is not None:
        missing = [split for split in SPLITS if split not in classes]
        if missing:
            raise ValueError(f"{name}: classes must list every split {SPLITS}; missing {missing}")
        split_to_classes = {split: list(classes[split]) for split in SPLITS}
    else:
        split_to_classes = split_classes(labels, class_fractions, seed)
    pools = class_pools(x, y, split_to_classes, name=name, ways=ways, shots=shots, queries=queries)
    sampler = sample_scaled_images if x.dtype == np.uint8 else sample_float_images
    if sampler is sample_float_images:
        pools = {split: pool.astype(np.float32) for split, pool in pools.items()}
    info = {"classes": split_to_classes, "per_class": {s: int(p.shape[1]) for s, p in pools.items()}}
    return pooled_taskset(name, pools, ways=ways, shots=shots, queries=queries, info=info, sampler=sampler)


def read_image_folder(root: str | Path, mode: str = "L") -> tuple[np.ndarray, np.ndarray]:
    """``(x uint8 [n, H, W, C], y [n] class-folder names)`` from ``root/<class>/<image>``.

    Args:
      mode: Pillow mode every image is converted to (``"L"`` grey, ``"RGB"``).

    Raises:
      FileNotFoundError: ``root`` is not a folder or holds no class folder with images.
      ValueError: images of different sizes (naming the first that differs), or an unreadable image.
    """
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("image folders are read with Pillow: pip install pillow") from error
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    images, labels, first = [], [], None
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(path) as image:
                    array = np.asarray(image.convert(mode), np.uint8)
            except Exception as error:  # Pillow raises several types for a broken file
                raise ValueError(f"cannot read image {path}: {error}") from error
            array = array[..., None] if array.ndim == 2 else array
            if first is None:
                first = (path, array.shape)
            elif array.shape != first[1]:
                raise ValueError(f"image {path} has shape {array.shape} but {first[0]} has {first[1]}; "
                                 "resize the images to one size")
            images.append(array)
            labels.append(folder.name)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in class folders under {root}; "
                                "expected root/<class>/<image>")
    return np.stack(images), np.asarray(labels)


@TASKSETS.register("image_folder")
def image_folder_taskset(*, ways: int | None, shots: int, queries: int, root: str | Path, mode: str = "L",
                         class_fractions: Sequence[float] = (0.6, 0.2, 0.2),
                         classes: dict[str, Sequence[str]] | None = None, seed: int = 0) -> TaskSet:
    """N-way K-shot tasks from an image folder tree (one folder per class), split by class."""
    x, y = read_image_folder(root, mode)
    return labelled_taskset(ways=ways, shots=shots, queries=queries, x=x, y=y, class_fractions=class_fractions,
                            classes=classes, seed=seed, name="image_folder")
