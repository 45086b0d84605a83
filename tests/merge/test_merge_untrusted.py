"""`metafit merge` on untrusted inputs and outputs: nothing read from outside, nothing lost, no traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metafit.cli import main
from metafit.config import ConfigError
from metafit.merge import MergeError, io
from metafit.merge.recipe import run_recipe
from metafit.models import MalformedWeightsError

sys.path.insert(0, str(Path(__file__).parent))
from test_merge_recipe import recipe, write_model  # noqa: E402

SHAPES = {"a.weight": (6, 5), "b.weight": (5,)}  # test_merge_recipe's shapes: its merge programs
TIES = "method: ties\nbase: base\nmodels: [m0, m1]\n"


@pytest.fixture
def models(tmp_path):
    for i, name in enumerate(["base", "m0", "m1"]):
        write_model(tmp_path / name, i, shapes=SHAPES)
    return tmp_path


def test_symlinked_tokenizer_outside_the_folder_is_refused(models):
    secret = models / "secret.txt"
    secret.write_text("not yours")
    os.symlink(secret, models / "base" / "tokenizer.json")
    with pytest.raises(MalformedWeightsError, match="tokenizer.json.*outside the model folder"):
        run_recipe(recipe(models, TIES), models / "out", progress=False)
    assert not (models / "out").exists()


def test_fifo_tokenizer_is_refused(models):
    os.mkfifo(models / "base" / "tokenizer.json")
    with pytest.raises(MalformedWeightsError, match="tokenizer.json.*not a regular file"):
        run_recipe(recipe(models, TIES), models / "out", progress=False)


def test_symlink_inside_the_folder_is_copied(models):
    (models / "base" / "tok.json").write_text("{}")
    os.symlink("tok.json", models / "base" / "tokenizer.json")
    run_recipe(recipe(models, TIES), models / "out", progress=False)
    out = models / "out" / "tokenizer.json"
    assert out.is_file() and not out.is_symlink() and out.read_text() == "{}"


@pytest.mark.parametrize("extra,out", [("config_from: cfg\n", "cfg"), ("", "base"), ("", "m1")])
def test_output_equal_to_an_input_is_refused(models, extra, out):
    write_model(models / "cfg", 4, shapes=SHAPES)
    before = (models / out / io.WEIGHTS_NAME).read_bytes()
    with pytest.raises(MergeError, match="is the folder of an input model"):
        run_recipe(recipe(models, TIES + extra), models / out, progress=False)
    assert (models / out / io.WEIGHTS_NAME).read_bytes() == before


def test_output_equal_to_a_fisher_folder_is_refused(models):
    write_model(models / "fish", 5, shapes=SHAPES)
    text = "method: fisher\nmodels: [{path: m0, fisher: fish/model.safetensors}, {path: m1, fisher: fish/model.safetensors}]\n"
    with pytest.raises(MergeError, match="is the folder of an input model"):
        run_recipe(recipe(models, text), models / "fish", progress=False)


def test_non_empty_or_sharded_folder_is_refused(models):
    (models / "mine").mkdir()
    (models / "mine" / "notes.txt").write_text("keep me")
    (models / "sharded").mkdir()
    (models / "sharded" / io.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    for name in ("mine", "sharded"):
        with pytest.raises(MergeError, match="non-empty folder"):
            run_recipe(recipe(models, TIES), models / name, progress=False)
    assert (models / "mine" / "notes.txt").read_text() == "keep me"


def test_rerun_into_an_earlier_output_leaves_no_stale_file(models):
    (models / "base" / "tokenizer.json").write_text("{}")
    run_recipe(recipe(models, TIES), models / "out", progress=False)
    (models / "out" / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (models / "out" / io.INDEX_NAME).write_text("{}")
    (models / "base" / "tokenizer.json").unlink()
    run_recipe(recipe(models, TIES), models / "out", progress=False)
    assert sorted(p.name for p in (models / "out").iterdir()) == ["config.json", "metafit_merge.yaml", io.WEIGHTS_NAME]
    assert [p.name for p in models.iterdir() if p.name.startswith(".out")] == []
    assert io.SafetensorsFolder(models / "out").names() == list(SHAPES)


def test_output_that_is_a_file_gives_a_clear_error(models, capsys):
    (models / "out").write_text("a file")
    with pytest.raises(MergeError, match="is a file"):
        run_recipe(recipe(models, TIES), models / "out", progress=False)
    assert main(["merge", str(models / "recipe.yaml"), "--out", str(models / "out")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (models / "out").read_text() == "a file"


def test_overflowing_merge_is_refused_and_nothing_is_written(models):
    run_recipe(recipe(models, TIES), models / "out", progress=False)
    before = (models / "out" / io.WEIGHTS_NAME).read_bytes()
    with pytest.raises(MergeError, match="merged tensor 'a.weight' has .* non-finite"):
        run_recipe(recipe(models, TIES + "parameters: {scale: 1e300}\n"), models / "out", progress=False)
    assert (models / "out" / io.WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in models.iterdir() if p.name.startswith(".out")] == []
    with pytest.raises(MergeError, match="non-finite"):
        run_recipe(recipe(models, TIES + "parameters: {scale: 1e300}\n"), models / "new", progress=False)
    assert not (models / "new").exists()


def test_a_non_finite_tensor_no_model_changed_is_copied_and_one_changed_is_refused(tmp_path):
    import numpy as np

    # a causal-mask buffer stored as -inf: the kernel would merge it to NaN (inf - inf); a copy keeps it
    mask = np.array([0.0, -np.inf, -np.inf, 0.0, -np.inf], np.float32)
    for i, name in enumerate(["base", "m0", "m1"]):
        tensors = {"a.weight": np.random.default_rng(i).standard_normal((6, 5)).astype(np.float32), "b.weight": mask}
        (tmp_path / name).mkdir()
        with io.SafetensorsWriter(tmp_path / name / io.WEIGHTS_NAME, [(n, t.dtype, t.shape) for n, t in tensors.items()]) as w:
            for n, t in tensors.items():
                w.write(n, t)
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    run_recipe(recipe(tmp_path, TIES), tmp_path / "out", progress=False)
    merged = io.SafetensorsFolder(tmp_path / "out")
    assert np.array_equal(merged.read("b.weight"), mask) and np.isfinite(merged.read("a.weight")).all()

    with io.SafetensorsWriter(tmp_path / "m1" / io.WEIGHTS_NAME, [("a.weight", np.float32, (6, 5)),
                                                                  ("b.weight", np.float32, (5,))]) as w:
        w.write("a.weight", np.zeros((6, 5), np.float32))
        w.write("b.weight", np.where(np.isinf(mask), -1e30, 0.0).astype(np.float32))  # this model changed it
    with pytest.raises(MergeError, match="merged tensor 'b.weight' has .* non-finite"):
        run_recipe(recipe(tmp_path, TIES), tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partials_of_dead_merges_are_removed(models):
    run_recipe(recipe(models, TIES), models / "out", progress=False)
    dead, alive = _dead_pid(), os.getppid()
    stale = [models / "out" / f"{io.WEIGHTS_NAME}.partial-{dead}", models / f".out.partial-{dead}"]
    stale[0].write_bytes(b"x" * 100)
    stale[1].mkdir()
    (stale[1] / io.WEIGHTS_NAME).write_bytes(b"x")
    live = models / f".out.partial-{alive}"
    live.mkdir()
    other = models / f".other.partial-{dead}"
    other.mkdir()
    run_recipe(recipe(models, TIES), models / "out", progress=False)
    assert not any(p.exists() for p in stale)
    assert live.is_dir() and other.is_dir()  # a live merge's and another output's are left alone


@pytest.mark.parametrize("params,key", [("{density: {a: 1}}", "parameters.density"),
                                        ("{scale: [x]}", "parameters.scale")])
def test_non_numeric_parameter_is_a_config_error(models, params, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_recipe(recipe(models, TIES + f"parameters: {params}\n"), models / "out", progress=False)


def test_non_numeric_layer_parameter_is_a_config_error(models):
    text = TIES + 'layers:\n  - {match: "a.*", parameters: {density: {a: 1}}}\n'
    with pytest.raises(ConfigError, match=r"layers\[0\]\.parameters\.density"):
        run_recipe(recipe(models, text), models / "out", progress=False)


def test_index_entry_outside_the_folder_is_refused(models):
    folder = models / "m1"
    (folder / io.WEIGHTS_NAME).rename(models / "elsewhere.safetensors")
    (folder / io.INDEX_NAME).write_text(json.dumps({"weight_map": {n: "../elsewhere.safetensors" for n in SHAPES}}))
    with pytest.raises(MalformedWeightsError, match="outside the model folder"):
        run_recipe(recipe(models, TIES), models / "out", progress=False)


@pytest.mark.parametrize("damage,match", [
    (lambda b: (2**64 - 1).to_bytes(8, "little") + b[8:], "header length"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b[:4], "too short"),
])
def test_malformed_safetensors_gives_malformed_weights_error(models, damage, match):
    file = models / "m1" / io.WEIGHTS_NAME
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(MalformedWeightsError, match=match):
        run_recipe(recipe(models, TIES), models / "out", progress=False)


def test_output_moved_aside_by_a_killed_swap_comes_back(models):
    run_recipe(recipe(models, TIES), models / "out", progress=False)
    before = (models / "out" / io.WEIGHTS_NAME).read_bytes()
    os.replace(models / "out", models / f".out.old-{_dead_pid()}")
    with pytest.raises(MergeError, match="non-finite"):
        run_recipe(recipe(models, TIES + "parameters: {scale: 1e300}\n"), models / "out", progress=False)
    assert (models / "out" / io.WEIGHTS_NAME).read_bytes() == before
