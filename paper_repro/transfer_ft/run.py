"""Transfer of fine-tuning configurations on metafit's meta-dataset: leave-one-task-out and an end-to-end tune.

    python paper_repro/transfer_ft/run.py loto --seeds 10 --budget 2     # resumable: one file per (task, seed)
    python paper_repro/transfer_ft/run.py tune --budget 2 --seeds 3       # metafit tune: bo, transfer, default, random
    python paper_repro/transfer_ft/run.py tune --job smollm2 --budget 4 --seeds 1 --methods bo,default,random
    python paper_repro/transfer_ft/run.py table                           # rebuild table.md and regret.png

Leave-one-task-out is tabular: every method chooses among the configurations the meta-dataset holds.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RESULTS = HERE / "results"
LOTO = RESULTS / "loto"
# job name -> its LoRA SFT config; the small-LM job is the one the table reports by default.
TUNE_JOBS = {"small": "configs/hpo/tune_upper_count.yaml", "smollm2": "configs/hpo/tune_smollm2.yaml"}
TUNE_METHODS = ("bo", "transfer", "default", "random")


def loto(seeds: int, budget: float, steps: int, budget_s: float | None) -> None:
    from metafit.hpo import benchmark, load_meta_dataset

    meta = load_meta_dataset()
    benchmark.leave_one_task_out(meta, LOTO, seeds=range(seeds), budget=budget, surrogate_steps=steps,
                                 budget_s=budget_s)


def tune_result(job: str, method: str, seed: int) -> Path:
    return RESULTS / f"tune_{job}_{method}_s{seed}.json"


def tune(job: str, budget: float, seeds: int, methods=TUNE_METHODS) -> None:
    """Each method's tune of ``job`` per seed; a finished (job, method, seed) is skipped, an unfinished one resumes."""
    from metafit.hpo.tune import TuneRequest, tune as run_tune

    for seed in range(seeds):
        for method in methods:
            out = tune_result(job, method, seed)
            if out.exists():
                continue
            work = Path("runs/transfer_ft") / f"tune_{job}_{method}_s{seed}"
            results = run_tune(TuneRequest(TUNE_JOBS[job], budget=budget, method=method, seed=seed), work)
            out.write_text(json.dumps({"budget": budget, **{k: results[k] for k in ("metrics", "methods")}},
                                      indent=1) + "\n")
            if (work / "regret_vs_cost.png").exists():
                shutil.copy(work / "regret_vs_cost.png", out.with_suffix(".png"))


def table() -> str:
    from metafit.hpo import benchmark
    from metafit.runs import plot_curves

    budgets, regret, names = benchmark.collect(LOTO)
    ranks = benchmark.average_ranks(regret)
    seeds = sorted({n.rsplit("_s", 1)[1] for n in names}, key=int)
    tasks = sorted({n.rsplit("_s", 1)[0] for n in names})
    plot_curves(RESULTS / "regret.png", {m: (budgets, r.mean(0)) for m, r in regret.items()},
                xlabel="budget (full-run equivalents)", ylabel="mean normalised regret",
                title=f"leave-one-task-out, {len(tasks)} tasks x {len(seeds)} seeds")
    shown = [i for i, b in enumerate(budgets) if b in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)]
    lines = [f"Leave-one-task-out on the packaged meta-dataset ({len(tasks)} held-out tasks x {len(seeds)} seeds = "
             f"{len(names)} runs per method). Mean normalised regret (0 = the task's best recorded loss) ± standard "
             f"error over the {len(tasks)} tasks (seeds averaged first: zero_shot and default do not depend on the "
             "seed, so the tasks are the independent units), and mean rank over runs (1 = best), at each budget.", "",
             "| method | " + " | ".join(f"regret @ {budgets[i]:g}" for i in shown) + " | " +
             " | ".join(f"rank @ {budgets[i]:g}" for i in shown) + " |",
             "|---|" + "---|" * (2 * len(shown))]
    order = sorted(regret, key=lambda m: ranks[m][-1])
    task_of = np.array([n.rsplit("_s", 1)[0] for n in names])
    for m in order:
        r = regret[m]
        per_task = np.stack([r[task_of == t].mean(0) for t in tasks])
        se = per_task.std(0, ddof=1) / np.sqrt(len(tasks)) if len(tasks) > 1 else np.zeros(r.shape[1])
        lines.append(f"| {m} | " + " | ".join(f"{r[:, i].mean():.3f} ± {se[i]:.3f}" for i in shown) + " | " +
                     " | ".join(f"{ranks[m][i]:.2f}" for i in shown) + " |")
    text = "\n".join(lines) + "\n"
    text += tune_table()
    (RESULTS / "table.md").write_text(text)
    return text


def tune_table() -> str:
    """Per job and method: best held-out loss of each seed's tune, their mean ± sample sd, spend."""
    lines = []
    for job in TUNE_JOBS:
        rows, seeds, budgets = [], set(), set()
        for method in TUNE_METHODS:
            files = sorted(RESULTS.glob(f"tune_{job}_{method}_s*.json"), key=lambda p: int(p.stem.rsplit("_s", 1)[1]))
            if not files:
                continue
            records = [json.loads(f.read_text()) for f in files]
            seeds |= {f.stem.rsplit("_s", 1)[1] for f in files}
            budgets |= {r["budget"] for r in records}
            best = np.array([r["metrics"]["best_eval_loss"] for r in records])
            spread = f" ± {best.std(ddof=1):.4f}" if len(best) > 1 else ""
            rows.append(f"| {method} | {best.mean():.4f}{spread} | {', '.join(f'{b:.4f}' for b in best)} | "
                        f"{np.mean([r['metrics']['spent_runs'] for r in records]):g} | "
                        f"{np.mean([r['metrics']['trials'] for r in records]):.1f} | "
                        f"{np.mean([r['metrics']['spent_s'] for r in records]):.0f} |")
        if rows:
            lines += ["", f"`metafit tune` on `{TUNE_JOBS[job]}` (budget {' / '.join(f'{b:g}' for b in sorted(budgets))} "
                      f"full-run equivalents, seeds {', '.join(sorted(seeds, key=int))}; mean ± sample sd over seeds; "
                      "`default` stops after its one run):", "",
                      "| method | best held-out loss | per seed | full runs spent | trials | trial seconds |",
                      "|---|---|---|---|---|---|", *rows]
    return "\n".join(lines) + "\n" if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("loto", "tune", "table"))
    parser.add_argument("--seeds", type=int, default=None, help="loto: 10, tune: 3 unless given")
    parser.add_argument("--job", choices=sorted(TUNE_JOBS), default="small", help="tune: which job")
    parser.add_argument("--methods", default=",".join(TUNE_METHODS), help="tune: comma-separated methods")
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--surrogate-steps", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=None, help="loto: start no (task, seed) after this")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.what == "loto":
        loto(args.seeds or 10, args.budget, args.surrogate_steps, args.budget_s)
    elif args.what == "tune":
        tune(args.job, args.budget, args.seeds or 3, tuple(args.methods.split(",")))
    print(table())


if __name__ == "__main__":
    main()
