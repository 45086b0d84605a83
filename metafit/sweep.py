"""Sweeps: a grid of experiment configs x seeds -> run folders -> one results store -> tables.

A **grid** is YAML (the papers' grids live in the top-level ``experiments/`` folder; paths in
a grid are relative to the folder that holds ``experiments/``)::

    paper: amfs
    builder: paper_repro/amfs/make_table.py   # defines collect(run_dir, results) and build(records, scale, variables)
    results: paper_repro/amfs/results/{scale} # the committed results store (sweep.json) and the built tables
    default_scale: cpu
    scales:                                   # variables of each scale
      cpu: {seeds: [0, 1, 2], steps: 2000}
      gpu: {seeds: [0, 1, 2], steps: 70000, device: gpu}   # device gpu/tpu: never run where JAX lacks one
    blocks:
      - name: "sinusoid_k{shots}_{learner}_s{seed}"
        config: "configs/meta/sinusoid_{learner}.yaml"
        seeds: $seeds                         # `$name` takes a scale variable as it is (a list here)
        axes: {learner: [maml, amfs], shots: [10, 5]}
        overrides: ["seed={seed}", "train.steps={steps}", "args.shots={shots}"]
        tags: {group: "sinusoid_k{shots}"}    # copied into each job's record for the table builder
        priority: 0                           # lower runs first (then lower seed); axis mappings may add theirs
        scales: [cpu]                         # only at these scales (default: all)
        env: {JAX_PLATFORMS: cpu}             # for subprocess jobs
      - name: "finetune_{learner}_s{seed}"     # a job that reads another job's run folder
        config: configs/meta/finetune.yaml
        seeds: $seeds
        axes: {learner: [maml, amfs]}
        after: ["sinusoid_k5_{learner}_s{seed}"]            # runs once these jobs are done
        overrides: ["args.init_run={runs}/sinusoid_k5_{learner}_s{seed}"]   # {runs}: the sweep's run folders

Each block expands to ``seeds x product(axes)`` jobs; an axis value that is a mapping
(``{setting: 5w1s, ways: 5}``) sets several variables at once. Strings are ``str.format``
templates over the scale's variables, the axis values and ``seed``; an overrides entry
``$name`` splices a list-valued variable in. ``{runs}`` stays a placeholder in the grid's jobs and
store (so committed records do not hold one machine's paths) and becomes the absolute run-folder
root when a job runs. ``after`` names jobs (templates too) that must be done first: jobs run in
waves of satisfied dependencies; a job whose dependency failed is recorded as failed (naming it),
one whose dependency was not started is not started either, and a dependency that the store holds
as done but whose run folder is missing here (a fresh clone) is run again, since its folder is an input.

A **job** is one ``metafit run CONFIG --set ...`` into ``RUNS/<job name>/``. The runner
(:func:`run_sweep`) skips jobs the store already holds as done, collects jobs whose run folder
already has ``results.json`` without running them again, and runs the rest in priority order
until the time budget is spent:

* ``inprocess``: one after another in this interpreter (no start-up cost per job);
* ``subprocess``: one ``python -m metafit.cli run`` per job, ``jobs`` at a time (isolated);
* ``ray``: the same subprocess per job as Ray tasks (``ray.init(address=...)``; a local
  cluster when no address is given); run folders must be on a filesystem every node sees;
* ``slurm``: one Slurm job per sweep job through ``submitit`` (``slurm:`` section of the grid
  or ``slurm_options``: submitit's parameters such as ``slurm_partition``, ``timeout_min``,
  ``gpus_per_node``; ``cluster: local`` runs the same path without Slurm).

Ray and submitit are the optional extra ``pip install metafit[cluster]``.

The **store** ``<results>/sweep.json`` holds one record per job::

    {"status": "done", "seconds": 41.2, "tags": {..., "seed": 0}, "config": ..., "overrides": [...],
     "data": <the builder's collect(run_dir, results)>}
    {"status": "failed", ..., "error": "ValueError: ..."}

It is committed with the tables, so a fresh clone rebuilds every table without runs: where a store
exists and this machine holds no run folder of the grid, a sweep only rebuilds the tables and names the
jobs without a result (``run_missing=True``, ``metafit repro ... --run-missing``, runs them). A job
that failed stays a failure (its error in the store and the table) until it succeeds; a done
record is never replaced by a failure; jobs never started (budget spent) are simply absent.
Files are written only when their bytes change, and never from fewer done results than the
committed store holds (a shrunk grid or a lost store is refused, :class:`SweepError`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from metafit.config import ConfigError, load_yaml
from metafit.registry import did_you_mean

STORE = "sweep.json"
EXECUTORS = ("inprocess", "subprocess", "ray", "slurm")
_GRID_KEYS = {"paper", "builder", "results", "default_scale", "scales", "blocks", "slurm", "description"}
_BLOCK_KEYS = {"name", "config", "seeds", "axes", "overrides", "tags", "priority", "env", "scales", "after"}
RUNS_PLACEHOLDER = "{runs}"


class SweepError(RuntimeError):
    """A sweep cannot go on without losing results (fewer results than committed, no store, ...)."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of a grid: ``metafit run config --set overrides...`` into ``RUNS/name``."""

    name: str
    config: str
    overrides: tuple[str, ...]
    seed: int
    tags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    priority: int = 0
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    after: tuple[str, ...] = ()  # jobs that must be done before this one runs

    def in_runs(self, runs: Path) -> "Job":
        """This job with ``{runs}`` in its overrides replaced by the absolute run-folder root."""
        root = str(Path(runs).resolve())
        return dataclasses.replace(self, overrides=tuple(o.replace(RUNS_PLACEHOLDER, root) for o in self.overrides))


@dataclasses.dataclass(frozen=True)
class Grid:
    """A parsed grid file (see the module docstring)."""

    path: Path
    root: Path
    paper: str
    builder: str
    results: str
    default_scale: str
    scales: Mapping[str, Mapping[str, Any]]
    blocks: tuple[Mapping[str, Any], ...]
    slurm: Mapping[str, Any]

    def variables(self, scale: str) -> dict[str, Any]:
        if scale not in self.scales:
            raise ConfigError(f"{self.path}: no scale '{scale}'; the scales are {sorted(self.scales)}."
                              f"{did_you_mean(scale, list(self.scales))}")
        return dict(self.scales[scale])

    def jobs(self, scale: str) -> list[Job]:
        """The grid's jobs at ``scale``, in run order: priority, then seed, then as listed."""
        variables = self.variables(scale)
        blocks = [b for b in self.blocks if scale in b.get("scales", [scale])]
        jobs = [job for block in blocks for job in _expand(block, variables, self.path)]
        names = [job.name for job in jobs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{self.path}: job names repeat at scale '{scale}' ({', '.join(duplicates[:5])}); "
                              "put every axis into the block's `name` template")
        jobs = sorted(jobs, key=lambda job: (job.priority, job.seed))
        _check_after(jobs, self.path)
        _waves(jobs, self.path)  # there is no cycle
        return jobs

    def results_dir(self, scale: str) -> Path:
        return self.root / _fill(self.results, {**self.variables(scale), "scale": scale}, self.path)

    def load_builder(self):
        """The paper's table builder module (``collect`` and ``build``), imported from its file."""
        return load_builder(self.root / self.builder)


def load_grid(path: str | Path, root: str | Path | None = None) -> Grid:
    """Reads a grid YAML; ``root`` defaults to the folder above ``experiments/`` (else the grid's folder)."""
    path = Path(path)
    raw = load_yaml(path)
    unknown = sorted(set(raw) - _GRID_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; a grid has {sorted(_GRID_KEYS)}."
                          f"{did_you_mean(unknown[0], sorted(_GRID_KEYS))}")
    for key in ("paper", "builder", "results", "scales", "blocks"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key '{key}' (see metafit.sweep for the grid format)")
    if not isinstance(raw["scales"], Mapping) or not raw["scales"]:
        raise ConfigError(f"{path}: `scales` must map each scale name to its variables")
    for index, block in enumerate(raw["blocks"]):
        bad = sorted(set(block) - _BLOCK_KEYS)
        if bad:
            raise ConfigError(f"{path}: blocks[{index}] has unknown key '{bad[0]}'; a block has {sorted(_BLOCK_KEYS)}."
                              f"{did_you_mean(bad[0], sorted(_BLOCK_KEYS))}")
        for key in ("name", "config"):
            if key not in block:
                raise ConfigError(f"{path}: blocks[{index}] needs `{key}`")
    if root is None:
        root = path.resolve().parent.parent if path.resolve().parent.name == "experiments" else path.resolve().parent
    default = raw.get("default_scale", next(iter(raw["scales"])))
    return Grid(path, Path(root), str(raw["paper"]), str(raw["builder"]), str(raw["results"]), str(default),
                raw["scales"], tuple(raw["blocks"]), raw.get("slurm") or {})


def find_grid(paper: str, root: str | Path = ".") -> Path:
    """``experiments/<paper>.yaml`` under ``root`` (or ``paper`` itself if it is a YAML file)."""
    if paper.endswith((".yaml", ".yml")):
        return Path(paper)
    folder = Path(root) / "experiments"
    path = folder / f"{paper}.yaml"
    if path.is_file():
        return path
    known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    if not known:
        raise ConfigError(f"no experiments/ folder in {Path(root).resolve()}: run `metafit repro` from the "
                          "metafit repository root (where experiments/ and paper_repro/ are)")
    raise ConfigError(f"no grid for paper '{paper}'; the papers are {known}.{did_you_mean(paper, known)}")


def load_builder(path: Path):
    if not path.is_file():
        raise ConfigError(f"table builder not found: {path}")
    spec = importlib.util.spec_from_file_location(f"metafit_builder_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("collect", "build"):
        if not callable(getattr(module, name, None)):
            raise ConfigError(f"{path} must define {name}() (see metafit.sweep)")
    return module


# ----------------------------------------------------------------------------- grid expansion


def _expand(block: Mapping[str, Any], variables: Mapping[str, Any], path: Path) -> list[Job]:
    seeds = _resolve(block.get("seeds", [0]), variables, path)
    axes = {name: _resolve(values, variables, path) for name, values in (block.get("axes") or {}).items()}
    jobs = []
    for seed in seeds:
        for combo in itertools.product(*axes.values()):
            scope, priority = {**variables, "seed": seed, "runs": RUNS_PLACEHOLDER}, int(block.get("priority", 0))
            for axis, value in zip(axes, combo):
                if isinstance(value, Mapping):
                    scope.update(value)
                    priority += int(value.get("priority", 0))
                else:
                    scope[axis] = value
            overrides: list[str] = []
            for entry in block.get("overrides", []):
                spliced = _resolve(entry, scope, path)
                overrides += [str(o) for o in spliced] if isinstance(spliced, list) else [_fill(entry, scope, path)]
            jobs.append(Job(
                name=_fill(block["name"], scope, path), config=_fill(block["config"], scope, path),
                overrides=tuple(overrides), seed=int(seed),
                tags={k: _fill(v, scope, path) for k, v in (block.get("tags") or {}).items()},
                priority=priority, env={k: _fill(v, scope, path) for k, v in (block.get("env") or {}).items()},
                after=tuple(_fill(name, scope, path) for name in block.get("after") or ()),
            ))
    return jobs


def _waves(jobs: Sequence[Job], path: Path | str = "grid") -> list[list[Job]]:
    """``jobs`` in waves: each job comes after every job of ``jobs`` it names in ``after`` (order kept within a wave).

    Names in ``after`` that are not in ``jobs`` are checked by the caller against the store, except when
    ``jobs`` is the whole grid, where an unknown name is an error.
    """
    names = {job.name for job in jobs}
    placed: set[str] = set()
    remaining, waves = list(jobs), []
    while remaining:
        wave = [job for job in remaining if all(d in placed or d not in names for d in job.after)]
        if not wave:
            cycle = ", ".join(f"{job.name} (after {', '.join(job.after)})" for job in remaining[:4])
            raise ConfigError(f"{path}: the `after` dependencies form a cycle: {cycle}")
        waves.append(wave)
        placed |= {job.name for job in wave}
        remaining = [job for job in remaining if job.name not in placed]
    return waves


def _check_after(jobs: Sequence[Job], path: Path | str) -> None:
    names = {job.name for job in jobs}
    for job in jobs:
        for name in job.after:
            if name not in names:
                raise ConfigError(f"{path}: job '{job.name}' runs after '{name}', which is no job of this scale."
                                  f"{did_you_mean(name, sorted(names))}")


def _resolve(value: Any, scope: Mapping[str, Any], path: Path) -> Any:
    """``$name`` -> the variable itself; anything else unchanged."""
    if isinstance(value, str) and value.startswith("$"):
        if value[1:] not in scope:
            raise ConfigError(f"{path}: {value} names no variable; this scale has {sorted(scope)}")
        return scope[value[1:]]
    return value


def _fill(template: Any, scope: Mapping[str, Any], path: Path) -> str:
    try:
        return str(template).format(**scope)
    except KeyError as err:
        raise ConfigError(f"{path}: '{template}' uses {{{err.args[0]}}}, which is neither a scale variable nor "
                          f"an axis; known: {sorted(scope)}") from None


# ----------------------------------------------------------------------------- store


def load_store(results_dir: Path) -> dict[str, Any]:
    """The committed store of a results folder (empty if there is none)."""
    path = Path(results_dir) / STORE
    if not path.is_file():
        return {"jobs": {}}
    store = json.loads(path.read_text())
    if not isinstance(store, Mapping) or not isinstance(store.get("jobs"), Mapping):
        raise SweepError(f"{path} is not a sweep store (a JSON object with `jobs`); restore it from git")
    return store


def done_count(records: Mapping[str, Mapping[str, Any]]) -> int:
    return sum(record.get("status") == "done" for record in records.values())


def failed_errors(records: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{job name: error}`` of the failed jobs."""
    return {name: r.get("error", "") for name, r in records.items() if r.get("status") == "failed"}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=_plain) + "\n"


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def write_if_changed(path: Path, content: str | bytes) -> bool:
    """Writes ``content`` atomically unless the file already holds exactly these bytes; True if written."""
    data = content.encode() if isinstance(content, str) else content
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


# ----------------------------------------------------------------------------- running jobs


def run_job_inprocess(job: Job, root: Path, run_dir: Path) -> str | None:
    """Runs one job in this interpreter; returns None on success, else the error text."""
    from metafit.experiments import run_experiment

    try:
        run_experiment(root / job.config, list(job.overrides), workdir=run_dir, force_new=True)
    except Exception as err:  # a failed job is recorded with its error; the sweep goes on
        return f"{type(err).__name__}: {err}"[:2000]
    return None


def run_job_subprocess(job: Job, root: Path, run_dir: Path, log_path: Path, cache_dir: Path | None = None) -> str | None:
    """Runs one job as ``python -m metafit.cli run``; returns None on success, else the log's last lines."""
    env = {**os.environ, **job.env}
    if cache_dir is not None:  # seeds of one cell compile identical programs: compile once
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir))
    command = [sys.executable, "-m", "metafit.cli", "run", str(root / job.config), "--workdir", str(run_dir),
               "--force-new", *[arg for o in job.overrides for arg in ("--set", o)]]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        code = subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code == 0:
        return None
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return f"exit code {code}: " + " | ".join(lines[-3:])[:2000] + f" (log: {log_path})"


@dataclasses.dataclass
class SweepReport:
    """What a sweep did: job names by outcome, and the files it wrote."""

    done: list[str] = dataclasses.field(default_factory=list)       # ran (or collected) now
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)    # already done in the store
    not_started: list[str] = dataclasses.field(default_factory=list)  # budget spent
    left_missing: list[str] = dataclasses.field(default_factory=list)  # no done result; not run (fresh clone)
    ran: bool = False  # False: the tables were only rebuilt (table_only, or a fresh clone)
    written: list[str] = dataclasses.field(default_factory=list)
    tables: dict[str, str] = dataclasses.field(default_factory=dict)  # built Markdown files by name
    results_done: int = 0    # finished jobs of the grid the tables were built from
    results_failed: int = 0  # failed jobs shown as failed


def run_sweep(
    grid: Grid | str | Path,
    scale: str | None = None,
    *,
    jobs: int = 1,
    executor: str | None = None,
    budget_s: float | None = None,
    only: Sequence[str] = (),
    table_only: bool = False,
    runs_dir: str | Path | None = None,
    ray_address: str | None = None,
    slurm_options: Mapping[str, Any] | None = None,
    run_missing: bool = False,
    log: Callable[[str], None] = print,
) -> SweepReport:
    """Runs a grid's missing jobs, updates its store, and rebuilds its tables.

    Args:
      grid: a :class:`Grid` or the path of a grid YAML.
      scale: a scale of the grid (default: the grid's ``default_scale``).
      jobs: jobs run at once (``subprocess`` and ``ray``).
      executor: ``inprocess`` (default for ``jobs=1``), ``subprocess`` (default otherwise), ``ray``, ``slurm``.
      budget_s: start no job after this many seconds (jobs not started stay absent: "not run").
      only: job-name glob patterns to run (the table still uses every stored result).
      table_only: run nothing; rebuild the tables from the store (a missing store is an error).
      runs_dir: run folders (default ``<root>/runs/repro/<paper>/<scale>``).
      run_missing: run the jobs without a result even where committed results exist and this machine
        holds no run folder of the grid (a fresh clone). Without it, such a sweep only rebuilds the tables
        from the committed results: a clone must not start hours of compute (or a GPU grid on a CPU)
        just to show a table. ``only`` patterns also count as asking to run.

    Returns:
      A :class:`SweepReport`.

    Raises:
      SweepError: the tables would be built from fewer done jobs than the committed store holds,
        ``table_only`` without a store, or jobs to run at a scale whose ``device`` (gpu, tpu) this
        machine's JAX does not have.
    """
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    scale = scale or grid.default_scale
    executor = executor or ("inprocess" if jobs <= 1 else "subprocess")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor '{executor}'; choose one of {EXECUTORS}.{did_you_mean(executor, list(EXECUTORS))}")
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    all_jobs = grid.jobs(scale)  # validates the scale and every template before anything runs
    builder = grid.load_builder()
    out = grid.results_dir(scale)
    committed = load_store(out)
    if table_only and not (out / STORE).is_file():
        raise SweepError(f"no results for '{grid.paper}' at scale '{scale}' ({out / STORE} does not exist): "
                         f"run `metafit repro {grid.paper} --scale {scale}` first")
    records = dict(committed["jobs"])
    report = SweepReport()
    runs = Path(runs_dir) if runs_dir else grid.root / "runs" / "repro" / grid.paper / scale
    if not table_only and _fresh_clone(records, runs) and not (run_missing or only):
        table_only = True
        report.left_missing = [job.name for job in all_jobs if records.get(job.name, {}).get("status") != "done"]
        log(f"{grid.paper} ({scale}): committed results of {done_count(records)} jobs and no run folders here "
            f"({runs}): rebuilding the tables only"
            + (f"; {len(report.left_missing)} jobs have no result, `metafit repro {grid.paper} --scale {scale} "
               f"--run-missing` runs them" if report.left_missing else ""))
    if not table_only:
        report.ran = True
        todo = []
        for job in all_jobs:
            if records.get(job.name, {}).get("status") == "done":
                report.skipped.append(job.name)
            elif not only or any(fnmatch.fnmatch(job.name, p) for p in only):
                todo.append(job)
        todo = _with_missing_inputs(todo, all_jobs, grid.root, runs, report, log)
        if todo:
            _check_device(grid, scale)
        log(f"{grid.paper} ({scale}): {len(all_jobs)} jobs, {len(report.skipped)} already done, "
            f"{len(todo)} to run -> {runs}")

        lock = threading.Lock()  # subprocess/ray jobs finish on several threads; one store writer at a time

        def record(job: Job, error: str | None, seconds: float) -> None:
            with lock:
                _record(job, error, seconds)

        def _record(job: Job, error: str | None, seconds: float) -> None:
            run_dir = runs / job.name
            entry: dict[str, Any] = {"status": "done", "seconds": round(seconds, 1), "tags": {**job.tags, "seed": job.seed},
                                     "config": job.config, "overrides": list(job.overrides)}
            if error is None:
                try:
                    results = json.loads((run_dir / "results.json").read_text())
                    entry["data"] = builder.collect(run_dir, results)
                except Exception as err:  # a run whose results the builder cannot read is a failure too
                    error = f"collecting {run_dir}: {type(err).__name__}: {err}\n{traceback.format_exc(limit=2)}"
            if error is not None:
                entry = {**entry, "status": "failed", "error": error}
                report.failed[job.name] = error
                log(f"  {job.name}: FAILED ({error.splitlines()[0][:300]})")
                if records.get(job.name, {}).get("status") == "done":  # an input run again: keep its result
                    return
            else:
                report.done.append(job.name)
                log(f"  {job.name}: done in {seconds:.0f}s")
            records[job.name] = entry
            _save_store(out, grid, scale, records, all_jobs)

        _execute(todo, grid, runs, record, jobs=jobs, executor=executor, budget_s=budget_s, report=report,
                 ray_address=ray_address, slurm_options={**grid.slurm, **(slurm_options or {})}, log=log,
                 status=lambda name: records.get(name, {}).get("status"))
    _build(grid, scale, builder, records, committed, all_jobs, out, report)
    return report


def _fresh_clone(records: Mapping[str, Any], runs: Path) -> bool:
    """Committed results and no run folder of this grid here: what a clone of the repository looks like."""
    return bool(records) and not runs.is_dir()


def _check_device(grid: Grid, scale: str) -> None:
    """Refuses to run a scale meant for an accelerator (its ``device`` variable) where JAX has none."""
    wanted = str(grid.variables(scale).get("device", "")).lower()
    if wanted not in ("gpu", "tpu"):
        return
    import jax

    have = jax.default_backend()
    if have != wanted and not (wanted == "gpu" and have in ("cuda", "rocm")):
        raise SweepError(f"scale '{scale}' of '{grid.paper}' runs on a {wanted} and this machine's JAX backend is "
                         f"'{have}': run it where a {wanted} is, or choose another scale "
                         f"({', '.join(s for s in grid.scales if s != scale)}); `--table-only` rebuilds its tables")


def _with_missing_inputs(todo: list[Job], all_jobs: list[Job], root: Path, runs: Path, report: SweepReport,
                         log) -> list[Job]:
    """``todo`` plus the done jobs whose run folders a job of ``todo`` reads but this machine lacks (in grid order)."""
    by_name = {job.name: job for job in all_jobs}
    wanted = {job.name for job in todo}
    stack = [name for job in todo if job.after and not _finished_as_configured(job.in_runs(runs), root, runs / job.name)
             for name in job.after]
    while stack:
        name = stack.pop()
        if name in wanted or (runs / name / "results.json").is_file():
            continue
        if name in report.skipped:  # done in the store, but its run folder (an input) is not here
            log(f"  {name}: run again, its run folder is an input of a job to run and is missing from {runs}")
            report.skipped.remove(name)
        wanted.add(name)
        stack += list(by_name[name].after)
    return [job for job in all_jobs if job.name in wanted]


def _execute(todo: list[Job], grid: Grid, runs: Path, record, *, jobs: int, executor: str, budget_s: float | None,
             report: SweepReport, ray_address: str | None, slurm_options: Mapping[str, Any], log,
             status: Callable[[str], str | None] = lambda name: None) -> None:
    start = time.monotonic()
    deadline = start + budget_s if budget_s is not None else float("inf")
    finished = [job for job in todo if _finished_as_configured(job.in_runs(runs), grid.root, runs / job.name)]
    for job in finished:  # run before, not collected (interrupted sweep): collect without rerunning
        record(job, None, 0.0)
    todo = [job for job in todo if job not in finished]
    cache = runs / "jax_cache"

    def started(job: Job) -> bool:
        if time.monotonic() > deadline:
            report.not_started.append(job.name)
            return False
        return True

    for wave in _waves(todo):
        runnable = []
        for job in wave:
            blocked = _blocked_by(job, status, report)
            if blocked is None:
                runnable.append(job)
            elif blocked[1] == "failed":
                record(job, f"needs {blocked[0]}, which failed (see its record)", 0.0)
            else:
                report.not_started.append(job.name)
                log(f"  {job.name}: not started, it needs {blocked[0]} ({blocked[1]})")
        _execute_wave(runnable, grid, runs, record, jobs=jobs, executor=executor, started=started, cache=cache,
                      ray_address=ray_address, slurm_options=slurm_options, log=log)


def _blocked_by(job: Job, status: Callable[[str], str | None], report: SweepReport) -> tuple[str, str] | None:
    """The first dependency of ``job`` that is not done, with why (``failed``, ``not started``, ``not run``)."""
    for name in job.after:
        if name in report.not_started:
            return name, "not started"
        state = status(name)
        if state != "done":
            return name, "failed" if state == "failed" else "not run"
    return None


def _execute_wave(todo: list[Job], grid: Grid, runs: Path, record, *, jobs: int, executor: str, started, cache: Path,
                  ray_address: str | None, slurm_options: Mapping[str, Any], log) -> None:
    if executor == "inprocess":
        import jax

        jax.config.update("jax_compilation_cache_dir", str(cache))
        for job in todo:
            if started(job):
                t = time.monotonic()
                record(job, run_job_inprocess(job.in_runs(runs), grid.root, runs / job.name), time.monotonic() - t)
    elif executor == "subprocess":
        def one(job: Job) -> None:
            if started(job):
                t = time.monotonic()
                error = run_job_subprocess(job.in_runs(runs), grid.root, runs / job.name,
                                           runs / "logs" / f"{job.name}.log", cache)
                record(job, error, time.monotonic() - t)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, todo))
    elif executor == "ray":
        _execute_ray(todo, grid, runs, record, jobs, started, ray_address, cache)
    else:
        _execute_slurm(todo, grid, runs, record, started, slurm_options, log)


def _execute_ray(todo, grid, runs, record, jobs, started, address, cache) -> None:
    ray = _optional("ray")
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else jobs, include_dashboard=False,
                 log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_timed_subprocess)
    pending = {}
    for job in todo:
        if started(job):
            pending[remote.remote(job.in_runs(runs), grid.root, runs / job.name, runs / "logs" / f"{job.name}.log",
                                  cache)] = job
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        try:
            error, seconds = ray.get(ready[0])
        except Exception as err:  # the task itself died (node lost, worker killed)
            error, seconds = f"ray task failed: {type(err).__name__}: {err}"[:2000], 0.0
        record(job, error, seconds)


def _execute_slurm(todo, grid, runs, record, started, options, log) -> None:
    submitit = _optional("submitit")
    options = dict(options)
    # cluster: None picks Slurm when sbatch is there; "local" runs each job as a local process, "debug" in this one
    executor = submitit.AutoExecutor(folder=runs / "slurm", cluster=options.pop("cluster", None))
    executor.update_parameters(**options)
    submitted = [(job, executor.submit(_timed_inprocess, job.in_runs(runs), grid.root, runs / job.name))
                 for job in todo if started(job)]
    log(f"  submitted {len(submitted)} Slurm jobs (logs in {runs / 'slurm'})")
    for job, handle in submitted:
        try:
            error, seconds = handle.result()
        except Exception as err:  # the Slurm job died (time limit, node failure, preemption)
            error, seconds = f"slurm job {handle.job_id} failed: {type(err).__name__}: {err}"[:2000], 0.0
        record(job, error, seconds)


def _finished_as_configured(job: Job, root: Path, run_dir: Path) -> bool:
    """True if ``run_dir`` holds finished results of exactly this job's resolved config (not of an older grid)."""
    if not (run_dir / "results.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    from metafit.config import dump_yaml
    from metafit.experiments import load_run_config, validate_config

    try:
        expected = dump_yaml(validate_config(load_run_config(root / job.config, list(job.overrides))))
    except (ValueError, ImportError):  # an invalid job: running it records the error
        return False
    return (run_dir / "config.yaml").read_text() == expected


def _timed_subprocess(job, root, run_dir, log_path, cache) -> tuple[str | None, float]:
    t = time.monotonic()
    return run_job_subprocess(job, root, run_dir, log_path, cache), time.monotonic() - t


def _timed_inprocess(job, root, run_dir) -> tuple[str | None, float]:
    t = time.monotonic()
    return run_job_inprocess(job, root, run_dir), time.monotonic() - t


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"the '{'ray' if name == 'ray' else 'slurm'}' executor needs {name}: "
                          "pip install 'metafit[cluster]'") from None


def _save_store(out: Path, grid: Grid, scale: str, records: Mapping[str, Any], all_jobs: list[Job]) -> None:
    order = {job.name: i for i, job in enumerate(all_jobs)}
    ordered = dict(sorted(records.items(), key=lambda kv: order.get(kv[0], len(order))))
    write_if_changed(out / STORE, _dumps({"paper": grid.paper, "scale": scale, "jobs": ordered}))


def _build(grid: Grid, scale: str, builder, records, committed, all_jobs: list[Job], out: Path,
           report: SweepReport) -> None:
    in_grid = {job.name for job in all_jobs}
    view = {name: record for name, record in records.items() if name in in_grid}
    before = done_count(committed["jobs"])
    if done_count(view) < before:
        lost = sorted(n for n, r in committed["jobs"].items() if r.get("status") == "done" and n not in view)
        raise SweepError(f"refusing to rebuild {out}: the grid at scale '{scale}' covers {done_count(view)} finished "
                         f"jobs but the committed results hold {before} (not in the grid: {', '.join(lost[:5])}"
                         f"{', ...' if len(lost) > 5 else ''}); restore the grid's jobs or move the results aside")
    report.results_done, report.results_failed = done_count(view), len(failed_errors(view))
    files = builder.build(view, scale, grid.variables(scale))
    for name, content in files.items():
        if write_if_changed(out / name, content):
            report.written.append(str(out / name))
        if name.endswith(".md"):
            report.tables[name] = content


__all__ = ["Grid", "Job", "STORE", "SweepError", "SweepReport", "done_count", "failed_errors",
           "find_grid", "load_grid", "load_builder", "load_store", "run_sweep", "run_job_inprocess",
           "run_job_subprocess", "write_if_changed"]
