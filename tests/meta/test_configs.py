"""Every meta config and every paper_repro/amfs job validates (keys, types, learner options) without compute."""
import importlib.util
import sys
from pathlib import Path

import pytest

from metafit.experiments import load_run_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "meta").glob("*.yaml"))


def load_reproduce():
    spec = importlib.util.spec_from_file_location("amfs_reproduce", REPO / "paper_repro" / "amfs" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_meta_config_validates_and_has_a_header(path):
    config = load_run_config(path)
    assert config.experiment == "meta"
    header = path.read_text().splitlines()[0]
    assert header == f"# metafit run configs/meta/{path.name}"


def test_every_reproduction_job_validates_and_the_table_builds():
    reproduce = load_reproduce()
    for scale in ("smoke", "cpu", "gpu"):
        for job in reproduce.make_jobs(reproduce.SCALES[scale]):
            load_run_config(REPO / job.config, job.overrides)
    rows = [{"group": "sinusoid_k10", "learner": "maml", "seed": s, "query_mse": v, "query_mse_ci95": 0.1,
             "seconds_per_iter": 1e-3, "meta_loss_var": 0.1, "meta_loss_cv": 0.2} for s, v in enumerate((1.0, 2.0, 3.0))]
    table = reproduce.build_table(rows, "cpu")
    assert "| maml | not run | 2.000 ± 2.483 (n=3) |" in table  # t(0.975, 2) * sd / sqrt(3) = 4.30 * 1 / 1.732
