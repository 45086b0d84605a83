"""The ``robust`` experiment: its configs validate before any compute, and a tiny run reports the clean-label
AUROC of its own final clean probabilities (recomputed here by brute force from the checkpoint)."""
from pathlib import Path

import numpy as np
import pytest

from metafit.config import ConfigError
from metafit.data.text import keyword_tokenizer
from metafit.experiments import load_run_config, run_experiment
from metafit.robust import EPOCH_HOOK, encoded_splits, noisy_task
from metafit.train.checkpoint import load_checkpoint

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
    with pytest.raises(ConfigError, match="backbone_layers must be >= 1"):
        load_run_config(base, ["args.backbone_layers=0"])


def pairwise_auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """AUROC by brute force: P(score of a positive > score of a negative), ties counting 1/2."""
    diff = score[positive][:, None] - score[~positive][None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def test_pairwise_auroc_reference_on_a_case_worked_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.4: pairs (0.9>0.5) 1, (0.9>0.4) 1, (0.4<0.5) 0, (0.4=0.4) 1/2
    assert pairwise_auroc(np.array([0.9, 0.4, 0.5, 0.4]), np.array([True, True, False, False])) == 0.625


@pytest.mark.slow
def test_keywords_config_smoke_reports_the_auroc_of_its_last_clean_probabilities(tmp_path):
    # one backbone layer: every stage (pre-training, per-layer routing, the GMM passes) at half the compile
    overrides = ["args.num_examples=80", "args.epochs=3", "args.backbone_steps=4", "args.backbone_layers=1",
                 "args.max_len=12",
                 "args.methods=['clear:bitfit']", "args.clear.warmup_epochs=1",
                 "args.noise_rates=[0.4]", "train.batch_size=16"]
    run, results = run_experiment(ROOT / "configs" / "robust" / "keywords_clear.yaml", overrides,
                                  workdir=tmp_path / "run")
    rows = results["methods"]
    assert set(rows) == {"clear:bitfit symm0.4"}
    assert (run.path / "results.md").exists() and (run.path / "memorisation_curves.png").exists()
    # the reported AUROC is that of the last GMM estimate (the one epoch 3 trained with, saved in the final
    # checkpoint) against the run's own corrupted-label mask, recomputed here pair by pair
    state = load_checkpoint(run.path / "clear_bitfit" / "symmetric0.4" / "seed0" / "checkpoints")["state"]
    estimate = state["callbacks"][EPOCH_HOOK]
    assert int(estimate["epoch"]) == 2  # made after epoch 2 for epoch 3; epoch 2 had its own
    splits = encoded_splits("keywords", keyword_tokenizer(num_classes=4), max_len=12, num_examples=80,
                            num_classes=4, val_fraction=0.1, test_fraction=0.2)
    is_noisy = noisy_task(splits, "symmetric", 0.4, seed=0).noise.is_noisy
    assert len(is_noisy) == len(estimate["clean_prob"]) and 0 < is_noisy.sum() < len(is_noisy)
    expected = pairwise_auroc(np.asarray(estimate["clean_prob"], np.float64), ~is_noisy)
    assert rows["clear:bitfit symm0.4"]["last_clean_auroc_mean"] == pytest.approx(expected, abs=1e-9)
