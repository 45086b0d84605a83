"""``metafit tune``: search fine-tuning settings for a LoRA SFT job with the meta-learned surrogates.

The job is a normal ``lora_sft`` config (model, data or instruction tasks, ``n_train``/``n_eval``);
the search space's fields replace its ``train``/``lora`` settings. Each trial is a real run folder
``WORKDIR/trials/<id>/`` (resolved trial config, ``metrics.jsonl``, checkpoints, ``results.json``)
trained through :func:`metafit.hpo.trial.run_trial`; a trial paused at fidelity ``k / F`` is
promoted by resuming its folder with a later ``stop_at``. ``WORKDIR/tune.json`` records every
finished action and the one in progress, so a killed tune resumes where it stopped: the pending
action is re-run (its trial resumes from its last checkpoint) and the choices after it are the
same as an uninterrupted tune's (proposals are a pure function of the seed and the history).

Budget: ``budget`` full-run equivalents (a fidelity step of a trial costs ``1 / F``), or
``budget_s`` seconds of measured trial time; the tune stops before an action that would overrun.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from metafit.hpo.space import SearchSpace, point_key

METHODS = ("bo", "transfer", "random", "default", "zero_shot")
STATE = "tune.json"


class TuneError(ValueError):
    """A tune request that cannot run (bad budget, job, workdir); raised before any training."""


@dataclasses.dataclass(frozen=True)
class TuneRequest:
    config: str
    budget: float | None = None
    budget_s: float | None = None
    method: str = "bo"
    seed: int = 0
    candidates: int = 48
    overrides: tuple[str, ...] = ()


def check_request(request: TuneRequest) -> None:
    """Budget and method checks (no file reading, no compute)."""
    if request.method not in METHODS:
        raise TuneError(f"unknown method {request.method!r}; choose among {list(METHODS)}")
    if request.budget is None and request.budget_s is None:
        raise TuneError("give a budget: --budget N (full-run equivalents) or --budget-s SECONDS")
    if request.budget is not None and not (math.isfinite(request.budget) and request.budget >= 1):
        raise TuneError(f"--budget {request.budget} is smaller than one run; give at least 1 (full-run equivalents)")
    if request.budget_s is not None and not (math.isfinite(request.budget_s) and request.budget_s > 0):
        raise TuneError(f"--budget-s must be a positive number of seconds, got {request.budget_s}")


def job_rows(config_path: str, overrides: Sequence[str] = ()):
    """The job's ``(run config, train rows, eval rows)``, checked to be a LoRA SFT job with prompt/response rows."""
    from metafit.data.instructions import make_instructions
    from metafit.data.sft_files import as_instructions, sft_file_split
    from metafit.experiments import load_run_config, validate_config

    cfg = validate_config(load_run_config(config_path, list(overrides)))
    if cfg.experiment != "lora_sft":
        raise TuneError(f"{config_path}: tune searches settings of lora_sft jobs (prompt -> response SFT, whose "
                        f"meta-features it knows), not {cfg.experiment!r}")
    args = cfg.args
    if args.data:
        train_chats, eval_chats = sft_file_split(args.data, args.n_eval, cfg.seed, prompt_field=args.prompt_field,
                                                 response_field=args.response_field)
        train, held_out = as_instructions(train_chats), as_instructions(eval_chats)
        if train is None or held_out is None:
            raise TuneError(f"{args.data}: the task has no meta-features: they are defined for rows that are one "
                            "user -> assistant exchange each (prompt/response), and some rows are longer chats")
    else:
        tasks = list(args.tasks) or None
        train = make_instructions(args.n_train, seed=cfg.seed, tasks=tasks)
        held_out = make_instructions(args.n_eval, seed=cfg.seed, tasks=tasks, offset=args.n_train)
    return cfg, train, held_out


def tune(request: TuneRequest, workdir: str | Path, *, meta_path: str | Path | None = None,
         space: SearchSpace = SearchSpace(), surrogate_steps: int = 300) -> dict[str, Any]:
    """Runs (or resumes) a tune into ``workdir``; returns the leaderboard (also written as results.json/.md)."""
    from metafit.hpo import metadataset
    from metafit.hpo.surrogate import Surrogate
    from metafit.hpo.trial import prepare_task

    check_request(request)
    cfg, train_rows, eval_rows = job_rows(request.config, request.overrides)
    meta = metadataset.load(meta_path or metadataset.PACKAGED, space)
    too_big = [b for b in space.batch_size if b > len(train_rows)]
    if too_big:
        raise TuneError(f"the job has {len(train_rows)} training rows, fewer than the space's batch sizes {too_big}; "
                        "add rows (args.n_train) or use a space with smaller batch sizes")
    workdir = Path(workdir)
    state = _load_state(workdir, request, cfg)
    task = prepare_task(cfg.args.model, train_rows, eval_rows, cfg.args.buckets)
    surrogate = Surrogate.fit(meta, steps=surrogate_steps, seed=request.seed)
    if request.budget_s is not None:
        cheapest = float(surrogate.predict_cost(task.meta_features, [space.default])[0]) / space.fidelities
        if request.budget_s < cheapest:
            raise TuneError(f"--budget-s {request.budget_s} is smaller than one trial's first fidelity "
                            f"(predicted {cheapest:.0f} s); give more seconds")
    candidates = _candidates(meta, space, request)
    planner = _Planner(request, space, surrogate, task.meta_features, candidates, meta)
    while True:
        action = state["pending"] or planner.next(state)
        if action is None or not _affordable(state, action, request, space, surrogate, task.meta_features):
            break
        state["pending"] = action
        _save_state(workdir, state)
        _run_action(workdir, state, action, task, space, cfg)
        state["pending"] = None
        _save_state(workdir, state)
    return write_leaderboard(workdir, state, space)


def _candidates(meta, space: SearchSpace, request: TuneRequest) -> list[dict]:
    """The meta-dataset's configs plus ``request.candidates`` fresh draws from the space (seeded)."""
    rng = np.random.default_rng([request.seed, 1])
    pool = {point_key(c): c for c in meta.configs}
    for _ in range(request.candidates):
        point = space.sample(rng)
        pool.setdefault(point_key(point), point)
    return list(pool.values())


class _Planner:
    """The next action of a method, a pure function of the history (so resume repeats it)."""

    def __init__(self, request, space, surrogate, features, candidates, meta):
        self.request, self.space, self.surrogate, self.features = request, space, surrogate, features
        self.candidates, self.meta = candidates, meta
        self._portfolio = None

    def next(self, state) -> dict | None:
        started = {point_key(t["config"]) for t in state["trials"]}
        last = self.space.fidelities - 1
        method = self.request.method
        if not state["trials"] and method in ("default", "bo", "random"):
            return _new(state, self.space.default, last if method != "bo" else 0)
        if method == "default":
            return None
        if method == "zero_shot":
            from metafit.hpo.acquisition import zero_shot_config

            return None if started else _new(state, zero_shot_config(self.meta.normalised()[:, :, -1],
                                                                      list(self.meta.configs)), last)
        if method == "random":
            rng = np.random.default_rng([self.request.seed, 2, len(state["trials"])])
            free = [c for c in self.candidates if point_key(c) not in started]
            return _new(state, free[int(rng.integers(len(free)))], last) if free else None
        if method == "transfer":
            from metafit.hpo.acquisition import portfolio

            if self._portfolio is None:
                self._portfolio = portfolio(self.surrogate, 16, self.candidates, self.features)
            free = [c for c in self._portfolio if point_key(c) not in started]
            return _new(state, free[0], last) if free else None
        from metafit.hpo.acquisition import suggest

        history = [{"config": t["config"], "curve": _curve(t, self.space), "status": t["status"]}
                   for t in state["trials"]]
        point, k = suggest(self.surrogate, history, self.candidates, self.features)
        for trial in state["trials"]:
            if point_key(trial["config"]) == point_key(point):
                return {"trial": trial["id"], "fidelity": int(k)}
        return _new(state, point, int(k))


def _new(state, point: dict, fidelity: int) -> dict:
    return {"trial": len(state["trials"]), "fidelity": int(fidelity), "config": point}


def _curve(trial: dict, space: SearchSpace) -> list[float]:
    return [trial["curve"].get(str(s), float("nan")) for s in space.fidelity_steps(trial["config"])]


def _affordable(state, action, request, space, surrogate, features) -> bool:
    trial = state["trials"][action["trial"]] if action["trial"] < len(state["trials"]) else None
    reached = trial["reached"] if trial else 0
    share = (action["fidelity"] + 1 - reached) / space.fidelities
    if request.budget is not None and state["spent_runs"] + share > request.budget + 1e-9:
        return False
    if request.budget_s is not None:
        config = trial["config"] if trial else action["config"]
        predicted = float(surrogate.predict_cost(features, [config])[0]) * share
        if state["spent_s"] + predicted > request.budget_s:
            return False
    return True


def _run_action(workdir: Path, state, action, task, space: SearchSpace, cfg) -> None:
    from metafit.config import dump_yaml, to_dict
    from metafit.hpo.trial import run_trial
    from metafit.runs import RunDir

    if action["trial"] == len(state["trials"]):
        state["trials"].append({"id": action["trial"], "config": action["config"], "reached": 0, "curve": {},
                                "seconds": 0.0, "status": "ok"})
    trial = state["trials"][action["trial"]]
    steps = space.fidelity_steps(trial["config"])
    stop_at = steps[action["fidelity"]]
    trial_config = dump_yaml({"job": to_dict(cfg), "point": trial["config"], "space": space.version})
    with RunDir.open(workdir / "trials" / f"{trial['id']:03d}", trial_config) as run:
        result = run_trial(task, space, trial["config"], seed=cfg.seed, workdir=run.checkpoint_dir("sft"),
                           stop_at=None if stop_at == steps[-1] else stop_at, log=run.metrics)
        # the run's own log holds every fidelity's eval, also those before a kill that this call resumed past
        trial["curve"].update(_logged_evals(run.path / "metrics.jsonl"))
        trial["curve"].update({str(k): v for k, v in result["curve"].items()})
        trial["seconds"] += result["seconds"]
        trial["status"] = result["status"]
        if result["status"] != "ok":
            trial["error"] = result["error"]
        share = (action["fidelity"] + 1 - trial["reached"]) / space.fidelities
        trial["reached"] = action["fidelity"] + 1
        run.write_results({"metrics": {"eval_loss": _best(trial), "fidelity": trial["reached"] / space.fidelities,
                                       "status": trial["status"]}}, title=f"tune trial {trial['id']}")
    state["spent_runs"] += share
    state["spent_s"] += result["seconds"]
    state["log"].append({"trial": trial["id"], "fidelity": trial["reached"], "spent_runs": state["spent_runs"],
                         "spent_s": state["spent_s"], "incumbent": _incumbent(state)})


def _logged_evals(path: Path) -> dict[str, float]:
    """``{step: eval_loss}`` from a trial's ``metrics.jsonl``."""
    if not path.exists():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {str(r["step"]): float(r["eval_loss"]) for r in records if r.get("split") == "eval" and "eval_loss" in r}


def _best(trial) -> float:
    values = [v for v in trial["curve"].values() if math.isfinite(v)]
    return min(values) if values and trial["status"] == "ok" else float("nan")


def _incumbent(state) -> float:
    values = [_best(t) for t in state["trials"]]
    values = [v for v in values if math.isfinite(v)]
    return min(values) if values else float("nan")


def _load_state(workdir: Path, request: TuneRequest, cfg) -> dict:
    from metafit.config import dump_yaml, to_dict

    identity = {"job": dump_yaml(to_dict(cfg)), "method": request.method, "seed": request.seed,
                "candidates": request.candidates}
    path = workdir / STATE
    if path.exists():
        state = json.loads(path.read_text())
        if state["identity"] != identity:
            raise TuneError(f"{workdir} holds a tune of another job, method or seed (see {path}); use another "
                            "--workdir")
        state["budget"], state["budget_s"] = request.budget, request.budget_s  # a resumed tune may get more budget
        return state
    workdir.mkdir(parents=True, exist_ok=True)
    return {"identity": identity, "budget": request.budget, "budget_s": request.budget_s, "trials": [],
            "pending": None, "spent_runs": 0.0, "spent_s": 0.0, "log": []}


def _save_state(workdir: Path, state: dict) -> None:
    tmp = workdir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(workdir / STATE)


def write_leaderboard(workdir: Path, state: dict, space: SearchSpace) -> dict[str, Any]:
    """``results.json`` / ``results.md`` (trials ranked by best held-out loss) and ``regret_vs_cost.png``."""
    from metafit.runs import plot_curves, results_markdown, validate_results

    ranked = sorted(state["trials"], key=lambda t: (not math.isfinite(_best(t)), _best(t)))
    methods = {}
    for place, trial in enumerate(ranked, 1):
        methods[f"{place}. trial {trial['id']:03d}"] = {
            "eval_loss": _best(trial), "fidelity": trial["reached"] / space.fidelities, "seconds": trial["seconds"],
            "status": trial["status"], "lr": trial["config"]["lr"], "peft": trial["config"]["peft"],
            "rank": trial["config"]["rank"], "steps": trial["config"]["steps"]}
    best = _incumbent(state)
    results = {"methods": methods, "metrics": {"best_eval_loss": best, "spent_runs": state["spent_runs"],
                                                "spent_s": state["spent_s"], "trials": len(state["trials"])},
               "trials": state["trials"]}
    validate_results(results)
    title = f"tune {state['identity']['method']} (seed {state['identity']['seed']})"
    (workdir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    (workdir / "results.md").write_text(results_markdown(results, title))
    if state["log"]:
        cost = [e["spent_s"] for e in state["log"]]
        regret = [e["incumbent"] - best for e in state["log"]]
        plot_curves(workdir / "regret_vs_cost.png", {"incumbent - best found": (cost, regret)},
                    xlabel="trial seconds spent", ylabel="held-out loss regret (vs best found)",
                    title="metafit tune")
    return results
