"""Reproduce the AMFS card's table: runs the configs in configs/meta/ and builds results/<scale>/table.md.

Every cell is one or more ``metafit run`` calls (the library path, no special code):

* sinusoid K=5 and K=10 query MSE, 600 held-out tasks, seeds 0-2 (``configs/meta/sinusoid_*.yaml``);
* heterogeneous sinusoid K=10 (25% outlier tasks in training, clean test tasks), seeds 0-2;
* glyphs 5-way 1-shot, 5-way 5-shot, 20-way 1-shot accuracy, 600 held-out tasks (``glyphs_*.yaml``);
* seconds per meta-iteration (trainer loop, compilation excluded) and the variance of the
  training meta-loss over the second half of training.

Jobs run in parallel worker processes: CPU jobs are pinned to one core each
(``JAX_PLATFORMS=cpu``), GPU jobs share the accelerator. Finished jobs are skipped on
a rerun (their ``results.json`` is kept), and jobs not started by ``--deadline`` are
left out of the table (marked "not run").

    python paper_repro/amfs/reproduce.py --scale smoke --in-process          # minutes, checks the pipeline
    python paper_repro/amfs/reproduce.py --scale cpu --in-process            # the README's table (2-core CPU)
    python paper_repro/amfs/reproduce.py --scale cpu --table-only            # rebuild table.md from results
    python paper_repro/amfs/reproduce.py --scale gpu --cpu-jobs 9 --gpu-jobs 5  # the card's scale (not run here)
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

SINUSOID_LEARNERS = ("maml", "maml5", "fomaml", "anil", "metasgd", "reptile", "r2d2", "i-amfs", "o-amfs", "amfs")
HETERO_LEARNERS = ("maml", "o-amfs", "i-amfs", "amfs")
GLYPH_LEARNERS = ("maml", "fomaml", "protonet", "r2d2", "i-amfs", "amfs")
GLYPH_SETTINGS = {  # name: (ways, shots, queries per class, meta-batch)
    "5w1s": (5, 1, 15, 32),
    "5w5s": (5, 5, 15, 32),
    "20w1s": (20, 1, 5, 16),
}

SCALES = {
    # pipeline check: every job, a few steps, tiny evaluation
    "smoke": dict(seeds=(0,), glyph_seeds=(0,), sinusoid_steps=20, glyph_steps=4, eval_tasks=10, val_tasks=4,
                  glyph_backbone=["args.backbone=mlp", "args.widths=[16]"], glyph_batch_divisor=8, log_every=2),
    # the README's table (planned for ~20 CPU-minutes; took ~50 on the loaded 2-core machine). Glyphs use an
    # MLP (784-64-64-ways) instead of Conv4: second-order MAML on a 32-filter Conv4 measured ~7 s per
    # meta-iteration (8 tasks) here.
    "cpu": dict(seeds=(0, 1, 2), glyph_seeds=(0,), sinusoid_steps=2_000, glyph_steps=300, eval_tasks=600,
                val_tasks=100, glyph_backbone=["args.backbone=mlp", "args.widths=[64,64]"], glyph_batch_divisor=4,
                log_every=100),
    # the card's protocol on a GPU (Conv4 with 64 filters); not run for the README (no GPU time was left)
    "gpu": dict(seeds=(0, 1, 2), glyph_seeds=(0, 1, 2), sinusoid_steps=70_000, glyph_steps=60_000, eval_tasks=600,
                val_tasks=100, glyph_backbone=["args.backbone=conv4", "args.conv_hidden=64"], glyph_batch_divisor=1,
                log_every=100),
}


@dataclass
class Job:
    name: str
    config: str
    overrides: list[str]
    device: str  # "cpu" or "gpu"
    group: str  # table cell: "sinusoid_k10", "hetero_k10", "glyphs_5w1s", ...
    learner: str
    seed: int
    priority: int
    info: dict = field(default_factory=dict)


def make_jobs(scale: dict) -> list[Job]:
    """The run matrix of one scale, highest priority first."""
    jobs: list[Job] = []
    steps, log = scale["sinusoid_steps"], scale["log_every"]
    common = [f"train.log_every={log}", f"train.steps_per_dispatch={log}", f"args.eval_tasks={scale['eval_tasks']}",
              f"args.val_tasks={scale['val_tasks']}"]
    sin = common + [f"train.steps={steps}", f"train.eval_every={steps // 2}", f"train.ckpt_every={steps // 2}"]
    for seed in scale["glyph_seeds"]:
        for learner in GLYPH_LEARNERS:
            for priority, (setting, (ways, shots, queries, batch)) in enumerate(GLYPH_SETTINGS.items()):
                g = scale["glyph_steps"]
                jobs.append(Job(
                    f"glyphs_{setting}_{learner}_s{seed}", f"configs/meta/glyphs_{learner}.yaml",
                    common + [f"seed={seed}", f"train.steps={g}", f"train.eval_every={g}", f"train.ckpt_every={g}",
                              f"train.batch_size={max(batch // scale['glyph_batch_divisor'], 2)}",
                              f"args.ways={ways}", f"args.shots={shots}", f"args.queries={queries}",
                              *scale["glyph_backbone"]],
                    "gpu", f"glyphs_{setting}", learner, seed, priority * 10 + seed,
                ))
    for seed in scale["seeds"]:
        for learner in SINUSOID_LEARNERS:
            for shots, priority in ((10, 0), (5, 2)):
                jobs.append(Job(f"sinusoid_k{shots}_{learner}_s{seed}", f"configs/meta/sinusoid_{learner}.yaml",
                                sin + [f"seed={seed}", f"args.shots={shots}"], "cpu", f"sinusoid_k{shots}", learner,
                                seed, priority * 10 + seed))
        for learner in HETERO_LEARNERS:
            jobs.append(Job(f"hetero_k10_{learner}_s{seed}", f"configs/meta/sinusoid_hetero_{learner}.yaml",
                            sin + [f"seed={seed}"], "cpu", "hetero_k10", learner, seed, 10 + seed))
    return sorted(jobs, key=lambda j: j.priority)


def run_job(job: Job, out: Path, core: int | None, deadline: float, hard_deadline: float,
            in_process: bool = False) -> dict | None:
    """Runs one job (in a subprocess, or in this process); returns its result row, or None if skipped or failed."""
    run_dir = out / "runs" / job.name
    results = run_dir / "results.json"
    if results.is_file():
        return _row(job, json.loads(results.read_text()), run_dir)
    if time.time() > deadline:
        return None
    if in_process:  # one interpreter for every job: no per-job start-up on a small machine
        import jax

        from metafit.experiments import run_experiment

        # seeds of one cell compile identical programs: a persistent cache turns 3 compilations into 1
        jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

        start = time.time()
        try:
            run_experiment(REPO / job.config, job.overrides, workdir=run_dir, force_new=True)
        except Exception as err:  # a failed job is reported and left out of the table, the others go on
            print(f"  {job.name}: FAILED ({type(err).__name__}: {err})", flush=True)
            return None
        print(f"  {job.name}: done in {time.time() - start:.0f}s", flush=True)
        return _row(job, json.loads(results.read_text()), run_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if job.device == "cpu":
        env.update(JAX_PLATFORMS="cpu")
    else:
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false")
    # `metafit run` imports only the meta experiment's module (and family), so a machine that lacks
    # another family's optional packages runs these jobs too.
    command = [sys.executable, "-m", "metafit.cli", "run", job.config, "--workdir", str(run_dir), "--force-new",
               *[arg for o in job.overrides for arg in ("--set", o)]]
    preexec = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    log_path = out / "logs" / f"{job.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log_path.open("w") as log:
        try:
            subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec,
                           timeout=max(hard_deadline - time.time(), 1), check=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            print(f"  {job.name}: FAILED ({type(err).__name__}); see {log_path}", flush=True)
            return None
    print(f"  {job.name}: done in {time.time() - start:.0f}s", flush=True)
    return _row(job, json.loads(results.read_text()), run_dir)


def _row(job: Job, results: dict, run_dir: Path | None = None) -> dict:
    row = {"name": job.name, "group": job.group, "learner": job.learner, "seed": job.seed, "device": job.device,
           **results["metrics"]}
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        row["meta_loss_cv"] = meta_loss_cv(run_dir / "metrics.jsonl")
    return row


def meta_loss_cv(path: Path) -> float:
    """std / mean of the logged training meta-loss over the second half: stability relative to its level."""
    losses = [json.loads(line)["loss"] for line in path.read_text().splitlines() if '"split": "train"' in line]
    half = losses[len(losses) // 2:]
    mean = sum(half) / len(half)
    return math.sqrt(sum((v - mean) ** 2 for v in half) / len(half)) / mean


def run_all(jobs: list[Job], out: Path, cpu_jobs: int, gpu_jobs: int, deadline_s: float) -> list[dict]:
    start = time.time()
    deadline, hard = start + deadline_s, start + deadline_s + 90
    cores = sorted(os.sched_getaffinity(0))
    free_cores = list(cores[:cpu_jobs]) if cpu_jobs else []
    lock = threading.Lock()
    rows: list[dict] = []

    def cpu_worker(job):
        with lock:
            core = free_cores.pop() if free_cores else None
        try:
            return run_job(job, out, core, deadline, hard)
        finally:
            if core is not None:
                with lock:
                    free_cores.append(core)

    gpu = [j for j in jobs if j.device == "gpu"] if gpu_jobs else []
    cpu = [j for j in jobs if j not in gpu]
    futures = []
    with ThreadPoolExecutor(max(cpu_jobs, 1)) as cpu_pool, ThreadPoolExecutor(max(gpu_jobs, 1)) as gpu_pool:
        futures += [cpu_pool.submit(cpu_worker, j) for j in cpu]
        futures += [gpu_pool.submit(run_job, j, out, None, deadline, hard) for j in gpu]
        for f in futures:
            row = f.result()
            if row is not None:
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- table


def _mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t-interval half-width over seeds (0 for one seed)."""
    t975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975.get(n, 1.96) * sd / math.sqrt(n)


def cell(rows: list[dict], key: str, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± CI`` over seeds; a single seed shows its 600-task CI marked with a dagger."""
    values = [r[key] * scale for r in rows if key in r]
    if not values:
        return "not run"
    if len(values) == 1:
        ci = rows[0].get(f"{key}_ci95", 0.0) * scale
        return f"{values[0]:.{digits}f} ± {ci:.{digits}f}†"
    mean, ci = _mean_ci(values)
    return f"{mean:.{digits}f} ± {ci:.{digits}f} (n={len(values)})"


def plain(rows: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in rows if key in r]
    return format(sum(values) / len(values), fmt) if values else "not run"


def build_table(rows: list[dict], scale_name: str) -> str:
    by = defaultdict(list)
    for r in rows:
        by[(r["group"], r["learner"])].append(r)
    lines = [f"Scale: `{scale_name}` ({SCALES[scale_name]}).", "",
             f"Sinusoid regression, query MSE on {SCALES[scale_name]['eval_tasks']} held-out tasks (lower is better), "
             "mean ± 95% CI over seeds; "
             "at K=10: seconds per meta-iteration, variance and CV (std / mean) of the logged training "
             "meta-loss over the second half of training, means over seeds.", "",
             "| learner | K=5 MSE | K=10 MSE | heterogeneous K=10 MSE | s / meta-iter (K=10) | meta-loss var (K=10) "
             "| meta-loss CV (K=10) |",
             "|---|---|---|---|---|---|---|"]
    for learner in SINUSOID_LEARNERS:
        k10 = by[("sinusoid_k10", learner)]
        lines.append(f"| {learner} | {cell(by[('sinusoid_k5', learner)], 'query_mse')} | {cell(k10, 'query_mse')} | "
                     f"{cell(by[('hetero_k10', learner)], 'query_mse') if learner in HETERO_LEARNERS else '—'} | "
                     f"{plain(k10, 'seconds_per_iter', '.2e')} | {plain(k10, 'meta_loss_var', '.3g')} | "
                     f"{plain(k10, 'meta_loss_cv', '.3f')} |")
    lines += ["", f"Glyph few-shot classification, query accuracy (%) on {SCALES[scale_name]['eval_tasks']} held-out "
              "tasks of the evaluation alphabets († = one seed, ± is the 95% CI over tasks).", "",
              "| learner | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot | s / meta-iter (5w1s) |", "|---|---|---|---|---|"]
    for learner in GLYPH_LEARNERS:
        cells = [cell(by[(f"glyphs_{s}", learner)], "query_accuracy", 100.0, 1) for s in GLYPH_SETTINGS]
        lines.append(f"| {learner} | {' | '.join(cells)} | {plain(by[('glyphs_5w1s', learner)], 'seconds_per_iter', '.2e')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="AMFS card reproduction")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: paper_repro/amfs/results/<scale>")
    parser.add_argument("--cpu-jobs", type=int, default=1, help="parallel CPU worker processes (one core each)")
    parser.add_argument("--gpu-jobs", type=int, default=0, help="parallel GPU processes (0: glyph jobs run on CPU)")
    parser.add_argument("--deadline", type=float, default=1e9, help="start no job after this many seconds")
    parser.add_argument("--only", nargs="*", default=None,
                        help="job-name glob patterns to run (e.g. 'glyphs_5w1s_*' 'sinusoid_k5_*_s0')")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--in-process", action="store_true", help="run the jobs one after another in this process")
    args = parser.parse_args(argv)
    out = args.out or HERE / "results" / args.scale
    out.mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(SCALES[args.scale])
    if args.only:
        jobs = [j for j in jobs if any(fnmatch.fnmatch(j.name, p) for p in args.only)]
    if args.table_only:
        rows = [r for r in (run_job(j, out, None, 0, 0) for j in jobs) if r is not None]
    else:
        print(f"{len(jobs)} jobs -> {out}", flush=True)
        if args.in_process:
            deadline = time.time() + args.deadline
            rows = [r for r in (run_job(j, out, None, deadline, 0, in_process=True) for j in jobs) if r is not None]
        else:
            rows = run_all(jobs, out, args.cpu_jobs, args.gpu_jobs, args.deadline)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    table = build_table(rows, args.scale)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
