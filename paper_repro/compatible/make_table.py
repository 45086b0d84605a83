"""Compatible-specialization table builder: tables and plots from the sweep store of ``experiments/compatible.yaml``.

    metafit repro compatible                 # runs the missing seeds of configs/merge/compatible_char_gpt.yaml
    metafit repro compatible --table-only    # rebuilds table.md, compatible.png, results.json, cka.json from sweep.json

Jobs: ``compatible_s{seed}`` (the current config: early and late routing, the base-MLP router
control, own-task exact match of every expert snapshot), ``compatible_lite_s{seed}`` (the same
with per-layer routing only; it stands in for its seed only while that seed has no full run, and a
row shows ``(n = k)`` when fewer runs than the table's have it) and ``compatible`` (the first, one-seed run, kept as committed). :func:`collect` keeps a run's ``results.json`` and ``cka.json``;
:func:`build` writes the tables (mean ± sample sd over seeds, :mod:`metafit.stats`), the verdict
numbers, ``compatible.png``, ``results.json`` and ``cka.json``.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np

from metafit.stats import CONVENTION, format_mean_sd, mean_sd

# gsm-hard token cross-entropy from the paper's README (GPT-2 124M experts; lower is better).
PAPER = {
    "activation interpolation, early experts (best / alpha end)": "1.625 / 2.00",
    "activation interpolation, late experts (best / alpha=0)": "1.719 / 2.73",
    "per-layer routing (early / late)": "1.328 / 1.344",
    "multi-layer routing n=1..4": "1.3125, 1.203, 1.172, 1.164",
}
INTERP = re.compile(r"(activation|weight) interp (early|late) \(step (\d+)\) alpha=([\d.]+)")


def collect(run_dir: Path, results: dict) -> dict:
    """The run's results and its per-layer CKA curves."""
    return {"results": results, "cka": json.loads((run_dir / "cka.json").read_text())}


def build(records: dict, scale: str, variables: dict) -> dict[str, str | bytes]:
    """``table.md``, ``compatible.png``, ``results.json`` and ``cka.json`` from the finished runs."""
    seeds = _one_run_per_seed(records)
    first = records.get("compatible", {}).get("data") if records.get("compatible", {}).get("status") == "done" else None
    failed = {name: r["error"] for name, r in records.items() if r["status"] == "failed"}
    lines: list[str] = []
    files: dict[str, str | bytes] = {}
    if seeds:
        text, summary, interp = seed_tables(seeds)
        lines += text
        files["compatible.png"] = _plot(interp, {n: d["cka"] for n, d in seeds.items()})
        files["results.json"] = json.dumps(summary, indent=1) + "\n"
        files["cka.json"] = json.dumps({n: d["cka"] for n, d in seeds.items()}, indent=1) + "\n"
    if first is not None:
        rows = first["results"]["methods"]
        lines += ["## First version (one run, seed 0; late routing n = 1..4, early n = 1 only)", "",
                  "| method | target loss |", "|---|---|"]
        lines += [f"| {n} | {r['target_loss']:.3f} |" for n, r in rows.items()
                  if "target_loss" in r and not INTERP.match(n)] + [""]
    if not lines:
        lines = ["No finished run yet.", ""]
    lines += ["Paper (GPT-2 124M experts, gsm-hard loss):", ""] + [f"- {k}: {v}" for k, v in PAPER.items()]
    lines += ["", f"Spread: {CONVENTION}."]
    if failed:
        lines += ["", "Failed jobs (error in sweep.json):", ""] + [
            f"- {name}: failed ({error.splitlines()[0][:200]})" for name, error in failed.items()]
    files["table.md"] = "\n".join(lines) + "\n"
    return files


def _values(runs: list[dict], name: str, column: str = "target_loss") -> list[float]:
    return [r[name][column] for r in runs if name in r and column in r[name]]


def _one_run_per_seed(records: dict) -> dict[str, dict]:
    """The finished seed runs, one per seed: the full config's, else the lite one (the same seed twice would
    count one seed as two samples in every mean and sd)."""
    done = {n: r["data"] for n, r in records.items() if r["status"] == "done"}
    full = {n: d for n, d in done.items() if n.startswith("compatible_s")}
    lite = {n: d for n, d in done.items() if n.startswith("compatible_lite_s")
            and n.replace("compatible_lite_s", "compatible_s") not in full}
    return {**full, **lite}


def seed_tables(seeds: dict[str, dict]) -> tuple[list[str], dict, dict]:
    """The Markdown lines, the summary for ``results.json`` and the mean interpolation curves."""
    runs = [d["results"]["methods"] for d in seeds.values()]
    learning = [d["results"]["expert_em_by_step"] for d in seeds.values()]
    f = lambda values, digits=3: format_mean_sd(values, digits)
    lines = [f"## Target task T (map of a sum): answer-token cross-entropy, nats, lower is better "
             f"({len(runs)} seed(s): {', '.join(seeds)})", "", "| model | target loss |", "|---|---|"]
    routed = list(dict.fromkeys(n for r in runs for n in r if "routing" in n))
    for name in ["base", "expert add (early)", "expert map (early)", "expert add (late)", "expert map (late)", *routed]:
        values = _values(runs, name)
        lines.append(f"| {name} | {f(values)}{f' (n = {len(values)})' if len(values) < len(runs) else ''} |")
    # Interpolation: per seed, the best alpha and whether it beats both endpoints.
    curves: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        for name, row in run.items():
            match = INTERP.match(name)
            if match:
                curves.setdefault(f"{match[1]} interp, {match[2]} (step {match[3]})", {}).setdefault(
                    float(match[4]), []).append(row["target_loss"])
    alphas = sorted({a for c in curves.values() for a in c})
    lines += ["", "| interpolation (α = weight of the add expert) | " + " | ".join(f"α={a:g}" for a in alphas)
              + " | best α per seed | seeds where a mix beats both experts |", "|---" * (len(alphas) + 3) + "|"]
    interp_verdict = {}
    for name, curve in curves.items():
        per_seed = np.array([curve[a] for a in alphas]).T  # [seed, alpha]
        best = [alphas[int(np.argmin(row))] for row in per_seed]
        beats = int(sum(min(row[1:-1]) < min(row[0], row[-1]) for row in per_seed))
        interp_verdict[name] = {"best_alpha": best, "mix_beats_both_experts": beats}
        lines.append(f"| {name} | " + " | ".join(f(curve[a]) for a in alphas) + " | "
                     + ", ".join(f"{b:g}" for b in best) + f" | {beats} of {len(per_seed)} |")
    # Did the experts learn their own tasks? Greedy exact match on held-out strings per snapshot.
    steps = learning[0]["steps"]
    lines += ["", "Own-task greedy exact match of each expert snapshot (held-out strings):", "",
              "| expert | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for name in ("add", "map"):
        lines.append(f"| {name} | " + " | ".join(f(list(v), 2) for v in zip(*[l[name] for l in learning])) + " |")
    lines.append(f"(base model: add {f(_values(runs, 'base', 'add_em'), 2)}, map {f(_values(runs, 'base', 'map_em'), 2)})")
    # CKA per layer (steps >= the first snapshot; the shared base at step 0 is 1 by construction).
    ckas = [d["cka"] for d in seeds.values()]
    layers = [k for k in ckas[0] if k != "steps"]
    lines += ["", "Linear CKA between the add and map experts (fixed probe batch), per layer:", "",
              "| layer | " + " | ".join(f"step {s}" for s in ckas[0]["steps"]) + " |", "|---" * (len(ckas[0]["steps"]) + 1) + "|"]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(f(list(v)) for v in zip(*[c[layer] for c in ckas])) + " |")
    # Verdict numbers.
    early, late = (next(n for n in runs[0] if n.startswith(f"per-layer routing {s}")) for s in ("early", "late"))
    diff = [r[early]["target_loss"] - r[late]["target_loss"] for r in runs]
    best_interp = [min(row["target_loss"] for n, row in r.items() if INTERP.match(n) and INTERP.match(n)[2] == "late")
                   for r in runs]
    n4 = {kind: next((n for n in routed if n.startswith("multi-layer routing n=4") and kind in n), None)
          for kind in ("early", "late", "control")}
    lines += ["", "## Verdict numbers (per seed)", "",
              f"- per-layer routing, early minus late: {', '.join(f'{d:+.3f}' for d in diff)} (mean {f(diff)})",
              f"- per-layer routing minus the best interpolation (either kind, any α), late experts: "
              + ", ".join(f"{r[late]['target_loss'] - b:+.3f}" for r, b in zip(runs, best_interp))]
    if n4["control"] and n4["late"]:
        gap = [r[n4["late"]]["target_loss"] - r[n4["control"]]["target_loss"] for r in runs
               if n4["late"] in r and n4["control"] in r]
        lines.append(f"- n = 4 routing over the late experts minus n = 4 over base MLPs (control): "
                     + ", ".join(f"{g:+.3f}" for g in gap) + f" (mean {f(gap)})")
    if n4["early"] and n4["late"]:
        gap = [r[n4["early"]]["target_loss"] - r[n4["late"]]["target_loss"] for r in runs
               if n4["early"] in r and n4["late"] in r]
        lines.append(f"- n = 4 routing, early minus late experts: " + ", ".join(f"{g:+.3f}" for g in gap))
    lines.append(f"- CKA, last layer, first -> last snapshot: "
                 + ", ".join(f"{c[layers[-1]][0]:.3f} -> {c[layers[-1]][-1]:.3f}" for c in ckas))
    lines.append("")
    summary = {"runs": list(seeds), "per_run": dict(zip(seeds, runs)), "expert_em_by_step": dict(zip(seeds, learning)),
               "mean": {n: {c: mean_sd(_values(runs, n, c))[0] for c in row} for n, row in runs[0].items()},
               "sd": {n: {c: mean_sd(_values(runs, n, c))[1] for c in row} for n, row in runs[0].items()},
               "interpolation": interp_verdict}
    mean_curves = {name: {a: float(np.mean(v)) for a, v in curve.items()} for name, curve in curves.items()}
    return lines, summary, mean_curves


def _plot(interp: dict, ckas: dict) -> bytes:
    from metafit.runs import figure

    fig = figure((11, 4))
    left, right = fig.subplots(1, 2)
    for name, curve in interp.items():
        alphas = sorted(curve)
        left.plot(alphas, [curve[a] for a in alphas], marker="o", label=name)
    left.set(xlabel="alpha (add expert weight)", ylabel="target loss (mean over seeds)", title="interpolation")
    left.legend(fontsize=7)
    for run, cka in ckas.items():
        for layer, values in cka.items():
            if layer != "steps":
                right.plot(cka["steps"], values, marker=".", alpha=0.7, label=f"{layer} ({run})")
    right.set(xlabel="expert fine-tuning step", ylabel="linear CKA", title="CKA(add expert, map expert)")
    right.legend(fontsize=5, ncol=2)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    return png.getvalue()
