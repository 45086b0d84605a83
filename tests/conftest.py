"""Shared test setup: CPU only, quiet logs, one cache folder per test run, a subprocess helper.

**One cache folder per run.** Everything the suite caches goes under a temporary folder made
for this run (shared by the xdist workers and by the ``metafit`` subprocesses they start), never
the user's ``~/.cache``: ``METAFIT_CACHE`` (glyph pools, converted GGUF weights, small-LM
builds) and JAX's persistent compilation cache, so a subprocess test or a second test that
compiles the same program loads it instead of compiling again. Set ``METAFIT_TEST_CACHE=DIR`` to
keep one folder across runs (faster local reruns); it is then not removed.

**Fast compilation.** Tests compile with LLVM at O0 and the classic fusion emitters (see below).

**Bytecode caches.** The suite writes ``__pycache__`` (git-ignored) even under
``PYTHONDONTWRITEBYTECODE=1``: without them each xdist worker and each ``metafit`` subprocess
compiles metafit's sources and pytest rewrites the asserts of every test module again
(collection: 27 s -> 20 s of CPU per worker). Subprocesses still inherit the variable; they
only read the caches the workers wrote.

**Strict skips.** With ``METAFIT_STRICT_SKIPS=1`` (``.ci/run`` sets it, since CI installs every
test dependency) a test skipped because a package is missing fails instead: a broken install
must not pass as a green suite.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

sys.dont_write_bytecode = False  # see "Bytecode caches" above; test modules are rewritten after this runs
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Reference libraries (torch, BLAS) on one thread: their idle threads spin-wait, and with two
# xdist workers on two cores that spinning is CPU taken from the other worker (SmolLM2's torch
# reference forward: 4.5 s of CPU with 2 threads, 0.5 s with 1, same numbers). XLA keeps its own pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# XLA's CPU backend without LLVM's optimisation passes: the suite's programs are tiny and run
# once, so compiling them is most of its time, and O0 cuts that by a third to a half (a tiny
# BERT's gradient: 5.7 s -> 3.1 s of CPU). The HLO passes (fusion, layout) and IEEE float
# semantics are unchanged; only machine-code speed drops. Subprocess tests inherit it; an
# optimisation level set in ``XLA_FLAGS`` by hand wins.
#
# And with XLA's classic LLVM-IR fusion emitters instead of the MLIR fusion emitters: the same
# fusions, emitted through a shorter pipeline. The whole suite: 446 s -> 389 s wall, 13.0 -> 11.3
# min of CPU (`time python -m pytest`, one sitting, 2026-12-01). Users' runs keep XLA's defaults.
FAST_COMPILE_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"}
for _flag, _value in FAST_COMPILE_FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}={_value}".strip()

REPO = Path(__file__).resolve().parents[1]


def _run_cache_root() -> tuple[Path, bool]:
    """The run's cache folder and whether this process owns (and so removes) it."""
    if os.environ.get("METAFIT_TEST_CACHE"):
        return Path(os.environ["METAFIT_TEST_CACHE"]).expanduser(), False
    # xdist workers share the controller's run id, so they share one folder
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or os.environ.setdefault(
        "METAFIT_TEST_RUN_ID", uuid.uuid4().hex[:12])
    owner = "PYTEST_XDIST_WORKER" not in os.environ
    return Path(tempfile.gettempdir()) / f"metafit-tests-{run_id}", owner


CACHE_ROOT, _OWNS_CACHE = _run_cache_root()
CACHE_ROOT.mkdir(parents=True, exist_ok=True)
os.environ["METAFIT_CACHE"] = str(CACHE_ROOT / "metafit")
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(CACHE_ROOT / "jax")
# programs that compile in under 0.2 s are cheaper to compile than to look up on disk
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"


def pytest_configure(config):
    if hasattr(config.option, "testrunuid") and not hasattr(config, "workerinput") and _OWNS_CACHE:
        config.option.testrunuid = CACHE_ROOT.name.removeprefix("metafit-tests-")  # workers use this folder


def pytest_sessionfinish(session, exitstatus):
    if _OWNS_CACHE and not hasattr(session.config, "workerinput"):  # not a worker, nor a folder kept on purpose
        shutil.rmtree(CACHE_ROOT, ignore_errors=True)


MISSING_PACKAGE = re.compile(r"could not import|No module named|pip install", re.IGNORECASE)


def _fail_missing_package_skip(report) -> None:
    if not (report.skipped and os.environ.get("METAFIT_STRICT_SKIPS") == "1"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if MISSING_PACKAGE.search(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped for a missing package under METAFIT_STRICT_SKIPS=1: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_package_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip skips at collection
    _fail_missing_package_skip(outcome.get_result())


def run_metafit(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``python -m metafit.cli ARGS`` in a fresh process (the real CLI path)."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "metafit.cli", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Runs ``metafit ARGS`` in this process (``cli.main``), capturing its output like :func:`run_metafit`.

    Error paths and most commands are tested this way: a subprocess costs a JAX import and a
    compilation each time. Each command keeps one real subprocess test (``tests/test_cli.py``).
    """
    import contextlib
    import io

    from metafit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse errors and --help exit
            code = exit.code
    return subprocess.CompletedProcess(["metafit", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def repo() -> Path:
    return REPO
