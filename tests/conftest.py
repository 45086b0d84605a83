"""Shared test setup: CPU only, quiet logs, a helper to run metafit in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]


def run_metafit(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``python -m metafit.cli ARGS`` in a fresh process (the real CLI path)."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "metafit.cli", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture
def repo() -> Path:
    return REPO
