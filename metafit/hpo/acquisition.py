"""Choosing what to run next: portfolio, expected improvement (cost-aware, multi-fidelity), zero-shot, default.

Parts, then the methods built from them:

================ ========================================================================= =========================
method           what it runs                                                              reference
================ ========================================================================= =========================
``transfer``     the portfolio: greedy on predicted normalised loss across the training     Strangmann et al. 2024
                 tasks and the target, in order of predicted loss on the target; no refit
``bo``           DyHPO-style transfer BO: cost-aware EI over (new config at the lowest      Arango et al. 2024
                 fidelity, or a started config one fidelity up), surrogate refit on target   (Quick-Tune)
``zero_shot``    the configuration with the best average normalised loss on training tasks  (baseline)
``default``      the space's default configuration                                          (baseline)
================ ========================================================================= =========================

Expected improvement for minimisation, with ``z = (best - mean) / std``::

    EI = (best - mean) Phi(z) + std phi(z),      cost-aware: EI / cost^c
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import norm

from metafit.hpo.space import point_key


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float) -> np.ndarray:
    """``E[max(best - Y, 0)]`` for ``Y ~ N(mean, std^2)``."""
    std = np.maximum(std, 1e-12)
    z = (best - mean) / std
    return (best - mean) * norm.cdf(z) + std * norm.pdf(z)


def greedy_portfolio(losses: np.ndarray, k: int, weights: np.ndarray | None = None) -> list[int]:
    """Greedy set of ``k`` columns minimising ``sum_t w_t min_{c in S} losses[t, c]``.

    ``losses [tasks, configs]`` are normalised per task. The first pick is the best average column;
    each next pick lowers the weighted sum of per-task best losses the most (ties: lower index).
    """
    tasks, configs = losses.shape
    weights = np.ones(tasks) if weights is None else np.asarray(weights, np.float64)
    chosen: list[int] = []
    best = np.full(tasks, np.inf)
    for _ in range(min(k, configs)):
        covered = np.minimum(best[:, None], losses)
        scores = (weights[:, None] * np.where(np.isfinite(covered), covered, 1e9)).sum(0)
        scores[chosen] = np.inf
        pick = int(np.argmin(scores))
        chosen.append(pick)
        best = np.minimum(best, losses[:, pick])
    return chosen


def normalise_rows(values: np.ndarray) -> np.ndarray:
    """Each row scaled to ``[0, 1]`` by its own min and max."""
    lo, hi = values.min(1, keepdims=True), values.max(1, keepdims=True)
    return (values - lo) / np.maximum(hi - lo, 1e-12)


def portfolio(surrogate, k: int, candidates: Sequence[dict], task_features=None) -> list[dict]:
    """The transfer-only portfolio: ``k`` candidates for a task, best predicted first.

    The surrogate predicts each candidate's final loss on every training task (and on the target
    when its meta-features are given); predictions are normalised per task and the greedy set
    covers all of them (the target counts as much as all training tasks together); the set is
    returned in order of predicted loss on the target (or on average when no target is given).
    """
    final = [surrogate.space.fidelities - 1] * len(candidates)
    rows = [surrogate.predict(f, candidates, final)[0] for f in surrogate.training_features()]
    weights = [1.0] * len(rows)
    if task_features is not None:
        rows.append(surrogate.predict(task_features, candidates, final)[0])
        weights.append(float(len(rows) - 1))
    predicted = normalise_rows(np.stack(rows))
    chosen = greedy_portfolio(predicted, k, np.asarray(weights))
    order = predicted[-1] if task_features is not None else predicted.mean(0)
    return [candidates[i] for i in sorted(chosen, key=lambda i: order[i])]


def suggest(surrogate, history: Sequence[dict], candidates: Sequence[dict], task_features, *,
            cost_power: float = 1.0, refit_steps: int = 30) -> tuple[dict, int]:
    """Transfer BO's next action: ``(point, fidelity index)`` maximising EI / cost^c.

    Actions are a started, unfinished config one fidelity up (a promotion) or an unstarted
    candidate at the lowest fidelity. EI is against the best ``loss / zero_shot_loss`` seen on the
    task so far (the best predicted mean before any observation); the GP is refit on the task's
    observations first (``refit_steps`` = 0: no refit). Cost = predicted full-run seconds x the
    share of the run the action adds.
    """
    from metafit.hpo.surrogate import _zero_shot

    started = {point_key(t["config"]): t for t in history}
    actions: list[tuple[dict, int]] = []
    for trial in history:
        reached = sum(np.isfinite(np.asarray(trial["curve"], np.float64)))
        if trial.get("status", "ok") == "ok" and reached < surrogate.space.fidelities:
            actions.append((trial["config"], reached))
    actions += [(c, 0) for c in candidates if point_key(c) not in started]
    if not actions:
        raise ValueError("every candidate is finished; nothing left to suggest")
    params = surrogate.refit(task_features, history, steps=refit_steps) if refit_steps and history else None
    points, fids = [a[0] for a in actions], [a[1] for a in actions]
    mean, std = surrogate.predict(task_features, points, fids, history, params=params)
    observed = [v for t in history for v in np.asarray(t["curve"], np.float64) if np.isfinite(v)]
    best = min(observed) / _zero_shot(task_features) if observed else float(mean.min())
    steps = np.asarray([1.0 / surrogate.space.fidelities] * len(actions))
    cost = surrogate.predict_cost(task_features, points) * steps
    score = expected_improvement(mean, std, best) / np.maximum(cost, 1e-6) ** cost_power
    pick = int(np.argmax(score))
    return points[pick], fids[pick]


def zero_shot_config(normalised_final: np.ndarray, configs: Sequence[dict]) -> dict:
    """The config with the lowest mean normalised final loss over the training tasks (``[tasks, configs]``)."""
    return configs[int(np.argmin(np.nanmean(normalised_final, 0)))]
