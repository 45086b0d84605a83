"""mergekit's YAML recipes in `metafit merge`: translation, equality with native recipes, errors, mergekit itself."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from metafit.config import ConfigError
from metafit.merge import io
from metafit.merge.mergekit import from_mergekit
from metafit.merge.recipe import run_recipe

# A tiny Llama (the tensor names mergekit's architecture table expects): 2 layers, every matrix 8 x 8, so
# only two shapes are compiled per merge method.
HIDDEN, MLP, LAYERS, VOCAB = 8, 8, 2, 8
SHAPES = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
for _i in range(LAYERS):
    SHAPES.update({f"model.layers.{_i}.{n}": s for n, s in {
        "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (MLP, HIDDEN), "mlp.up_proj.weight": (MLP, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, MLP)}.items()})
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
          "intermediate_size": MLP, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 2,
          "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "torch_dtype": "float32"}


def write_llama(folder: Path, seed: int | None) -> None:
    """Base (seed None) or a fine-tune: the base plus N(0, 0.01²) noise."""
    base_rng, noise = np.random.default_rng(0), None if seed is None else np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with io.SafetensorsWriter(folder / io.WEIGHTS_NAME, [(n, np.float32, s) for n, s in SHAPES.items()]) as w:
        for name, shape in SHAPES.items():
            t = base_rng.standard_normal(shape).astype(np.float32) * 0.1
            if noise is not None:
                t += noise.standard_normal(shape).astype(np.float32) * 0.01
            w.write(name, t)
    (folder / "config.json").write_text(json.dumps(CONFIG))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llamas")
    for name, seed in [("base", None), ("math", 1), ("code", 2)]:
        write_llama(root / name, seed)
    return root


# Example recipes in the shape of mergekit's documentation (TIES, SLERP over slices, DARE-TIES),
# with local folders in place of hub ids.
TIES = """
models:
  - model: base
  - model: math
    parameters: {density: 0.5, weight: 1.0}
  - model: code
    parameters:
      density: 0.3
      weight: [{filter: mlp, value: 0.2}, {value: 0.7}]
merge_method: ties
base_model: base
parameters: {normalize: true, int8_mask: true}
dtype: float32
"""
TIES_NATIVE = """
method: ties
base: base
models: [math, code]
parameters: {scale: 1.0, weight: [1.0, 0.7], density: [0.5, 0.3]}
layers:
  - {match: "*mlp*", parameters: {weight: [1.0, 0.2]}}
dtype: float32
"""
SLERP = """
slices:
  - sources:
      - {model: math, layer_range: [0, 2]}
      - {model: code, layer_range: [0, 2]}
merge_method: slerp
base_model: math
parameters:
  t:
    - {filter: self_attn, value: 0.3}
    - {filter: mlp, value: 0.7}
    - value: 0.5
dtype: bfloat16
"""
SLERP_NATIVE = """
method: slerp
models: [math, code]
parameters: {t: 0.5}
layers:
  - {match: "*self_attn*", parameters: {t: 0.3}}
  - {match: "*mlp*", parameters: {t: 0.7}}
dtype: bfloat16
"""
DARE_TIES = """
models:
  - model: base
  - model: math
    parameters: {density: 0.53, weight: 0.4}
  - model: code
    parameters: {density: 0.53, weight: 0.6}
merge_method: dare_ties
base_model: base
parameters: {int8_mask: true}
random_seed: 7
tokenizer_source: base
dtype: bfloat16
"""
DARE_TIES_NATIVE = """
method: dare_ties_sum
base: base
models: [math, code]
parameters: {scale: 1.0, weight: [0.4, 0.6], drop_rate: [0.47, 0.47]}
seed: 7
config_from: base
dtype: bfloat16
"""


def merged_bytes(root: Path, text: str, name: str) -> bytes:
    path = root / f"{name}.yaml"
    path.write_text(text)
    run_recipe(path, root / "out" / name, progress=False)
    return (root / "out" / name / io.WEIGHTS_NAME).read_bytes()


@pytest.mark.parametrize("mergekit_text,native_text", [(TIES, TIES_NATIVE), (SLERP, SLERP_NATIVE)], ids=["ties", "slerp"])
def test_mergekit_recipe_merges_bit_identically_to_its_native_recipe(models, mergekit_text, native_text):
    name = mergekit_text.split("merge_method: ")[1].split()[0]
    assert merged_bytes(models, mergekit_text, f"mk_{name}") == merged_bytes(models, native_text, f"native_{name}")


@pytest.mark.parametrize("mergekit_text,native_text", [(TIES, TIES_NATIVE), (SLERP, SLERP_NATIVE),
                                                        (DARE_TIES, DARE_TIES_NATIVE)], ids=["ties", "slerp", "dare_ties"])
def test_documented_examples_translate_to_their_native_recipes(models, mergekit_text, native_text):
    """The recipe metafit runs (DARE-TIES: mergekit's default normalize: false is the elected sum, seeded)."""
    import yaml

    native = yaml.safe_load(native_text)
    native["parameters"] = {k: v for k, v in native["parameters"].items()}
    got = from_mergekit(yaml.safe_load(mergekit_text), models)
    assert got == native


def test_translation_of_each_field(tmp_path):
    write_llama(tmp_path / "a", 1)
    raw = {"merge_method": "task_arithmetic", "base_model": "b",
           "models": [{"model": "b"}, {"model": "a", "parameters": {"weight": 3.0}}, {"model": "c", "parameters": {"weight": 1.0}}],
           "parameters": {"normalize": True, "lambda": 0.5}, "dtype": "bfloat16", "out_dtype": "float16",
           "tokenizer_source": "c", "random_seed": 3, "name": "my-merge"}
    assert from_mergekit(raw, tmp_path) == {
        "method": "task_arithmetic", "base": "b", "models": ["a", "c"], "dtype": "float16", "seed": 3,
        "parameters": {"scale": 0.5, "weight": [0.75, 0.25]}, "config_from": "c"}  # normalize: w / Σw
    dare = from_mergekit({"merge_method": "dare_linear", "base_model": "b", "parameters": {"weight": 1.0},
                          "models": [{"model": "a", "parameters": {"density": 0.25}}]}, tmp_path)
    assert dare["method"] == "dare_linear" and dare["parameters"] == {"scale": 1.0, "weight": [1.0], "drop_rate": [0.75]}
    ties = from_mergekit({"merge_method": "ties", "base_model": "b", "parameters": {"normalize": False},
                          "models": [{"model": "a", "parameters": {"weight": 1}}]}, tmp_path)
    assert ties["method"] == "ties_sum" and ties["parameters"]["density"] == [1.0]  # mergekit's default density
    crumbs = from_mergekit({"merge_method": "breadcrumbs_ties", "base_model": "b", "parameters": {"normalize": True},
                            "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.9, "gamma": 0.02}}]},
                           tmp_path)
    assert crumbs["method"] == "breadcrumbs_ties" and crumbs["parameters"]["gamma"] == [0.02]
    linear = from_mergekit({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 2}},
                                                                  {"model": "c", "parameters": {"weight": 1}}]}, tmp_path)
    assert linear == {"method": "linear", "models": ["a", "c"], "parameters": {"weight": [2, 1], "normalize": True}}
    stock = from_mergekit({"merge_method": "model_stock", "base_model": "b",
                           "models": [{"model": "a"}, {"model": "c"}, {"model": "b"}]}, tmp_path)
    assert stock == {"method": "model_stock", "base": "b", "models": ["a", "c"], "parameters": {}}
    copy = from_mergekit({"merge_method": "passthrough", "dtype": "bfloat16",
                          "slices": [{"sources": [{"model": "a", "layer_range": [0, LAYERS]}]}]}, tmp_path)
    assert copy == {"method": "linear", "models": ["a"], "parameters": {"weight": [1.0]}, "dtype": "bfloat16"}


@pytest.mark.parametrize("change,match", [
    ({"merge_method": "della"}, "merge_method 'della' is not supported"),
    ({"tokenizer": {"source": "union"}}, "key 'tokenizer' is not supported"),
    ({"tokenizer_source": "union"}, "tokenizer_source: union"),
    ({"models": [{"model": "math", "parameters": {"weight": 1.0, "density": [1.0, 0.5, 0.1]}}]}, "gradient"),
    ({"parameters": {"normalize": True, "epsilon": 0.1}}, "parameter 'epsilon' is not supported"),
    ({"models": [{"model": "math", "parameters": {"weight": 1}}, {"model": "code"}]},
     r"models\[1\] \(code\): parameter 'weight' is required"),
    ({"models": [{"model": "math+lora", "parameters": {"weight": 1}}]}, "LoRA"),
    ({"models": None, "slices": [{"sources": [{"model": "math", "layer_range": [0, 1]}]},
                                 {"sources": [{"model": "code", "layer_range": [1, 2]}]}]}, "2 slices stack or cut"),
    ({"models": None, "slices": [{"sources": [{"model": "math", "layer_range": [0, 1]}]}]}, "not the whole model"),
    ({"merge_method": "dare_ties", "parameters": {"rescale": False}}, "rescale: false is not supported"),
])
def test_unsupported_mergekit_features_fail_by_name_with_nothing_written(models, change, match):
    import yaml

    raw = {"merge_method": "ties", "base_model": "base",
           "models": [{"model": "math", "parameters": {"weight": 1.0, "density": 0.5}}], "parameters": {}}
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    path = models / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=match):
        run_recipe(path, models / "out" / "bad", progress=False)
    assert not (models / "out" / "bad").exists()


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit is not a test dependency")
@pytest.mark.parametrize("text", [TIES, SLERP], ids=["ties", "slerp"])
def test_same_recipe_agrees_with_mergekit(models, text):
    """mergekit (--no-deps, see benchmarks/merge_mergekit.py) and metafit run the same file; float32 outputs agree."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = text.replace("bfloat16", "float32")
    name = text.split("merge_method: ")[1].split()[0]
    ours = np.frombuffer(merged_bytes(models, text, f"vs_mergekit_{name}"), np.uint8)  # noqa: F841 (written)
    raw = yaml.safe_load(text)
    for entry in raw.get("models", []) + [s for sl in raw.get("slices", []) for s in sl["sources"]]:
        entry["model"] = str(models / entry["model"])
    raw["base_model"] = str(models / raw["base_model"])
    out = models / "out" / f"mergekit_{name}"
    run_merge(MergeConfiguration.model_validate(raw), str(out),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False))
    theirs, mine = io.SafetensorsFolder(out), io.SafetensorsFolder(models / "out" / f"vs_mergekit_{name}")
    for tensor in SHAPES:
        np.testing.assert_allclose(mine.read(tensor), theirs.read(tensor), atol=2e-6, err_msg=tensor)
