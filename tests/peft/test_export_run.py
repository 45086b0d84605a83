"""``metafit export``: a run's adapter, merged or kept, becomes an HF folder transformers loads with peft's logits."""
import json

import numpy as np
import pytest

from metafit.export import ExportError, export_run, exportable_models
from metafit.models.loading import parse_size, shard_plan

from test_hf_export import IDS, tiny_hf_folder
from test_hf_import import TOL, hf_class, save_with_peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft", reason="pip install --no-deps peft==0.21.2 accelerate==1.15.0")


def make_run(folder, adapter_source=None):
    """A run folder as ``metafit run`` leaves it, with the adapter copied to ``adapter/``."""
    import shutil

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("experiment: lora_sft\n")
    (folder / ".metafit-run").write_text("{}")
    if adapter_source is not None:
        shutil.copytree(adapter_source, folder / "adapter")
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A run holding a LoRA adapter on every linear layer (weights moved off init) and peft's logits for it."""
    root = tmp_path_factory.mktemp("export")
    base = tiny_hf_folder(root, "llama")
    config = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    adapter, adapted = save_with_peft(base, "llama", config, root / "saved", safe=True)
    return make_run(root / "run", adapter), base, adapted


def hf_logits(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def test_merged_export_is_sharded_and_loads_in_transformers_with_peft_logits(lora_run, tmp_path):
    run, _, adapted = lora_run
    out = tmp_path / "merged"
    summary = export_run(run, out, max_shard_size=4000)
    assert summary["merged"] and summary["kind"] == "adapter" and len(summary["weight_files"]) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == summary["weight_files"]
    assert not (out / "model.safetensors").exists()
    np.testing.assert_allclose(hf_logits(out), adapted, atol=TOL)  # transformers reads the shards, adapter folded in

    from metafit.models import load  # metafit reads its own export the same way
    from test_hf_import import logits

    np.testing.assert_allclose(logits(load(out, tokenizer=False)[0]), adapted, atol=TOL)


def test_kept_adapter_loads_with_peft(lora_run, tmp_path):
    run, _, adapted = lora_run
    out = tmp_path / "kept"
    summary = export_run(run, out, merge=False, max_shard_size=None)
    assert summary["weight_files"] == ["model.safetensors"] and (out / "adapter" / "adapter_config.json").is_file()
    model = hf_peft.PeftModel.from_pretrained(hf_class("llama").from_pretrained(out), out / "adapter").eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.tensor(IDS)).logits.numpy(), adapted, atol=TOL)


def test_prefix_adapter_is_not_merged_silently(tmp_path):
    base = tiny_hf_folder(tmp_path, "llama")
    adapter, _ = save_with_peft(base, "llama", hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                                tmp_path / "prefix")
    run = make_run(tmp_path / "run", adapter)
    with pytest.raises(ExportError, match="cannot be folded.*--keep-adapter"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_bad_runs_and_outputs_are_named_before_any_loading(lora_run, tmp_path):
    run, base, _ = lora_run
    with pytest.raises(ExportError, match="not a metafit run folder"):
        export_run(base, tmp_path / "a")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_run(run, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="cannot read the size '5 gigs'"):
        export_run(run, tmp_path / "b", max_shard_size="5 gigs")
    with pytest.raises(ExportError, match="no model at 'nope'.*adapter"):
        export_run(run, tmp_path / "c", model="nope")
    with pytest.raises(ExportError, match="holds no exportable model"):
        export_run(make_run(tmp_path / "empty"), tmp_path / "d")
    with pytest.raises(ExportError, match="cannot load the adapter's base model.*--base"):
        export_run(run, tmp_path / "e", base=str(tmp_path / "missing-base"))


def test_several_models_need_a_choice_and_the_cli_exports_one(lora_run, tmp_path):
    import shutil

    from conftest import run_cli

    run, base, adapted = lora_run
    many = tmp_path / "many"
    shutil.copytree(run, many)
    shutil.copytree(base, many / "merged" / "ties")
    assert exportable_models(many) == {"adapter": "adapter", "merged/ties": "model"}
    with pytest.raises(ExportError, match="holds 2 models .*--model"):
        export_run(many, tmp_path / "x")
    done = run_cli("export", str(many), "--out", str(tmp_path / "ties"), "--model", "merged/ties", "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "ties" / "config.json").read_text())["dtype"] == "bfloat16"
    failed = run_cli("export", str(many), "--out", str(tmp_path / "y"))
    assert failed.returncode == 2 and "--model" in failed.stderr


def test_sizes_and_shard_plan():
    assert parse_size(1000) == 1000 and parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    assert parse_size("1.5kb") == 1500
    for bad in ("0", "-3MB", "five", True):
        with pytest.raises(ValueError):
            parse_size(bad)
    sizes = {"a": np.zeros(10, np.float32), "b": np.zeros(10, np.float32), "c": np.zeros(30, np.float32),
             "d": np.zeros(1, np.float32)}
    assert shard_plan(sizes, None) == [["a", "b", "c", "d"]]
    assert shard_plan(sizes, 80) == [["a", "b"], ["c"], ["d"]]  # c (120 B) is larger than the limit: alone
