"""Streaming safetensors merges and `metafit merge` recipes."""
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import metafit.merge as mm
from metafit.config import ConfigError
from metafit.merge import io
from metafit.merge.recipe import run_recipe
from metafit.merge.stream import merge_folders

# The float32 shapes of test_merge_methods.tree (embed and mlp one shape, so one program per method serves
# both, each with its own per-layer parameters) and a 1-D norm: few merge programs to compile.
SHAPES = {"embed.weight": (6, 5), "layers.0.mlp.weight": (6, 5), "layers.0.norm.weight": (5,), "step": ()}


def write_model(folder: Path, seed: int, shapes=SHAPES, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    tensors = {n: (np.asarray(seed, np.int64) if n == "step" else rng.standard_normal(s).astype(dtype))
               for n, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    with io.SafetensorsWriter(folder / io.WEIGHTS_NAME, [(n, t.dtype, t.shape) for n, t in tensors.items()]) as w:
        for n, t in tensors.items():
            w.write(n, t)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    return tensors


# The slow tests come first: xdist (loadfile) hands a worker its next file once at most two of its current
# file's tests are left, so a slow test at the end keeps a worker busy after it took more work.

def test_recipe_output_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # square attention and MLP matrices: three tensor shapes in all, so the merge compiles three programs
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    models = [transformers.LlamaForCausalLM(config) for _ in range(3)]
    for i, model in enumerate(models):
        model.save_pretrained(tmp_path / f"m{i}")
    path = recipe(tmp_path, "method: ties\nbase: m0\nmodels: [m1, m2]\nparameters: {density: 0.5, scale: 1.0}\n")
    run_recipe(path, tmp_path / "merged", progress=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    states = [{k: v.numpy() for k, v in m.state_dict().items()} for m in models]
    expected = mm.ties(states[0], states[1:], density=0.5, scale=1.0)
    for name, value in merged.state_dict().items():
        np.testing.assert_allclose(value.numpy(), np.asarray(expected[name]), atol=1e-6, err_msg=name)
    logits = merged(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_writer_reader_roundtrip_with_bfloat16(tmp_path):
    tensors = write_model(tmp_path / "m", 0, dtype=ml_dtypes.bfloat16)
    view = io.SafetensorsFolder(tmp_path / "m")
    assert view.names() == list(SHAPES)
    for name, t in tensors.items():
        np.testing.assert_array_equal(view.read(name), t)


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3, "scale": 0.8}),
                                           ("dare_ties", {"drop_rate": 0.5})])
def test_streaming_merge_equals_in_memory_merge(tmp_path, method, params):
    base = write_model(tmp_path / "base", 0)
    models = [write_model(tmp_path / f"m{i}", i + 1) for i in range(2)]  # two: the recipes' programs
    key = jax.random.key(3)
    merge_folders(method, tmp_path / "base", [tmp_path / f"m{i}" for i in range(2)], tmp_path / "out.safetensors",
                  params=params, key=key)
    streamed = io.SafetensorsFolder(tmp_path / "out.safetensors")
    in_memory = mm.merge(method, base, models, key=key, **params)
    for name in SHAPES:
        np.testing.assert_array_equal(streamed.read(name), np.asarray(in_memory[name]))


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_with_layer_rules_and_dtype(tmp_path):
    base = write_model(tmp_path / "base", 0)
    models = [write_model(tmp_path / f"m{i}", i + 1) for i in range(2)]
    path = recipe(tmp_path, """
method: ties
base: base
models:
  - {path: m0, density: 0.5}
  - m1
parameters: {scale: 0.5, density: 0.25}
layers:
  - {match: "layers.0.norm.*", copy_base: true}
  - {match: "embed.*", parameters: {density: 1.0}}
dtype: bfloat16
""")
    summary = run_recipe(path, tmp_path / "out", progress=False)
    assert summary["tensors"] == len(SHAPES)
    out = io.SafetensorsFolder(tmp_path / "out")
    assert out.dtype("embed.weight") == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(out.read("layers.0.norm.weight"), base["layers.0.norm.weight"].astype(ml_dtypes.bfloat16))
    expected = mm.ties({"w": base["embed.weight"]}, [{"w": m["embed.weight"]} for m in models], density=1.0, scale=0.5)
    np.testing.assert_array_equal(out.read("embed.weight"), np.asarray(expected["w"]).astype(ml_dtypes.bfloat16))
    expected = mm.merge("ties", {"w": base["layers.0.mlp.weight"]}, [{"w": m["layers.0.mlp.weight"]} for m in models],
                        density=(0.5, 0.25), scale=0.5)
    np.testing.assert_array_equal(out.read("layers.0.mlp.weight"), np.asarray(expected["w"]).astype(ml_dtypes.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "out" / "metafit_merge.yaml").is_file()


@pytest.mark.parametrize("text,error,match", [
    ("method: ties\nbase: base\nmodels: [m0]\nmodel: m1\n", ConfigError, "unknown key 'model'"),
    ("method: ties\nbase: base\nmodels: [m0]\nparameters: {densty: 0.2}\n", mm.MergeError, "did you mean 'density'"),
    ("method: tiez\nbase: base\nmodels: [m0]\n", ConfigError, "did you mean 'ties'"),
    ("method: ties\nbase: base\nmodels: [m0, nowhere]\n", mm.MergeError, r"models\[1\]: model not found"),
    ("method: ties\nbase: base\nmodels: [m0]\nparameters: {density: 1.5}\n", mm.MergeError, r"\(0, 1\]"),
    ("method: ties\nbase: base\nmodels: [{path: m0, density: 0}]\n", mm.MergeError, r"\(0, 1\]"),
    ("method: linear\nmodels: [{path: m0, weight: 0.7}, {path: m0, weight: 0.7}]\n", mm.MergeError, "sum to 1.4"),
    ("method: ties\nbase: base\nmodels: [m0, other]\n", mm.MergeError, "tensor 'layers.0.mlp.weight' has shape"),
    ("method: ties\nmodels: [m0]\n", mm.MergeError, "needs `base:`"),
])
def test_bad_recipes_fail_before_merging(tmp_path, text, error, match):
    write_model(tmp_path / "base", 0)
    write_model(tmp_path / "m0", 1)
    write_model(tmp_path / "other", 2, shapes={**SHAPES, "layers.0.mlp.weight": (6, 6)})
    with pytest.raises(error, match=match):
        run_recipe(recipe(tmp_path, text), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / io.WEIGHTS_NAME).exists()


def test_failed_or_self_overwriting_merges_keep_what_was_written(tmp_path):
    """A merge that fails midway leaves the previous output intact; an input folder as output is refused."""
    write_model(tmp_path / "base", 0)
    write_model(tmp_path / "m0", 1)
    write_model(tmp_path / "m1", 2)
    good = recipe(tmp_path, "method: ties\nbase: base\nmodels: [m0, m1]\n")
    run_recipe(good, tmp_path / "out", progress=False)
    before = (tmp_path / "out" / io.WEIGHTS_NAME).read_bytes()

    def fail_on_third(i, n, name):
        if i == 2:
            raise KeyboardInterrupt("killed while merging")

    with pytest.raises(KeyboardInterrupt):
        merge_folders("ties", tmp_path / "base", [tmp_path / "m0", tmp_path / "m1"], tmp_path / "out" / io.WEIGHTS_NAME,
                      params={"density": 0.5}, on_tensor=fail_on_third)
    assert (tmp_path / "out" / io.WEIGHTS_NAME).read_bytes() == before  # the old merge, untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "partial" in p.name) == []

    base_bytes = (tmp_path / "base" / io.WEIGHTS_NAME).read_bytes()
    with pytest.raises(mm.MergeError, match="is the folder of an input model"):
        run_recipe(good, tmp_path / "base", progress=False)
    assert (tmp_path / "base" / io.WEIGHTS_NAME).read_bytes() == base_bytes
