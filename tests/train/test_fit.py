"""The trainer against closed forms and its own invariants (resume, accumulation, masks, NaN guard)."""
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metafit.train import CheckpointWarning, DeviceSampler, MetricsWriter, NonFiniteLossError, TrainConfig, fit

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 3)).astype(np.float32)
W_TRUE = np.array([1.0, -2.0, 0.5], np.float32)
Y = X @ W_TRUE


def squared_loss(w, batch, key):
    x, y = batch
    return jnp.mean((x @ w["w"] - y) ** 2), {"mean_x": jnp.mean(x)}


def batch_at(step):
    rows = np.arange(8) + (step % 8) * 8
    return X[rows], Y[rows]


def params0():
    return {"w": jnp.zeros(3), "frozen": jnp.ones(2)}


def test_sgd_step_matches_closed_form():
    cfg = TrainConfig(steps=1, lr=0.1, optimizer="sgd", batch_size=8, log_every=1)
    result = fit(squared_loss, params0(), batch_at, cfg, key=jax.random.key(0), progress=False)
    x, y = batch_at(0)
    grad = 2 * x.T @ (x @ np.zeros(3) - y) / len(y)
    np.testing.assert_allclose(result.params["w"], -0.1 * grad, rtol=1e-5)
    assert result.history[0]["loss"] == pytest.approx(float(np.mean(y**2)), rel=1e-5)


def test_converges_and_fused_dispatch_equals_single_steps():
    cfg = TrainConfig(steps=120, lr=0.05, batch_size=8, log_every=20)
    single = fit(squared_loss, params0(), batch_at, cfg, key=jax.random.key(0), progress=False)
    fused = fit(squared_loss, params0(), batch_at, TrainConfig(**{**cfg.__dict__, "steps_per_dispatch": 40}),
                key=jax.random.key(0), progress=False)
    np.testing.assert_allclose(single.params["w"], W_TRUE, atol=1e-2)
    np.testing.assert_allclose(fused.params["w"], single.params["w"], rtol=1e-6)
    assert [h["step"] for h in fused.history] == [20, 40, 60, 80, 100, 120]


def test_grad_accumulation_equals_full_batch():
    full = fit(squared_loss, params0(), batch_at, TrainConfig(steps=5, lr=0.1, optimizer="sgd", batch_size=8),
               key=jax.random.key(0), progress=False)
    accum = fit(squared_loss, params0(), batch_at,
                TrainConfig(steps=5, lr=0.1, optimizer="sgd", batch_size=8, grad_accum=4),
                key=jax.random.key(0), progress=False)
    np.testing.assert_allclose(accum.params["w"], full.params["w"], rtol=1e-5)


def test_trainable_mask_freezes_leaves_bit_identically():
    params = {"w": jnp.zeros(3), "frozen": jnp.array([0.3, 0.7])}

    def loss(p, batch, key):
        x, y = batch
        return jnp.mean((x @ p["w"] * p["frozen"].sum() - y) ** 2), {}

    result = fit(loss, params, batch_at, TrainConfig(steps=10, lr=0.1), key=jax.random.key(0),
                 trainable={"w": True, "frozen": False}, progress=False)
    assert np.array_equal(np.asarray(result.params["frozen"]), np.array([0.3, 0.7], np.float32))
    assert not np.allclose(result.params["w"], 0)
    assert np.array_equal(np.asarray(params["w"]), np.zeros(3))  # the caller's arrays were not donated


def test_device_sampler_and_custom_grad_fn():
    def sample(key):
        x = jax.random.normal(key, (16, 3))
        return x, x @ jnp.asarray(W_TRUE)

    def grad_fn(params, batch, key):  # plain gradient written by hand: must equal the default path
        (loss, metrics), grads = jax.value_and_grad(squared_loss, has_aux=True)(params, batch, key)
        return (loss, metrics), grads

    cfg = TrainConfig(steps=200, lr=0.05, steps_per_dispatch=50, log_every=50)
    default = fit(squared_loss, params0(), DeviceSampler(sample), cfg, key=jax.random.key(1), progress=False)
    custom = fit(squared_loss, params0(), DeviceSampler(sample), cfg, key=jax.random.key(1), grad_fn=grad_fn,
                 progress=False)
    np.testing.assert_allclose(default.params["w"], W_TRUE, atol=1e-3)
    np.testing.assert_allclose(custom.params["w"], default.params["w"], rtol=1e-6)


def test_device_sampler_data_is_an_argument_not_a_constant():
    """A sampler's dataset travels as a jit argument: a new dataset of the same shapes reuses the program."""
    from metafit.train.loop import _compiled_chunk

    def sample(key, data):  # a random mini-batch of the dataset's rows
        rows = jax.random.randint(key, (16,), 0, data["x"].shape[0])
        return data["x"][rows], data["y"][rows]

    cfg = TrainConfig(steps=200, lr=0.05, steps_per_dispatch=50, log_every=50)
    fitted = []
    for w in (W_TRUE, -2.0 * W_TRUE):
        data = {"x": X, "y": X @ w}
        result = fit(squared_loss, params0(), DeviceSampler(sample, data=data), cfg, key=jax.random.key(1),
                     progress=False)
        fitted.append(np.asarray(result.params["w"]))
    np.testing.assert_allclose(fitted[0], W_TRUE, atol=1e-3)  # each run learned from its own dataset
    np.testing.assert_allclose(fitted[1], -2.0 * W_TRUE, atol=1e-2)
    assert _compiled_chunk(squared_loss, None, cfg, (sample, True), None)._cache_size() == 1


def test_eval_fn_may_take_the_step():
    seen = []
    cfg = TrainConfig(steps=20, lr=0.05, eval_every=5, log_every=5)
    result = fit(squared_loss, params0(), batch_at, cfg, key=jax.random.key(0), progress=False,
                 eval_fn=lambda params, step: (seen.append(step), {"w0": params["w"][0]})[1])
    assert seen == [5, 10, 15, 20] and [e["step"] for e in result.evals] == seen
    plain = fit(squared_loss, params0(), batch_at, cfg, key=jax.random.key(0), progress=False,
                eval_fn=lambda params: {"w0": params["w"][0]})
    assert [e["w0"] for e in plain.evals] == [e["w0"] for e in result.evals]


def test_bfloat16_compute_keeps_float32_params():
    result = fit(squared_loss, params0(), batch_at, TrainConfig(steps=100, lr=0.05, precision="bfloat16"),
                 key=jax.random.key(0), progress=False)
    assert result.params["w"].dtype == jnp.float32
    np.testing.assert_allclose(result.params["w"], W_TRUE, atol=0.05)


def test_resume_continues_exactly(tmp_path):
    from metafit.train.loop import _compiled_chunk

    loss = lambda params, batch, key: squared_loss(params, batch, key)  # noqa: E731  (its own compiled step)
    cfg = TrainConfig(steps=40, lr=0.05, ckpt_every=10, log_every=10, eval_every=20)
    eval_fn = lambda p: {"w0": p["w"][0]}
    reference = fit(loss, params0(), batch_at, cfg, key=jax.random.key(0), eval_fn=eval_fn, progress=False)
    log = MetricsWriter(tmp_path / "metrics.jsonl")
    partial = TrainConfig(**{**cfg.__dict__, "steps": 20})  # same schedule of checkpoints, stopped early
    fit(loss, params0(), batch_at, partial, key=jax.random.key(0), workdir=tmp_path / "ck",
        eval_fn=eval_fn, log=log, progress=False)
    resumed = fit(loss, params0(), batch_at, cfg, key=jax.random.key(0), workdir=tmp_path / "ck",
                  eval_fn=eval_fn, log=log, progress=False)
    assert resumed.resumed_from == 20
    assert np.array_equal(np.asarray(resumed.params["w"]), np.asarray(reference.params["w"]))
    assert [h["step"] for h in resumed.history] == [10, 20, 30, 40]
    assert resumed.history == reference.history
    # the restored state runs the step compiled before (Orbax restores arrays committed to a device,
    # and jit would compile the same program again for them)
    assert _compiled_chunk(loss, None, cfg, None, None)._cache_size() == 1


def test_params_committed_to_a_device_compile_the_step_once(tmp_path):
    """Parameters the caller placed on a device: every chunk, and a resumed run, reuse one program."""
    from metafit.train.loop import _compiled_chunk

    loss = lambda params, batch, key: squared_loss(params, batch, key)  # noqa: E731  (its own compiled step)
    cfg = TrainConfig(steps=20, lr=0.05, log_every=5, ckpt_every=10)
    params = jax.device_put(params0(), jax.devices()[0])
    reference = fit(loss, params, batch_at, cfg, key=jax.random.key(0), progress=False)
    fit(loss, params, batch_at, cfg, key=jax.random.key(0), workdir=tmp_path, stop_at=10, progress=False)
    resumed = fit(loss, params, batch_at, cfg, key=jax.random.key(0), workdir=tmp_path, progress=False)
    assert resumed.resumed_from == 10
    assert np.array_equal(np.asarray(resumed.params["w"]), np.asarray(reference.params["w"]))
    assert _compiled_chunk(loss, None, cfg, None, None)._cache_size() == 1


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    cfg = TrainConfig(steps=30, lr=0.05, ckpt_every=10, keep_checkpoints=3)
    reference = fit(squared_loss, params0(), batch_at, cfg, key=jax.random.key(0), workdir=tmp_path / "ck",
                    progress=False)
    latest = tmp_path / "ck" / "30"
    for file in latest.rglob("*"):
        if file.is_file() and file.name != "commit_success.txt":
            file.write_bytes(b"garbage")
    with pytest.warns(CheckpointWarning, match="unreadable"):
        resumed = fit(squared_loss, params0(), batch_at, cfg, key=jax.random.key(0), workdir=tmp_path / "ck",
                      progress=False)
    assert resumed.resumed_from == 20
    assert np.array_equal(np.asarray(resumed.params["w"]), np.asarray(reference.params["w"]))


def test_non_finite_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    def poisoned(step):
        x, y = batch_at(step)
        return (x * np.nan, y) if step == 12 else (x, y)

    cfg = TrainConfig(steps=30, lr=0.05, ckpt_every=5, log_every=5)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 13"):
        fit(squared_loss, params0(), poisoned, cfg, key=jax.random.key(0), workdir=tmp_path / "ck", progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == [5, 10]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        resumed = fit(squared_loss, params0(), batch_at, cfg, key=jax.random.key(0), workdir=tmp_path / "ck",
                      progress=False)
    assert resumed.resumed_from == 10 and np.isfinite(np.asarray(resumed.params["w"])).all()


def test_repeated_fit_calls_reuse_the_compiled_step():
    from metafit.train.loop import _compiled_chunk

    cfg = TrainConfig(steps=10, lr=0.05, steps_per_dispatch=5, log_every=5)
    # a loss object of this test alone: other tests' fits of squared_loss share its compiled step
    loss = lambda params, batch, key: squared_loss(params, batch, key)
    fit(loss, params0(), batch_at, cfg, key=jax.random.key(0), progress=False)
    compiled = _compiled_chunk(loss, None, cfg, None, None)
    size = compiled._cache_size()
    for seed in (1, 2):  # new keys and new initial values, same shapes: no new compilation
        fit(loss, {"w": jnp.full(3, 0.1 * seed), "frozen": jnp.ones(2)}, batch_at, cfg,
            key=jax.random.key(seed), progress=False)
    assert compiled._cache_size() == size == 1


def test_configs_differing_only_in_loop_cadences_share_one_compiled_step():
    """Logging, evaluation and checkpoint cadences (and ``steps`` of a constant schedule) steer only the host loop."""
    from metafit.train.loop import _compiled_chunk

    loss = lambda params, batch, key: squared_loss(params, batch, key)
    short = TrainConfig(steps=10, lr=0.05, steps_per_dispatch=5, log_every=5)
    long = TrainConfig(steps=20, lr=0.05, steps_per_dispatch=5, log_every=10, eval_every=10, ckpt_every=10)
    first = fit(loss, params0(), batch_at, short, key=jax.random.key(0), progress=False)
    second = fit(loss, params0(), batch_at, long, key=jax.random.key(0), progress=False)
    compiled = _compiled_chunk(loss, None, short, None, None)
    assert _compiled_chunk(loss, None, long, None, None) is compiled and compiled._cache_size() == 1
    # the same first 10 steps (means of 10 vs two means of 5: equal up to float32 round-off)
    np.testing.assert_allclose(second.history[0]["loss"], np.mean([h["loss"] for h in first.history]), rtol=1e-6)
    # what the step reads as a constant keeps programs apart: a schedule's length, the optimiser
    assert _compiled_chunk(loss, None, dataclasses.replace(short, optimizer="sgd"), None, None) is not compiled
    cosine = dataclasses.replace(short, schedule="cosine")
    assert (_compiled_chunk(loss, None, cosine, None, None)
            is not _compiled_chunk(loss, None, dataclasses.replace(cosine, steps=20), None, None))


def test_learning_rate_and_weight_decay_sweeps_share_one_step_and_equal_a_plain_optax_loop():
    """lr and weight decay reach the compiled step as arguments: a sweep compiles once, values unchanged."""
    import optax

    from metafit.train.loop import _compiled_chunk

    loss = lambda params, batch, key: squared_loss(params, batch, key)
    base = TrainConfig(steps=6, lr=0.05, optimizer="adamw", schedule="cosine", warmup_steps=2, log_every=3,
                       steps_per_dispatch=3)
    settings = [(0.05, 0.0), (0.2, 0.0), (0.01, 0.3)]
    for lr, wd in settings:
        cfg = dataclasses.replace(base, lr=lr, weight_decay=wd)
        result = fit(loss, params0(), batch_at, cfg, key=jax.random.key(0), progress=False)
        # the same run written directly with optax, every value a Python constant
        schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, 2), optax.cosine_decay_schedule(lr, 4)], [2])
        tx = optax.adamw(schedule, weight_decay=wd)
        w = jnp.zeros(3)
        state = tx.init(w)
        for step in range(6):
            grad = jax.grad(lambda v: squared_loss({"w": v}, batch_at(step), None)[0])(w)
            updates, state = tx.update(grad, state, w)
            w = optax.apply_updates(w, updates)
        np.testing.assert_allclose(result.params["w"], w, rtol=2e-6, atol=1e-7)
    compiled = _compiled_chunk(loss, None, base, None, None)
    assert compiled._cache_size() == 1
    assert all(_compiled_chunk(loss, None, dataclasses.replace(base, lr=lr, weight_decay=wd), None, None)
               is compiled for lr, wd in settings)


def test_a_registered_optimizer_keeps_its_learning_rate_a_constant():
    """A user's optimiser may branch on its arguments in Python: its values are not traced."""
    import optax

    from metafit.train import OPTIMIZERS

    def stepped_sgd(learning_rate, **kwargs):
        if learning_rate(0) > 0.1:  # Python control flow on the value: a traced rate here would raise
            raise ValueError("too large")
        return optax.sgd(learning_rate)

    if "stepped_sgd_test" not in OPTIMIZERS:  # the registry lives as long as the process
        OPTIMIZERS.register("stepped_sgd_test", stepped_sgd)
    cfg = TrainConfig(steps=1, lr=0.1, optimizer="stepped_sgd_test", log_every=1)
    result = fit(squared_loss, params0(), batch_at, cfg, key=jax.random.key(0), progress=False)
    x, y = batch_at(0)
    np.testing.assert_allclose(result.params["w"], -0.1 * 2 * x.T @ (x @ np.zeros(3) - y) / len(y), rtol=1e-5)
