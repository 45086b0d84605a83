"""Few-shot task sets: shapes, determinism, split hygiene, committed glyph splits, bad input."""
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metafit.data import glyphs
from metafit.data.tasks import get_tasksets, list_tasksets
from metafit.registry import UnknownNameError


def test_list_and_unknown_names():
    assert {"sinusoid", "sinusoid_hetero", "glyphs", "digits"} <= set(list_tasksets())
    with pytest.raises(UnknownNameError, match="did you mean 'sinusoid'"):
        get_tasksets("sinusiod")


def test_sinusoid_protocol_shapes_and_determinism():
    tasks = get_tasksets("sinusoid", shots=5, queries=7)
    batch = jax.jit(lambda k: tasks.train.sample_batch(k, 64))(jax.random.key(0))
    assert batch.support[0].shape == (64, 5, 1) and batch.query[1].shape == (64, 7, 1)
    x = np.concatenate([batch.support[0], batch.query[0]], 1)
    y = np.concatenate([batch.support[1], batch.query[1]], 1)
    assert x.min() >= -5 and x.max() <= 5 and np.abs(y).max() <= 5
    again = tasks.train.sample_batch(jax.random.key(0), 64)
    np.testing.assert_array_equal(batch.query[1], again.query[1])
    other = tasks.train.sample_batch(jax.random.key(1), 64)
    assert not np.allclose(batch.query[1], other.query[1])
    # each task is a sinusoid: fit A sin(x - phi) = a sin x + b cos x by least squares, exactly
    design = np.stack([np.sin(x[0, :, 0]), np.cos(x[0, :, 0])], 1)
    coef = np.linalg.lstsq(design, y[0, :, 0], rcond=None)[0]
    np.testing.assert_allclose(design @ coef, y[0, :, 0], atol=1e-5)
    assert 0.1 - 1e-5 <= np.hypot(*coef) <= 5 + 1e-5


def test_heterogeneous_sinusoid_has_outliers_in_training_only():
    tasks = get_tasksets("sinusoid_hetero", shots=5, queries=15, outlier_fraction=0.3)

    def residual_of_sine_fit(batch):  # max |y - best a sin x + b cos x| per task, batched least squares
        x = np.concatenate([batch.support[0], batch.query[0]], 1)[..., 0].astype(np.float64)
        y = np.concatenate([batch.support[1], batch.query[1]], 1)[..., 0].astype(np.float64)
        design = np.stack([np.sin(x), np.cos(x)], -1)
        coef = np.linalg.solve(design.transpose(0, 2, 1) @ design, design.transpose(0, 2, 1) @ y[..., None])
        return np.abs((design @ coef)[..., 0] - y).max(axis=1)

    train = residual_of_sine_fit(tasks.train.sample_batch(jax.random.key(0), 400))
    test = residual_of_sine_fit(tasks.test.sample_batch(jax.random.key(0), 100))
    assert 0.22 < np.mean(train > 1e-3) < 0.38  # ~30% are not sinusoids
    assert np.all(test < 1e-3)  # the test split is clean
    with pytest.raises(ValueError, match="outlier_fraction"):
        get_tasksets("sinusoid_hetero", outlier_fraction=1.5)


def test_digits_tasks_are_balanced_and_split_by_class():
    tasks = get_tasksets("digits", ways=5, shots=2, queries=3)
    task = tasks.test.sample(jax.random.key(0))
    assert task.support[0].shape == (10, 8, 8, 1) and task.query[0].shape == (15, 8, 8, 1)
    assert np.bincount(np.asarray(task.support[1]), minlength=5).tolist() == [2] * 5
    assert 0.0 <= float(task.support[0].min()) and float(task.support[0].max()) <= 1.0
    assert tasks.info["train_classes"] == (0, 1, 2, 3, 4) and tasks.info["held_out_classes"] == (5, 6, 7, 8, 9)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="digits", ways=6, shots=1, queries=1), "ways=6 but the train split has only 5 classes"),
    (dict(name="digits", ways=5, shots=100, queries=100), "shots \\+ queries"),
    (dict(name="sinusoid", shots=5, queries=0), "queries must be a positive integer"),
    (dict(name="sinusoid", shots=0, queries=5), "shots must be a positive integer"),
    (dict(name="sinusoid", ways=5, shots=5, queries=5), "regression task set: ways must be 1"),
    (dict(name="glyphs", ways=500, shots=1, queries=1), "ways=500 but the validation split has only"),
    (dict(name="glyphs", ways=5, shots=15, queries=15, instances=20), "shots \\+ queries = 15 \\+ 15 = 30"),
])
def test_bad_sizes_fail_before_sampling(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        get_tasksets(name, **kwargs)


def test_glyph_split_file_is_small_disjoint_by_alphabet_and_reproducible():
    committed = json.loads(glyphs.SPLITS_FILE.read_text())
    assert glyphs.SPLITS_FILE.stat().st_size < 100_000  # code points and font masks, no images
    splits = committed["splits"]
    alphabets = [set(splits[s]) for s in ("train", "validation", "test")]
    assert not (alphabets[0] & alphabets[1] or alphabets[0] & alphabets[2] or alphabets[1] & alphabets[2])
    points = [cp for s in splits.values() for items in s.values() for cp, _ in items]
    assert len(points) == len(set(points)) > 1500
    assert len(alphabets[0]) + len(alphabets[1]) + len(alphabets[2]) > 25
    regenerated = glyphs.generate_splits()  # deterministic: same fonts -> same file
    assert regenerated["splits"] == splits and regenerated["fonts"] == committed["fonts"]


def _digest_batches(taskset) -> dict:
    return {split: taskset.split(split).sample_batch(jax.random.key(7), 3) for split in ("train", "validation", "test")}


def _digest(taskset) -> str:
    digest = hashlib.sha256()
    for split, batch in _digest_batches(taskset).items():
        for leaf in jax.tree.leaves(batch):
            leaf = np.asarray(leaf)
            digest.update(str(leaf.dtype).encode() + str(leaf.shape).encode() + leaf.tobytes())
    return digest.hexdigest()


# Digests of the tasks sampled by the code before digits and glyphs moved onto pooled_taskset
# (commit 509c3e9, key 7, 3 tasks per split): the shared builder must not change a single bit.
# glyphs: 8-pixel drawings, 2 per class, 5-way 1-shot 1-query (the digest of 12 pixels, 3 per class,
# 1 shot, 2 queries was 25c14dcc...; the smaller pool renders in half the time). To recompute one:
# `git archive 509c3e9 metafit | tar -x -C OLD` and call get_tasksets and _digest with PYTHONPATH=OLD.
BEFORE = {
    "digits": "fd416aea0d88a6154ae4eecdeccb5f5bdf354fe2415b9ddca8a1eea2020578f1",
    "glyphs": "0cb1b17d5d2406ceac5341f721c88c6fc05c82c032147f78c6be022e01444f00",
}


def test_digits_tasks_are_bit_identical_to_before_the_shared_builder():
    assert _digest(get_tasksets("digits", ways=3, shots=2, queries=1)) == BEFORE["digits"]


def test_glyph_tasks_shapes_labels_and_distinct_classes():
    # the smallest drawings (8 pixels) and pool (2 per class): rendering every class of three splits
    # is the test's whole cost
    tasks = get_tasksets("glyphs", ways=5, shots=1, queries=1, instances=2, image_size=8)
    assert tasks.info["classes"]["train"] > 1000 and tasks.info["alphabets"]["test"] >= 5
    task = jax.tree.map(lambda leaf: leaf[0], _digest_batches(tasks)["test"])  # the digest's sampler, compiled once
    assert task.support[0].shape == (5, 8, 8, 1) and task.query[0].shape == (5, 8, 8, 1)
    assert task.support[0].dtype == jnp.float32 and 0.0 <= float(task.support[0].min()) <= float(
        task.support[0].max()) <= 1.0
    np.testing.assert_array_equal(task.support[1], np.arange(5))
    np.testing.assert_array_equal(task.query[1], np.arange(5))
    # the five classes really are different glyphs, and support/query are different drawings
    flat = np.asarray(task.support[0]).reshape(5, -1)
    assert min(np.abs(flat[i] - flat[j]).sum() for i in range(5) for j in range(i + 1, 5)) > 1.0
    assert np.abs(np.asarray(task.query[0][0]) - np.asarray(task.support[0][0])).sum() > 0.1
    assert _digest(tasks) == BEFORE["glyphs"]  # the shared builder samples exactly what glyphs did before


def test_batch_fn_is_the_pure_sampler_the_trainer_wraps():
    """``batch_fn`` draws the tasks ``sample_batch`` draws; ``fit`` runs it inside its step as a DeviceSampler."""
    from metafit.train import DeviceSampler, TrainConfig, fit

    # the sizes of the hetero and digest tests above: their compiled samplers are reused
    sizes = (("sinusoid", dict(shots=5, queries=15), 100), ("digits", dict(ways=3, shots=2, queries=1), 3))
    for name, options, num_tasks in sizes:
        sampler = get_tasksets(name, **options).train
        drawn = sampler.batch_fn(num_tasks)(jax.random.key(7), sampler.data)
        expected = sampler.sample_batch(jax.random.key(7), num_tasks)
        for a, b in zip(jax.tree.leaves(drawn), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)

    seen = []

    def loss(params, batch, key):
        seen.append(jax.tree.map(lambda x: x.shape, batch))
        return jnp.mean((batch.query[0] * params["w"]) ** 2), {}

    # a task set built again with equal options has the same sampler objects, so nothing recompiles
    from metafit.data.tasks import _sample_batch

    compiled = _sample_batch._cache_size()
    for name, options, num_tasks in sizes:
        again = get_tasksets(name, **options)
        assert again.train.fn is get_tasksets(name, **options).train.fn
        assert again.train.batch_fn(num_tasks) is again.train.batch_fn(num_tasks)
        again.train.sample_batch(jax.random.key(7), num_tasks)
    assert _sample_batch._cache_size() == compiled
    sinusoid = get_tasksets("sinusoid", shots=5, queries=15).train
    fit(loss, {"w": jnp.ones(())}, DeviceSampler(sinusoid.batch_fn(5), data=sinusoid.data),
        TrainConfig(steps=2, lr=0.1, log_every=1), key=jax.random.key(0), progress=False)
    assert seen[0].support[0] == (5, 5, 1)


def test_the_data_layer_imports_no_layer_above_it():
    """Data knows no trainer (DESIGN.md: the layers read bottom-up; data sits at the bottom)."""
    import ast
    from pathlib import Path

    import metafit.data

    above = ("metafit.train", "metafit.meta", "metafit.robust", "metafit.merge", "metafit.bayes", "metafit.peft",
             "metafit.parallel", "metafit.experiments", "metafit.cli")
    for path in Path(metafit.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.startswith(above)]
            assert not bad, f"{path.name} imports {bad}"
