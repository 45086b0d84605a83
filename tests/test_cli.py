"""The real CLI in subprocesses: quickstart, resume after SIGKILL, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_metafit

TINY = ["--set", "args.hidden=[32]", "--set", "train.eval_every=0"]


def test_help_list_and_quickstart_run(repo, tmp_path):
    assert "metafit" in run_metafit("--help").stdout
    listing = run_metafit("list")
    assert listing.returncode == 0 and "experiment" in listing.stdout and "quickstart" in listing.stdout
    out = run_metafit("run", str(repo / "configs/quickstart.yaml"), "--workdir", str(tmp_path / "run"),
                      "--set", "train.steps=200")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "results.json", "results.md", "learning_curve.png"):
        assert (run / name).exists(), name
    results = json.loads((run / "results.json").read_text())
    assert results["metrics"]["test_accuracy"] > 0.9  # digits MLP after 200 steps
    assert "steps: 200" in (run / "config.yaml").read_text()
    shown = run_metafit("show", str(run))
    assert shown.returncode == 0 and "test_accuracy" in shown.stdout


def test_sigkill_mid_run_then_resume_equals_uninterrupted(repo, tmp_path):
    config = str(repo / "configs/quickstart.yaml")
    common = [*TINY, "--set", "train.steps=3000", "--set", "train.ckpt_every=100", "--set", "train.log_every=100",
              "--set", "train.steps_per_dispatch=1"]
    reference = run_metafit("run", config, "--workdir", str(tmp_path / "ref"), *common)
    assert reference.returncode == 0, reference.stderr

    killed_dir = tmp_path / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "metafit.cli", "run", config, "--workdir", str(killed_dir), *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoints = killed_dir / "checkpoints" / "train"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "results.json").exists()

    resumed = run_metafit("run", config, "--workdir", str(killed_dir), *common)
    assert resumed.returncode == 0, resumed.stderr
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    got = json.loads((killed_dir / "results.json").read_text())
    assert got == ref
    lines = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["split"], r["step"]) for r in lines]
    assert len(keys) == len(set(keys))  # no duplicated lines after resume
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(100, 3001, 100))


def test_bad_input_errors(repo, tmp_path):
    config = str(repo / "configs/quickstart.yaml")
    missing = run_metafit("run", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("experiment: quickstart\ntrain: {steps: 3\n")
    syntax = run_metafit("run", str(broken))
    assert syntax.returncode == 2 and "YAML syntax error at line" in syntax.stderr

    typo = run_metafit("run", config, "--set", "train.stpes=3", "--workdir", str(tmp_path / "t"))
    assert typo.returncode == 2 and "unknown key 'train.stpes'; did you mean 'steps'?" in typo.stderr
    assert not (tmp_path / "t").exists()  # validated before anything was written

    wrong_type = run_metafit("run", config, "--set", "train.steps=many")
    assert wrong_type.returncode == 2 and "train.steps: expected int, got 'many'" in wrong_type.stderr

    first = run_metafit("run", config, *TINY, "--set", "train.steps=20", "--workdir", str(tmp_path / "w"))
    assert first.returncode == 0, first.stderr
    other = run_metafit("run", config, *TINY, "--set", "train.steps=30", "--workdir", str(tmp_path / "w"))
    assert other.returncode == 2 and "different config" in other.stderr and "--force-new" in other.stderr
    forced = run_metafit("run", config, *TINY, "--set", "train.steps=30", "--workdir", str(tmp_path / "w"),
                         "--force-new")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "w.old-1" / "results.json").exists()  # the old run was moved aside, not lost

    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    if os.geteuid() != 0:  # root ignores permissions
        unwritable = run_metafit("run", config, "--workdir", str(readonly / "run"))
        assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr
    blocked = tmp_path / "file"
    blocked.write_text("x")
    not_a_dir = run_metafit("run", config, *TINY, "--workdir", str(blocked / "run"))
    assert not_a_dir.returncode == 2 and "cannot write to run folder" in not_a_dir.stderr
