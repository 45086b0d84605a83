"""scikit-learn's bundled digits (8x8, 1,797 images, offline): one loader and the splits built on it.

:func:`digits_arrays` is the one place the file is read; every use goes through it:

* :func:`digit_pools` / the ``digits`` task set: few-shot classification. With only ten classes
  the split is by class *and* instance, fixed (no RNG): meta-training uses digits 0-4;
  validation and test use digits 5-9, validation the first half of each class's images (in the
  file's order) and test the second half. So a test task never shows a class seen in
  meta-training, and at most 5 ways are possible. Images are scaled to ``[0, 1]`` with shape
  ``(8, 8, 1)``.
* :func:`digits_split`: flat images, a train/test split drawn from a seed (the quickstart).
* :func:`multitask_digits`: eight classification tasks on one input space (the merging
  experiments' stand-in for CLIP's eight vision tasks):

  ====  =================================  ==========
  task  input                              label
  ====  =================================  ==========
  0     image                              digit (10)
  1     image                              parity (2)
  2     image                              digit >= 5 (2)
  3     image                              digit mod 3 (3)
  4     left-right flipped image           digit (10)
  5     inverted intensities (1 − x)       digit (10)
  6     image rotated by 90°               digit (10)
  7     upside-down image                  digit (10)
  ====  =================================  ==========
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from metafit.data.tasks import TASKSETS, TaskSet, pooled_taskset

TRAIN_CLASSES = (0, 1, 2, 3, 4)
HELD_OUT_CLASSES = (5, 6, 7, 8, 9)
MULTITASK_NAMES = ("digit", "parity", "ge5", "mod3", "flip_lr", "invert", "rot90", "flip_ud")


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 [1797, 8, 8] in [0, 1], labels int32 [1797])`` in the file's order (read-only).

    The file is scikit-learn's ``datasets/data/digits.csv.gz`` (64 pixel columns in 0..16, then
    the label), read directly: importing ``sklearn.datasets`` (scipy and all) costs seconds in
    every run. ``load_digits`` is the fallback where the file is not at that place.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",")
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, target = digits.images, digits.target
    images = (pixels / 16.0).astype(np.float32)
    labels = target.astype(np.int32)
    for array in (images, labels):
        array.setflags(write=False)  # cached and shared by every caller
    return images, labels


@functools.lru_cache(maxsize=1)
def digit_pools() -> dict[str, np.ndarray]:
    """``{split: uint8 pool [classes, per_class, 8, 8, 1]}``, classes truncated to the smallest class size."""
    images, labels = digits_arrays()
    pixels = np.round(images * 255.0).astype(np.uint8)[..., None]  # exact: pixel values are k / 16
    by_class = {c: pixels[labels == c] for c in range(10)}
    smallest = min(len(v) for v in by_class.values())
    half = smallest // 2
    return {
        "train": np.stack([by_class[c][:smallest] for c in TRAIN_CLASSES]),
        "validation": np.stack([by_class[c][:half] for c in HELD_OUT_CLASSES]),
        "test": np.stack([by_class[c][half : 2 * half] for c in HELD_OUT_CLASSES]),
    }


def digits_split(seed: int, test_fraction: float) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((x_train, y_train), (x_test, y_test))``: flat images ``[n, 64]`` in [0, 1], split by a permutation of ``seed``."""
    images, labels = digits_arrays()
    x = images.reshape(len(images), -1)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (x[train], labels[train]), (x[test], labels[test])


def multitask_digits(seed: int, train_size: int, val_size: int,
                     num_tasks: int = len(MULTITASK_NAMES)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (x [T, n, 64], y [T, n])}`` for the first ``num_tasks`` tasks of the table above.

    Every task sees the same images (rows) in each split: train gets ``train_size`` of them,
    validation ``val_size``, test the rest, by a permutation drawn from ``seed``.
    """
    images, label = digits_arrays()
    inputs = [images, images, images, images, images[:, :, ::-1], 1.0 - images, np.rot90(images, 1, axes=(1, 2)),
              images[:, ::-1, :]]
    labels = [label, label % 2, (label >= 5).astype(np.int32), label % 3, label, label, label, label]
    x = np.stack([i.reshape(len(label), -1) for i in inputs[:num_tasks]])
    y = np.stack(labels[:num_tasks])
    order = np.random.default_rng(seed).permutation(len(label))
    cuts = {"train": order[:train_size], "validation": order[train_size:train_size + val_size],
            "test": order[train_size + val_size:]}
    return {split: (x[:, rows], y[:, rows]) for split, rows in cuts.items()}


@TASKSETS.register("digits")
def digits(*, ways: int | None, shots: int, queries: int) -> TaskSet:
    """N-way K-shot tasks on sklearn digits (train classes 0-4, held-out classes 5-9)."""
    ways = 5 if ways is None else ways
    pools = digit_pools()
    info = {"train_classes": TRAIN_CLASSES, "held_out_classes": HELD_OUT_CLASSES,
            "per_class": {s: int(p.shape[1]) for s, p in pools.items()}}
    return pooled_taskset("digits", pools, ways=ways, shots=shots, queries=queries, info=info)
