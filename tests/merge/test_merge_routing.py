"""Routing closed forms and a smoke run of the compatible-specialization experiment with tiny overrides.

The function-level tests use the architecture, batch shapes and router trainer config of the
``merge_compatible`` smoke run (first in the file), so the jitted losses, the router steps and the residual
streams compile once for the whole module (``routing`` caches them per architecture).
"""
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metafit.data.chars import CHARS, SEQ_LEN, char_stream, char_tasks
from metafit.merge import routing
from metafit.models.gpt2 import GPT2Config, GPT2LMHeadModel

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "merge"
COMPATIBLE_SMOKE = ["args.n_embd=16", "args.n_layer=2", "args.n_head=2", "args.pretrain_steps=2", "args.expert_steps=4",
                    "args.snapshot_every=2", "args.router_steps=2", "args.windows=[1,2]", "args.early_windows=[2]",
                    "args.control_windows=[2]", "args.alphas=[0.0,0.5,1.0]", "args.eval_size=16", "train.batch_size=8"]


@pytest.fixture(scope="module")
def smoke_cfg():
    from metafit.experiments import load_run_config

    return load_run_config(CONFIGS / "compatible_char_gpt.yaml", COMPATIBLE_SMOKE)


@pytest.fixture(scope="module")
def router_config(smoke_cfg):
    """The trainer config of the smoke run's routers (as ``merge_compatible`` builds it)."""
    args = smoke_cfg.args
    return dataclasses.replace(smoke_cfg.train, steps=args.router_steps, lr=args.router_lr, log_every=100)


def tiny_gpt(seed):
    """The smoke run's char-level GPT-2 (two layers, width 16)."""
    cfg = GPT2Config(vocab_size=len(CHARS), n_embd=16, n_layer=2, n_head=2, n_positions=SEQ_LEN,
                     activation_function="gelu_new")
    return GPT2LMHeadModel(cfg, rngs=nnx.Rngs(seed))


# The slow tests come first: xdist (loadfile) hands a worker its next file once at most two of its current
# file's tests are left, so a slow test at the end keeps a worker busy after it took more work.

@pytest.mark.slow
def test_compatible_experiment_smoke(tmp_path):
    from metafit.experiments import run_experiment

    overrides = COMPATIBLE_SMOKE
    _, results = run_experiment(CONFIGS / "compatible_char_gpt.yaml", overrides, workdir=tmp_path / "comp")
    rows = results["methods"]
    # alpha weighs the add expert: alpha = 1 is the add expert's own loss, alpha = 0 the map expert's,
    # for both stages and both kinds of interpolation.
    for stage, step in (("early", 2), ("late", 4)):
        add, map_ = rows[f"expert add ({stage})"]["target_loss"], rows[f"expert map ({stage})"]["target_loss"]
        for kind in ("weight", "activation"):
            assert rows[f"{kind} interp {stage} (step {step}) alpha=1"]["target_loss"] == pytest.approx(add, rel=1e-5)
            assert rows[f"{kind} interp {stage} (step {step}) alpha=0"]["target_loss"] == pytest.approx(map_, rel=1e-5)
    # Early and late multi-layer routing and the base-MLP control (n >= 2 only: at n = 1 it is the base).
    assert {"multi-layer routing n=2 early (step 2)", "multi-layer routing n=2 late (step 4)",
            "multi-layer routing n=2 control: base MLPs"} <= set(rows)
    assert "per-layer routing early (step 2)" not in rows and "per-layer routing late (step 4)" in rows
    assert results["expert_em_by_step"]["steps"] == [2, 4] and len(results["expert_em_by_step"]["add"]) == 2
    assert rows["expert add (late)"]["add_em"] == results["expert_em_by_step"]["add"][-1]
    assert rows["expert map (late)"]["map_em"] == results["expert_em_by_step"]["map"][-1]
    with pytest.raises(ValueError, match="routing window"):
        run_experiment(CONFIGS / "compatible_char_gpt.yaml", overrides + ["args.windows=[3]"], workdir=tmp_path / "bad")
    with pytest.raises(ValueError, match="base model exactly"):
        run_experiment(CONFIGS / "compatible_char_gpt.yaml", overrides + ["args.control_windows=[1]"],
                       workdir=tmp_path / "bad1")



def test_mlp_mask_router_training_and_losses_of_the_experiment_helpers(smoke_cfg, router_config):
    from metafit.merge.similarity import cka, layer_cka
    from metafit.train.losses import lm_batch_loss
    from metafit.train.loop import _jitted_chunk

    graphdef, pa = nnx.split(tiny_gpt(0), nnx.Param)
    pb = nnx.state(tiny_gpt(1), nnx.Param)
    mask = routing.mlp_mask(pa)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    chosen = sorted(jax.tree_util.keystr(p) for p, m in flat if m)
    assert chosen and all("'mlp'" in p for p in chosen) and len(chosen) < len(flat)
    assert any("'mlp'" in jax.tree_util.keystr(p) for p, _ in flat)

    # evaluation batches of the smoke run's size (eval_size strings): the jitted losses are shared with it
    batch = jax.tree.map(jnp.asarray, char_tasks("T", smoke_cfg.args.eval_size, seed=0))
    plain, interp = routing.forward_loss(graphdef), routing.interpolation_loss(graphdef)
    assert routing.forward_loss(graphdef) is plain  # one jitted function per architecture, not one per call
    model_loss = jax.jit(lambda p, b: lm_batch_loss(nnx.merge(graphdef, p)(b["input_ids"]), b))
    np.testing.assert_allclose(plain(pa, batch), model_loss(pa, batch), rtol=1e-5)
    np.testing.assert_allclose(interp(pa, pb, 1.0, batch), plain(pa, batch), rtol=1e-5)  # alpha 1 = expert A

    train_stream = char_stream("T", router_config.batch_size, 0)
    params, router_loss = routing.fit_routers(graphdef, [pa, pb], train_stream, router_config, window=1,
                                              key=jax.random.key(0))
    assert all(leaf.shape[-1] == 2 for leaf in jax.tree.leaves(params))
    # Zero-initialised routers (where training starts) with top-2 of two candidates give the uniform
    # mixture = activation interpolation at 1/2.
    router_def, zero_routers = nnx.split(routing.Routers(2, 16, 2, rngs=nnx.Rngs(0)), nnx.Param)
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(zero_routers))
    np.testing.assert_allclose(router_loss(zero_routers, batch), interp(pa, pb, 0.5, batch), rtol=1e-5)
    assert float(router_loss(params, batch)) != float(router_loss(zero_routers, batch))  # the routers trained
    # Routing over two copies of one model's MLPs is that model whatever the router learned (gates sum to 1):
    # the capacity control adds nothing at n = 1.
    steps_compiled = _jitted_chunk.cache_info().misses
    same, same_loss = routing.fit_routers(graphdef, [pa, pa], train_stream, router_config, window=1,
                                          key=jax.random.key(0))
    rng = np.random.default_rng(1)
    random_router = jax.tree.map(lambda x: jnp.asarray(3.0 * rng.standard_normal(x.shape), jnp.float32), same)
    np.testing.assert_allclose(same_loss(random_router, batch), plain(pa, batch), rtol=1e-5)
    # Other experts, same setting: the experts are arguments of the compiled step and evaluation, not
    # constants baked into them, so the second run compiles neither again.
    assert _jitted_chunk.cache_info().misses == steps_compiled
    assert routing._router_losses(graphdef, router_def, 1, lm_batch_loss)[1]._cache_size() == 1
    # Window 2 over two layers: each router gates all four candidates (both experts' MLPs of both layers).
    trained, trained_loss = routing.fit_routers(graphdef, [pa, pb], train_stream, router_config, window=2,
                                                key=jax.random.key(0))
    assert all(leaf.shape[-1] == 4 for leaf in jax.tree.leaves(trained)) and np.isfinite(float(trained_loss(trained, batch)))

    # residual streams on the smoke run's CKA inputs (three tasks' eval strings)
    ids = jnp.concatenate([batch["input_ids"]] * 3)
    hidden = routing.residual_streams(graphdef, ids)
    ha, hb = hidden(pa), hidden(pb)
    # a second set of inputs of the same shape reuses the compiled streams (the inputs are an argument)
    routing.residual_streams(graphdef, jnp.asarray(np.asarray(ids)[::-1]))(pa)
    assert routing._residual_streams_jit(graphdef)._cache_size() == 1
    values = layer_cka(ha, hb)
    assert len(values) == 2
    np.testing.assert_allclose(values[1], cka(ha[1].reshape(-1, 16), hb[1].reshape(-1, 16)), rtol=1e-6)
    np.testing.assert_allclose(layer_cka(ha, ha), 1.0, atol=1e-5)


def test_forward_matches_the_model_and_returns_every_residual_stream():
    """The routed forward with the model's own MLPs is the model. Its closed forms under interpolation
    (alpha = 1 is expert A) and zero-initialised routing (the uniform mixture) are checked through the
    jitted losses shared with the smoke run, in the router test above."""
    a = tiny_gpt(0)
    ids = jnp.arange(2 * SEQ_LEN).reshape(2, SEQ_LEN) % len(CHARS)

    @jax.jit  # one compiled program instead of hundreds of eager dispatches
    def outputs():
        logits, hiddens = routing.forward(a, ids)
        return logits, a(ids), hiddens

    logits, direct, hiddens = outputs()
    np.testing.assert_allclose(logits, direct, atol=1e-5)
    assert len(hiddens) == 2 and hiddens[0].shape == (2, SEQ_LEN, 16)


def test_answer_exact_match_counts_strings_with_every_answer_token_right():
    ids = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
    batch = {"input_ids": ids, "loss_mask": np.array([[0, 0, 1, 1]] * 3, np.float32)}
    logits = np.eye(17, dtype=np.float32)[np.roll(ids, -1, axis=1)] * 5.0  # position t predicts token t + 1
    wrong_answer, wrong_prompt = logits.copy(), logits.copy()
    wrong_answer[1, 2] = np.eye(17)[9] * 5.0  # row 1 predicts 9 instead of its last answer token
    wrong_prompt[2, 0] = np.eye(17)[9] * 5.0  # row 2 errs outside the answer: not counted
    exact_match = jax.jit(routing.answer_exact_match)  # one compiled program for the three calls
    assert float(exact_match(logits, batch)) == 1.0
    assert float(exact_match(wrong_answer, batch)) == pytest.approx(2 / 3)
    assert float(exact_match(wrong_prompt, batch)) == 1.0


def test_windows_and_top_k_gates():
    assert routing.window(0, 2, 4) == [0, 1] and routing.window(3, 2, 4) == [2, 3] and routing.window(1, 4, 4) == [0, 1, 2, 3]
    gates = jax.jit(routing.top_k_gates, static_argnums=1)(jnp.array([1.0, 3.0, 2.0, 0.0]), 2)  # one program
    np.testing.assert_allclose(gates, [0, np.e / (np.e + 1), 1 / (np.e + 1), 0], atol=1e-6)
