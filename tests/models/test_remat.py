"""train.remat: every policy gives the same loss and gradients as keeping all activations."""
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


@pytest.fixture(scope="module")
def lora_model():
    cfg = LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, sliding_windows=(None, 3))
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    peft.apply(model, peft.LoraConfig(rank=2, init="random"), rngs=nnx.Rngs(1))
    return nnx.split(model, nnx.LoRAParam, ...)


@pytest.mark.parametrize("policy", ["block", "dots_saveable"])
def test_remat_matches_no_remat(lora_model, policy):
    graphdef, lora, rest = lora_model
    ids = jax.random.randint(jax.random.key(0), (2, 7), 0, 41)
    batch = {"input_ids": ids, "loss_mask": jnp.ones_like(ids)}

    def loss(lora_params, name):
        with remat_policy(name):
            return next_token_loss(graphdef)(nnx.merge_state(lora_params, rest), batch, None)[0]

    want, want_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, "none")
    got, got_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, policy)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="train.remat must be one of none, block, dots_saveable"):
        TrainConfig(remat="all")
    with pytest.raises(ValueError, match="unknown remat policy"):
        with remat_policy("all"):
            pass


@pytest.mark.parametrize("policy", ["none", "block"])
def test_layer_scan_matches_unrolled(lora_model, policy):
    """The scanned stack (per-layer sliding windows, per-layer attention biases) = the unrolled one."""
    graphdef, lora, rest = lora_model
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, 41)
    biases = [jnp.zeros((1, 1, 7, 7)), jax.random.normal(jax.random.key(3), (1, 1, 7, 7))]

    def loss(lora_params, scan):
        with remat_policy(policy, scan_layers=scan):
            out = nnx.merge(graphdef, lora_params, rest).forward(ids, attention_bias=biases).logits
        return jnp.mean(out ** 2)

    want, want_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, False)
    got, got_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, True)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
