"""The context_sft experiment end to end on a tiny chat model (tiny overrides of configs/context/sft_small.yaml)."""
from pathlib import Path

import pytest

from context_fixtures import chat_folder  # noqa: F401 (a fixture)
from metafit.experiments import run_experiment

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "context"


def test_sft_experiment_end_to_end_on_a_tiny_chat_model(tmp_path, chat_folder):
    """context_sft with tiny overrides: the flagged fraction is the one asked for, the indicator arm was trained
    on the flagged items, and the arms' scores are those of the answers they kept."""
    import json

    from metafit.context.evaluate import nih_recall_grid
    from metafit.data import context_tasks
    from metafit.models import load

    settings = [f"args.model={chat_folder}", "args.n_train=8", "args.flag_fraction=0.25", "args.n_qa=2",
                "args.n_free=2", "args.nih_lengths=[160]", "args.nih_depths=[0.5]", "args.buckets=[256]",
                "args.batch_size=4", "args.bucket=64", "args.max_new_tokens=3", "train.steps=2", "train.batch_size=4",
                "train.ckpt_every=2", "train.log_every=1", "train.warmup_steps=0"]
    run, results = run_experiment(CONFIGS / "sft_small.yaml", settings, workdir=tmp_path / "run")
    assert set(results["methods"]) == {"base", "vanilla", "indicator"}
    assert results["metrics"]["fraction_flagged"] == pytest.approx(0.25)  # the top 2 of 8 by s_M
    tests = context_tasks.nih_grid(load(str(chat_folder), tokenizer=True)[1], [160], [0.5], seed=0)
    for arm in ("base", "vanilla", "indicator"):  # every arm's recall is that of the answers it kept
        kept = json.loads((run.path / "arms" / f"{arm}.json").read_text())
        grid, _, _ = nih_recall_grid(tests, kept["nih_answers"])
        assert results["methods"][arm]["nih_recall"] == pytest.approx(grid.mean())
    assert all((run.path / "checkpoints" / arm).is_dir() for arm in ("vanilla", "indicator"))  # both SFT arms trained
