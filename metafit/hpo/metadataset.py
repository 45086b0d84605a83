"""The meta-dataset: learning curves and costs of real fine-tuning runs over a search space, on many tasks.

Generation (:func:`generate`) trains the same list of configurations (the space's default first,
then points drawn from ``seed``) on every task of the suite, configuration-major so a partial
meta-dataset covers every task. Each finished run is one JSON file under ``out_dir``; a restart
skips the runs already there, so generation spans several sittings. :func:`pack` joins the files
into the versioned file shipped in ``metafit/hpo/data/``; :func:`load` refuses a file whose space
version is not the space's.

Per run: ``curve[k]`` = held-out response-token loss after ``(k + 1) / F`` of the steps, and
``cost`` = wall seconds of the whole run (compilation included: what a user pays).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from metafit.hpo.space import SearchSpace, space_from_dict
from metafit.hpo.tasks import META_FEATURES, SUITE, TaskSpec, check_meta_features, task_rows

PACKAGED = Path(__file__).parent / "data" / "small_lm_v1.json"
GENERATE_COMMAND = "python -m metafit.hpo.make_metadataset --out runs/hpo_metadataset_v2 --configs 30 && " \
                   "python -m metafit.hpo.make_metadataset --pack runs/hpo_metadataset_v2 --configs 30"


class MetaDatasetError(ValueError):
    """A meta-dataset that cannot serve this request (another space version, missing tasks, ...)."""


@dataclasses.dataclass(frozen=True)
class MetaDataset:
    """Tabular meta-data: ``loss[t, c, k]`` of config ``c`` on task ``t`` at fidelity ``k`` (NaN = failed/missing).

    Attributes:
      space: the search space the configs come from.
      tasks: task names; ``features[t]`` their meta-features (:data:`META_FEATURES` order).
      configs: the configurations (dicts), shared by every task.
      loss: ``[T, C, F]`` held-out losses.
      cost: ``[T, C]`` wall seconds of a full run.
      command: how the file was generated.
    """

    space: SearchSpace
    tasks: tuple[str, ...]
    features: np.ndarray
    configs: tuple[dict, ...]
    loss: np.ndarray
    cost: np.ndarray
    command: str = ""

    @property
    def complete(self) -> np.ndarray:
        """``[T, C]`` True where the run finished with a finite curve."""
        return np.isfinite(self.loss).all(-1)

    def normalised(self) -> np.ndarray:
        """``[T, C, F]`` losses scaled per task by its best loss anywhere and its worst final loss.

        ``(loss - min_{c,k} loss[t, c, k]) / (max_c loss[t, c, F-1] - min_{c,k} ...)``; failed runs count as
        the worst (1), so a method that picks them is charged for it.
        """
        lo, hi = np.nanmin(self.loss, (1, 2)), np.nanmax(self.loss[:, :, -1], 1)
        scaled = (self.loss - lo[:, None, None]) / np.maximum(hi - lo, 1e-12)[:, None, None]
        return np.where(np.isfinite(scaled), scaled, 1.0)

    def drop_tasks(self, keep: Sequence[int]) -> "MetaDataset":
        keep = list(keep)
        return dataclasses.replace(self, tasks=tuple(self.tasks[i] for i in keep), features=self.features[keep],
                                   loss=self.loss[keep], cost=self.cost[keep])


def config_list(space: SearchSpace, n: int, seed: int = 0) -> list[dict]:
    """The default configuration, then ``n - 1`` points drawn from ``seed`` (the same on every task)."""
    rng = np.random.default_rng(seed)
    return [dict(space.default)] + [space.sample(rng) for _ in range(n - 1)]


def generate(out_dir: str | Path, *, space: SearchSpace = SearchSpace(), tasks: Sequence[TaskSpec] = SUITE,
             n_configs: int = 24, model: str = "metafit-small-lm", seed: int = 0,
             budget_s: float | None = None) -> int:
    """Runs the missing (task, config) runs into ``out_dir`` (one JSON each); returns how many ran."""
    from metafit.hpo.trial import prepare_task, run_trial

    out = Path(out_dir)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    configs = config_list(space, n_configs, seed)
    _write_json(out / "space.json", {"space": _space_dict(space), "configs": configs, "model": model})
    started, ran, prepared = time.perf_counter(), 0, {}
    for c, point in enumerate(configs):
        for spec in tasks:
            path = out / spec.name / f"{c:04d}.json"
            if path.exists():
                continue
            if budget_s is not None and time.perf_counter() - started > budget_s:
                return ran
            if spec.name not in prepared:
                prepared[spec.name] = prepare_task(model, *task_rows(spec, seed))
                _write_json(out / "tasks" / f"{spec.name}.json", prepared[spec.name].meta_features)
            result = run_trial(prepared[spec.name], space, point, seed=seed)
            path.parent.mkdir(exist_ok=True)
            _write_json(path, {"task": spec.name, "config": c, **result})
            ran += 1
            print(f"[{time.strftime('%H:%M:%S')}] {spec.name} config {c}: {result['status']} "
                  f"{[round(v, 3) for v in result['curve'].values()]} {result['seconds']:.1f}s", flush=True)
    return ran


def pack(out_dir: str | Path, path: str | Path = PACKAGED, command: str = GENERATE_COMMAND,
         max_configs: int | None = None) -> dict:
    """Joins the run files of ``out_dir`` into one meta-dataset file.

    Only the leading configs finished on every task are packed (at most ``max_configs``), so a pack of a
    generation still running is the same file whenever it is made once those configs are done.
    """
    out = Path(out_dir)
    head = json.loads((out / "space.json").read_text())
    tasks = sorted(p.stem for p in (out / "tasks").glob("*.json"))
    suite = [t.name for t in SUITE]
    order = sorted(tasks, key=lambda t: (suite.index(t) if t in suite else len(suite), t))
    runs = {t: {int(p.stem): json.loads(p.read_text()) for p in (out / t).glob("*.json")} for t in order}
    limit = len(head["configs"]) if max_configs is None else min(max_configs, len(head["configs"]))
    n = _leading_finished(runs, limit)
    fidelities = head["space"]["fidelities"]
    data = {
        "space_version": head["space"]["version"], "space": head["space"], "model": head["model"], "command": command,
        "meta_features": list(META_FEATURES),
        "tasks": {t: json.loads((out / "tasks" / f"{t}.json").read_text()) for t in order},
        "configs": head["configs"][:n],
        "runs": [{"task": t, "config": c, "status": runs[t][c]["status"], "cost": round(runs[t][c]["seconds"], 3),
                  "curve": [round(runs[t][c]["curve"].get(str(s), float("nan")), 5)
                            for s in SearchSpace.fidelity_steps(_space(head), head["configs"][c])]
                  if runs[t][c]["status"] == "ok" else [None] * fidelities}
                 for t in order for c in range(n)],
    }
    Path(path).write_text(json.dumps(data, allow_nan=False, default=_null_nan) + "\n")
    return data


def _leading_finished(runs: dict[str, dict[int, Any]], limit: int) -> int:
    """How many configs ``0, 1, ...`` (at most ``limit``) have a run file on every task.

    Counted from 0, so a config missing anywhere (not yet run, or deleted to rerun) ends the pack
    rather than leaving a hole, and run files past ``limit`` (an earlier, longer generation's) are ignored.
    """
    n = 0
    while runs and n < limit and all(n in done for done in runs.values()):
        n += 1
    return n


def load(path: str | Path = PACKAGED, space: SearchSpace | None = None) -> MetaDataset:
    """Reads a meta-dataset file.

    Raises:
      MetaDatasetError: its space version differs from ``space.version`` (the configs would mean other things).
    """
    data = json.loads(Path(path).read_text())
    file_space = space_from_dict(data["space"])
    if space is not None and data["space_version"] != space.version:
        raise MetaDatasetError(f"{path} was generated over search space {data['space_version']!r}, not "
                               f"{space.version!r}; regenerate it over this space ({data['command']}) or use "
                               "the space it was made with")
    tasks = tuple(data["tasks"])
    features = np.stack([check_meta_features(data["tasks"][t], f"meta-dataset task {t}") for t in tasks])
    index = {t: i for i, t in enumerate(tasks)}
    n_configs, fidelities = len(data["configs"]), file_space.fidelities
    loss = np.full((len(tasks), n_configs, fidelities), np.nan)
    cost = np.full((len(tasks), n_configs), np.nan)
    for run in data["runs"]:
        t, c = index[run["task"]], run["config"]
        loss[t, c] = [np.nan if v is None else v for v in run["curve"]]
        cost[t, c] = run["cost"]
    return MetaDataset(space or file_space, tasks, features, tuple(data["configs"]), loss, cost, data["command"])


def _space(head: dict) -> SearchSpace:
    return space_from_dict(head["space"])


def _space_dict(space: SearchSpace) -> dict:
    from metafit.config import to_dict

    return to_dict(space)


def _null_nan(value: Any) -> Any:
    return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _persistent_compilation_cache(path: Path) -> None:
    """Runs of one config on tasks of the same sequence bucket compile the same program: compile it once."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m metafit.hpo.make_metadataset", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="run files folder (generation resumes there)")
    parser.add_argument("--configs", type=int, default=30, help="configurations to run (with --pack: to pack at most)")
    parser.add_argument("--budget-s", type=float, default=None)
    parser.add_argument("--pack", type=Path, help="join the run files of this folder into the packaged file")
    args = parser.parse_args(argv)
    if args.pack:
        data = pack(args.pack, max_configs=args.configs)
        print(f"packed {len(data['runs'])} runs ({len(data['tasks'])} tasks x {len(data['configs'])} configs) -> {PACKAGED}")
        return 0
    _persistent_compilation_cache(args.out / "jax_cache")
    generate(args.out, n_configs=args.configs, budget_s=args.budget_s)
    return 0

