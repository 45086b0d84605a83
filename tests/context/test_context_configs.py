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


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny chat model folder: a character-level tokenizer with a chat template, numpy weights (well under 1 s)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
    from serve_tiny import tiny_folder

    return tiny_folder(tmp_path_factory.mktemp("chat"), max_position_embeddings=512)


def test_nih_experiment_end_to_end_on_a_tiny_chat_model(tmp_path, chat_folder):
    """context_nih with tiny overrides: the arm scores are those of the answers it kept, and it resumes."""
    import json

    from metafit.context.evaluate import nih_recall_grid
    from metafit.data import context_tasks
    from metafit.models import load

    folder = chat_folder
    settings = [f"args.model={folder}", "args.lengths=[160,192]", "args.depths=[0.0,1.0]", "args.alphas=[1.0,0.5]",
                "args.n_qa=2", "args.n_free=2", "args.batch_size=4", "args.bucket=128", "args.max_new_tokens=3"]
    run, results = run_experiment(CONFIGS / "nih_smollm2.yaml", settings, workdir=tmp_path / "run")
    methods = results["methods"]
    assert set(methods) == {"template_alpha1", "template_alpha0.5", "no_template"}
    tests = context_tasks.nih_grid(load(str(folder), tokenizer=True)[1], [160, 192], [0.0, 1.0], seed=0)
    for arm, scores in methods.items():
        kept = json.loads((run.path / "arms" / f"{arm}.json").read_text())
        grid, _, _ = nih_recall_grid(tests, kept["nih_answers"])
        assert scores["nih_recall"] == pytest.approx(grid.mean())
        assert [scores["nih_recall_by_length"][n] for n in ("160", "192")] == pytest.approx(grid.mean(1))
        assert run.plot_path(f"nih_{arm}").is_file()
    # Without the template every prompt token is a user token, so all attention lands on user tokens.
    assert results["metrics"]["no_template_user_attention_mean"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < results["metrics"]["template_user_attention_mean"] < 1.0
    for arm_file in (run.path / "arms").iterdir():  # a rerun reads every finished arm back instead of generating
        arm_file.write_text(arm_file.read_text().replace('"nih_recall"', '"nih_recall_marker": 1, "nih_recall"', 1))
    _, again = run_experiment(CONFIGS / "nih_smollm2.yaml", settings, workdir=tmp_path / "run")
    assert all(scores.get("nih_recall_marker") == 1 for scores in again["methods"].values())


def test_sft_experiment_end_to_end_on_a_tiny_chat_model(tmp_path, chat_folder):
    """context_sft with tiny overrides: the flagged fraction is the one asked for, the indicator arm was trained
    on the flagged items, and the arms' scores are those of the answers they kept."""
    import json

    from metafit.context.evaluate import nih_recall_grid
    from metafit.data import context_tasks
    from metafit.models import load

    settings = [f"args.model={chat_folder}", "args.n_train=16", "args.flag_fraction=0.25", "args.n_qa=2",
                "args.n_free=2", "args.nih_lengths=[160]", "args.nih_depths=[0.5]", "args.buckets=[448]",
                "args.batch_size=4", "args.bucket=64", "args.max_new_tokens=3", "train.steps=2", "train.batch_size=8",
                "train.ckpt_every=2", "train.log_every=1", "train.warmup_steps=0"]
    run, results = run_experiment(CONFIGS / "sft_small.yaml", settings, workdir=tmp_path / "run")
    assert set(results["methods"]) == {"base", "vanilla", "indicator"}
    assert results["metrics"]["fraction_flagged"] == pytest.approx(0.25)  # the top 4 of 16 by s_M
    tests = context_tasks.nih_grid(load(str(chat_folder), tokenizer=True)[1], [160], [0.5], seed=0)
    for arm in ("base", "vanilla", "indicator"):  # every arm's recall is that of the answers it kept
        kept = json.loads((run.path / "arms" / f"{arm}.json").read_text())
        grid, _, _ = nih_recall_grid(tests, kept["nih_answers"])
        assert results["methods"][arm]["nih_recall"] == pytest.approx(grid.mean())
    assert all((run.path / "checkpoints" / arm).is_dir() for arm in ("vanilla", "indicator"))  # both SFT arms trained
