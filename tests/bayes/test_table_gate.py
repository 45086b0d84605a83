"""The PROMPT table builder reports no row whose posteriors fail the convergence gate."""
import importlib.util
from pathlib import Path

import pytest

BUILDER = Path(__file__).resolve().parents[2] / "paper_repro" / "prompt" / "make_table.py"


@pytest.fixture(scope="module")
def make_table():
    spec = importlib.util.spec_from_file_location("prompt_make_table", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sampled(lpd, max_rhat, divergences=(0, 0, 0, 0), min_ess=(400.0,) * 4):
    return {"lpd": list(lpd), "mse": [1.0, 2.0, 3.0, 4.0], "max_rhat": list(max_rhat), "min_ess": list(min_ess),
            "divergences": list(divergences), "draws": [1000] * 4, "worst_site": ["phi"] * 4}


# 2 cells (heterogeneity 1 and 4) x 2 seeds; proxy noise fixed.
PROBLEMS = {
    "cells": {"proxy_noise": [0.1] * 4, "heterogeneity": [1.0, 1.0, 4.0, 4.0], "prior_misspecification": [0.0] * 4,
              "seed": [0, 1, 0, 1]},
    "methods": {
        "no_transfer": {"lpd": [-2.0, -2.0, -2.0, -2.0], "mse": [2.0, 2.0, 2.0, 2.0]},
        "pooling": sampled([-1.0, -3.0, -5.0, -1.5], [1.01, 1.02, 1.0, 1.03]),
        # seed 1 of heterogeneity 4 disagrees across chains; seed 0 of heterogeneity 1 diverges 11 / 1000 times
        "hierarchical_mixture": sampled([-1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.3], divergences=(11, 0, 0, 0)),
    },
}


def test_rows_with_unconverged_posteriors_are_not_reported(make_table):
    records = {"prompt_sweep_linear": {"status": "done", "data": {"results": {}, "problems": PROBLEMS}}}
    table = make_table.build(records, "cpu", {})["results.md"]
    # pooling converged everywhere: lpd mean ± sample sd (ddof 1) over the 4 problems, rates vs no_transfer
    assert "| pooling | -2.625 ± 1.797 | 2.500 ± 1.291 | 0.50 | 0.50 | 1.030 | 400 | 0/4000 |" in table
    assert ("| hierarchical_mixture | not converged: 2/4 posteriors fail (worst R-hat 1.30 at 'phi', min ESS 400, "
            "11 divergences) | | | | 1.300 | 400 | 11/4000 |") in table
    # per cell: both mixture cells hold one failing posterior; pooling's cells are reported
    assert "| hierarchical_mixture | 1 | n.c. |" in table and "| hierarchical_mixture | 4 | n.c. |" in table
    assert "| pooling | 1 | -2.00 ± 1.41 |" in table and "| pooling | 4 | 0.50 |" in table
    assert "| hierarchical_mixture | 4 | 1.300 / 400 / 0/2000 |" in table


def test_a_row_passes_only_when_every_posterior_in_it_does(make_table):
    mixture = PROBLEMS["methods"]["hierarchical_mixture"]
    assert make_table.gate_failures(mixture, [1, 2]) == []
    assert make_table.gate_failures(mixture, [0]) == [
        "1/1 posteriors fail (worst R-hat 1.00 at 'phi', min ESS 400, 11 divergences)"]
    assert make_table.gate_failures(sampled([0] * 4, [1.0] * 4, min_ess=(99.0,) * 4), [0])  # ESS below 100
    assert make_table.gate_failures(PROBLEMS["methods"]["no_transfer"], [0, 1, 2, 3]) == []  # closed form
