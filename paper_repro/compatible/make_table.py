"""Compatible-specialization table builder: the table and plots from the sweep store of ``experiments/compatible.yaml``.

    metafit repro compatible                 # runs configs/merge/compatible_char_gpt.yaml if needed, rebuilds the table
    metafit repro compatible --table-only    # rebuilds table.md, compatible.png, results.json, cka.json from sweep.json

:func:`collect` keeps the run's ``results.json`` and ``cka.json``; :func:`build` writes them
back beside ``table.md`` and ``compatible.png``.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

# gsm-hard token cross-entropy from the paper's README (GPT-2 124M experts; lower is better).
PAPER = {
    "activation interpolation, early experts (best / alpha end)": "1.625 / 2.00",
    "activation interpolation, late experts (best / alpha=0)": "1.719 / 2.73",
    "per-layer routing (early / late)": "1.328 / 1.344",
    "multi-layer routing n=1..4": "1.3125, 1.203, 1.172, 1.164",
}


def collect(run_dir: Path, results: dict) -> dict:
    """The run's results and its per-layer CKA curves."""
    return {"results": results, "cka": json.loads((run_dir / "cka.json").read_text())}


def build(records: dict, scale: str, variables: dict) -> dict[str, str | bytes]:
    """``table.md``, ``compatible.png``, ``results.json`` and ``cka.json`` from the one run."""
    done = [r["data"] for r in records.values() if r["status"] == "done"]
    failed = {name: r["error"] for name, r in records.items() if r["status"] == "failed"}
    if not done:
        notes = "".join(f"- {name}: failed ({e.splitlines()[0][:200]})\n" for name, e in failed.items())
        return {"table.md": "No finished run yet.\n" + (f"\nFailed jobs (error in sweep.json):\n\n{notes}" if notes else "")}
    results, cka = done[0]["results"], done[0]["cka"]
    text, interp = table(results["methods"], cka)
    return {"table.md": text, "compatible.png": _plot(interp, cka),
            "results.json": json.dumps(results, indent=2) + "\n",  # as the run folder wrote them
            "cka.json": json.dumps(cka, indent=1)}


def table(rows: dict, cka: dict) -> tuple[str, dict]:
    """The Markdown text and the interpolation curves ``{name: {alpha: loss}}``."""
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
    return "\n".join(lines) + "\n", interp


def _plot(interp: dict, cka: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    alphas = sorted({a for curve in interp.values() for a in curve})
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()
