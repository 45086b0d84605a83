"""`metafit repro` on the committed results of every paper, and results printed off a terminal."""
import hashlib
import importlib.util
import json
import time
from pathlib import Path

import pytest

from metafit import cli, sweep

REPO = Path(__file__).resolve().parents[2]
PAPERS = [("amfs", "cpu"), ("clear", "gpu"), ("clear", "cpu"), ("prompt", "cpu"), ("atm", "cpu"), ("compatible", "cpu"),
          ("posttrain", "cpu"), ("context", "cpu"), ("delift", "small"), ("delift", "cpu"), ("delift", "smollm2"),
          ("mt_server", "cpu"), ("mt_server", "smollm2")]


def test_every_grid_has_committed_results_checked_here():
    assert {p.stem for p in (REPO / "experiments").glob("*.yaml")} == {paper for paper, _ in PAPERS}


def _hashes() -> dict[str, str]:
    # bytecode caches of the table builders are not results (tests/conftest.py writes them on purpose)
    files = [p for folder in ("paper_repro", "experiments") for p in (REPO / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    return {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_repro_on_a_fresh_clone_rebuilds_every_paper_from_committed_results_without_changing_a_file(
        monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO)  # `metafit repro` runs from the repository root
    before = _hashes()
    start = time.perf_counter()
    for paper, scale in PAPERS:
        # no --table-only: a clone holds no run folders (an empty --runs-dir here, whatever this checkout ran),
        # so repro rebuilds from the committed results and starts none of the jobs without one
        runs = tmp_path / f"{paper}-{scale}"
        assert cli.main(["repro", paper, "--scale", scale, "--runs-dir", str(runs)]) == 0, paper
        out = capsys.readouterr().out
        assert "no file changed" in out and not runs.exists(), paper
        # a grid with cells never run at this scale names them, and how to run them; a complete one does not
        grid = sweep.load_grid(REPO / "experiments" / f"{paper}.yaml", REPO)
        jobs = {job.name for job in grid.jobs(scale)}
        records = sweep.load_store(grid.results_dir(scale))["jobs"]
        missing = len(jobs - {name for name, r in records.items() if r.get("status") == "done"})
        assert ("jobs have no result; add --run-missing to run them" in out) == (missing > 0), (paper, scale)
    assert cli.main(["repro", "amfs", "--table-only"]) == 0 and "no file changed" in capsys.readouterr().out
    seconds = time.perf_counter() - start
    assert _hashes() == before
    assert seconds < 120, seconds  # seconds, not a rerun (hours); ~30 s for the first six at load 13 on 2 cores


def test_repro_errors_name_what_to_do(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO)
    assert cli.main(["repro", "amf", "--table-only"]) == 2
    assert "did you mean 'amfs'" in capsys.readouterr().err
    assert cli.main(["repro", "amfs", "--scale", "gpu", "--table-only"]) == 2
    assert "run `metafit repro amfs --scale gpu` first" in capsys.readouterr().err
    assert cli.main(["repro", "atm", "--scale", "gpu"]) == 2
    assert "the scales are ['cpu']" in capsys.readouterr().err
    # a GPU scale asked to run its missing jobs on a machine whose JAX has no GPU (the suite forces CPU)
    assert cli.main(["repro", "clear", "--scale", "gpu", "--run-missing", "--runs-dir", str(tmp_path / "r")]) == 2
    assert "runs on a gpu and this machine's JAX backend is 'cpu'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _builder(paper: str):
    spec = importlib.util.spec_from_file_location(f"builder_{paper}", REPO / f"paper_repro/{paper}/make_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_job_shows_as_failed_in_the_paper_tables():
    store = json.loads((REPO / "paper_repro/amfs/results/cpu/sweep.json").read_text())["jobs"]
    records = {name: r for name, r in store.items() if not name.startswith(("sinusoid_k5_maml_", "glyphs_20w1s_amfs_"))}
    records["sinusoid_k5_maml_s0"] = {"status": "failed", "error": "NonFiniteLossError: loss is nan",
                                      "tags": {"group": "sinusoid_k5", "learner": "maml", "seed": 0}}
    table = _builder("amfs").build(records, "cpu", {"eval_tasks": 600})["table.md"]
    assert "| maml | failed | 1.341 ± 0.411 (n=3) |" in table  # K=5 failed, K=10 intact (mean ± sample sd)
    glyph_amfs = [line for line in table.splitlines() if line.startswith("| amfs | ") and line.count("|") == 6]
    assert glyph_amfs[0].split(" | ")[3] == "not run"  # never run (20-way 1-shot) stays "not run"

    atm = json.loads((REPO / "paper_repro/atm/sweep.json").read_text())["jobs"]
    atm["seed2"] = {"status": "failed", "error": "RuntimeError: out of memory"}
    text = _builder("atm").build(atm, "cpu", {})["table.md"]
    assert "- seed2: failed (RuntimeError: out of memory)" in text and "| method: 2 seed(s) (seed0, seed1) |" in text


WIDE = {"methods": {f"method {i}": {f"metric_{j}": 0.123456 * (i + 1) * (j + 1) for j in range(12)}
                    for i in range(3)}}


def test_results_off_a_terminal_print_as_markdown_not_cut(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(WIDE))
    assert cli.main(["show", str(run)]) == 0  # captured stdout is not a TTY, as in a log or CI
    out = capsys.readouterr().out
    assert "…" not in out
    assert "| method 2 | 0.3704 | 0.7407 | 1.111 |" in out  # 0.123456 * 3 * (1, 2, 3), every column there
    assert out.splitlines()[2].count("|") == 14 and "metric_11" in out

    (run / "results.json").write_text(json.dumps({"metrics": {"a|b\x1b[2J": "x\x07"}}))
    assert cli.main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "| a\\|b\\x1b[2J | x\\x07 |" in out


def test_results_on_a_terminal_stay_a_rich_table(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"metrics": {"acc": 0.5}}))
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert cli.main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "┃" in out or "│" in out
