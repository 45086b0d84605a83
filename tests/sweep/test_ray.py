"""Sweep jobs on Ray (a local cluster) and through submitit (runs when the `cluster` extra is installed)."""
from pathlib import Path

import pytest

from metafit.sweep import load_store, run_sweep
from sweep_project import fake_project  # noqa: F401 (a fixture)


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # starting a Ray cluster takes ~10 s on an idle 2-core CPU (90 s at load 12)
def test_ray_local_cluster_runs_jobs_and_records_failures(fake_project, monkeypatch):
    ray = pytest.importorskip("ray")
    root = fake_project.parent.parent
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the cluster's workers import this checkout's metafit
    try:
        report = run_sweep(fake_project, executor="ray", jobs=2, only=["x2_s1", "broken"], log=lambda _: None)
    finally:
        ray.shutdown()
    assert report.done == ["x2_s1"] and "x=1.0 was asked to fail" in report.failed["broken"]
    jobs = load_store(root / "paper_repro/fake/results/tiny")["jobs"]
    assert jobs["x2_s1"]["data"] == {"y": 5.0} and jobs["broken"]["status"] == "failed"


def test_slurm_path_through_submitit_debug_cluster(fake_project):
    pytest.importorskip("submitit")
    root = fake_project.parent.parent
    report = run_sweep(fake_project, executor="slurm", only=["x1_s0", "broken"], slurm_options={"cluster": "debug"},
                       log=lambda _: None)
    assert report.done == ["x1_s0"] and "x=1.0 was asked to fail" in report.failed["broken"]
    assert load_store(root / "paper_repro/fake/results/tiny")["jobs"]["x1_s0"]["data"] == {"y": 1.0}
