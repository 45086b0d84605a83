"""metafit.peft on metafit.models: HF-named targets, the prefix hook with KV caches, BERT adapters."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

import metafit.peft as peft
from metafit.models import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                            LlamaForCausalLM, generate)

from peft_tiny import forward, perturb_adapters, random_model

IDS = jnp.array([[3, 7, 1, 9, 4], [2, 2, 8, 5, 6]])


def tiny_llama():
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    return random_model(lambda rngs: LlamaForCausalLM(cfg, rngs=rngs))


def test_prefix_on_llama_gate_zero_is_base_and_generation_with_cache_matches_without():
    model = tiny_llama()
    base = forward(model, IDS)
    peft.apply(model, peft.PrefixConfig(num_prefix=3, init_scale=1.0), rngs=nnx.Rngs(0))
    assert peft.gated_paths(model) == [f"model.layers.{i}.self_attn.kv_prefix" for i in range(2)]
    assert model.model.layers[0].self_attn.kv_prefix.prefix_k.shape == (3, 2, 4)
    # per-sample gates throughout (one compiled forward): [1, 1] is the plain prefix, [0, 1] gates sample 0 off
    peft.set_gates(model, jnp.array([[1.0, 1.0]]))
    assert not np.allclose(forward(model, IDS), base, atol=1e-4)
    peft.set_gates(model, jnp.array([[0.0, 1.0]]))
    gated = forward(model, IDS)
    np.testing.assert_allclose(gated[0], base[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(gated[1], base[1], atol=1e-4)
    peft.reset_gates(model)
    # the KV cache holds the model's own keys only; the prefix is prepended at every step
    cached = generate(model, IDS, max_new_tokens=3, stop_tokens=())
    recomputed = generate(model, IDS, max_new_tokens=3, stop_tokens=(), use_cache=False)
    np.testing.assert_array_equal(cached, recomputed)


def test_houlsby_adapters_on_bert_follow_clear_placement():
    cfg = BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                     max_position_embeddings=16, id2label=("neg", "pos"))
    model = random_model(lambda rngs: BertForSequenceClassification(cfg, rngs=rngs))
    base = forward(model, IDS)
    peft.apply(model, peft.AdapterConfig(bottleneck=16, activation="gelu"), rngs=nnx.Rngs(0))
    assert peft.gated_paths(model) == [
        f"bert.encoder.layer.{i}.{p}.dense" for i in range(2) for p in ("attention.output", "output")]
    peft.set_gates(model, jnp.array([[1.0, 1.0]]))  # per-sample gates throughout: one compiled forward
    np.testing.assert_allclose(forward(model, IDS), base, rtol=1e-6, atol=1e-6)  # W_up = 0 at init
    perturb_adapters(model)
    peft.set_gates(model, jnp.array([[1.0, 0.0]]))
    out = forward(model, IDS)
    np.testing.assert_allclose(out[1], base[1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[0], base[0], atol=1e-4)


def test_lora_on_gpt2_conv1d_targets_and_merge():
    cfg = GPT2Config(vocab_size=16, n_embd=16, n_layer=2, n_head=4, n_positions=16)
    model = random_model(lambda rngs: GPT2LMHeadModel(cfg, rngs=rngs), scale=0.1)
    peft.apply(model, peft.LoraConfig(rank=2, targets=("c_attn",), init="random"), rngs=nnx.Rngs(0))
    assert peft.gated_paths(model) == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    before = forward(model, IDS)
    np.testing.assert_allclose(forward(peft.merge_lora(model), IDS), before, rtol=1e-4, atol=1e-5)
