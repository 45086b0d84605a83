"""Every meta config and every job of the AMFS grid (experiments/amfs.yaml) validates without compute."""
import copy
from pathlib import Path

import pytest

from metafit.config import apply_overrides, load_yaml
from metafit.experiments import load_run_config, resolve_config
from metafit.sweep import load_grid

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "meta").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_meta_config_validates_and_has_a_header(path):
    config = load_run_config(path)
    assert config.experiment == "meta"
    header = path.read_text().splitlines()[0]
    assert header == f"# metafit run configs/meta/{path.name}"


def test_every_reproduction_job_validates_and_the_table_builds():
    grid = load_grid(REPO / "experiments" / "amfs.yaml")
    parsed = {}  # load_run_config's steps, each config file parsed once: 446 jobs share a dozen files
    for scale in ("smoke", "cpu", "gpu"):
        for job in grid.jobs(scale):
            if job.config not in parsed:
                parsed[job.config] = load_yaml(REPO / job.config)
            resolved = resolve_config(apply_overrides(copy.deepcopy(parsed[job.config]), list(job.overrides)),
                                      str(REPO / job.config))
    assert resolved == load_run_config(REPO / job.config, list(job.overrides))  # the same steps
    records = {f"sinusoid_k10_maml_s{s}": {"status": "done", "tags": {"group": "sinusoid_k10", "learner": "maml", "seed": s},
                                           "data": {"query_mse": v, "query_mse_ci95": 0.1, "seconds_per_iter": 1e-3,
                                                    "meta_loss_var": 0.1, "meta_loss_cv": 0.2}}
               for s, v in enumerate((1.0, 2.0, 3.0))}
    table = grid.load_builder().build(records, "cpu", grid.variables("cpu"))["table.md"]
    assert "| maml | not run | 2.000 ± 1.000 (n=3) |" in table  # mean ± sample sd (ddof = 1) of 1, 2, 3


def test_task_batching_outside_its_choices_is_refused_before_any_compute():
    with pytest.raises(ValueError, match="task_batching"):
        load_run_config(REPO / "configs" / "meta" / "glyphs_maml.yaml", ["args.task_batching=loop"])
    assert load_run_config(REPO / "configs" / "meta" / "glyphs_maml.yaml",
                           ["args.task_batching=unroll"]).args.task_batching == "unroll"
