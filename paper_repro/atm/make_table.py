"""Builds the ATM table and plot (ours beside the paper's) from a finished `merge_atm` run.

    metafit run configs/merge/atm_digits.yaml --workdir runs/atm_digits
    python paper_repro/atm/make_table.py runs/atm_digits      # writes table.md + atm_vs_budget.png there
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

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


def main(run_dir: str) -> None:
    run = Path(run_dir)
    methods = json.loads((run / "results.json").read_text())["methods"]
    budgets = [int(k[2:]) for k in methods["PA-ATM"]]
    lines = ["| method (ours: 8 digits tasks, MLP encoder) | " + " | ".join(f"K={k}" for k in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    for name, row in methods.items():
        if all(f"K={k}" in row for k in budgets):
            lines.append(f"| {name} | " + " | ".join(f"{row[f'K={k}']:.2f}" for k in budgets) + " |")
    lines += ["", "| paper (ViT-B/16, 8 vision tasks) | " + " | ".join(f"K={k}" for k in budgets) + " |",
              "|---" * (len(budgets) + 1) + "|"]
    for name, row in PAPER.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.2f}" if k in row else "–" for k in budgets) + " |")
    ph = methods["PH-ATM (rounds on validation)"]
    lines += ["", "PH-ATM (ours), rounds on the validation split from the tuned TA merge: "
              + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()) + " (paper: TA 72.70 -> 80.88 after 5 rounds)",
              f"Zero-shot (ours): {list(methods['Zero-shot (frozen heads on pre-trained encoder)'].values())[0]:.2f} "
              "(paper: 59.6)"]
    (run / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in methods.items():
        if all(f"K={k}" in row for k in budgets):
            left.plot(budgets, [row[f"K={k}"] for k in budgets], marker="o", label=name)
    left.set(title="ours: 8 digits tasks", xlabel="budget K (epochs per task)", ylabel="avg test accuracy (%)")
    left.legend(fontsize=7)
    for name, row in PAPER.items():
        ks = sorted(row)
        right.plot(ks, [row[k] for k in ks], marker="o", label=name)
    right.set(title="paper: ViT-B/16, 8 tasks (card)", xlabel="budget K")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "atm_vs_budget.png", dpi=110)
    print(f"wrote {run / 'table.md'} and {run / 'atm_vs_budget.png'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/atm_digits")
