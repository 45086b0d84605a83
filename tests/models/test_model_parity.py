"""metafit.models vs transformers' PyTorch classes: logits, masks, save -> reload, parameter names."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metafit.models as mm
from models_tiny import (
    bert_config, batch, build, forward, gpt2_config, llama_config, qwen2_config, save, torch_out, transformers,
)

ATOL = 1e-4

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# (id, HF class, config factory, sequence length)
CASES = [
    # GQA, untied, llama3 RoPE, q/k/v/o and MLP bias
    ("llama-gqa-llama3", "LlamaForCausalLM",
     lambda: llama_config(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True), 7),
    # SmolLM2-like: tied embeddings, MHA, linear RoPE scaling
    ("llama-tied-linear", "LlamaForCausalLM",
     lambda: llama_config(tie_word_embeddings=True, num_key_value_heads=4,
                          rope_parameters={"rope_type": "linear", "rope_theta": 100000.0, "factor": 2.0}), 7),
    # dynamic NTK only acts past max_position_embeddings: sequence 12 > 8
    ("llama-dynamic", "LlamaForCausalLM",
     lambda: llama_config(max_position_embeddings=8,
                          rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), 12),
    # Qwen2: q/k/v bias without o bias, one KV head, tied, YaRN
    ("qwen2-yarn", "Qwen2ForCausalLM",
     lambda: qwen2_config(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                           "original_max_position_embeddings": 16}), 7),
    ("mistral-sliding", "MistralForCausalLM",
     lambda: transformers.MistralConfig(**{**llama_config().to_dict(), "model_type": "mistral",
                                           "sliding_window": 3, "architectures": None}), 9),
    ("gpt2", "GPT2LMHeadModel", gpt2_config, 7),
    ("gpt2-untied-layerscale", "GPT2LMHeadModel",
     lambda: gpt2_config(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True,
                         activation_function="gelu"), 7),
    ("bert", "BertModel", bert_config, 7),
    ("bert-cls", "BertForSequenceClassification", lambda: bert_config(num_labels=3), 7),
    ("llama-cls", "LlamaForSequenceClassification", lambda: llama_config(num_labels=3), 7),
    ("gpt2-cls", "GPT2ForSequenceClassification", lambda: gpt2_config(num_labels=4), 7),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory):
    name, cls_name, make_config, seq = request.param
    reference = build(cls_name, make_config())
    folder = save(reference, tmp_path_factory.mktemp(name))
    model, _ = mm.load(folder)
    return name, reference, model, folder, seq


def _compare(got, want, mask):
    if want.ndim == 3:  # per-token outputs: padded query rows are never read
        got, want = got[mask == 1], want[mask == 1]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)


def test_logits_match_torch_with_and_without_padding(case):
    _, reference, model, _, seq = case
    ids, mask = batch(seq)
    _compare(forward(model, ids, mask), torch_out(reference, ids, mask), mask)
    # no padding (an all-ones mask reuses the compiled function; mask=None: test_model_attention)
    full = np.random.RandomState(5).randint(3, 97, ids.shape).astype(np.int32)
    _compare(forward(model, full, np.ones_like(mask)), torch_out(reference, full), np.ones_like(full))


def test_save_then_transformers_reload_gives_same_outputs(case, tmp_path):
    name, reference, model, _, seq = case
    mm.save(model, tmp_path)
    reloaded = getattr(transformers, type(reference).__name__).from_pretrained(str(tmp_path), attn_implementation="eager")
    ids, mask = batch(seq, seed=1)
    _compare(torch_out(reloaded, ids, mask), torch_out(reference, ids, mask), mask)
    again, _ = mm.load(tmp_path)
    _compare(forward(again, ids, mask), torch_out(reference, ids, mask), mask)


def test_parameter_paths_are_hf_names_and_projections_are_linear(case):
    _, reference, model, _, _ = case
    torch_names = set(reference.state_dict())
    names = {name for _, name, _ in mm.hf_layout(model)}
    tied = {"lm_head.weight"} if "lm_head.weight" not in names else set()
    assert names == torch_names - tied
    for path, module in nnx.iter_modules(model):
        if path and path[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                 "c_attn", "c_proj", "c_fc", "query", "key", "value", "dense", "lm_head"):
            assert isinstance(module, nnx.Linear), path


def test_bfloat16_load_is_close_to_float32(tmp_path):
    reference = build("LlamaForCausalLM", llama_config())
    folder = save(reference, tmp_path)
    model32, _ = mm.load(folder)
    model16, _ = mm.load(folder, dtype=jnp.bfloat16)
    ids, _ = batch()
    out16 = forward(model16, ids)
    assert out16.dtype == jnp.bfloat16
    out32 = forward(model32, ids)
    assert np.abs(out16.astype(np.float32) - out32).max() < 0.05 * np.abs(out32).max()


def test_sharded_safetensors_index_loads(tmp_path):
    reference = build("LlamaForCausalLM", llama_config())
    reference.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = mm.load(tmp_path)
    ids, mask = batch()
    _compare(forward(model, ids, mask), torch_out(reference, ids, mask), mask)


def test_base_model_checkpoint_loads_into_head_model(tmp_path):
    """A ``BertModel`` checkpoint has no ``bert.`` prefix; the classifier checkpoint does."""
    reference = build("BertForSequenceClassification", bert_config(num_labels=2))
    reference.bert.save_pretrained(str(tmp_path))
    encoder, _ = mm.load(tmp_path)
    assert isinstance(encoder, mm.BertModel)
    ids, mask = batch()
    _compare(forward(encoder, ids, mask), torch_out(reference.bert, ids, mask), mask)
