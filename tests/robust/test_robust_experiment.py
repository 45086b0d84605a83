"""The ``robust`` experiment: its configs validate before any compute, and a tiny run completes."""
from pathlib import Path

import pytest

from metafit.config import ConfigError
from metafit.experiments import load_run_config, run_experiment

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "robust").glob("*.yaml")) + sorted((ROOT / "paper_repro" / "clear").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_validate(path):
    cfg = load_run_config(path)
    assert cfg.experiment == "robust"
    assert path.read_text().startswith("#") and "Command:" in path.read_text()


def test_bad_entries_fail_before_compute():
    base = ROOT / "configs" / "robust" / "keywords_clear.yaml"
    with pytest.raises((ConfigError, KeyError), match="did you mean 'clear'"):
        load_run_config(base, ["args.methods=['claer:adapter']"])
    with pytest.raises(ConfigError, match="tuning"):
        load_run_config(base, ["args.methods=['clear:lorra']"])
    with pytest.raises(ConfigError, match="CleaR routes PEFT"):
        load_run_config(base, ["args.methods=['clear:full']"])


@pytest.mark.slow
def test_keywords_config_smoke(tmp_path):
    overrides = ["args.num_examples=80", "args.epochs=2", "args.backbone_steps=4", "args.max_len=12",
                 "args.methods=['clear:bitfit']", "args.clear.warmup_epochs=1",
                 "args.noise_rates=[0.4]", "train.batch_size=16"]
    run, results = run_experiment(ROOT / "configs" / "robust" / "keywords_clear.yaml", overrides,
                                  workdir=tmp_path / "run")
    rows = results["methods"]
    assert set(rows) == {"clear:bitfit symm0.4"}
    assert 0.0 <= rows["clear:bitfit symm0.4"]["last_clean_auroc_mean"] <= 1.0
    assert (run.path / "results.md").exists() and (run.path / "memorisation_curves.png").exists()
