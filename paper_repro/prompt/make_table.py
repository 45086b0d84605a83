"""PROMPT table builder: ``results.md`` and ``figures/`` from the sweep store of ``experiments/prompt.yaml``.

    metafit repro prompt                 # runs the missing sweeps (configs/bayes/prompt_*.yaml), rebuilds the report
    metafit repro prompt --table-only    # rebuilds results.md and figures/ from sweep.json

:func:`collect` keeps a sweep run's ``results.json`` and its ``problems.json`` (every problem's
cell, lpd, mse and NUTS diagnostics). :func:`build` recomputes every number from those
per-problem records, so the convergence gate below is applied here, from the stored
diagnostics, and no table can report an unconverged posterior:

* a problem's posterior is *converged* when :class:`metafit.bayes.ConvergenceGate` passes it
  (split R-hat <= 1.05 and ESS >= 100 over every scalar of every site, divergent transitions
  <= 1 % of the kept draws);
* a row (a method over all problems of a sweep, or over one cell's seeds) is reported only if
  every posterior in it is converged; otherwise it shows ``not converged`` and what failed.
  Closed-form methods (no_transfer) have no sampler and are always reported.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

SWEEPS = {
    "prompt_sweep_linear": ("Linear-Gaussian setting", "heterogeneity", "proxy_noise"),
    "prompt_sweep_gp": ("Gaussian-process setting", "heterogeneity", "proxy_noise"),
    "prompt_misspec_linear": ("Prior misspecification (linear, heterogeneity 1, learner's phi prior N(0, 1))",
                              "prior_misspecification", "proxy_noise"),
}
ORDER = ["no_transfer", "pooling", "hierarchical_mixture", "oracle", "prompt"]
REFERENCE = "no_transfer"
NOT_CONVERGED = "n.c."


def collect(run_dir: Path, results: dict) -> dict:
    """The sweep's overall results and every problem's record (scores and diagnostics)."""
    return {"results": results, "problems": json.loads((run_dir / "problems.json").read_text())}


def gate_failures(record: dict, index: np.ndarray) -> list[str]:
    """Why the posteriors ``index`` of one method fail the convergence gate (empty: all pass)."""
    from metafit.bayes import ConvergenceGate

    if "max_rhat" not in record:
        return []
    gate, failing = ConvergenceGate(), []
    for i in index:
        if gate.failures(record["max_rhat"][i], record["min_ess"][i], record["divergences"][i], record["draws"][i]):
            failing.append(i)
    if not failing:
        return []
    worst_site = record["worst_site"][max(failing, key=lambda i: record["max_rhat"][i])]
    return [f"{len(failing)}/{len(index)} posteriors fail (worst R-hat {max(record['max_rhat'][i] for i in index):.2f}"
            f" at '{worst_site}', min ESS {min(record['min_ess'][i] for i in index):.0f},"
            f" {sum(record['divergences'][i] for i in index)} divergences)"]


def diagnostics_text(record: dict, index: np.ndarray) -> str:
    """``R-hat | ESS | divergences`` over the posteriors ``index`` (worst R-hat, lowest ESS, total)."""
    if "max_rhat" not in record:
        return "– | – | –"
    return (f"{max(record['max_rhat'][i] for i in index):.3f} | {min(record['min_ess'][i] for i in index):.0f} | "
            f"{sum(record['divergences'][i] for i in index)}/{sum(record['draws'][i] for i in index)}")


def row_stats(problems: dict, name: str, index: np.ndarray) -> dict:
    """lpd / mse mean and sample sd, negative-transfer rates (vs no_transfer, same problems), gate verdict."""
    from metafit.stats import mean_sd

    record, reference = problems["methods"][name], problems["methods"][REFERENCE]
    lpd, mse = np.asarray(record["lpd"])[index], np.asarray(record["mse"])[index]
    return {"lpd": mean_sd(lpd), "mse": mean_sd(mse),
            "neg_lpd": float(np.mean(lpd < np.asarray(reference["lpd"])[index])),
            "neg_mse": float(np.mean(mse > np.asarray(reference["mse"])[index])),
            "failures": gate_failures(record, index), "n": len(index)}


def overall_table(problems: dict) -> list[str]:
    lines = ["| method | lpd | mse | neg. transfer (lpd) | neg. transfer (mse) | max R-hat | min ESS | divergent / draws |",
             "|---|---|---|---|---|---|---|---|"]
    index = np.arange(len(problems["cells"]["seed"]))
    for name in ORDER:
        if name not in problems["methods"]:
            continue
        s, diag = row_stats(problems, name, index), diagnostics_text(problems["methods"][name], index)
        if s["failures"]:
            lines.append(f"| {name} | not converged: {s['failures'][0]} | | | | {diag} |")
        else:
            lines.append(f"| {name} | {s['lpd'][0]:.3f} ± {s['lpd'][1]:.3f} | {s['mse'][0]:.3f} ± {s['mse'][1]:.3f} | "
                         f"{s['neg_lpd']:.2f} | {s['neg_mse']:.2f} | {diag} |")
    return lines


def cell_index(problems: dict, row_axis: str, col_axis: str) -> dict[tuple[float, float], np.ndarray]:
    cells = problems["cells"]
    pairs = list(zip(cells[row_axis], cells[col_axis]))
    return {pair: np.array([i for i, p in enumerate(pairs) if p == pair]) for pair in sorted(set(pairs))}


def pivot(problems: dict, row_axis: str, col_axis: str, cell) -> list[str]:
    """One line per (method, row value), one column per col value; ``cell(stats, record, index)`` -> text."""
    groups = cell_index(problems, row_axis, col_axis)
    cols = sorted({c for _, c in groups})
    lines = [f"| method | {row_axis} | " + " | ".join(f"{col_axis}={c:g}" for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name in ORDER:
        if name not in problems["methods"]:
            continue
        for value in sorted({r for r, _ in groups}):
            texts = [cell(row_stats(problems, name, groups[(value, c)]), problems["methods"][name], groups[(value, c)])
                     for c in cols]
            lines.append(f"| {name} | {value:g} | " + " | ".join(texts) + " |")
    return lines


def gated(text):
    return lambda s, record, index: NOT_CONVERGED if s["failures"] else text(s)


def cell_rows(problems: dict, row_axis: str, col_axis: str) -> list[dict]:
    """Per-cell rows for :func:`metafit.bayes.plot_axis`, converged rows only."""
    rows = []
    for (row_value, col_value), index in cell_index(problems, row_axis, col_axis).items():
        for name in ORDER:
            if name not in problems["methods"]:
                continue
            s = row_stats(problems, name, index)
            if s["failures"]:
                continue
            other = {axis: float(problems["cells"][axis][index[0]]) for axis in problems["cells"] if axis != "seed"}
            rows.append({**other, "method": name, "lpd": s["lpd"][0], "lpd_sd": s["lpd"][1],
                         "neg_transfer_rate": s["neg_lpd"]})
    return rows


def build(records: dict, scale: str, variables: dict) -> dict[str, str | bytes]:
    """``results.md`` and ``figures/<sweep>_vs_<axis>.png`` from the finished sweeps."""
    from metafit.bayes import ConvergenceGate
    from metafit.bayes.report import plot_axis
    from metafit.stats import CONVENTION

    gate = ConvergenceGate()
    files: dict[str, str | bytes] = {}
    out = ["# PROMPT reproduction: measured tables", "",
           "Generated by `metafit repro prompt` (grid: experiments/prompt.yaml) from the per-problem records in",
           "`sweep.json`. lpd = mean log predictive density per target point; negative transfer = lpd (or mse)",
           f"worse than no transfer on the same problem. Spread: {CONVENTION} (here: over problems or seeds).", "",
           f"Convergence gate (applied by this builder from the stored diagnostics): a posterior passes with split",
           f"R-hat <= {gate.max_rhat}, ESS >= {gate.min_ess:.0f} (worst over every scalar of every site) and divergent",
           f"transitions <= {gate.max_divergent_fraction:.0%} of its kept draws. A row is reported only if every",
           f"posterior in it passes; otherwise it reads `not converged` (whole sweep) or `{NOT_CONVERGED}` (one cell).", ""]
    for name, (title, row_axis, col_axis) in SWEEPS.items():
        record = records.get(name, {"status": "absent"})
        if record["status"] != "done":
            why = f"failed: {record['error'].splitlines()[0][:200]}" if record["status"] == "failed" else "not run"
            out += [f"## {title}", "", f"({why})", ""]
            continue
        problems = record["data"]["problems"]
        groups = cell_index(problems, row_axis, col_axis)
        seeds = sorted({len(i) for i in groups.values()})
        out += [f"## {title}", "", f"`{name}`: {len(groups)} cells x {'/'.join(map(str, seeds))} seeds.", "",
                "All problems:", ""] + overall_table(problems)
        out += ["", "Negative-transfer rate (lpd) per cell:", ""]
        out += pivot(problems, row_axis, col_axis, gated(lambda s: f"{s['neg_lpd']:.2f}"))
        out += ["", "lpd per cell (mean ± sd over seeds):", ""]
        out += pivot(problems, row_axis, col_axis, gated(lambda s: f"{s['lpd'][0]:.2f} ± {s['lpd'][1]:.2f}"))
        out += ["", "NUTS diagnostics per cell (max R-hat / min ESS / divergent transitions; closed forms: –):", ""]
        out += pivot(problems, row_axis, col_axis, lambda s, rec, index: diagnostics_text(rec, index).replace(" | ", " / "))
        out.append("")
        rows = cell_rows(problems, row_axis, col_axis)
        for axis in (row_axis, col_axis):
            if len({r[axis] for r in rows}) < 2:
                continue
            target = f"figures/{name}_vs_{axis}.png"
            with tempfile.TemporaryDirectory() as tmp:
                files[target] = plot_axis(rows, axis, Path(tmp) / "plot.png").read_bytes()
        for target in sorted(t for t in files if t.startswith(f"figures/{name}_")):
            out += [f"![{name} {Path(target).stem.removeprefix(name + '_')}]({target})", ""]
    return {"results.md": "\n".join(out), **files}
