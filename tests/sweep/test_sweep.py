"""The sweep runner on a tiny fake grid (a user experiment y = x^2 + seed), in process and in subprocesses."""
import json
import os
from pathlib import Path

import pytest

from sweep_project import CHAIN, fake_project, write_grid  # noqa: F401 (fake_project is a fixture)
from metafit.config import ConfigError
from metafit.sweep import STORE, SweepError, load_grid, load_store, run_sweep

REPO = Path(__file__).resolve().parents[2]


def _calls(root: Path) -> dict[str, int]:
    runs = root / "runs/repro/fake/tiny"
    return {p.parent.name: len(p.read_text().splitlines()) for p in runs.glob("*/calls.txt")}


def test_grid_expands_seeds_and_axes_in_priority_order(fake_project):
    jobs = load_grid(fake_project).jobs("tiny")
    assert [j.name for j in jobs] == ["x1_s0", "x2_s0", "x1_s1", "x2_s1", "broken"]
    assert jobs[3].overrides == ("seed=1", "args.x=2") and dict(jobs[3].tags) == {"x": "2"}
    with pytest.raises(ConfigError, match="no scale 'huge'.*tiny"):
        load_grid(fake_project).jobs("huge")


def test_runs_records_failures_and_resumes(fake_project):
    root = fake_project.parent.parent
    report = run_sweep(fake_project, log=lambda _: None)
    assert sorted(report.done) == ["x1_s0", "x1_s1", "x2_s0", "x2_s1"]
    assert list(report.failed) == ["broken"] and "ValueError: x=1.0 was asked to fail" in report.failed["broken"]
    store = load_store(root / "paper_repro/fake/results/tiny")["jobs"]
    assert {n: r["data"]["y"] for n, r in store.items() if r["status"] == "done"} == {
        "x1_s0": 1.0, "x2_s0": 4.0, "x1_s1": 2.0, "x2_s1": 5.0}  # x^2 + seed
    assert store["broken"]["status"] == "failed" and "asked to fail" in store["broken"]["error"]
    table = (root / "paper_repro/fake/results/tiny/table.md").read_text()
    assert "| broken | failed (ValueError: x=1.0 was asked to fail" in table and "| x2_s1 | 5 |" in table
    assert "not run" not in table

    # rerun: finished jobs are skipped (each ran once), the failure is retried and stays a failure
    again = run_sweep(fake_project, log=lambda _: None)
    assert sorted(again.skipped) == ["x1_s0", "x1_s1", "x2_s0", "x2_s1"] and list(again.failed) == ["broken"]
    assert _calls(root) == {"x1_s0": 1, "x2_s0": 1, "x1_s1": 1, "x2_s1": 1}

    # a finished run folder whose record was lost is collected, not rerun
    store_path = root / "paper_repro/fake/results/tiny" / STORE
    data = json.loads(store_path.read_text())
    del data["jobs"]["x2_s1"]
    store_path.write_text(json.dumps(data))
    collected = run_sweep(fake_project, only=["x2_*"], log=lambda _: None)
    assert collected.done == ["x2_s1"] and _calls(root)["x2_s1"] == 1

    # ... but a run folder of another config (the grid's overrides changed since) is run again
    store_path.write_text(json.dumps(data))
    config = root / "runs/repro/fake/tiny/x2_s1/config.yaml"
    config.write_text(config.read_text().replace("x: 2.0", "x: 3.0"))
    rerun = run_sweep(fake_project, only=["x2_*"], log=lambda _: None)
    assert (root / "runs/repro/fake/tiny/x2_s1.old-1").is_dir()  # the other config's run is moved aside, not lost
    assert rerun.done == ["x2_s1"] and _calls(root)["x2_s1"] == 1 and load_store(root / "paper_repro/fake/results/tiny")["jobs"]["x2_s1"]["data"] == {
        "y": 5.0}


def test_table_only_changes_nothing_and_fewer_results_are_refused(fake_project):
    root = fake_project.parent.parent
    run_sweep(fake_project, log=lambda _: None)
    out = root / "paper_repro/fake/results/tiny"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    report = run_sweep(fake_project, table_only=True)
    assert report.written == [] and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # not even rewritten

    write_grid(root, xs=[1])  # a grid that lost x=2: its table would hold fewer results
    with pytest.raises(SweepError, match="covers 2 finished jobs but the committed results hold 4.*x2_s0"):
        run_sweep(fake_project, table_only=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    with pytest.raises(SweepError, match="no results for 'fake' at scale 'tiny'"):
        (out / STORE).unlink()
        run_sweep(fake_project, table_only=True)
    assert not (out / STORE).exists() and (out / "table.md").read_bytes() == before["table.md"]


def test_a_fresh_clone_rebuilds_and_runs_missing_jobs_only_when_asked(fake_project):
    root = fake_project.parent.parent
    run_sweep(fake_project, only=["x1_*", "x2_s0"], log=lambda _: None)
    out = root / "paper_repro/fake/results/tiny"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import shutil

    shutil.rmtree(root / "runs")  # a clone: the committed store, no run folders
    logged = []
    report = run_sweep(fake_project, log=logged.append)
    assert not report.ran and report.left_missing == ["x2_s1", "broken"] and not (root / "runs").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and report.results_done == 3
    assert "`metafit repro fake --scale tiny --run-missing` runs them" in logged[0]

    asked = run_sweep(fake_project, run_missing=True, log=lambda _: None)
    assert asked.ran and asked.done == ["x2_s1"] and list(asked.failed) == ["broken"]
    assert asked.skipped == ["x1_s0", "x2_s0", "x1_s1"] and _calls(root) == {"x2_s1": 1}  # the done jobs did not rerun


def test_a_gpu_scale_does_not_run_where_jax_has_no_gpu(fake_project):
    grid = fake_project.read_text().replace("tiny: {seeds: [0, 1], xs: [1, 2]}",
                                            "tiny: {seeds: [0, 1], xs: [1, 2]}\n  big: {seeds: [0], xs: [3], device: gpu}")
    fake_project.write_text(grid)
    with pytest.raises(SweepError, match="scale 'big' of 'fake' runs on a gpu.*backend is 'cpu'.*tiny"):
        run_sweep(fake_project, "big", log=lambda _: None)
    assert not (fake_project.parent.parent / "runs/repro/fake/big").exists()


def test_budget_leaves_jobs_not_started(fake_project):
    report = run_sweep(fake_project, budget_s=0, log=lambda _: None)
    assert len(report.not_started) == 5 and not report.done and not report.failed
    table = (fake_project.parent.parent / "paper_repro/fake/results/tiny/table.md").read_text()
    assert table == "| job | y |\n|---|---|\n"  # never run: absent, not "failed"


def test_subprocess_jobs_in_parallel(fake_project, monkeypatch):
    root = fake_project.parent.parent
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the subprocesses import this checkout's metafit
    report = run_sweep(fake_project, jobs=2, only=["x1_s1", "broken"], log=lambda _: None)
    assert report.done == ["x1_s1"] and "x=1.0 was asked to fail" in report.failed["broken"]
    assert "exit code" in report.failed["broken"] and (root / "runs/repro/fake/tiny/logs/broken.log").is_file()
    assert load_store(root / "paper_repro/fake/results/tiny")["jobs"]["x1_s1"]["data"] == {"y": 2.0}


def test_after_runs_chained_jobs_in_waves_and_reads_the_earlier_run(fake_project):
    root = fake_project.parent.parent
    write_grid(root, xs=[1, 2], extra=CHAIN)
    jobs = {job.name: job for job in load_grid(fake_project).jobs("tiny")}
    assert jobs["chain_s1"].after == ("x2_s1",) and jobs["chain_s1"].overrides[1] == "args.source={runs}/x2_s1"
    report = run_sweep(fake_project, log=lambda _: None)
    out = root / "paper_repro/fake/results/tiny"
    store = load_store(out)["jobs"]
    # y = x^2 + seed + (the x2 run's y = 4 + seed): read from the earlier job's run folder
    assert store["chain_s0"]["data"] == {"y": 1 + 0 + 4.0} and store["chain_s1"]["data"] == {"y": 1 + 1 + 5.0}
    assert store["chain_s1"]["overrides"] == ["seed=1", "args.source={runs}/x2_s1"]  # no machine path committed
    assert store["after_broken"]["status"] == "failed" and "needs broken, which failed" in store["after_broken"]["error"]
    assert report.done.index("x2_s1") < report.done.index("chain_s1")

    # a fresh clone: the store says x2_s0 is done but its run folder (an input of chain_s0) is gone
    import shutil

    shutil.rmtree(root / "runs/repro/fake/tiny/x2_s0")
    shutil.rmtree(root / "runs/repro/fake/tiny/chain_s0")
    del_chain = json.loads((out / STORE).read_text())
    del del_chain["jobs"]["chain_s0"]
    (out / STORE).write_text(json.dumps(del_chain))
    again = run_sweep(fake_project, only=["chain_s0"], log=lambda _: None)
    assert again.done == ["x2_s0", "chain_s0"] and load_store(out)["jobs"]["chain_s0"]["data"] == {"y": 5.0}

    # a dependency not started (budget spent) leaves its dependants not started, not failed
    del_chain["jobs"].pop("x1_s0")
    for name in ("x2_s1", "chain_s1"):
        del_chain["jobs"].pop(name)
    (out / STORE).write_text(json.dumps(del_chain))
    shutil.rmtree(root / "runs/repro/fake/tiny/x2_s1")
    shutil.rmtree(root / "runs/repro/fake/tiny/chain_s1")
    spent = run_sweep(fake_project, budget_s=0, only=["chain_s1"], log=lambda _: None)
    assert spent.not_started == ["x2_s1", "chain_s1"] and not spent.failed


def test_after_errors_name_the_job(fake_project):
    root = fake_project.parent.parent
    write_grid(root, xs=[1], extra=CHAIN)  # chain_s* runs after x2_s*, which this grid no longer has
    with pytest.raises(ConfigError, match="'chain_s0' runs after 'x2_s0', which is no job of this scale.*x1_s0"):
        load_grid(fake_project).jobs("tiny")
    write_grid(root, xs=[1, 2], extra=CHAIN.replace("after: [broken]", "after: [after_broken]"))
    with pytest.raises(ConfigError, match="cycle: after_broken"):
        load_grid(fake_project).jobs("tiny")
