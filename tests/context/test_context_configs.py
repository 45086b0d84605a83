"""The context configs resolve, and bad settings fail before any run folder exists."""
from pathlib import Path

import pytest

from metafit.config import load_yaml
from metafit.experiments import resolve_config, run_experiment

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "context"


@pytest.mark.parametrize("name", ["nih_smollm2.yaml", "sft_small.yaml"])
def test_configs_resolve(name):
    cfg = resolve_config(load_yaml(CONFIGS / name), name)
    assert cfg.experiment in ("context_nih", "context_sft")


@pytest.mark.parametrize("name, setting, message", [
    ("nih_smollm2.yaml", "args.alphas=[1.0,1.5]", r"alphas must lie in \(0, 1\]"),
    ("nih_smollm2.yaml", "args.depths=[0.5,2.0]", r"depths must lie in \[0, 1\]"),
    ("sft_small.yaml", "args.context_fraction=1.0", r"context_fraction must lie in \(0, 1\)"),
    ("sft_small.yaml", "args.flag_fraction=1.5", r"flag_fraction must lie in \[0, 1\)"),
])
def test_bad_settings_fail_before_the_run_folder(tmp_path, name, setting, message):
    with pytest.raises(ValueError, match=message):
        run_experiment(CONFIGS / name, [setting], workdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
