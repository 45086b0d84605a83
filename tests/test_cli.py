"""The real CLI in subprocesses: quickstart, resume after SIGKILL, bad input, and a `metafit serve` server."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, run_cli

QUICKSTART = str(REPO / "configs/quickstart.yaml")
# Every training run below uses these settings (a narrow MLP, 300 steps in dispatches of 10) on the
# default config that `metafit config quickstart` prints, so they share one compiled step: in this
# process through `fit`'s step cache, in the subprocesses through the persistent compilation cache.
# The default schedule is constant, so the step never reads `train.steps` either: runs that must
# differ change a field the step never reads.
TINY = ["--set", "args.hidden=[32]", "--set", "train.lr=1e-2", "--set", "train.eval_every=0",
        "--set", "train.steps=300", "--set", "train.ckpt_every=100", "--set", "train.log_every=50",
        "--set", "train.steps_per_dispatch=10"]

# `metafit config quickstart` then `metafit run` of the printed file, in one fresh process (one JAX import), which
# then lists the modules it loaded
CONFIG_RUN_PROBE = """
import contextlib, io, json, sys
from metafit.cli import main
modules, config, *overrides = sys.argv[1:]
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    code = main(["config", "quickstart"])
if code != 0:
    sys.exit(code)
with open(config, "w") as f:
    f.write(printed.getvalue())
code = main(["run", config, *overrides])
json.dump(sorted(sys.modules), open(modules, "w"))
sys.exit(code)
"""


@dataclass(frozen=True)
class PrintedRun:
    config: Path  # what `metafit config quickstart` printed
    run: Path  # the finished run of it with TINY
    modules: frozenset[str]  # every module the fresh process had loaded when the run ended


@pytest.fixture(scope="module")
def printed_run(tmp_path_factory) -> PrintedRun:
    """The quickstart's printed default config run with :data:`TINY` by the real CLI in a fresh process: the
    quickstart output, the config-runs-as-is check and the uninterrupted reference of the resume test."""
    root = tmp_path_factory.mktemp("cli")
    modules, config, run = root / "modules.json", root / "quickstart.yaml", root / "run"
    probe = subprocess.run([sys.executable, "-c", CONFIG_RUN_PROBE, str(modules), str(config), *TINY,
                            "--workdir", str(run)], capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert probe.returncode == 0, probe.stderr
    return PrintedRun(config, run, frozenset(json.loads(modules.read_text())))


def test_list_show_and_the_quickstart_run(printed_run):
    # in this process: `--help` and `--version` have their real subprocess below, `run` in printed_run
    listing = run_cli("list")
    assert listing.returncode == 0 and "experiment" in listing.stdout and "quickstart" in listing.stdout
    run = printed_run.run
    for name in ("config.yaml", "metrics.jsonl", "results.json", "results.md", "learning_curve.png"):
        assert (run / name).exists(), name
    results = json.loads((run / "results.json").read_text())
    assert results["metrics"]["test_accuracy"] > 0.9  # digits MLP (64-32-10) after 300 steps
    assert "steps: 300" in (run / "config.yaml").read_text()
    shown = run_cli("show", str(run))
    assert shown.returncode == 0 and "test_accuracy" in shown.stdout


# The killed run: the real CLI in a subprocess whose data source sleeps 10 ms per step, so that it
# is still training when the test sees its first checkpoint and kills it (without the sleep a
# short run can finish first; a long one makes the reference and the resume slow).
SLOW_RUN = ("import sys, time; import metafit.experiments.quickstart as q; batches = q.epoch_batches\n"
            "def slow(*a, **k):\n    batch_at = batches(*a, **k)\n"
            "    return lambda step: (time.sleep(0.01), batch_at(step))[1]\n"
            "q.epoch_batches = slow; from metafit.cli import main; sys.exit(main(sys.argv[1:]))")


def test_sigkill_mid_run_then_resume_equals_uninterrupted(repo, tmp_path, printed_run):
    config, common = str(printed_run.config), TINY
    # the uninterrupted reference (printed_run) and the killed run are real subprocesses; the resume runs in this process
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, "run", config, "--workdir", str(killed_dir), *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=repo)
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

    resumed = run_cli("run", config, "--workdir", str(killed_dir), *common)
    assert resumed.returncode == 0, resumed.stderr
    ref = json.loads((printed_run.run / "results.json").read_text())
    got = json.loads((killed_dir / "results.json").read_text())
    assert got == ref
    lines = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["split"], r["step"]) for r in lines]
    assert len(keys) == len(set(keys))  # no duplicated lines after resume
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(50, 301, 50))


def test_bad_input_errors(repo, tmp_path, printed_run):
    config = str(repo / "configs/quickstart.yaml")
    missing = run_cli("run", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("experiment: quickstart\ntrain: {steps: 3\n")
    syntax = run_cli("run", str(broken))
    assert syntax.returncode == 2 and "YAML syntax error at line" in syntax.stderr

    typo = run_cli("run", config, "--set", "train.stpes=3", "--workdir", str(tmp_path / "t"))
    assert typo.returncode == 2 and "unknown key 'train.stpes'; did you mean 'steps'?" in typo.stderr
    assert not (tmp_path / "t").exists()  # validated before anything was written

    wrong_type = run_cli("run", config, "--set", "train.steps=many")
    assert wrong_type.returncode == 2 and "train.steps: expected int, got 'many'" in wrong_type.stderr

    # finished runs of the printed config: 20 steps of the compiled step of the runs above (constant schedule)
    short = [str(printed_run.config), *TINY, "--set", "train.steps=20"]
    first = run_cli("run", *short, "--workdir", str(tmp_path / "w"))
    assert first.returncode == 0, first.stderr
    # another config (log_every: the compiled step is the same, so the forced run below does not recompile)
    other = run_cli("run", *short, "--set", "train.log_every=100", "--workdir", str(tmp_path / "w"))
    assert other.returncode == 2 and "different config" in other.stderr and "--force-new" in other.stderr
    forced = run_cli("run", *short, "--set", "train.log_every=100", "--workdir", str(tmp_path / "w"),
                     "--force-new")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "w.old-1" / "results.json").exists()  # the old run was moved aside, not lost

    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    if os.geteuid() != 0:  # root ignores permissions
        unwritable = run_cli("run", config, "--workdir", str(readonly / "run"))
        assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr
    blocked = tmp_path / "file"
    blocked.write_text("x")
    not_a_dir = run_cli("run", config, *TINY, "--workdir", str(blocked / "run"))
    assert not_a_dir.returncode == 2 and "cannot write to run folder" in not_a_dir.stderr


HELP_PROBE = """
import contextlib, io, json, sys, time
start = time.perf_counter()
from metafit.cli import main
answers = {}
for argv in (["--help"], ["run", "--help"], ["config", "--help"], ["--version"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exit:
            answers[" ".join(argv)] = [exit.code, out.getvalue()]
print(json.dumps({"answers": answers, "modules": sorted(sys.modules), "seconds": time.perf_counter() - start}))
"""

HEAVY = ("jax", "jaxlib", "optax", "flax", "orbax", "numpyro", "transformers", "rich", "matplotlib")


def test_help_and_version_answer_without_importing_jax(repo):
    probe = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, cwd=repo, timeout=60)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    answers = report["answers"]
    assert answers["--help"][0] == 0 and "config" in answers["--help"][1] and "run" in answers["--help"][1]
    assert answers["run --help"][0] == 0 and "--force-new" in answers["run --help"][1]
    assert answers["config --help"][0] == 0 and "EXPERIMENT|CONFIG" in answers["config --help"][1]
    assert answers["--version"] == [0, "metafit 0.1.0\n"]
    loaded = {name.split(".")[0] for name in report["modules"]}
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))

    as_module = subprocess.run([sys.executable, "-m", "metafit", "--version"], capture_output=True, text=True,
                               cwd=repo, timeout=60)
    assert as_module.returncode == 0 and as_module.stdout == "metafit 0.1.0\n"


def test_config_prints_a_default_config_that_runs_as_is(repo, tmp_path, printed_run):
    printed = printed_run.config.read_text()
    assert "# optimiser steps in total.\n  steps: 100" in printed
    assert "# widths of the hidden layers.\n  hidden: [128, 128]" in printed
    assert json.loads((printed_run.run / "results.json").read_text())["metrics"]["steps"] == 300
    # the run imported only the quickstart experiment's code
    loaded = printed_run.modules
    assert "metafit.experiments.quickstart" in loaded
    others = {"metafit.experiments.meta", "metafit.experiments.merge", "metafit.experiments.bayes",
              "metafit.experiments.robust", "metafit.meta", "metafit.merge", "metafit.bayes", "metafit.robust"}
    assert not loaded & others, sorted(loaded & others)

    # a bad value in the printed file is refused before anything is written
    bad = run_cli("run", str(printed_run.config), "--set", "train.optimizer=adamz", "--workdir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "train.optimizer" in bad.stderr and "'adamz'" in bad.stderr
    assert not (tmp_path / "bad").exists()


USER_EXPERIMENT = '''
from dataclasses import dataclass

from metafit.experiments import experiment


@dataclass(frozen=True)
class CountArgs:
    """Attributes:
      n: how many.
    """

    n: int = 1


@experiment(config=CountArgs)
def count(cfg, run):
    return {"metrics": {"n_squared": cfg.args.n ** 2}}
'''

# The console script's sys.path holds neither '' nor the current directory (unlike `python -m`).
CONSOLE_SCRIPT = ("import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
                  "from metafit.cli import main; sys.exit(main(sys.argv[1:]))")


def test_user_experiment_in_the_current_directory_runs_from_the_cli(repo, tmp_path, monkeypatch):
    (tmp_path / "my_experiments.py").write_text(USER_EXPERIMENT)
    (tmp_path / "my.yaml").write_text("experiment: my_experiments:count\nargs: {n: 4}\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, "run", "my.yaml", "--workdir", "run"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {"metrics": {"n_squared": 16}}

    # the error path in this process, with the console script's sys.path (no '' nor the current directory)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    missing = run_cli("run", "my.yaml", "--workdir", "run2", "--set", "experiment=my_experimnts:count")
    assert missing.returncode == 2 and "no module named 'my_experimnts'" in missing.stderr
    assert not (tmp_path / "run2").exists()


def test_config_resolves_a_file_with_overrides_in_process(repo, capsys):
    from metafit.cli import main

    assert main(["config", str(repo / "configs/quickstart.yaml"), "--set", "train.steps=5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# {repo / 'configs/quickstart.yaml'} --set train.steps=5, resolved")
    assert "  steps: 5\n" in text and "  schedule: cosine\n" in text and "  keep_checkpoints: 2\n" in text

    assert main(["config", "quickstart", "--set", "args.hidden=[8]"]) == 0
    assert "  hidden: [8]\n" in capsys.readouterr().out

    assert main(["config", "quickstrat"]) == 2
    assert "unknown experiment 'quickstrat'; did you mean 'quickstart'?" in capsys.readouterr().err
    assert main(["config", "quickstart", "--set", "args.hidden=[8"]) == 2
    assert "does not parse as YAML" in capsys.readouterr().err


def test_metafit_serve_in_a_real_process_answers_then_stops_gracefully_on_sigterm(tmp_path):
    """`metafit serve CONFIG --port N` as users start it: it binds loopback, answers a completion equal to
    metafit.models.generate's greedy text, and on SIGTERM stops its engine after the requests, then exits."""
    import httpx
    import numpy as np

    import metafit.models as mm
    from metafit.serve.server import free_port

    sys.path.insert(0, str(REPO / "tests" / "serve"))
    from serve_tiny import tiny_folder  # a tiny Llama folder with a chat template, written with numpy

    folder = tiny_folder(tmp_path / "tiny")
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {folder}\nname: tiny\nbatch_size: 2\nprompt_buckets: [32]\nnew_token_buckets: [8]\n")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "metafit.cli", "serve", str(config), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120  # start-up: imports, model load, warm-up compilation
        while True:
            assert server.poll() is None, server.communicate()[1][-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "metafit serve did not answer /health within 120 s"
            time.sleep(0.2)
        answer = httpx.post(url + "/v1/completions", timeout=60,
                            content=json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}))
        assert answer.status_code == 200, answer.text
        model, tokenizer = mm.load(folder)
        ids = tokenizer("hello", add_special_tokens=False)["input_ids"]
        expected = tokenizer.decode(np.asarray(mm.generate(model, np.asarray([ids]), max_new_tokens=8))[0, len(ids):],
                                    skip_special_tokens=True)
        assert answer.json()["choices"][0]["text"] == expected
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM (143 in a shell)
        assert server.wait(timeout=60) == -signal.SIGTERM
        assert "engine stopped: every queued and running request finished" in server.communicate()[1]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
