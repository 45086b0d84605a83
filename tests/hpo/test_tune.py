"""``metafit tune``: errors before compute, and a real tune on a tiny Llama (trial folders, promotion, resume)."""
import importlib.util
import json
from pathlib import Path

import pytest

from metafit.data.instructions import make_instructions
from hpo_fixtures import TINY_SPACE, synthetic_meta_file, meta_file  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("root_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_cli


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0.5"], "smaller than one run"),
    ([], "give a budget"),
    (["--budget", "2", "--method", "grid"], "unknown method"),
    (["--budget-s", "-3"], "positive number of seconds"),
])
def test_bad_budget_or_method_fails_before_anything(cli, tmp_path, extra, message):
    out = cli("tune", str(REPO / "configs/finetune/lora_small.yaml"), "--workdir", str(tmp_path / "t"), *extra)
    assert out.returncode == 2 and message in out.stderr
    assert not (tmp_path / "t").exists()


def test_job_that_is_not_lora_sft_and_other_space_version_are_errors(cli, tmp_path, meta_file):
    out = cli("tune", str(REPO / "configs/quickstart.yaml"), "--budget", "2", "--workdir", str(tmp_path / "q"))
    assert out.returncode == 2 and "tune searches settings of lora_sft jobs" in out.stderr
    out = cli("tune", str(REPO / "configs/finetune/lora_small.yaml"), "--budget", "2", "--workdir",
              str(tmp_path / "v"), "--meta-dataset", str(meta_file))
    assert out.returncode == 2 and "generated over search space 'test-tiny'" in out.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / "v").exists()


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("tiny_lm", REPO / "tests" / "experiments" / "tiny_lm.py")
    tiny_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_lm)
    root = tmp_path_factory.mktemp("tune")
    texts = [f"{ex.prompt} {ex.response}" for ex in make_instructions(200, seed=0)]
    model = tiny_lm.make_tiny_llama(root / "llama", texts, hidden=16, layers=1)
    config = root / "job.yaml"
    config.write_text(f"experiment: lora_sft\nargs:\n  model: {model}\n  tasks: [upper]\n  n_train: 16\n  n_eval: 4\n"
                      "  buckets: [96]\n")
    return config, synthetic_meta_file(root / "meta.json")


@pytest.mark.slow
def test_tune_runs_trials_promotes_and_resumes(tiny_job, tmp_path):
    from metafit.hpo.tune import TuneRequest, tune

    config, meta = tiny_job
    work = tmp_path / "tune"
    first = tune(TuneRequest(str(config), budget=1.0, method="bo"), work, meta_path=meta, space=TINY_SPACE,
                 surrogate_steps=5)
    state = json.loads((work / "tune.json").read_text())
    assert state["spent_runs"] == pytest.approx(1.0) and state["pending"] is None
    reached = sum(t["reached"] for t in state["trials"])
    assert reached == TINY_SPACE.fidelities  # four quarter-steps of budget, as new trials or promotions
    for trial in state["trials"]:
        folder = work / "trials" / f"{trial['id']:03d}"
        assert (folder / "results.json").exists() and (folder / "config.yaml").exists()
        assert len(trial["curve"]) == trial["reached"]  # one held-out loss per fidelity reached
    losses = [m["eval_loss"] for m in first["methods"].values()]
    assert losses == sorted(losses) and first["metrics"]["best_eval_loss"] == losses[0]
    assert (work / "results.md").exists() and (work / "regret_vs_cost.png").exists()

    # a second call with more budget (one more quarter run) continues the same tune: earlier trials kept
    second = tune(TuneRequest(str(config), budget=1.25, method="bo"), work, meta_path=meta, space=TINY_SPACE,
                  surrogate_steps=5)
    again = json.loads((work / "tune.json").read_text())
    assert again["spent_runs"] == pytest.approx(1.25)
    assert sum(t["reached"] for t in again["trials"]) == reached + 1
    assert again["trials"][: len(state["trials"])][0]["config"] == state["trials"][0]["config"]
    assert again["log"][: len(state["log"])] == state["log"]
    assert second["metrics"]["best_eval_loss"] <= first["metrics"]["best_eval_loss"]
