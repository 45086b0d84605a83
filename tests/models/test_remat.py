"""train.remat: every policy gives the same loss and gradients as keeping all activations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metafit import peft
from metafit.models import LlamaConfig, LlamaForCausalLM
from metafit.models.remat import remat_policy
from metafit.train import TrainConfig
from metafit.train.losses import next_token_loss

from models_tiny import host_random


@pytest.fixture(scope="module")
def lora_model():
    cfg = LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, sliding_windows=(None, 3))

    def build():
        model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        peft.apply(model, peft.LoraConfig(rank=2, init="random"), rngs=nnx.Rngs(1))
        return model

    return nnx.split(host_random(build), nnx.LoRAParam, ...)


def _value_and_grad(loss):
    """``loss(lora, policy, scan)``'s value and gradient, one compile per (policy, scan)."""
    return jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))


def _assert_same(got, want, rtol, grad_rtol, grad_atol):
    (got, got_grad), (want, want_grad) = got, want
    np.testing.assert_allclose(float(got), float(want), rtol=rtol)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=grad_rtol, atol=grad_atol)


@pytest.fixture(scope="module")
def next_token(lora_model):
    """The fit path's loss (next-token cross-entropy) and its no-remat value and gradient, computed once."""
    graphdef, lora, rest = lora_model
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 41, (2, 7)).astype(np.int32))
    batch = {"input_ids": ids, "loss_mask": jnp.asarray(np.ones((2, 7), np.int32))}

    def loss(lora_params, name, scan):
        with remat_policy(name, scan_layers=scan):
            return next_token_loss(graphdef)(nnx.merge_state(lora_params, rest), batch, None)[0]

    step = _value_and_grad(loss)
    return step, step(lora, "none", False)


@pytest.mark.parametrize("policy", ["block", "dots_saveable"])
def test_remat_matches_no_remat(lora_model, next_token, policy):
    step, want = next_token
    _assert_same(step(lora_model[1], policy, False), want, 1e-6, 1e-5, 1e-7)


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="train.remat must be one of none, block, dots_saveable"):
        TrainConfig(remat="all")
    with pytest.raises(ValueError, match="unknown remat policy"):
        with remat_policy("all"):
            pass


@pytest.fixture(scope="module")
def biased_logits(lora_model):
    """Mean squared logits with per-layer attention biases, and its unrolled no-remat value and gradient."""
    graphdef, lora, rest = lora_model
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, 41, (2, 7)).astype(np.int32))
    biases = [jnp.asarray(np.zeros((1, 1, 7, 7), np.float32)),
              jnp.asarray(rng.normal(size=(1, 1, 7, 7)).astype(np.float32))]

    def loss(lora_params, policy, scan):
        with remat_policy(policy, scan_layers=scan):
            out = nnx.merge(graphdef, lora_params, rest).forward(ids, attention_bias=biases).logits
        return jnp.mean(out ** 2)

    step = _value_and_grad(loss)
    return step, step(lora, "none", False)


@pytest.mark.parametrize("policy", ["none", "block"])
def test_layer_scan_matches_unrolled(lora_model, biased_logits, policy):
    """The scanned stack (per-layer sliding windows, per-layer attention biases) = the unrolled one.

    The reference is the unrolled stack without rematerialisation for both policies (one compile
    fewer; unrolled ``block`` = unrolled ``none`` is test_remat_matches_no_remat's fact).
    """
    step, want = biased_logits
    _assert_same(step(lora_model[1], policy, True), want, 1e-5, 1e-4, 1e-6)


def test_layer_scan_with_kv_cache_matches_unrolled(lora_model):
    """Prefill 5 tokens, then one cached step (what generation runs): the scanned stack = the unrolled one.

    Per-layer sliding windows and attention biases, a left-padded row; the scanned stack returns the
    cache stacked ``[layers, ...]`` and takes it back in that form for the next step.
    """
    graphdef, lora, rest = lora_model
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 41, (2, 6)).astype(np.int32))
    mask = jnp.asarray([[1] * 7, [0, 0] + [1] * 5], jnp.int32)
    biases = [jnp.zeros((1, 1, 1, 7)), jnp.asarray(rng.normal(size=(1, 1, 1, 7)).astype(np.float32))]

    @functools.partial(jax.jit, static_argnums=0)
    def prefill_and_step(scan):
        with remat_policy("none", scan_layers=scan):
            model = nnx.merge(graphdef, lora, rest)
            first = model.forward(ids[:, :5], mask, cache=model.init_cache(2, 7), attention_bias=biases)
            second = model.forward(ids[:, 5:], mask, cache=first.cache, cache_index=5, attention_bias=biases)
        return first.logits, second.logits, second.cache

    *scanned, scanned_cache = prefill_and_step(True)
    *unrolled, unrolled_cache = prefill_and_step(False)
    assert isinstance(scanned_cache.keys, jax.Array) and scanned_cache.keys.shape[0] == 2
    for got, want in zip(scanned, unrolled):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    for got, want in zip(scanned_cache, unrolled_cache):
        np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=1e-5, atol=1e-6)
