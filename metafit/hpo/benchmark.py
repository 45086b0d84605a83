"""Leave-one-task-out evaluation on the meta-dataset (tabular: methods choose among its configurations).

For a held-out task every method sees only the other tasks' runs (the surrogate is meta-trained
on them) and the held-out task's meta-features; "running" config ``c`` to fidelity ``k`` reveals
the recorded losses ``loss[t, c, :k+1]`` and costs ``(k + 1 - k_before) / F`` full-run
equivalents (a promotion resumes the paused run, so only the new steps are paid). The incumbent
is the best normalised loss observed so far at any fidelity (every fidelity leaves a checkpoint);
its value at budget ``b`` is the normalised regret (0 = the task's best recorded loss).

Methods: ``transfer``, ``bo``, ``zero_shot``, ``default`` (see :mod:`metafit.hpo.acquisition`),
``random`` (random order, full runs), ``tpe`` (Optuna's TPE sampler, each suggestion snapped to
the nearest unused meta-dataset config in the encoded space), ``sh`` (successive halving, eta = 2,
over fidelities 1/4, 1/2, 1 with random starting configs).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from metafit.hpo.acquisition import portfolio, suggest, zero_shot_config
from metafit.hpo.metadataset import MetaDataset
from metafit.hpo.space import point_key

METHODS = ("transfer", "bo", "zero_shot", "default", "random", "tpe", "sh")


class TabularTask:
    """The held-out task's recorded runs, revealed as a method pays for them."""

    def __init__(self, meta: MetaDataset, task: int, budget: float):
        self.meta, self.task, self.budget = meta, task, budget
        self.fidelities = meta.space.fidelities
        self.normalised = meta.normalised()[task]
        self.reached = np.zeros(len(meta.configs), int)  # fidelities run so far per config
        self.spent = 0.0
        self.trace: list[tuple[float, float]] = []  # (spent, incumbent regret)
        self.index = {point_key(c): i for i, c in enumerate(meta.configs)}

    @property
    def left(self) -> float:
        return self.budget - self.spent

    def run(self, config: int, fidelity: int) -> bool:
        """Runs ``config`` up to fidelity index ``fidelity``; False (nothing run) when over budget."""
        extra = (fidelity + 1 - self.reached[config]) / self.fidelities
        if extra <= 0:
            return True
        if extra > self.left + 1e-9:
            return False
        self.spent += extra
        self.reached[config] = fidelity + 1
        self.trace.append((self.spent, self.regret()))
        return True

    def regret(self) -> float:
        seen = [self.normalised[c, : self.reached[c]].min() for c in np.flatnonzero(self.reached)]
        return float(min(seen)) if seen else 1.0

    def history(self) -> list[dict]:
        out = []
        for c in np.flatnonzero(self.reached):
            curve = np.full(self.fidelities, np.nan)
            curve[: self.reached[c]] = self.meta.loss[self.task, c, : self.reached[c]]
            status = "ok" if np.isfinite(self.meta.loss[self.task, c]).all() else "failed"
            out.append({"config": self.meta.configs[c], "curve": curve, "status": status})
        return out

    def regret_at(self, budgets: np.ndarray) -> np.ndarray:
        """Incumbent regret after spending at most each budget (1 before anything ran)."""
        spent = np.asarray([s for s, _ in self.trace])
        values = np.asarray([r for _, r in self.trace])
        out = np.ones(len(budgets))
        for i, b in enumerate(budgets):
            done = spent <= b + 1e-9
            if done.any():
                out[i] = values[done][-1]
        return out


def run_method(method: str, meta: MetaDataset, task: int, budget: float, seed: int,
               surrogate_factory: Callable[[MetaDataset, int], object] | None = None) -> TabularTask:
    """One method on held-out ``task`` until ``budget`` full-run equivalents are spent."""
    train = meta.drop_tasks([i for i in range(len(meta.tasks)) if i != task])
    sim = TabularTask(meta, task, budget)
    rng = np.random.default_rng(seed)
    configs = list(meta.configs)
    last = meta.space.fidelities - 1
    if method == "default":
        sim.run(0, last)
    elif method == "zero_shot":
        sim.run(sim.index[point_key(zero_shot_config(train.normalised()[:, :, -1], configs))], last)
    elif method == "random":
        for c in rng.permutation(len(configs)):
            if not sim.run(int(c), last):
                break
    elif method == "sh":
        _successive_halving(sim, rng)
    elif method == "tpe":
        _tpe(sim, meta, seed)
    elif method in ("transfer", "bo"):
        surrogate = surrogate_factory(train, seed)
        features = meta.features[task]
        if method == "transfer":
            for point in portfolio(surrogate, len(configs), configs, features):
                if not sim.run(sim.index[point_key(point)], last):
                    break
        else:
            while sim.left >= 1.0 / meta.space.fidelities - 1e-9 and sim.reached.sum() < len(configs) * (last + 1):
                point, k = suggest(surrogate, sim.history(), configs, features)
                if not sim.run(sim.index[point_key(point)], k):
                    break
    else:
        raise ValueError(f"unknown method {method!r}; choose among {list(METHODS)}")
    return sim


def _successive_halving(sim: TabularTask, rng: np.random.Generator, eta: int = 2) -> None:
    """Brackets of successive halving over fidelity indices 0, 1, F-1 until the budget is spent."""
    rungs = sorted({0, min(1, sim.fidelities - 1), sim.fidelities - 1})
    unused = list(rng.permutation(len(sim.meta.configs)))
    while unused and sim.left > 1e-9:
        alive = [int(unused.pop()) for _ in range(min(eta ** (len(rungs) - 1), len(unused)))]
        for rung in rungs:
            for c in alive:
                if not sim.run(c, rung):
                    return
            scores = [sim.normalised[c, rung] for c in alive]
            alive = [alive[i] for i in np.argsort(scores)[: max(1, len(alive) // eta)]]


def _tpe(sim: TabularTask, meta: MetaDataset, seed: int) -> None:
    """Optuna TPE over the space; each suggestion snapped to the nearest unused recorded config."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = meta.space
    encoded = np.stack([space.encode(c) for c in meta.configs])
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3))
    last = space.fidelities - 1
    while sim.left >= 1 - 1e-9 and (sim.reached == 0).any():
        trial = study.ask()
        point = {n: trial.suggest_float(n, getattr(space, n).low, getattr(space, n).high, log=getattr(space, n).log)
                 for n in space.ranges()}
        for name in space.choices():
            values = getattr(space, name)
            point[name] = values[trial.suggest_categorical(name, list(range(len(values))))]
        free = np.flatnonzero(sim.reached == 0)
        c = int(free[np.argmin(((encoded[free] - space.encode(point)) ** 2).sum(1))])
        sim.run(c, last)
        study.tell(trial, float(sim.normalised[c, last]))


def average_ranks(regrets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean rank (1 = best, ties share the mean rank) of each method at each budget.

    ``regrets[method]`` is ``[runs, budgets]``; ranks are taken within each run (task x seed).
    """
    from scipy.stats import rankdata

    names = list(regrets)
    stacked = np.stack([regrets[n] for n in names])  # [methods, runs, budgets]
    ranks = rankdata(stacked, axis=0)
    return {n: ranks[i].mean(0) for i, n in enumerate(names)}


def budgets_grid(budget: float, fidelities: int) -> np.ndarray:
    return np.arange(1, int(math.floor(budget * fidelities)) + 1) / fidelities


def leave_one_task_out(meta: MetaDataset, out_dir, *, seeds: Sequence[int], budget: float,
                       methods: Sequence[str] = METHODS, surrogate_steps: int = 150,
                       budget_s: float | None = None) -> None:
    """Every method on every held-out task and seed; one JSON per (task, seed) in ``out_dir`` (skipped if there).

    Each file holds ``regret[method]`` at :func:`budgets_grid` budgets; transfer and BO share the
    surrogate meta-trained (seeded) on the other tasks.
    """
    import json
    from pathlib import Path

    from metafit.hpo.surrogate import Surrogate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import time

    budgets = budgets_grid(budget, meta.space.fidelities)
    started = time.perf_counter()
    for seed in seeds:
        for t, task in enumerate(meta.tasks):
            path = out / f"{task}_s{seed}.json"
            if path.exists():
                continue
            if budget_s is not None and time.perf_counter() - started > budget_s:
                return
            cache: dict = {}

            def factory(train, s, _cache=cache):
                if "model" not in _cache:
                    _cache["model"] = Surrogate.fit(train, steps=surrogate_steps, seed=s)
                return _cache["model"]

            regret = {m: run_method(m, meta, t, budget, seed, factory).regret_at(budgets).tolist() for m in methods}
            path.write_text(json.dumps({"task": task, "seed": seed, "budgets": budgets.tolist(), "regret": regret}) + "\n")
            print(f"{task} seed {seed}: " + ", ".join(f"{m} {r[-1]:.3f}" for m, r in regret.items()), flush=True)


def collect(out_dir) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """``(budgets, regret[method] [runs, budgets], run names)`` from :func:`leave_one_task_out`'s files."""
    import json
    from pathlib import Path

    files = sorted(Path(out_dir).glob("*_s*.json"))
    if not files:
        raise FileNotFoundError(f"no leave-one-task-out results in {out_dir}")
    records = [json.loads(f.read_text()) for f in files]
    methods = list(records[0]["regret"])
    return (np.asarray(records[0]["budgets"]), {m: np.asarray([r["regret"][m] for r in records]) for m in methods},
            [f.stem for f in files])
