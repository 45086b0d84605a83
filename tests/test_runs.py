"""Run folders: the lock against concurrent runs, the marker that keeps metafit out of foreign folders."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from metafit.runs import LOCK, MARKER, RunDir, RunDirError


def test_a_second_run_on_a_live_folder_is_refused_naming_the_pid(tmp_path):
    with RunDir.open(tmp_path / "run", "a: 1\n"):
        with pytest.raises(RunDirError, match=f"in use by another metafit run \\(PID {os.getpid()}\\)"):
            RunDir.open(tmp_path / "run", "a: 1\n")
        with pytest.raises(RunDirError, match="in use"):  # --force-new cannot move a live run aside either
            RunDir.open(tmp_path / "run", "a: 2\n", force_new=True)
    RunDir.open(tmp_path / "run", "a: 1\n").close()  # released on close
    assert not (tmp_path / "run.old-1").exists()


def test_the_lock_of_a_killed_process_is_not_stale(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from metafit.runs import RunDir
        RunDir.open({str(tmp_path / 'run')!r}, "a: 1\\n")
        print("locked", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"PID {child.pid}"):
            RunDir.open(tmp_path / "run", "a: 1\n")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    RunDir.open(tmp_path / "run", "a: 1\n").close()


def test_a_plain_folder_is_never_written_into_or_moved(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("mine: true\n")
    (project / "notes.txt").write_text("keep me")
    for force_new in (False, True):
        with pytest.raises(RunDirError, match="not a metafit run folder"):
            RunDir.open(project, "a: 1\n", force_new=force_new)
    assert sorted(p.name for p in project.iterdir()) == sorted(["config.yaml", "notes.txt", LOCK])
    assert (project / "config.yaml").read_text() == "mine: true\n"
    assert not list(tmp_path.glob("project.old-*"))


def test_workdir_dot_resolves_and_an_empty_folder_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with RunDir.open(".", "a: 1\n") as run:
        assert run.path == tmp_path and (tmp_path / MARKER).exists()
    with pytest.raises(RunDirError, match="holds the current directory"):
        RunDir.open(".", "a: 2\n", force_new=True)


def test_deleting_config_yaml_does_not_let_another_config_resume(tmp_path):
    RunDir.open(tmp_path / "run", "a: 1\n").close()
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(RunDirError, match="different config"):
        RunDir.open(tmp_path / "run", "a: 2\n")
    RunDir.open(tmp_path / "run", "a: 1\n").close()  # its own config still resumes
    assert (tmp_path / "run" / "config.yaml").read_text() == "a: 1\n"


def test_a_run_folder_of_an_earlier_version_is_adopted(tmp_path):
    old = tmp_path / "run"
    (old / "checkpoints").mkdir(parents=True)
    (old / "config.yaml").write_text("a: 1\n")
    with pytest.raises(RunDirError, match="different config"):
        RunDir.open(old, "a: 2\n")
    RunDir.open(old, "a: 1\n").close()
    assert (old / MARKER).exists()
    run = RunDir.open(old, "a: 2\n", force_new=True)
    run.close()
    assert (tmp_path / "run.old-1" / "checkpoints").is_dir() and (old / "config.yaml").read_text() == "a: 2\n"


def test_show_prints_results_inert_and_refuses_malformed_files(tmp_path):
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"metrics": {"\x1b]0;owned\x07acc": "[bold red]x[/] \x1b[2J"}}))
    out = subprocess.run([sys.executable, "-m", "metafit", "show", str(run)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "\x1b" not in out.stdout
    assert "[bold red]x[/]" in out.stdout and "\\x1b[2J" in out.stdout
    for text in ("{not json", '{"metrics": [1, 2]}', '{"methods": [1]}', "[]"):
        (run / "results.json").write_text(text)
        out = subprocess.run([sys.executable, "-m", "metafit", "show", str(run)], capture_output=True, text=True)
        assert out.returncode == 2 and "is not a metafit results file" in out.stderr and "Traceback" not in out.stderr


def test_plots_leave_the_users_matplotlib_backend_and_figures_alone(tmp_path, monkeypatch):
    import matplotlib
    import numpy as np
    from PIL import Image

    from metafit.bayes.report import plot_axis
    from metafit.context.evaluate import nih_heatmap
    from metafit.runs import plot_curves

    def refuse(*args, **kwargs):
        raise AssertionError("a library plot switched the process-wide matplotlib backend")

    monkeypatch.setattr(matplotlib, "use", refuse)  # what a notebook's inline backend relies on
    plot_curves(tmp_path / "c.png", {"a": ([0, 1], [1, 0])}, xlabel="x", ylabel="y")
    rows = [{"method": m, "x": x, "neg_transfer_rate": 0.5, "lpd": -1.0, "lpd_sd": 0.1} for m in "ab" for x in (1, 2)]
    plot_axis(rows, "x", tmp_path / "b.png")
    nih_heatmap(tmp_path / "h.png", np.ones((2, 3)), [128, 256], [0.0, 0.5, 1.0], "arm")
    assert Image.open(tmp_path / "c.png").size == (720, 480)  # 6 x 4 inches at 120 dpi
    assert Image.open(tmp_path / "b.png").size == (1200, 480)
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
