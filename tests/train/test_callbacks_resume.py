"""Callbacks, pausing, strict resume: a resumed run skips its finished steps and restores callback state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metafit.train import (Callback, CheckpointMismatchError, MetricsWriter, NonFiniteLossError, StatefulData,
                           StepInfo, TrainConfig, callbacks, fit, param_snapshots, unstack)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 3)).astype(np.float32)
Y = X @ np.array([1.0, -2.0, 0.5], np.float32)


def squared_loss(w, batch, key):
    x, y = batch
    return jnp.mean((x @ w["w"] - y) ** 2), {}


class CountingData:
    """``batch_at`` that records which steps were served, to prove which steps a call ran."""

    def __init__(self):
        self.steps = []

    def __call__(self, step):
        self.steps.append(step)
        rows = np.arange(8) + (step % 8) * 8
        return X[rows], Y[rows]


def params0():
    return {"w": jnp.zeros(3)}


def sum_of_w(info, state):
    """Callback state: a running sum of w at each call, and the count of calls."""
    total, calls = state
    return (total + info.params["w"], calls + 1), {"w0": info.params["w"][0], "calls": calls + 1}


def test_callback_runs_at_its_period_and_at_the_end_with_params_of_that_step():
    cfg = TrainConfig(steps=25, lr=0.05, log_every=5)
    seen = []

    def record(info, state):
        seen.append((info.step, info.final, np.asarray(info.params["w"]).copy()))
        return state, {}

    cb = Callback("rec", record, every=10)
    result = fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), callbacks=[cb], progress=False)
    assert [(s, f) for s, f, _ in seen] == [(10, False), (20, False), (25, True)]
    # the params a callback sees at step 10 are those of an uninterrupted 10-step run
    ten = fit(squared_loss, params0(), CountingData(), TrainConfig(steps=10, lr=0.05, log_every=5),
              key=jax.random.key(0), progress=False)
    np.testing.assert_array_equal(seen[0][2], np.asarray(ten.params["w"]))
    assert result.complete and result.steps_run == 25


def test_resume_skips_finished_steps_and_restores_callback_state(tmp_path):
    cfg = TrainConfig(steps=40, lr=0.05, log_every=10, ckpt_every=10)
    init = (jnp.zeros(3), jnp.zeros((), jnp.int32))
    cb = Callback("sum", sum_of_w, every=10, init=init)
    reference = fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), callbacks=[cb],
                    progress=False)

    log = MetricsWriter(tmp_path / "metrics.jsonl")
    first_data = CountingData()
    paused = fit(squared_loss, params0(), first_data, cfg, key=jax.random.key(0), workdir=tmp_path / "ck",
                 callbacks=[cb], stop_at=20, log=log, progress=False)
    assert not paused.complete and paused.step == 20 and first_data.steps == list(range(20))

    second_data = CountingData()
    resumed = fit(squared_loss, params0(), second_data, cfg, key=jax.random.key(0), workdir=tmp_path / "ck",
                  callbacks=[cb], log=log, progress=False)
    assert resumed.resumed_from == 20 and resumed.steps_run == 20
    assert second_data.steps == list(range(20, 40))  # the finished steps were not redone
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(reference.params["w"]))
    total, calls = resumed.callback_states["sum"]
    assert int(calls) == 4  # two calls restored from the checkpoint + two live ones, none repeated
    np.testing.assert_allclose(np.asarray(total), np.asarray(reference.callback_states["sum"][0]), rtol=0, atol=0)
    assert [r["step"] for r in resumed.callback_records["sum"]] == [10, 20, 30, 40]
    assert resumed.history == reference.history

    third_data = CountingData()  # resuming a finished stage runs nothing
    again = fit(squared_loss, params0(), third_data, cfg, key=jax.random.key(0), workdir=tmp_path / "ck",
                callbacks=[cb], log=log, progress=False)
    assert third_data.steps == [] and again.steps_run == 0 and int(again.callback_states["sum"][1]) == 4


def test_pause_off_the_checkpoint_grid_resumes_to_the_same_end(tmp_path):
    cfg = TrainConfig(steps=30, lr=0.05, log_every=10, ckpt_every=10, steps_per_dispatch=5)
    reference = fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), progress=False)
    fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), workdir=tmp_path, stop_at=13,
        progress=False)
    data = CountingData()
    resumed = fit(squared_loss, params0(), data, cfg, key=jax.random.key(0), workdir=tmp_path, progress=False)
    assert resumed.resumed_from == 13 and data.steps == list(range(13, 30))
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(reference.params["w"]))


def test_stateful_data_sees_the_state_of_the_last_call(tmp_path):
    cfg = TrainConfig(steps=20, lr=0.05, log_every=5, ckpt_every=5)
    served = {}

    def batch_at(step, states):
        served[step] = int(states["count"])
        rows = np.arange(8) + (step % 8) * 8
        return X[rows], Y[rows]

    cb = Callback("count", lambda info, n: (n + 1, {}), every=5, init=jnp.zeros((), jnp.int32))
    fit(squared_loss, params0(), StatefulData(batch_at), cfg, key=jax.random.key(0), callbacks=[cb],
        workdir=tmp_path, stop_at=10, progress=False)
    fit(squared_loss, params0(), StatefulData(batch_at), cfg, key=jax.random.key(0), callbacks=[cb],
        workdir=tmp_path, progress=False)
    assert [served[s] for s in (0, 4, 5, 9, 10, 14, 15, 19)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_param_snapshots_keep_copies_at_each_period():
    cfg = TrainConfig(steps=30, lr=0.05, log_every=10)
    snaps = param_snapshots(params0(), every=10, count=3)
    result = fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), callbacks=[snaps],
                 progress=False)
    kept = unstack(result.callback_states["snapshots"])
    for steps, snap in zip((10, 20, 30), kept):
        direct = fit(squared_loss, params0(), CountingData(), TrainConfig(steps=steps, lr=0.05, log_every=10),
                     key=jax.random.key(0), progress=False)
        np.testing.assert_array_equal(np.asarray(snap["w"]), np.asarray(direct.params["w"]))


def test_param_snapshots_keep_the_last_count_and_compile_once_whatever_the_leaf_shapes():
    """Three leaf shapes and dtypes, four takes into two slots: the last two kept, oldest first, by one
    compiled take and one compiled unstack (eagerly, each op would compile once per leaf shape)."""
    tree = lambda v: {"a": jnp.full((2, 3), v), "b": {"c": jnp.full(4, v, jnp.bfloat16), "d": jnp.full((), v)}}
    snaps = param_snapshots(tree(0.0), every=1, count=2)
    takes, unstacks = callbacks._take_snapshot._cache_size(), callbacks._unstack._cache_size()
    state = snaps.init
    for value in (1.0, 2.0, 3.0, 4.0):
        state, _ = snaps.fn(StepInfo(0, tree(value), None, {}, False, "train"), state)
    kept = unstack(state)
    assert [float(k["a"][0, 0]) for k in kept] == [3.0, 4.0] and [float(k["b"]["c"][0]) for k in kept] == [3.0, 4.0]
    assert kept[0]["b"]["c"].dtype == jnp.bfloat16 and kept[1]["b"]["d"].shape == ()
    assert callbacks._take_snapshot._cache_size() - takes <= 1 and callbacks._unstack._cache_size() - unstacks <= 1


def test_checkpoint_of_another_structure_is_an_error_naming_the_leaf(tmp_path):
    cfg = TrainConfig(steps=10, lr=0.05, ckpt_every=5, log_every=5)
    fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), workdir=tmp_path, stop_at=5,
        progress=False)
    wider = lambda w, batch, key: squared_loss({"w": w["w"][:3]}, batch, key)
    with pytest.raises(CheckpointMismatchError, match=r"\['w'\] has shape \[3\] float32 on disk but \[4\].*--force-new"):
        fit(wider, {"w": jnp.zeros(4)}, CountingData(), cfg, key=jax.random.key(0), workdir=tmp_path,
            progress=False)
    with pytest.raises(CheckpointMismatchError, match="callback|not on disk"):  # a new callback = new structure
        fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), workdir=tmp_path,
            callbacks=[Callback("n", lambda i, s: (s, {}), every=5, init=jnp.zeros(2))], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5"]  # nothing set aside, nothing lost


def test_timing_is_reported():
    cfg = TrainConfig(steps=20, lr=0.05, log_every=5, steps_per_dispatch=5)
    timing = fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), progress=False).timing
    assert timing["seconds"] >= timing["first_dispatch_seconds"] > 0
    assert 0 < timing["step_seconds"] < timing["seconds"] / 15


def test_bad_callbacks_and_stop_at_are_refused():
    cfg = TrainConfig(steps=10)
    cb = Callback("a", lambda i, s: (s, {}))
    with pytest.raises(ValueError, match="unique; repeated: a"):
        fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), callbacks=[cb, cb], progress=False)
    with pytest.raises(ValueError, match="stop_at"):
        fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), stop_at=11, progress=False)


def test_non_finite_parameters_stop_the_run_before_a_checkpoint(tmp_path):
    def exploding(w, batch, key):  # finite loss and gradient, but the update overflows float32
        return jnp.sum(w["w"]) * 1e18, {}

    cfg = TrainConfig(steps=10, lr=1e21, optimizer="sgd", ckpt_every=5, log_every=5)
    with pytest.raises(NonFiniteLossError, match="non-finite updated parameters at step 1.*No checkpoint"):
        fit(exploding, params0(), CountingData(), cfg, key=jax.random.key(0), workdir=tmp_path, progress=False)
    assert not any(p.name.isdigit() for p in tmp_path.iterdir())


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    log = MetricsWriter(tmp_path / "metrics.jsonl")
    log.write({"stage": "train", "step": 5, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "train", "st')  # killed mid-write
    with pytest.warns(RuntimeWarning, match="torn last line"):
        assert log.read("train") == [{"stage": "train", "step": 5, "loss": 1.0}]
    with pytest.warns(RuntimeWarning):
        log.truncate("train", 5)
    assert log.read() == [{"stage": "train", "step": 5, "loss": 1.0}]  # the torn tail is gone for good


@pytest.mark.parametrize("override, message", [
    ({"lr": float("nan")}, "train.lr must be a finite number"), ({"weight_decay": -0.1}, "train.weight_decay"),
    ({"clip_norm": -1.0}, "train.clip_norm"), ({"steps": 3 * 10**9}, "above the limit"),
])
def test_bad_numbers_in_train_config_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**override)


def test_checkpoints_are_named_and_readable_without_the_training_code(tmp_path):
    from metafit.train import load_checkpoint

    cfg = TrainConfig(steps=10, lr=0.05, ckpt_every=5, log_every=5)
    cb = Callback("sum", sum_of_w, every=5, init=(jnp.zeros(3), jnp.zeros((), jnp.int32)))
    result = fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), workdir=tmp_path,
                 callbacks=[cb], progress=False)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 10
    np.testing.assert_array_equal(np.asarray(ckpt["state"]["train"]["trainable"]["w"]), np.asarray(result.params["w"]))
    assert int(ckpt["state"]["callbacks"]["sum"]["1"]) == 2
    assert set(ckpt["state"]["train"]) == {"step", "trainable", "opt_state", "first_bad_step", "bad_metric"}
    assert load_checkpoint(tmp_path / "5")["step"] == 5


def test_checkpoint_of_the_earlier_flat_layout_still_resumes(tmp_path):
    import orbax.checkpoint as ocp

    cfg = TrainConfig(steps=10, lr=0.05, ckpt_every=5, log_every=5)
    reference = fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), progress=False)
    five = fit(squared_loss, params0(), CountingData(), cfg, key=jax.random.key(0), workdir=tmp_path / "new",
               stop_at=5, progress=False)
    from metafit.train import load_checkpoint

    state = load_checkpoint(tmp_path / "new")["state"]["train"]
    leaves = [state["step"], state["trainable"]["w"], *jax.tree.leaves(state["opt_state"]),
              state["first_bad_step"], state["bad_metric"]]
    flat = {"leaves": {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}, "step": np.asarray(5)}
    manager = ocp.CheckpointManager(tmp_path / "old", options=ocp.CheckpointManagerOptions(create=True))
    manager.save(5, args=ocp.args.StandardSave(flat))  # what the trainer wrote before names were kept
    manager.wait_until_finished()
    manager.close()
    data = CountingData()
    resumed = fit(squared_loss, params0(), data, cfg, key=jax.random.key(0), workdir=tmp_path / "old", progress=False)
    assert five.step == 5 and resumed.resumed_from == 5 and data.steps == list(range(5, 10))
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(reference.params["w"]))
