"""Staged multi-task fine-tuning: temperature sampling, gradient-conflict filtering, the stage plan, end to end."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metafit.data.task_suite import DEFAULT_SIZES, task_examples, task_suite
from metafit.serve import multitask as mt


def test_temperature_probs_match_the_closed_form():
    sizes = np.array([1600, 120, 40])
    for temperature in (0.5, 1.0, 2.0, 5.0):
        expected = sizes ** (1 / temperature) / np.sum(sizes ** (1 / temperature))
        np.testing.assert_allclose(mt.temperature_probs(sizes, temperature), expected, rtol=1e-12)
    np.testing.assert_allclose(mt.temperature_probs(sizes, 1.0), sizes / sizes.sum())  # T = 1: proportional
    np.testing.assert_allclose(mt.temperature_probs(sizes, 1e9), np.full(3, 1 / 3), atol=1e-6)  # T -> inf: uniform
    np.testing.assert_allclose(mt.temperature_probs([10**300, 1], 0.01), [1.0, 0.0])  # no overflow
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mt.temperature_probs(sizes, 0.0)
    with pytest.raises(ValueError, match="at least one example"):
        mt.temperature_probs([5, 0], 1.0)


def test_mixture_batches_draw_tasks_with_their_probabilities_and_resume_exactly():
    arrays = [{"input_ids": np.full((n, 3), task, np.int32), "loss_mask": np.ones((n, 3), np.float32)}
              for task, n in enumerate((50, 5, 2))]
    probs = mt.temperature_probs([50, 5, 2], 2.0)
    stream = mt.mixture_batches(arrays, probs, batch_size=64, seed=7)
    drawn = np.concatenate([stream(step)["input_ids"][:, 0] for step in range(200)])
    frequency = np.bincount(drawn, minlength=3) / drawn.size
    assert np.all(np.abs(frequency - probs) < 4 * np.sqrt(probs * (1 - probs) / drawn.size))  # 4 binomial sd
    np.testing.assert_array_equal(stream(17)["input_ids"], mt.mixture_batches(arrays, probs, 64, 7)(17)["input_ids"])
    with pytest.raises(ValueError, match="summing to 1"):
        mt.mixture_batches(arrays, [0.5, 0.5, 0.5], 4, 0)
    with pytest.raises(ValueError, match="different lengths"):
        mt.mixture_batches([arrays[0], {"input_ids": np.zeros((3, 4)), "loss_mask": np.zeros((3, 4))}], [0.5, 0.5], 4, 0)


def _logistic_loss(params, batch, key):
    x, y = batch
    logits = x @ params["w"] + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits), {}


def _brute_force_cosines(params, batches):
    """Cosines of the closed-form logistic gradients X^T (sigmoid(Xw + b) - y) / n, over w only, pair by pair."""
    grads = []
    for x, y in batches:
        p = 1 / (1 + np.exp(-(x @ np.asarray(params["w"]) + float(params["b"]))))
        grads.append(x.T @ (p - y) / len(y))
    return np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in grads] for a in grads])


@pytest.fixture(scope="module")
def conflicting_tasks():
    """Task A, task B = A's inputs with the opposite labels, task C on features A and B never touch."""
    rng = np.random.default_rng(0)
    x = np.zeros((40, 6))
    x[:, :4] = rng.normal(size=(40, 4))
    y = (x[:, 0] > 0).astype(np.float64)
    x_c = np.zeros((40, 6))
    x_c[:, 4:] = rng.normal(size=(40, 2))
    return [(x, y), (x, 1 - y), (x_c, (x_c[:, 4] > 0).astype(np.float64))]


def test_gradient_cosines_equal_brute_force_and_flag_opposite_labels(conflicting_tasks):
    trainable = {"b": False, "w": True}
    at_zero = {"b": jnp.zeros(()), "w": jnp.zeros(6)}
    cosines = mt.gradient_cosines(_logistic_loss, at_zero, conflicting_tasks, trainable)
    assert cosines[0, 1] == pytest.approx(-1.0)  # at w = 0: g_B = X^T (1/2 - (1 - y)) = -g_A exactly
    assert cosines[0, 2] == pytest.approx(0.0) and cosines[1, 2] == pytest.approx(0.0)  # disjoint features
    somewhere = {"b": jnp.asarray(0.3), "w": jnp.asarray(np.random.default_rng(1).normal(size=6))}
    np.testing.assert_allclose(mt.gradient_cosines(_logistic_loss, somewhere, conflicting_tasks, trainable),
                               _brute_force_cosines(somewhere, conflicting_tasks), atol=1e-5)

    sizes = {"a": 100, "b": 10, "c": 10, "d": 10}
    full = np.eye(4)
    full[:3, :3] = cosines
    single = {"a": 0.9, "b": 0.9, "c": 0.9, "d": 0.9}
    joint = {"a": 0.9, "b": 0.85, "c": 0.9, "d": 0.5}  # d: negative transfer only; b: conflict only
    decisions = mt.filter_tasks(sizes, single, joint, full, high_resource=("a",), delta=0.1, cos_threshold=0.0)
    assert decisions["a"].kept and decisions["a"].high_resource  # the larger side of the conflict keeps priority
    assert not decisions["b"].kept and decisions["b"].conflict and decisions["b"].conflicts_with == "a"
    assert not decisions["b"].negative_transfer and "dropped" in decisions["b"].reason
    assert decisions["c"].kept and not decisions["c"].conflict
    assert not decisions["d"].kept and decisions["d"].negative_transfer and decisions["d"].drop_in_metric == pytest.approx(0.4)
    assert json.loads(json.dumps(mt.as_jsonable(decisions)))["b"]["min_cosine"] == pytest.approx(-1.0)


def test_three_stage_plan_trains_large_tasks_then_every_kept_task_with_temperature():
    sizes = {"big": 900, "mid": 400, "small": 16, "tiny": 4, "gone": 9}
    large = mt.high_resource_tasks(sizes, 2)
    assert large == ("big", "mid")
    stage2, stage3 = mt.three_stage_plan(sizes, ["big", "mid", "small", "tiny"], large, temperature=2.0,
                                         stage2_steps=5, stage3_steps=7)
    assert stage2 == mt.Stage("stage2", ("big", "mid"), pytest.approx((900 / 1300, 400 / 1300)), 5)
    assert stage3.tasks == ("big", "mid", "small", "tiny") and stage3.steps == 7
    root = np.sqrt([900, 400, 16, 4])
    np.testing.assert_allclose(stage3.probs, root / root.sum())
    with pytest.raises(ValueError, match="no high-resource task is kept"):
        mt.three_stage_plan(sizes, ["small"], large, temperature=2.0, stage2_steps=5, stage3_steps=7)
    with pytest.raises(ValueError, match=r"high_resource must be in \[1, 5\]"):
        mt.high_resource_tasks(sizes, 0)


def test_task_suite_has_3_large_8_small_a_conflict_and_unseen_held_out_prompts():
    assert len(DEFAULT_SIZES) == 11 and sorted(DEFAULT_SIZES.values())[-4] * 5 < sorted(DEFAULT_SIZES.values())[-3]
    suite = task_suite({"pick": 300, "pick_flipped": 10, "swap": 5, "double": 5}, n_held_out=6, seed=0)
    for data in suite.values():
        assert len(data.held_out) == 6 and not {e.prompt for e in data.held_out} & {e.prompt for e in data.train}
    same = task_examples("pick", 3, seed=4)[1]
    first, second = same.prompt.split("'")[1], same.prompt.split("'")[3]
    assert same.response == first and task_examples("pick", 3, seed=4)[1] == same
    flipped = task_examples("pick_flipped", 1, seed=4)[0]
    assert flipped.response == flipped.prompt.split("'")[3]  # same question, the other answer
    assert task_examples("double", 1, seed=0)[0].response == str(2 * int(task_examples("double", 1, seed=0)[0].prompt.split()[1][:-1]))
    with pytest.raises(ValueError, match="unseen prompts"):
        task_suite({"double": 1000}, n_held_out=10, seed=0)  # 240 numbers, nearly all seen


SIZES = {"pick": 16, "pick_flipped": 8}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny chat Llama (character tokenizer, numpy weights) and a three-stage config on two tasks."""
    from serve_tiny import tiny_folder

    root = tmp_path_factory.mktemp("mt")
    model = tiny_folder(root / "llama")
    config = root / "mt.yaml"
    config.write_text(json.dumps({
        "experiment": "multitask", "seed": 0,
        "train": {"steps": 2, "batch_size": 4, "lr": 0.03, "log_every": 1, "ckpt_every": 2},
        "args": {"arm": "three_stage", "model": str(model), "sizes": SIZES, "n_held_out": 2, "bucket": 96, "max_new_tokens": 2,
                 "high_resource": 1, "probe_steps": 2, "stage2_steps": 2, "stage3_steps": 3, "cosine_rows": 4,
                 "lora": {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]},
                 "single_runs": str(root / "single" / "{task}")}}))
    return root, config


@pytest.mark.slow  # two real runs (single-task + three-stage) on a tiny Llama: compile-bound
def test_three_stage_end_to_end_writes_filtering_and_a_servable_adapter(tiny_setup):
    from metafit.experiments import run_experiment

    root, config = tiny_setup
    with pytest.raises(FileNotFoundError, match="configs/serve/multitask_single.yaml --set args.task=pick"):
        run_experiment(config, workdir=root / "early")
    assert not (root / "early").exists()  # refused before the run folder was created
    # arm single runs once; the other task's single-task result is a file with a known value, which
    # stage 1 must read as it is (a second single run would check nothing new)
    run_experiment(config, ["args.arm=single", "args.task=pick"], workdir=root / "single" / "pick")
    (root / "single" / "pick_flipped").mkdir(parents=True)
    (root / "single" / "pick_flipped" / "results.json").write_text(
        json.dumps({"methods": {"single": {"pick_flipped_em": 0.375}}}))
    run_experiment(config, workdir=root / "three")
    run = root / "three"
    filtering = json.loads((run / "filtering.json").read_text())
    assert set(filtering["decisions"]) == set(SIZES) and filtering["decisions"]["pick"]["kept"]
    singles = {t: json.loads((root / "single" / t / "results.json").read_text())["methods"]["single"][f"{t}_em"]
               for t in SIZES}
    assert {t: d["single"] for t, d in filtering["decisions"].items()} == singles
    assert singles["pick_flipped"] == 0.375 and set(json.loads((root / "single" / "pick" / "results.json").read_text())[
        "methods"]["single"]) == {"pick_em", "pick_loss", "mean_em", "mean_loss"}  # the single arm scores its task only
    results = json.loads((run / "results.json").read_text())
    assert set(results["methods"]) == {"probe", "three_stage"}
    assert {f"{t}_em" for t in SIZES} <= set(results["methods"]["three_stage"])
    stages = {json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"probe", "stage2", "stage3"} <= stages
    assert results["metrics"]["train_steps"] == 5  # stage 2 + stage 3
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(root / "llama")
    with pytest.raises(ValueError, match="args.arm must be one of"):
        run_experiment(config, ["args.arm=mixed"], workdir=root / "bad")
    assert not (root / "bad").exists()
