"""Few-shot classification tasks from scikit-learn's bundled digits (8x8, 1,797 images, offline).

With only ten classes the split is by class *and* instance, fixed (no RNG):
meta-training uses digits 0-4; validation and test use digits 5-9, validation the
first half of each class's images (in the file's order) and test the second half.
So a test task never shows a class seen in meta-training, and at most 5 ways are
possible. Images are scaled to ``[0, 1]`` with shape ``(8, 8, 1)``.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from metafit.data.tasks import TASKSETS, TaskSampler, TaskSet, check_class_pool, sample_scaled_images

TRAIN_CLASSES = (0, 1, 2, 3, 4)
HELD_OUT_CLASSES = (5, 6, 7, 8, 9)


@functools.lru_cache(maxsize=1)
def digit_pools() -> dict[str, np.ndarray]:
    """``{split: uint8 pool [classes, per_class, 8, 8, 1]}``, classes truncated to the smallest class size."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    by_class = {c: images[digits.target == c] for c in range(10)}
    smallest = min(len(v) for v in by_class.values())
    half = smallest // 2
    return {
        "train": np.stack([by_class[c][:smallest] for c in TRAIN_CLASSES]),
        "validation": np.stack([by_class[c][:half] for c in HELD_OUT_CLASSES]),
        "test": np.stack([by_class[c][half : 2 * half] for c in HELD_OUT_CLASSES]),
    }


@TASKSETS.register("digits")
def digits(*, ways: int | None, shots: int, queries: int) -> TaskSet:
    """N-way K-shot tasks on sklearn digits (train classes 0-4, held-out classes 5-9)."""
    ways = 5 if ways is None else ways
    pools = digit_pools()
    samplers = {}
    for split, pool in pools.items():
        check_class_pool("digits", split, pool.shape[0], pool.shape[1], ways, shots, queries)
    for split, pool in pools.items():
        device_pool = jnp.asarray(pool)
        samplers[split] = TaskSampler(
            functools.partial(sample_scaled_images, ways=ways, shots=shots, queries=queries), split, device_pool
        )
    info = {"train_classes": TRAIN_CLASSES, "held_out_classes": HELD_OUT_CLASSES,
            "per_class": {s: int(p.shape[1]) for s, p in pools.items()}}
    return TaskSet("digits", "classification", ways, shots, queries, (8, 8, 1), ways, **samplers, info=info)
