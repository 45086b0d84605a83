"""The one digits loader and the splits built on it; the char-level task generator."""
import numpy as np
import pytest

from metafit.data import chars, digits
from metafit.data.batching import epoch_batches, multitask_batches


def test_digits_arrays_are_sklearn_digits_scaled_and_read_only():
    from sklearn.datasets import load_digits

    raw = load_digits()
    images, labels = digits.digits_arrays()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(images * 16.0, raw.images)  # k / 16 is exact in float32
    np.testing.assert_array_equal(labels, raw.target)
    with pytest.raises(ValueError, match="read-only"):
        images[0, 0, 0] = 1.0


def test_digit_pools_hold_uint8_pixels_of_the_right_classes():
    from sklearn.datasets import load_digits

    raw = load_digits()
    pools = digits.digit_pools()
    expected = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)  # the pools' definition on the raw file
    first_of_5 = expected[raw.target == 5][0]
    np.testing.assert_array_equal(pools["validation"][0, 0, ..., 0], first_of_5)
    assert pools["train"].shape[0] == 5 and pools["train"].dtype == np.uint8


def test_digits_split_is_a_seeded_partition():
    (x_tr, y_tr), (x_te, y_te) = digits.digits_split(3, 0.25)
    assert x_tr.shape == (1348, 64) and x_te.shape == (449, 64)  # round(1797 / 4) held out
    images, labels = digits.digits_arrays()
    order = np.random.default_rng(3).permutation(1797)
    np.testing.assert_array_equal(x_te, images.reshape(1797, 64)[order[:449]])
    np.testing.assert_array_equal(y_tr, labels[order[449:]])


def test_multitask_digits_inputs_and_labels_follow_the_table():
    data = digits.multitask_digits(0, 1000, 300)
    x, y = data["train"]
    assert x.shape == (8, 1000, 64) and y.shape == (8, 1000) and data["test"][0].shape == (8, 497, 64)
    img = x[0].reshape(-1, 8, 8)
    np.testing.assert_array_equal(y[1], y[0] % 2)
    np.testing.assert_array_equal(y[2], y[0] >= 5)
    np.testing.assert_array_equal(y[3], y[0] % 3)
    np.testing.assert_array_equal(y[4:], np.broadcast_to(y[0], (4, 1000)))
    np.testing.assert_array_equal(x[4].reshape(-1, 8, 8), img[:, :, ::-1])
    np.testing.assert_array_equal(x[5], 1.0 - x[0])
    np.testing.assert_array_equal(x[6].reshape(-1, 8, 8), np.rot90(img, 1, axes=(1, 2)))
    np.testing.assert_array_equal(x[7].reshape(-1, 8, 8), img[:, ::-1, :])
    few = digits.multitask_digits(0, 1000, 300, num_tasks=3)
    np.testing.assert_array_equal(few["validation"][0], data["validation"][0][:3])


def test_multitask_batches_give_every_task_the_same_rows():
    x = np.arange(3 * 10 * 2, dtype=np.float32).reshape(3, 10, 2)
    y = np.arange(30).reshape(3, 10)
    xb, yb = multitask_batches(x, y, 4, seed=1)(5)
    assert xb.shape == (3, 4, 2) and yb.shape == (3, 4)
    rows_x, rows_y = epoch_batches((np.arange(10), np.arange(10)), 4, 1)(5)
    np.testing.assert_array_equal(yb, y[:, rows_y])
    np.testing.assert_array_equal(xb, x[:, rows_x])


def _text(tokens):
    return "".join(chars.CHARS[t] for t in tokens)


@pytest.mark.parametrize("kind", "CMAT")
def test_char_tasks_answers_and_masks(kind):
    batch = chars.char_tasks(kind, 50, seed=4)
    tokens, mask = batch["input_ids"], batch["loss_mask"]
    assert tokens.shape == mask.shape == (50, chars.SEQ_LEN)
    for row, weights in zip(tokens, mask):
        text = _text(row)
        question, answer = text[1:].split("=")
        assert text[0] == kind and answer.endswith(".")
        if kind in "CM":
            expected = question if kind == "C" else "".join(str((int(d) + 4) % 10) for d in question)
        else:
            a, b = map(int, question.split("+"))
            total = f"{a + b:03d}"
            expected = total if kind == "A" else "".join(str((int(d) + 4) % 10) for d in total)
        assert answer == expected + "."
        # position t predicts token t + 1: the mask covers exactly the answer characters and the final '.'
        predicted = "".join(text[t + 1] for t in np.nonzero(weights)[0])
        assert predicted == answer and weights[-1] == 0


def test_char_stream_is_a_pure_function_of_the_step():
    stream = chars.char_stream("CCAM", 8, seed=2)
    a, b = stream(3), stream(3)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert [_text(r)[0] for r in a["input_ids"]] == list("CCCCAAMM")
    assert not np.array_equal(stream(4)["input_ids"], a["input_ids"])
    with pytest.raises(ValueError, match="unknown char task kind"):
        chars.char_tasks("X", 2, 0)
