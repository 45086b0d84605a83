"""The trainer gives every step its own dropout masks (NNX random streams live in the frozen state)."""
import dataclasses

import jax
import numpy as np
from flax import nnx

from metafit import peft
from metafit.models.llama import LlamaConfig, LlamaForCausalLM
from metafit.train import TrainConfig, fit
from metafit.train.losses import next_token_loss
from metafit.train.loop import fresh_rng_streams


def _lora_model(dropout: float):
    # one layer: the streams and their keys are per LoRA module, so depth adds compile time, not checks
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = peft.apply(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)),
                       peft.LoraConfig(rank=4, alpha=8, dropout=dropout, init="random"), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    return graphdef, state, peft.trainable_mask(state)


IDS = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
BATCH = {"input_ids": IDS, "loss_mask": np.ones_like(IDS)}
# lr = 0: the parameters never change, so any change of the loss between steps is the dropout masks
FROZEN = TrainConfig(steps=4, lr=0.0, optimizer="sgd", weight_decay=0.0, log_every=1, eval_every=0, ckpt_every=2)


def _losses(graphdef, state, mask, config=FROZEN, **kwargs):
    result = fit(next_token_loss(graphdef), state, lambda step: BATCH, config, key=jax.random.key(0),
                 trainable=mask, progress=False, **kwargs)
    return [h["loss"] for h in result.history], result


def test_each_step_draws_new_dropout_masks_and_no_dropout_stays_constant():
    losses, _ = _losses(*_lora_model(dropout=0.5))
    assert len(set(np.round(losses, 6))) == 4, losses
    constant, _ = _losses(*_lora_model(dropout=0.0))
    assert np.ptp(constant) == 0.0


def test_masks_are_a_function_of_the_step_so_resume_and_remat_draw_the_same(tmp_path):
    graphdef, state, mask = _lora_model(dropout=0.5)
    uninterrupted, _ = _losses(graphdef, state, mask)
    _, paused = _losses(graphdef, state, mask, workdir=tmp_path, stop_at=2)
    resumed, result = _losses(graphdef, state, mask, workdir=tmp_path)
    assert result.resumed_from == 2  # the finished steps were skipped, not rerun
    np.testing.assert_allclose(resumed, uninterrupted[2:], rtol=1e-6)  # steps 3 and 4, with their masks
    rematerialised, _ = _losses(graphdef, state, mask, config=dataclasses.replace(FROZEN, remat="block"))
    np.testing.assert_allclose(rematerialised, uninterrupted, rtol=1e-5)


def test_fresh_rng_streams_changes_only_stream_keys():
    _, state, _ = _lora_model(dropout=0.5)
    fresh = fresh_rng_streams(state, jax.random.key(3))
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    pairs = zip(jax.tree.leaves(state, is_leaf=is_var), jax.tree.leaves(fresh, is_leaf=is_var))
    for old, new in pairs:
        if isinstance(old, nnx.RngKey):
            assert not np.array_equal(jax.random.key_data(old.get_value()), jax.random.key_data(new.get_value()))
        else:
            np.testing.assert_array_equal(np.asarray(old.get_value()), np.asarray(new.get_value()))
    again = fresh_rng_streams(state, jax.random.key(3))  # a pure function of the key
    for a, b in zip(jax.tree.leaves(fresh, is_leaf=is_var), jax.tree.leaves(again, is_leaf=is_var)):
        if isinstance(a, nnx.RngKey):
            np.testing.assert_array_equal(jax.random.key_data(a.get_value()), jax.random.key_data(b.get_value()))


def test_dropout_applies_in_training_steps_only():
    """Outside the trainer (evaluation, generation, export) a LoRA model with dropout is deterministic and
    equals its merged weights; inside ``dropout_enabled()`` (what fit enters) it is not."""
    graphdef, state, _ = _lora_model(dropout=0.5)
    # jitted, not eager (one program each instead of one program per op). The model is called twice in
    # one trace: with dropout on, the second call would draw from the advanced stream. dropout_enabled()
    # is read while tracing, so the forward traced inside it is a function object of its own.
    def twice(graph):
        def forward(s, ids):
            model = nnx.merge(graph, s)
            return model(ids), model(ids)  # model(ids) gives the logits
        return jax.jit(forward)

    logits, again = map(np.asarray, twice(graphdef)(state, IDS))
    np.testing.assert_array_equal(again, logits)
    merged_graphdef, merged_state = nnx.split(peft.merge_lora(nnx.merge(graphdef, state)))
    merged_logits = np.asarray(twice(merged_graphdef)(merged_state, IDS)[0])
    np.testing.assert_allclose(logits, merged_logits, rtol=1e-4, atol=1e-5)
    with peft.dropout_enabled():
        dropped, dropped_again = map(np.asarray, twice(graphdef)(state, IDS))
    assert np.abs(dropped - logits).max() > 1e-3
    assert np.abs(dropped_again - dropped).max() > 1e-3  # each call draws new masks: the check above can fail
