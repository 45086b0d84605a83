"""ATM table builder: the table and plot (ours beside the paper's) from the sweep store of ``experiments/atm.yaml``.

    metafit repro atm                 # runs the missing seeds of configs/merge/atm_digits.yaml, rebuilds the table
    metafit repro atm --table-only    # rebuilds table.md, results.json, atm_vs_budget.png from sweep.json

:func:`collect` keeps a finished run's ``methods`` table; :func:`build` shows one run's numbers,
or the mean ± standard deviation over runs (seeds), and writes ``table.md``,
``atm_vs_budget.png`` and ``results.json`` (the per-seed and mean rows).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

# Average test accuracy (%) over 8 tasks, CLIP ViT-B/16, recomputed by the card from the authors' files.
PAPER = {
    "TA": {1: 71.62, 2: 72.02, 4: 72.04, 10: 72.22},
    "Breadcrumbs": {1: 71.14, 2: 71.56, 4: 71.53, 10: 71.95},
    "TIES (broken in their code)": {1: 56.19, 2: 57.19, 4: 58.06, 10: 58.42},
    "DARE": {1: 71.65, 2: 72.06, 4: 71.88, 10: 72.04},
    "ATM": {1: 71.62, 2: 77.65, 4: 83.26, 10: 88.08},
}
OURS_FOR_PAPER_ROW = {"TA": "TA (1/T)", "Breadcrumbs": "Breadcrumbs (tuned)", "TIES (broken in their code)": "TIES (tuned)",
                      "DARE": "DARE (tuned)", "ATM": "PA-ATM"}


def collect(run_dir: Path, results: dict) -> dict:
    """The run's results: ``methods`` (and, in newer runs, the chosen scales, the LM round curve and weight changes).

    The first grid's records (block ``seed{seed}``) hold the ``methods`` table itself.
    """
    return results


def summarise(tables: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{method: {column: (mean, std)}}`` over runs (std 0 for a single run)."""
    out = {}
    for name, row in tables[0].items():
        out[name] = {}
        for column in row:
            values = np.array([t[name][column] for t in tables if column in t.get(name, {})], float)
            out[name][column] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return out


def _cell(mean_std: tuple[float, float], spread: bool) -> str:
    mean, std = mean_std
    return f"{mean:.2f} ± {std:.2f}" if spread else f"{mean:.2f}"


def build(records: dict, scale: str, variables: dict) -> dict[str, str | bytes]:
    """``table.md``, ``results.json`` and ``atm_vs_budget.png`` from the finished seeds."""
    done = {name: r["data"] for name, r in records.items() if r["status"] == "done"}
    failed = {name: r["error"] for name, r in records.items() if r["status"] == "failed"}
    if not done:
        notes = "".join(f"- {name}: failed ({e.splitlines()[0][:200]})\n" for name, e in failed.items())
        return {"table.md": "No finished run yet.\n" + (f"\nFailed jobs (error in sweep.json):\n\n{notes}" if notes else "")}
    tables = list(done.values())
    methods = summarise(tables)
    spread = len(tables) > 1
    budgets = [int(k[2:]) for k in methods["PA-ATM"]]
    label = f"mean ± std over {len(tables)} seeds" if spread else "one seed"
    lines = [f"| method (ours: 8 digits tasks, MLP encoder; {label}) | " + " | ".join(f"K={k}" for k in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    for name, row in methods.items():
        if all(f"K={k}" in row for k in budgets):
            lines.append(f"| {name} | " + " | ".join(_cell(row[f'K={k}'], spread) for k in budgets) + " |")
    lines += ["", "| paper (ViT-B/16, 8 vision tasks) | " + " | ".join(f"K={k}" for k in budgets) + " |",
              "|---" * (len(budgets) + 1) + "|"]
    for name, row in PAPER.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.2f}" if k in row else "–" for k in budgets) + " |")
    ph = methods["PH-ATM (rounds on validation)"]
    zero_shot = list(methods["Zero-shot (frozen heads on pre-trained encoder)"].values())[0]
    lines += ["", "PH-ATM (ours), rounds on the validation split from the tuned TA merge: "
              + ", ".join(f"{k} {_cell(v, spread)}" for k, v in ph.items()) + " (paper: TA 72.70 -> 80.88 after 5 rounds)",
              f"Zero-shot (ours): {_cell(zero_shot, spread)} (paper: 59.6)"]
    if failed:
        lines += ["", "Failed jobs (error in sweep.json):", ""] + [
            f"- {name}: failed ({error.splitlines()[0][:200]})" for name, error in failed.items()]
    summary = json.dumps({"runs": list(done), "per_run": tables,
                          "mean": {n: {c: v[0] for c, v in row.items()} for n, row in methods.items()},
                          "std": {n: {c: v[1] for c, v in row.items()} for n, row in methods.items()}}, indent=1) + "\n"
    return {"table.md": "\n".join(lines) + "\n", "results.json": summary, "atm_vs_budget.png": _plot(methods, budgets, label)}


def _plot(methods: dict, budgets: list[int], label: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in methods.items():
        if all(f"K={k}" in row for k in budgets):
            means = np.array([row[f"K={k}"][0] for k in budgets])
            stds = np.array([row[f"K={k}"][1] for k in budgets])
            left.plot(budgets, means, marker="o", label=name)
            left.fill_between(budgets, means - stds, means + stds, alpha=0.15)
    left.set(title=f"ours: 8 digits tasks ({label})", xlabel="budget K (epochs per task)",
             ylabel="avg test accuracy (%)")
    left.legend(fontsize=7)
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
    plt.close(fig)
    return png.getvalue()
