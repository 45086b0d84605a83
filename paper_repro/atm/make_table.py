"""ATM table builder: tables and plot (ours beside the paper's) from the sweep store of ``experiments/atm.yaml``.

    metafit repro atm                 # runs the missing jobs of the grid, rebuilds the tables
    metafit repro atm --table-only    # rebuilds table.md, results.json, atm_vs_budget.png from sweep.json

Jobs by name: ``digits_s{seed}`` (the current digits config), ``digits_adamw_s{seed}`` (AdamW
fine-tuning, the setting that did not reproduce), ``lm_s{seed}`` (language ATM on SmolLM2) and
``seed{seed}`` (the first digits grid: scales from 0.025, no TIES/DARE aggregation inside ATM).
:func:`collect` keeps a finished run's results; :func:`build` writes ``table.md`` (every table,
mean ± sample sd over seeds, :mod:`metafit.stats`), ``results.json`` (per-seed and mean rows of
every group) and ``atm_vs_budget.png``.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from metafit.stats import CONVENTION, format_mean_sd, mean_sd, t_halfwidth

# Average test accuracy (%) over 8 tasks, CLIP ViT-B/16, recomputed by the card from the authors' files.
PAPER = {
    "TA": {1: 71.62, 2: 72.02, 4: 72.04, 10: 72.22},
    "Breadcrumbs": {1: 71.14, 2: 71.56, 4: 71.53, 10: 71.95},
    "TIES (broken in their code)": {1: 56.19, 2: 57.19, 4: 58.06, 10: 58.42},
    "DARE": {1: 71.65, 2: 72.06, 4: 71.88, 10: 72.04},
    "ATM": {1: 71.62, 2: 77.65, 4: 83.26, 10: 88.08},
}
ONE_SHOT = ("TA (tuned)", "TIES (tuned)", "DARE (tuned)", "Breadcrumbs (tuned)")
GROUPS = (("digits_adamw_s", "adamw"), ("digits_s", "digits"), ("lm_s", "lm"), ("seed", "first"))


def collect(run_dir: Path, results: dict) -> dict:
    """The run's results: ``methods`` and, in newer runs, the chosen scales, the LM round curve and weight changes.

    The first grid's records (block ``seed{seed}``) hold the ``methods`` table itself.
    """
    return results


def _group(name: str) -> str:
    return next(group for prefix, group in GROUPS if name.startswith(prefix))


def _methods(data: dict) -> dict:
    return data["methods"] if "methods" in data else data  # first-grid records are the methods table


def summarise(tables: list[dict]) -> dict[str, dict[str, list[float]]]:
    """``{method: {column: [value per run]}}``."""
    return {name: {column: [t[name][column] for t in tables if column in t.get(name, {})] for column in row}
            for name, row in tables[0].items()}


def _budget_table(title: str, methods: dict, budgets: list[int]) -> list[str]:
    lines = [f"| {title} | " + " | ".join(f"K={k}" for k in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for name, row in methods.items():
        if all(f"K={k}" in row for k in budgets):
            lines.append(f"| {name} | " + " | ".join(format_mean_sd(row[f'K={k}']) for k in budgets) + " |")
    return lines


def _digits_lines(runs: dict[str, dict], label: str, grid_min: float) -> tuple[list[str], dict]:
    tables = [_methods(d) for d in runs.values()]
    methods = summarise(tables)
    budgets = [int(k[2:]) for k in methods["PA-ATM"]]
    lines = _budget_table(f"{label}: {len(tables)} seed(s) ({', '.join(runs)})", methods, budgets)
    ph = methods["PH-ATM (rounds on validation)"]
    zero = list(methods["Zero-shot (frozen heads on pre-trained encoder)"].values())[0]
    lines += ["", "PH-ATM, rounds on the validation split from the tuned TA merge: "
              + ", ".join(f"{k} {format_mean_sd(v)}" for k, v in ph.items()), f"Zero-shot: {format_mean_sd(zero)}"]
    k_max = f"K={max(budgets)}"
    gaps = [t["PA-ATM"][k_max] - max(t[m][k_max] for m in ONE_SHOT) for t in tables]
    lines.append(f"PA-ATM minus the best tuned one-shot merge at {k_max}, per seed: "
                 + ", ".join(f"{g:+.2f}" for g in gaps) + f" (mean {format_mean_sd(gaps)}"
                 + (f", 95% t-interval ± {t_halfwidth(gaps):.2f})" if len(gaps) > 1 else ")"))
    scales = [d.get("chosen_scales", {}) for d in runs.values()]
    if any(scales):
        lines += ["", f"Merge coefficients chosen on validation (smallest / largest over seeds and K; grid from {grid_min:g}):", ""]
        for method in ONE_SHOT:
            picked = [v for s in scales for k, v in s.items() if k.startswith(method)]
            if picked:
                lines.append(f"- {method}: {min(picked):g} / {max(picked):g} ({sum(p <= grid_min for p in picked)} "
                             f"of {len(picked)} picks at the grid's smallest value)")
    return lines, {"per_run": dict(zip(runs, tables)), "mean": {n: {c: mean_sd(v)[0] for c, v in r.items()}
                                                               for n, r in methods.items()},
                   "sd": {n: {c: mean_sd(v)[1] for c, v in r.items()} for n, r in methods.items()},
                   "gap_vs_best_one_shot": dict(zip(runs, gaps))}


def _lm_lines(runs: dict[str, dict]) -> tuple[list[str], dict]:
    rows = [r["methods"] for r in runs.values()]
    names = [n for n in rows[0] if "mean_em" in rows[0][n]]
    lines = [f"| model (mean exact match over 4 tasks) | " + " | ".join(runs) + " | mean ± sd |",
             "|---" * (len(runs) + 2) + "|"]
    for name in names:
        values = [r[name]["mean_em"] for r in rows]
        chosen = [f" (λ {r[name]['scale']:g})" if "scale" in r[name] else "" for r in rows]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}{c}" for v, c in zip(values, chosen))
                     + f" | {format_mean_sd(values, 3)} |")
    tasks = [k[:-3] for k in rows[0]["base"] if k.endswith("_em") and k != "mean_em"]
    lines += ["", "Per task (mean over seeds):", "", "| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name in names:
        if all(f"{t}_em" in rows[0][name] for t in tasks):
            lines.append(f"| {name} | " + " | ".join(f"{np.mean([r[name][f'{t}_em'] for r in rows]):.2f}" for t in tasks) + " |")
    lines += ["", "ATM mean exact match after each round, per seed: "
              + "; ".join(f"{run} " + ", ".join(f"{s['mean_em']:.3f}" for s in r["atm_rounds"]) for run, r in runs.items()),
              "", "Weight change on the LoRA targets (q, v), mean over tensors of ‖θ − θ_base‖ / ‖θ_base‖:", "",
              "| model | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for name in runs[next(iter(runs))]["weight_change"]:
        lines.append(f"| {name} | " + " | ".join(f"{r['weight_change'][name]:.4f}" for r in runs.values()) + " |")
    return lines, {"per_run": runs}


def build(records: dict, scale: str, variables: dict) -> dict[str, str | bytes]:
    """``table.md``, ``results.json`` and ``atm_vs_budget.png`` from the finished jobs."""
    done: dict[str, dict[str, dict]] = {}
    for name, record in records.items():
        if record["status"] == "done":
            done.setdefault(_group(name), {})[name] = record["data"]
    failed = {name: r["error"] for name, r in records.items() if r["status"] == "failed"}
    lines, summary = [], {}
    sections = (("digits", "Current digits config (scales from 0.005; TIES and DARE aggregation inside ATM)", 0.005),
                ("adamw", "The same with AdamW fine-tuning (lr 3e-3; no sum / TIES / DARE aggregation)", 0.005),
                ("first", "First digits grid (scales from 0.025, no TIES/DARE aggregation), as committed before", 0.025))
    for group, title, grid_min in sections:
        if group in done:
            text, summary[group] = _digits_lines(done[group], "method", grid_min)
            lines += [f"## {title}", ""] + text + [""]
    if "lm" in done:
        text, summary["lm"] = _lm_lines(done["lm"])
        lines += ["## Language ATM: SmolLM2-135M-Instruct, LoRA experts, 4 tasks", ""] + text + [""]
    if not lines:
        lines = ["No finished run yet.", ""]
    budgets = sorted({k for row in PAPER.values() for k in row})
    lines += ["## Paper (ViT-B/16, 8 vision tasks; card)", "",
              "| method | " + " | ".join(f"K={k}" for k in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in budgets) + " |" for name, row in PAPER.items()]
    lines += ["", "PH-ATM in the paper: TA 72.70 -> 80.88 after 5 rounds. Zero-shot 59.6.", "", f"Spread: {CONVENTION}."]
    if failed:
        lines += ["", "Failed jobs (error in sweep.json):", ""] + [
            f"- {name}: failed ({error.splitlines()[0][:200]})" for name, error in failed.items()]
    files = {"table.md": "\n".join(lines) + "\n", "results.json": json.dumps(summary, indent=1) + "\n"}
    if "digits" in summary:
        files["atm_vs_budget.png"] = _plot(summary["digits"])
    return files


def _plot(digits: dict) -> bytes:
    from metafit.runs import figure

    mean, sd = digits["mean"], digits["sd"]
    budgets = [int(k[2:]) for k in mean["PA-ATM"]]
    fig = figure((11, 4))
    left, right = fig.subplots(1, 2)
    for name, row in mean.items():
        if all(f"K={k}" in row for k in budgets):
            m = np.array([row[f"K={k}"] for k in budgets])
            s = np.array([sd[name][f"K={k}"] for k in budgets])
            left.plot(budgets, m, marker="o", label=name)
            left.fill_between(budgets, m - s, m + s, alpha=0.15)
    left.set(title=f"ours: 8 digits tasks (mean ± sd, {len(digits['per_run'])} seeds)",
             xlabel="budget K (epochs per task)", ylabel="avg test accuracy (%)")
    left.legend(fontsize=6)
    for name, row in PAPER.items():
        ks = sorted(row)
        right.plot(ks, [row[k] for k in ks], marker="o", label=name)
    right.set(title="paper: ViT-B/16, 8 tasks (card)", xlabel="budget K")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    return png.getvalue()
