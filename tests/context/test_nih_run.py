"""The context_nih experiment end to end on a tiny chat model (tiny overrides of configs/context/nih_smollm2.yaml)."""
from pathlib import Path

import pytest

from context_fixtures import chat_folder  # noqa: F401 (a fixture)
from metafit.experiments import run_experiment

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "context"


def test_nih_experiment_end_to_end_on_a_tiny_chat_model(tmp_path, chat_folder):
    """context_nih with tiny overrides: the arm scores are those of the answers it kept, and it resumes."""
    import json

    from metafit.context.evaluate import nih_recall_grid
    from metafit.data import context_tasks
    from metafit.models import load

    folder = chat_folder
    settings = [f"args.model={folder}", "args.lengths=[160,192]", "args.depths=[0.0,1.0]", "args.alphas=[1.0]",
                "args.n_qa=2", "args.n_free=2", "args.batch_size=4", "args.bucket=128", "args.max_new_tokens=3"]
    run, results = run_experiment(CONFIGS / "nih_smollm2.yaml", settings, workdir=tmp_path / "run")
    methods = results["methods"]
    assert set(methods) == {"template_alpha1", "no_template"}
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
    # a rerun reads every finished arm and the diagnosis back instead of generating and scoring again
    for arm_file in (run.path / "arms").iterdir():
        data = json.loads(arm_file.read_text())
        arm_file.write_text(json.dumps({**data, "resume_marker": 1}))
    _, again = run_experiment(CONFIGS / "nih_smollm2.yaml", settings, workdir=tmp_path / "run")
    assert all(scores.get("resume_marker") == 1 for scores in again["methods"].values())
    assert again["metrics"]["resume_marker"] == 1
