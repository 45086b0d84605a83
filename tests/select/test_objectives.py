"""FL / FLMI / FLCG: objective values against the definitions, greedy against a naive greedy and brute force."""
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from metafit import select


def kernels(seed, n=9, m=3):
    rng = np.random.default_rng(seed)
    return rng.random((n, n)).astype(np.float32), rng.random((n, m)).astype(np.float32)


def definition(name, s, side, chosen, weight=1.0):
    """The objectives written straight from their formulas."""
    cover = s[:, chosen].max(1) if chosen else np.zeros(len(s))
    if name == "fl":
        return cover.sum()
    if name == "flmi_additive":
        return cover.sum() + weight * side[chosen].max(1).sum() if chosen else 0.0
    if name == "flmi_min":
        return np.minimum(cover, weight * side.max(1)).sum()
    return np.maximum(cover - weight * side.max(1), 0).sum()  # flcg


def build(name, s, side, weight=1.0):
    if name == "fl":
        return select.facility_location_objective(s)
    if name.startswith("flmi"):
        return select.flmi_objective(s, side, eta=weight, form=name.split("_")[1])
    return select.flcg_objective(s, side, nu=weight)


NAMES = ["fl", "flmi_additive", "flmi_min", "flcg"]


def naive_greedy(objective, budget):
    chosen = []
    for _ in range(budget):
        gains = [-np.inf if c in chosen else select.objective_value(objective, chosen + [c])
                 - select.objective_value(objective, chosen) for c in range(len(objective.kernel))]
        chosen.append(int(np.argmax(gains)))
    return chosen


@pytest.mark.parametrize("name", NAMES)
def test_objective_values_match_their_definitions(name):
    s, side = kernels(0)
    objective = build(name, s, side, weight=0.7)
    for chosen in ([], [3], [0, 4, 8], list(range(9))):
        assert select.objective_value(objective, chosen) == pytest.approx(definition(name, s, side, chosen, 0.7), abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_naive_greedy_and_is_near_the_brute_force_optimum(name):
    for seed in range(3):
        s, side = kernels(seed)
        objective = build(name, s, side)
        picked = select.greedy(objective, 4)
        assert picked.tolist() == naive_greedy(objective, 4)
        best = max(definition(name, s, side, list(c)) for c in itertools.combinations(range(9), 4))
        assert definition(name, s, side, picked.tolist()) >= (1 - 1 / math.e) * best - 1e-6
        top = max(range(9), key=lambda c: (definition(name, s, side, [c]), -c))
        assert select.greedy(objective, 1).tolist() == [top]  # budget 1: greedy is optimal


def test_presets_and_ties():
    s, side = kernels(1)
    assert select.facility_location(s, 3).tolist() == select.greedy(select.facility_location_objective(s), 3).tolist()
    assert select.flmi(s, side, 3, eta=2.0).tolist() == naive_greedy(build("flmi_additive", s, side, 2.0), 3)
    assert select.flcg(s, side, 3, nu=0.5).tolist() == naive_greedy(build("flcg", s, side, 0.5), 3)
    assert select.facility_location(np.ones((5, 5)), 5).tolist() == [0, 1, 2, 3, 4]  # ties: lowest index first


def test_stochastic_greedy():
    s, _ = kernels(2, n=40)
    objective = select.facility_location_objective(s)
    key = jax.random.key(0)
    # A sample as large as the pool sees every candidate: exactly greedy.
    assert select.stochastic_greedy(objective, 4, key=key, epsilon=1e-9).tolist() == select.greedy(objective, 4).tolist()
    picked = select.stochastic_greedy(objective, 4, key=key, epsilon=0.3)  # looks at 13 of 40 per step
    assert len(set(picked.tolist())) == 4
    value = select.objective_value(objective, picked)
    assert value >= 0.9 * select.objective_value(objective, select.greedy(objective, 4))
    assert select.facility_location(s, 4, key=key, epsilon=0.3).tolist() == picked.tolist()


APRICOT_RANKINGS = """
import json, sys
import numpy as np
from apricot import FacilityLocationSelection
kernels = np.load(sys.argv[1])
print(json.dumps([FacilityLocationSelection(int(sys.argv[2]), metric="precomputed", optimizer=optimizer)
                  .fit(kernel).ranking.tolist() for kernel, optimizer in zip(kernels, sys.argv[3:])]))
"""


def test_facility_location_equals_apricot_select(tmp_path):
    """The same picks in the same order as apricot-select (a test dependency: requirements-nodeps.txt),
    with its plain greedy on a random kernel and its lazy-greedy heap on a DELIFT similarity kernel.

    apricot's precomputed kernel is the transpose of ours: its X[j, i] is how well candidate j covers item i."""
    if importlib.util.find_spec("apricot") is None:  # found, not imported: it runs in the subprocess below
        pytest.skip("No module named 'apricot': pip install --no-deps -r requirements-nodeps.txt")
    rng = np.random.default_rng(7)
    random_kernel = rng.random((40, 40))
    delift_kernel = select.similarity_from_utility(rng.normal(size=(40, 40)))  # diagonal 1, min-max scaled
    np.save(tmp_path / "kernels.npy", np.stack([random_kernel.T, delift_kernel.T]).astype(np.float64))
    # In a process of its own with numba's JIT off: apricot compiles its kernels anew in every fit (2 s each
    # here) and interpreted runs them in milliseconds at this size; the switch is read once, when numba is
    # first imported, and another test's import (arviz) may have done that in this process already.
    done = subprocess.run([sys.executable, "-c", APRICOT_RANKINGS, str(tmp_path / "kernels.npy"), "13", "naive", "lazy"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "NUMBA_DISABLE_JIT": "1"})
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout)
    assert select.facility_location(random_kernel.astype(np.float32), 13).tolist() == theirs[0]
    assert select.facility_location(delift_kernel.astype(np.float32), 13).tolist() == theirs[1]


def test_budget_of():
    assert select.budget_of(0.3, 100) == 30 and select.budget_of(0.001, 10) == 1 and select.budget_of(1.0, 7) == 7
    with pytest.raises(ValueError, match="fraction"):
        select.budget_of(1.5, 10)


def test_bad_input():
    s, side = kernels(0)
    with pytest.raises(ValueError, match=r"budget must be in \[1, 9\]"):
        select.facility_location(s, 10)
    with pytest.raises(ValueError, match="budget must be in"):
        select.facility_location(s, 0)
    with pytest.raises(ValueError, match="budget_of"):
        select.facility_location(s, 0.3)
    with pytest.raises(ValueError, match="square"):
        select.facility_location(s[:, :5], 2)
    bad = s.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        select.facility_location(bad, 2)
    with pytest.raises(ValueError, match="query_sim must be"):
        select.flmi(s, side[:5], 2)
    with pytest.raises(ValueError, match="private_sim must be"):
        select.flcg(s, side[:, :0], 2)
    with pytest.raises(ValueError, match="form must be"):
        select.flmi(s, side, 2, form="max")
