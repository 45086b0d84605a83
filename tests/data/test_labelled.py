"""Few-shot task sets from labelled arrays and image folders, and digits/glyphs through the same builder."""
import jax
import numpy as np
import pytest

from metafit.data.tasks import get_tasksets


def _labelled(n_classes=10, per_class=6, shape=(3,)):
    # x encodes its own label and index, so a sampled example can be traced back to its class
    y = np.repeat(np.arange(n_classes) * 10, per_class)  # labels 0, 10, 20, ... (not 0..C-1)
    x = np.zeros((len(y), *shape), np.float32)
    x[:, 0] = y
    x[:, 1] = np.tile(np.arange(per_class), n_classes)
    return x, y


def test_arrays_split_by_class_and_tasks_relabel_classes():
    x, y = _labelled()
    tasks = get_tasksets("arrays", ways=2, shots=2, queries=3, x=x, y=y, class_fractions=(0.6, 0.2, 0.2), seed=1)
    splits = tasks.info["classes"]
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [6, 2, 2]
    assert sorted(sum(splits.values(), [])) == list(range(0, 100, 10))  # every class once, no overlap
    expected_order = [list(range(0, 100, 10))[i] for i in np.random.default_rng(1).permutation(10)]
    assert splits["train"] == sorted(expected_order[:6])
    for split in ("train", "validation", "test"):
        batch = tasks.split(split).sample_batch(jax.random.key(3), 8)
        xs = np.concatenate([batch.support[0], batch.query[0]], axis=1)   # [tasks, 10, 3]
        ys = np.concatenate([batch.support[1], batch.query[1]], axis=1)
        for t in range(8):
            originals = xs[t, :, 0]
            assert set(originals) <= set(splits[split])                   # only this split's classes
            for label in range(2):                                        # one original class per task label
                assert len(set(originals[ys[t] == label])) == 1
            assert len(set(originals)) == 2
            # examples within a task are distinct (drawn without replacement)
            assert len({(a, b) for a, b in xs[t, :, :2]}) == 10
        assert batch.support[0].dtype == np.float32 and batch.support[0].shape == (8, 4, 3)


def test_arrays_explicit_classes_and_uint8_scaling():
    y = np.repeat(np.array(["cat", "dog", "eel", "fox"]), 3)
    x = np.arange(12, dtype=np.uint8)[:, None] * 20
    tasks = get_tasksets("arrays", ways=1, shots=1, queries=1, x=x, y=y,
                         classes={"train": ["cat", "dog"], "validation": ["eel"], "test": ["fox"]})
    task = tasks.test.sample(jax.random.key(0))
    values = np.concatenate([task.support[0], task.query[0]]).ravel()
    assert set(np.round(values * 255).astype(int)) <= {180, 200, 220}   # fox rows 9-11, scaled by 1/255


@pytest.mark.parametrize("kwargs, message", [
    (dict(ways=3, shots=1, queries=1), "ways=3 but the validation split has only 2 classes"),
    (dict(ways=2, shots=4, queries=3), "class \\d+ \\(train split\\) has 6 examples but shots \\+ queries = 4 \\+ 3 = 7"),
    (dict(ways=2, shots=1, queries=1, classes={"train": [0, 10], "validation": [10], "test": [20]}),
     "class 10 is in both the train and the validation split"),
    (dict(ways=1, shots=1, queries=1, classes={"train": [0, 999], "validation": [10], "test": [20]}),
     "class 999 of the train split has no examples"),
    (dict(ways=1, shots=1, queries=1, class_fractions=(0.5, 0.5)), "class_fractions must be three"),
])
def test_arrays_bad_requests_are_clear_errors(kwargs, message):
    x, y = _labelled()
    with pytest.raises(ValueError, match=message):
        get_tasksets("arrays", x=x, y=y, **kwargs)


def test_too_few_examples_names_the_class():
    x, y = _labelled()
    keep = ~((y == 30) & (np.tile(np.arange(6), 10) >= 2))   # class 30 keeps 2 examples
    with pytest.raises(ValueError, match="class 30 .* has 2 examples"):
        get_tasksets("arrays", ways=1, shots=2, queries=1, x=x[keep], y=y[keep], classes={
            "train": [0, 30], "validation": [10], "test": [20]})


def test_image_folder_tree(tmp_path):
    from PIL import Image

    names = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    for c, name in enumerate(names):
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels = np.full((4, 5), 10 * c + i, np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.{'png' if i % 2 else 'jpg'}", quality=100)
    (tmp_path / "notes.txt").write_text("not a class")
    tasks = get_tasksets("image_folder", ways=2, shots=1, queries=1, root=tmp_path, class_fractions=(0.5, 0.25, 0.25))
    assert tasks.input_shape == (4, 5, 1)
    assert sum(len(v) for v in tasks.info["classes"].values()) == 8
    task = tasks.train.sample(jax.random.key(0))
    values = np.round(np.concatenate([task.support[0], task.query[0]]) * 255)
    classes = [names.index(n) for n in tasks.info["classes"]["train"]]
    allowed = {10 * c + i for c in classes for i in range(3)}
    assert {int(v) for v in values.ravel()} <= allowed                   # uniform images survive JPEG at q=100
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "eps" / "big.png")
    with pytest.raises(ValueError, match="big.png has shape \\(6, 6, 1\\)"):
        get_tasksets("image_folder", ways=2, shots=1, queries=1, root=tmp_path)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        get_tasksets("image_folder", ways=2, shots=1, queries=1, root=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_tasksets("image_folder", ways=2, shots=1, queries=1, root=tmp_path / "missing")
