"""CKA invariances and reference values; ATM's task-vector / multi-task-gradient identity, snapshots, resume."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metafit.merge import atm as atm_lib
from metafit.merge import cka, task_arithmetic, task_vector
from metafit.merge import cka_debiased
from metafit.train import Callback, Checkpointer, CheckpointMismatchError, MetricsWriter, TrainConfig


def numpy_cka(x, y):
    """CKA from its definition: HSIC via centred Gram matrices tr(KHLH)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def numpy_debiased_cka(x, y):
    n = x.shape[0]

    def hsic_u(k, l):
        k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
        ones = np.ones(n)
        return (np.trace(k @ l) + ones @ k @ ones * (ones @ l @ ones) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T
    return hsic_u(k, l) / np.sqrt(hsic_u(k, k) * hsic_u(l, l))


def test_cka_self_invariances_and_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 12))
    y = x @ rng.standard_normal((12, 7)) + 0.5 * rng.standard_normal((40, 7))
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    for fn, ref in [(cka, numpy_cka), (cka_debiased, numpy_debiased_cka)]:
        np.testing.assert_allclose(fn(x, x), 1.0, atol=1e-5)
        base = float(fn(x, y))
        np.testing.assert_allclose(fn(x @ q, y), base, atol=1e-5)  # orthogonal transform
        np.testing.assert_allclose(fn(3.7 * x, y), base, atol=1e-5)  # isotropic scaling
        np.testing.assert_allclose(base, ref(x, y), atol=1e-5)
    assert float(cka(x, rng.standard_normal((40, 7)))) < base


def test_atm_identity_sum_of_task_vectors_is_minus_lr_times_multitask_gradient():
    """One epoch of full-batch GD per task: Σ_t τ_t = −η ∇_θ Σ_t L_t(θ)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
    tasks = [(rng.standard_normal((16, 5)).astype(np.float32), rng.standard_normal((16, 3)).astype(np.float32))
             for _ in range(3)]

    def loss_fn(p, batch, key):
        x, y = batch
        return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2), {}

    lr = 0.05
    specs = [atm_lib.FinetuneSpec(loss_fn, atm_lib.full_batch(t), steps=1) for t in tasks]
    finetune = atm_lib.fit_finetune(specs, TrainConfig(steps=1, batch_size=16, lr=lr, optimizer="sgd"))
    finetuned = atm_lib.one_shot(params, finetune, len(tasks), key=jax.random.key(0))
    total = jax.tree.map(lambda *v: sum(v), *[task_vector(params, f) for f in finetuned])
    grad = jax.grad(lambda p: sum(loss_fn(p, t, None)[0] for t in tasks))(params)
    jax.tree.map(lambda s, g: np.testing.assert_allclose(s, -lr * g, atol=1e-6), total, grad)
    # So one ATM round with sum aggregation is one multi-task GD step.
    result = atm_lib.atm(params, finetune, len(tasks), 1, key=jax.random.key(0),
                         aggregate=lambda b, fts: task_arithmetic(b, fts, 1.0))
    jax.tree.map(lambda a, p, g: np.testing.assert_allclose(a, p - lr * g, atol=1e-6), result.params, params, grad)


def test_tune_scale_picks_the_best_validation_score():
    scale, merged, scores = atm_lib.tune_scale(lambda s: {"w": jnp.array(s)}, [0.1, 0.5, 0.9],
                                               lambda p: -abs(float(p["w"]) - 0.5))
    assert scale == 0.5 and float(merged["w"]) == 0.5 and len(scores) == 3


def test_one_shot_snapshots_are_the_shorter_fine_tunes():
    """Snapshot j of a task's run equals that task fine-tuned for (j + 1) * every steps (constant lr)."""
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    data = [(rng.standard_normal((12, 3)).astype(np.float32), rng.standard_normal(12).astype(np.float32))
            for _ in range(2)]

    def loss_fn(p, batch, key):
        x, y = batch
        return jnp.mean((x @ p["w"] - y) ** 2), {}

    from metafit.data.batching import epoch_batches

    config = TrainConfig(steps=1, batch_size=4, lr=0.05, optimizer="sgd", momentum=0.9)
    specs = [atm_lib.FinetuneSpec(loss_fn, epoch_batches(d, 4, t), steps=6) for t, d in enumerate(data)]
    snapshots = atm_lib.one_shot_snapshots(params, specs, config, every=3, key=jax.random.key(0))
    assert [len(s) for s in snapshots] == [2, 2]
    for steps, j in [(3, 0), (6, 1)]:
        shorter = [dataclasses.replace(s, steps=steps) for s in specs]
        direct = atm_lib.one_shot(params, atm_lib.fit_finetune(shorter, config), 2, key=jax.random.key(0))
        for t in range(2):
            np.testing.assert_array_equal(snapshots[t][j]["w"], direct[t]["w"])


def _score(info, state):
    """An ATM callback: counts its calls in its (checkpointed) state and reports the merge's norm."""
    return state + 1, {"norm": float(jnp.linalg.norm(info.params["w"]))}


def test_atm_resumes_after_an_interrupted_round_and_ends_where_an_uninterrupted_run_does(tmp_path):
    """Rounds and callback states are checkpointed; a rerun restores them, reads the finished rounds'
    callback records back from the log instead of calling the callback again, and finetunes only the rest."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal(4), jnp.float32)}
    targets = [jnp.asarray(rng.standard_normal(4), jnp.float32) for _ in range(3)]
    calls = []

    def finetune(p, task, round_index, key):  # a noisy pull toward the task's target
        calls.append((round_index, task))
        noise = 0.01 * jax.random.normal(key, (4,))
        return {"w": p["w"] + 0.5 * (targets[task] - p["w"]) + noise}

    def scorer():
        return Callback("score", _score, every=1, init=jnp.zeros((), jnp.int32))

    reference = atm_lib.atm(params, finetune, 3, 4, key=jax.random.key(0), callbacks=[scorer()])
    assert [r["step"] for r in reference.callback_records["score"]] == [1, 2, 3, 4]
    assert int(reference.callback_states["score"]) == 4

    def crashing(p, task, round_index, key):
        if round_index == 3:
            raise KeyboardInterrupt("killed in round 3")
        return finetune(p, task, round_index, key)

    ckpt, log = tmp_path / "atm", MetricsWriter(tmp_path / "metrics.jsonl")
    with pytest.raises(KeyboardInterrupt):
        atm_lib.atm(params, crashing, 3, 4, key=jax.random.key(0), checkpoint_dir=ckpt, callbacks=[scorer()], log=log)
    calls.clear()
    seen = []
    counting = Callback("score", lambda info, state: (seen.append(info.step), _score(info, state))[1], every=1,
                        init=jnp.zeros((), jnp.int32))
    resumed = atm_lib.atm(params, finetune, 3, 4, key=jax.random.key(0), checkpoint_dir=ckpt, callbacks=[counting],
                          log=log)
    assert sorted({r for r, _ in calls}) == [3, 4] and seen == [3, 4]
    assert resumed.callback_records == reference.callback_records  # rounds 1-2 read back from the log
    assert int(resumed.callback_states["score"]) == 4  # the restored state counted rounds 1-2
    for a, b in zip(resumed.rounds, reference.rounds):
        np.testing.assert_array_equal(a["w"], b["w"])
    assert len(log.read("atm")) == 4  # one line per round, none repeated
    # Finished: a third call restores all four rounds and trains and scores nothing.
    calls.clear()
    seen.clear()
    again = atm_lib.atm(params, finetune, 3, 4, key=jax.random.key(0), checkpoint_dir=ckpt, callbacks=[counting],
                        log=log)
    assert calls == [] and seen == [] and np.array_equal(again.params["w"], reference.params["w"])
    assert again.callback_records == reference.callback_records
    with pytest.raises(ValueError, match="different run"):
        atm_lib.atm(params, finetune, 3, 2, key=jax.random.key(0), checkpoint_dir=ckpt, callbacks=[counting])
    with pytest.raises(CheckpointMismatchError):  # rounds saved with a callback state, restored without one
        atm_lib.atm(params, finetune, 3, 4, key=jax.random.key(0), checkpoint_dir=ckpt)
    # Callbacks without state leave the checkpoint as it was without callbacks: θ^k alone.
    stateless = Callback("norm", lambda info, state: (state, _score(info, 0)[1]), every=1)
    plain = atm_lib.atm(params, finetune, 3, 2, key=jax.random.key(0), checkpoint_dir=tmp_path / "plain",
                        callbacks=[stateless], log=log)
    checkpointer = Checkpointer(tmp_path / "plain")
    np.testing.assert_array_equal(checkpointer.restore(2, params)["w"], plain.params["w"])
    checkpointer.close()


def test_atm_random_aggregation_gets_a_fresh_key_each_round_and_dare_without_drops_is_the_mean():
    from metafit.experiments.merge import ATM_AGGREGATORS, ATMArgs
    from metafit.merge.similarity import relative_change

    base = {"w": jnp.arange(6.0).reshape(2, 3) + 1.0}
    finetune = lambda p, t, k, key: {"w": p["w"] + (t + 1.0) * k}  # task t moves every entry by (t+1)·k
    seen = []

    def aggregate(b, fts, key):
        seen.append(key)
        return atm_lib.mean_aggregate(b, fts)

    key = jax.random.key(3)
    result = atm_lib.atm(base, finetune, 2, 3, key=key, aggregate=aggregate, aggregate_takes_key=True)
    expected = [jax.random.fold_in(jax.random.fold_in(key, k), 2) for k in (1, 2, 3)]
    assert [jax.random.key_data(k).tolist() for k in seen] == [jax.random.key_data(k).tolist() for k in expected]
    # mean of (t+1)·k over t = 1.5 k per round: 1.5, 3, 4.5 -> cumulative 9
    np.testing.assert_allclose(result.params["w"], base["w"] + 9.0)
    # DARE with no drops and scale 1/T is the mean; TIES aggregation with density 1 and no sign conflict too.
    no_drop = ATM_AGGREGATORS["dare"][1](dataclasses.replace(ATMArgs(), dare_drop=0.0), 2)
    full_ties = ATM_AGGREGATORS["ties"][1](dataclasses.replace(ATMArgs(), ties_density=1.0), 2)
    fts = [finetune(base, t, 1, None) for t in range(2)]
    np.testing.assert_allclose(no_drop(base, fts, jax.random.key(0))["w"], base["w"] + 1.5, rtol=1e-6)
    np.testing.assert_allclose(full_ties(base, fts, None)["w"], base["w"] + 1.5, rtol=1e-6)
    with pytest.raises(ValueError, match="atm_aggregators.*unknown"):
        ATMArgs(atm_aggregators=("tie",))
    # relative_change: mean over tensors of ‖θ − θ_b‖ / ‖θ_b‖
    moved = {"a": jnp.ones(4) * 2.0, "b": jnp.ones(3) * 3.0}
    start = {"a": jnp.ones(4), "b": jnp.ones(3)}
    assert relative_change(start, moved) == pytest.approx((1.0 + 2.0) / 2)
    assert relative_change(start, moved, lambda name: name == "b") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no tensor selected"):
        relative_change(start, moved, lambda name: False)
