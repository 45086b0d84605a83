"""Builds the compatible-specialization table and plots from a finished `merge_compatible` run.

    metafit run configs/merge/compatible_char_gpt.yaml --workdir runs/compatible
    python paper_repro/compatible/make_table.py runs/compatible   # writes table.md + compatible.png there
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# gsm-hard token cross-entropy from the paper's README (GPT-2 124M experts; lower is better).
PAPER = {
    "activation interpolation, early experts (best / alpha end)": "1.625 / 2.00",
    "activation interpolation, late experts (best / alpha=0)": "1.719 / 2.73",
    "per-layer routing (early / late)": "1.328 / 1.344",
    "multi-layer routing n=1..4": "1.3125, 1.203, 1.172, 1.164",
}


def main(run_dir: str) -> None:
    run = Path(run_dir)
    rows = json.loads((run / "results.json").read_text())["methods"]
    cka = json.loads((run / "cka.json").read_text())
    lines = ["Target task T (map of a sum), answer-token cross-entropy (nats; lower is better):", "",
             "| method | target loss |", "|---|---|"]
    for name, row in rows.items():
        if "target_loss" in row and not name.startswith(("activation", "weight")):
            lines.append(f"| {name} | {row['target_loss']:.3f} |")
    interp: dict[str, dict[float, float]] = {}
    for name, row in rows.items():
        match = re.match(r"(activation|weight) interp (early|late) \(step (\d+)\) alpha=([\d.]+)", name)
        if match:
            interp.setdefault(f"{match[1]} interp, {match[2]} (step {match[3]})", {})[float(match[4])] = row["target_loss"]
    alphas = sorted({a for curve in interp.values() for a in curve})
    lines += ["", "| interpolation (alpha = weight of the add expert) | " + " | ".join(f"α={a:g}" for a in alphas)
              + " | best |", "|---" * (len(alphas) + 2) + "|"]
    for name, curve in interp.items():
        lines.append(f"| {name} | " + " | ".join(f"{curve[a]:.3f}" for a in alphas) + f" | {min(curve.values()):.3f} |")
    lines += ["", "Linear CKA between the add and map experts on a fixed probe batch, per layer:", "",
              "| layer | " + " | ".join(f"step {s}" for s in cka["steps"]) + " |", "|---" * (len(cka["steps"]) + 1) + "|"]
    for layer, values in cka.items():
        if layer != "steps":
            lines.append(f"| {layer} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["", "Paper (GPT-2 124M experts, gsm-hard loss):", ""] + [f"- {k}: {v}" for k, v in PAPER.items()]
    (run / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in interp.items():
        left.plot(alphas, [curve[a] for a in alphas], marker="o", label=name)
    left.set(xlabel="alpha (add expert weight)", ylabel="target loss", title="interpolation")
    left.legend(fontsize=7)
    for layer, values in cka.items():
        if layer != "steps":
            right.plot(cka["steps"], values, marker="o", label=layer)
    right.set(xlabel="expert fine-tuning step", ylabel="linear CKA", title="CKA(add expert, map expert)")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "compatible.png", dpi=110)
    print(f"wrote {run / 'table.md'} and {run / 'compatible.png'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/compatible")
