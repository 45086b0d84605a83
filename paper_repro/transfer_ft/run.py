"""Transfer of fine-tuning configurations on metafit's meta-dataset: leave-one-task-out and an end-to-end tune.

    python paper_repro/transfer_ft/run.py loto --seeds 10 --budget 2     # resumable: one file per (task, seed)
    python paper_repro/transfer_ft/run.py tune --budget 2                 # metafit tune: bo, default, random
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
TUNE_CONFIG = "configs/hpo/tune_upper_count.yaml"
TUNE_METHODS = ("bo", "default", "random")


def loto(seeds: int, budget: float, steps: int, budget_s: float | None) -> None:
    from metafit.hpo import benchmark, load_meta_dataset

    meta = load_meta_dataset()
    benchmark.leave_one_task_out(meta, LOTO, seeds=range(seeds), budget=budget, surrogate_steps=steps,
                                 budget_s=budget_s)


def tune(budget: float) -> None:
    from metafit.hpo.tune import TuneRequest, tune as run_tune

    for method in TUNE_METHODS:
        out = RESULTS / f"tune_{method}.json"
        if out.exists():
            continue
        work = Path("runs/transfer_ft") / f"tune_{method}"
        results = run_tune(TuneRequest(TUNE_CONFIG, budget=budget, method=method), work)
        out.write_text(json.dumps({k: results[k] for k in ("metrics", "methods")}, indent=1) + "\n")
        if (work / "regret_vs_cost.png").exists():
            shutil.copy(work / "regret_vs_cost.png", RESULTS / f"tune_{method}_regret_vs_cost.png")


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
             f"{len(names)} runs per method). Mean normalised regret (0 = the task's best recorded loss; "
             "standard error over runs) and mean rank (1 = best) at each budget.", "",
             "| method | " + " | ".join(f"regret @ {budgets[i]:g}" for i in shown) + " | " +
             " | ".join(f"rank @ {budgets[i]:g}" for i in shown) + " |",
             "|---|" + "---|" * (2 * len(shown))]
    order = sorted(regret, key=lambda m: ranks[m][-1])
    for m in order:
        r = regret[m]
        se = r.std(0, ddof=1) / np.sqrt(len(r)) if len(r) > 1 else np.zeros(r.shape[1])
        lines.append(f"| {m} | " + " | ".join(f"{r[:, i].mean():.3f} ± {se[i]:.3f}" for i in shown) + " | " +
                     " | ".join(f"{ranks[m][i]:.2f}" for i in shown) + " |")
    text = "\n".join(lines) + "\n"
    for method in TUNE_METHODS:
        path = RESULTS / f"tune_{method}.json"
        if path.exists():
            metrics = json.loads(path.read_text())["metrics"]
            text += (f"\ntune `{method}`: best held-out loss {metrics['best_eval_loss']:.4f} after "
                     f"{metrics['spent_runs']:g} full-run equivalents ({metrics['spent_s']:.0f} s, "
                     f"{metrics['trials']} trials)\n")
    (RESULTS / "table.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("loto", "tune", "table"))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--surrogate-steps", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=None, help="loto: start no (task, seed) after this")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.what == "loto":
        loto(args.seeds, args.budget, args.surrogate_steps, args.budget_s)
    elif args.what == "tune":
        tune(args.budget)
    print(table())


if __name__ == "__main__":
    main()
