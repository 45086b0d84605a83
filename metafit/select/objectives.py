r"""Submodular selection objectives over a similarity kernel, maximised greedily under a count budget.

Kernels are ``S[i, j]`` = how well candidate ``j`` serves ground item ``i`` (``[n, n]``, from
:func:`~metafit.select.utility.similarity_from_utility`). Every objective here is one general
form (the part) with named settings (the presets):

.. math::

    f(A) = \sum_i \Big[\min\big(\max(\ell_i, \max_{j \in A} S_{ij}), c_i\big) - \min(\ell_i, c_i)\Big]
           + \sum_{j \in A} m_j

with a per-item floor :math:`\ell_i` (coverage already there), cap :math:`c_i` and a modular
bonus :math:`m_j`. The max over an empty set is :math:`\ell_i` (0 by default, so kernels are
expected to be non-negative, as scaled similarities are).

=====================  =======================================================  ==========================
preset                 objective                                                 setting
=====================  =======================================================  ==========================
``facility_location``  :math:`\sum_i \max_{j\in A} S_{ij}`                       :math:`\ell=0, c=\infty, m=0`
``flmi`` (additive,    :math:`\sum_i \max_{j\in A} S_{ij} + \eta\sum_{j\in A}    :math:`m_j = \eta \max_q Q_{jq}`
DELIFT paper)          \max_q Q_{jq}`
``flmi`` (``"min"``,   :math:`\sum_i \min(\max_{j\in A} S_{ij}, \eta\max_q       :math:`c_i = \eta \max_q Q_{iq}`
submodlib's C++)       Q_{iq})`
``flcg``               :math:`\sum_i \max(\max_{j\in A} S_{ij} - \nu\max_k       :math:`\ell_i = \nu \max_k P_{ik}`
                       P_{ik}, 0)`
=====================  =======================================================  ==========================

(FLCG is FL started from the existing set's coverage: :math:`\max(a - t, 0) = \max(a, t) - t`.)
``Q = query_sim [n, m]`` (pool x target) and ``P = private_sim [n, p]`` (pool x existing).

Maximisation: :func:`greedy` takes, ``budget`` times, the candidate with the largest gain
(ties: lowest index); every step computes all ``n`` gains at once, ``[n, n]`` dense and jitted
inside one ``lax.fori_loop``. :func:`stochastic_greedy` (Mirzasoleiman et al., 2015) looks at a
random ``(n / k) log(1 / eps)`` of the remaining candidates per step, for large ``n``.
All return candidate indices in selection order.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FLMI_FORMS = ("additive", "min")


class Objective(NamedTuple):
    """The general form's parameters: kernel ``[n, n]``, floor ``[n]``, cap ``[n]``, bonus ``[n]``."""

    kernel: jax.Array
    floor: jax.Array
    cap: jax.Array
    bonus: jax.Array


def budget_of(fraction: float, n: int) -> int:
    """A fraction of a pool of ``n`` as a count (rounded, at least 1), e.g. ``budget_of(0.3, 100) == 30``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the budget fraction must be in (0, 1], got {fraction}")
    return max(1, int(round(fraction * n)))


def _square_kernel(kernel, name: str = "kernel") -> np.ndarray:
    s = np.asarray(kernel, np.float32)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"{name} must be a square [n, n] matrix (S[i, j] = how well candidate j serves item i), "
                         f"got shape {s.shape}")
    _finite(s, name)
    return s


def _finite(a: np.ndarray, name: str) -> None:
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} NaN/inf entries; fix the kernel first")


def _side_kernel(matrix, n: int, name: str, shape_hint: str) -> np.ndarray:
    m = np.asarray(matrix, np.float32)
    if m.ndim != 2 or m.shape[0] != n or m.shape[1] == 0:
        raise ValueError(f"{name} must be {shape_hint} with n = {n} pool rows, got shape {m.shape}")
    _finite(m, name)
    return m


def facility_location_objective(kernel) -> Objective:
    """FL: :math:`f(A) = \\sum_i \\max_{j\\in A} S_{ij}`."""
    s = _square_kernel(kernel)
    n = s.shape[0]
    return Objective(jnp.asarray(s), jnp.zeros(n), jnp.full(n, jnp.inf), jnp.zeros(n))


def flmi_objective(kernel, query_sim, *, eta: float = 1.0, form: str = "additive") -> Objective:
    """FLMI with a target set; ``form="additive"`` (DELIFT paper) or ``"min"`` (submodlib)."""
    if form not in FLMI_FORMS:
        raise ValueError(f"form must be one of {FLMI_FORMS}, got {form!r}")
    s = _square_kernel(kernel)
    relevance = eta * _side_kernel(query_sim, s.shape[0], "query_sim", "[n, m] (pool x target)").max(1)
    fl = facility_location_objective(s)
    if form == "additive":
        return fl._replace(bonus=jnp.asarray(relevance))
    return fl._replace(cap=jnp.asarray(relevance))


def flcg_objective(kernel, private_sim, *, nu: float = 1.0) -> Objective:
    """FLCG given an existing set: FL whose coverage starts at :math:`\\nu \\max_k P_{ik}`."""
    s = _square_kernel(kernel)
    covered = nu * _side_kernel(private_sim, s.shape[0], "private_sim", "[n, p] (pool x existing)").max(1)
    return facility_location_objective(s)._replace(floor=jnp.asarray(covered))


def objective_value(objective: Objective, selected) -> float:
    """:math:`f(A)` of the general form for the index set ``selected``."""
    s, floor, cap, bonus = (np.asarray(a, np.float64) for a in objective)
    idx = np.asarray(list(selected), int)
    cover = np.maximum(floor, s[:, idx].max(1)) if len(idx) else floor
    return float((np.minimum(cover, cap) - np.minimum(floor, cap)).sum() + bonus[idx].sum())


def _gains(objective: Objective, cover: jax.Array, candidates: jax.Array | None = None) -> jax.Array:
    """Marginal gains given the current coverage ``[n]``: of every candidate, or of ``candidates`` only."""
    kernel, bonus = objective.kernel, objective.bonus
    if candidates is not None:
        kernel, bonus = kernel[:, candidates], bonus[candidates]
    capped = jnp.minimum(cover, objective.cap)
    new = jnp.minimum(jnp.maximum(cover[:, None], kernel), objective.cap[:, None])
    return (new - capped[:, None]).sum(0) + bonus


def _check_budget(budget: int, n: int) -> None:
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool):
        raise ValueError(f"budget must be a count (int); for a fraction use budget_of(fraction, n), got {budget!r}")
    if not 0 < budget <= n:
        raise ValueError(f"budget must be in [1, {n}] (the pool size), got {budget}")


@functools.partial(jax.jit, static_argnames=("budget",))
def _greedy(objective: Objective, budget: int) -> jax.Array:
    n = objective.kernel.shape[0]

    def step(t, carry):
        cover, taken, order = carry
        gains = jnp.where(taken, -jnp.inf, _gains(objective, cover))
        pick = jnp.argmax(gains)
        return jnp.maximum(cover, objective.kernel[:, pick]), taken.at[pick].set(True), order.at[t].set(pick)

    init = (objective.floor.astype(jnp.float32), jnp.zeros(n, bool), jnp.zeros(budget, jnp.int32))
    return jax.lax.fori_loop(0, budget, step, init)[2]


def greedy(objective: Objective, budget: int) -> np.ndarray:
    """Greedy maximisation: ``budget`` indices in selection order (ties go to the lowest index)."""
    _check_budget(budget, objective.kernel.shape[0])
    return np.asarray(_greedy(objective, int(budget)))


@functools.partial(jax.jit, static_argnames=("budget", "sample"))
def _stochastic_greedy(objective: Objective, key: jax.Array, budget: int, sample: int) -> jax.Array:
    n = objective.kernel.shape[0]

    def step(t, carry):
        cover, taken, order = carry
        noise = jax.random.uniform(jax.random.fold_in(key, t), (n,))
        _, looked_at = jax.lax.top_k(jnp.where(taken, -1.0, noise), sample)  # a random untaken subset
        gains = _gains(objective, cover, looked_at)
        gains = jnp.where(taken[looked_at], -jnp.inf, gains)
        best = jnp.argmax(gains)
        # Among equal gains prefer the lowest index, as greedy does.
        best = jnp.argmin(jnp.where(gains == gains[best], looked_at, n))
        pick = looked_at[best]
        return jnp.maximum(cover, objective.kernel[:, pick]), taken.at[pick].set(True), order.at[t].set(pick)

    init = (objective.floor.astype(jnp.float32), jnp.zeros(n, bool), jnp.zeros(budget, jnp.int32))
    return jax.lax.fori_loop(0, budget, step, init)[2]


def stochastic_greedy(objective: Objective, budget: int, *, key: jax.Array, epsilon: float = 0.01) -> np.ndarray:
    """Stochastic greedy: each step takes the best of ``ceil(n / budget * log(1 / epsilon))`` random
    untaken candidates; expected value :math:`\\ge (1 - 1/e - \\epsilon)` of the optimum."""
    n = objective.kernel.shape[0]
    _check_budget(budget, n)
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    sample = min(n, math.ceil(n / budget * math.log(1.0 / epsilon)))
    return np.asarray(_stochastic_greedy(objective, key, int(budget), sample))


def _maximise(objective: Objective, budget: int, key, epsilon: float) -> np.ndarray:
    if key is None:
        return greedy(objective, budget)
    return stochastic_greedy(objective, budget, key=key, epsilon=epsilon)


def facility_location(kernel, budget: int, *, key=None, epsilon: float = 0.01) -> np.ndarray:
    """FL selection (instruction tuning). ``key`` given = stochastic greedy."""
    return _maximise(facility_location_objective(kernel), budget, key, epsilon)


def flmi(kernel, query_sim, budget: int, *, eta: float = 1.0, form: str = "additive", key=None,
         epsilon: float = 0.01) -> np.ndarray:
    """FLMI selection toward a target set (task-specific); ``query_sim`` is ``[n, m]`` pool x target."""
    return _maximise(flmi_objective(kernel, query_sim, eta=eta, form=form), budget, key, epsilon)


def flcg(kernel, private_sim, budget: int, *, nu: float = 1.0, key=None, epsilon: float = 0.01) -> np.ndarray:
    """FLCG selection given an existing set (continual); ``private_sim`` is ``[n, p]`` pool x existing."""
    return _maximise(flcg_objective(kernel, private_sim, nu=nu), budget, key, epsilon)
