"""CleaR table builder: the table and plots from the sweep store of ``experiments/clear.yaml``.

    metafit repro clear --scale gpu          # runs the grid's missing jobs, rebuilds results/
    metafit repro clear --table-only         # rebuilds results/table.md and the plots from results/sweep.json

:func:`collect` keeps a finished run's ``results.json`` and its per-epoch curves;
:func:`build` writes ``table.md`` (mean ± std over seeds of peak / last /
clean-validation-selected test accuracy, memorisation and clean-probability AUROC, per method
and noise setting; the CleaR − plain-PEFT gaps) and ``accuracy_vs_noise.png``,
``memorisation_curves.png``, ``test_accuracy_curves.png``. Failed jobs are listed under the table.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

NOISE_NAMES = {"symm": "sym", "asym": "asym", "inst": "inst", "none": "none"}


def parse_label(label: str) -> tuple[str, str, float]:
    """``'clear:lora symm0.4'`` -> ``('clear:lora', 'sym', 0.4)``."""
    entry, setting = label.split(" ")
    match = re.fullmatch(r"([a-z]+?)([0-9.]+)", setting)
    return entry, NOISE_NAMES.get(match.group(1), match.group(1)), float(match.group(2))


def fmt(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


EPOCH_SPLIT = "epoch"  # metafit.robust.EPOCH_HOOK: the per-epoch metrics lines (not imported: it loads JAX)


def collect(run_dir: Path, results: dict) -> dict:
    """A finished run's results and per-epoch curves (metrics.jsonl lines of the epoch callback)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    curves = [record for record in map(json.loads, lines) if record.get("split") == EPOCH_SPLIT]
    return {"results": results, "curves": curves}


def rows_of(grid: dict) -> dict[tuple[str, str, float], dict]:
    rows = {}
    for job in grid["jobs"].values():
        for label, row in job["results"]["methods"].items():
            rows[parse_label(label)] = row
    return rows


def build(records: dict, scale: str, variables: dict) -> dict[str, str | bytes]:
    """``table.md`` and the plots from the sweep records of one scale."""
    grid = {"jobs": {name: r["data"] for name, r in records.items() if r["status"] == "done"}}
    failed = {name: r["error"] for name, r in records.items() if r["status"] == "failed"}
    rows = rows_of(grid)
    text = table(rows)
    if failed:
        text += "\nFailed jobs (error in sweep.json):\n\n" + "".join(
            f"- {name}: failed ({error.splitlines()[0][:200]})\n" for name, error in failed.items())
    with tempfile.TemporaryDirectory() as tmp:
        plots(grid, rows, Path(tmp))
        return {"table.md": text, **{p.name: p.read_bytes() for p in sorted(Path(tmp).glob("*.png"))}}


def table(rows: dict) -> str:
    lines = ["| method | noise | η | peak acc | last acc | val-selected acc | memorisation | clean AUROC | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (entry, noise, rate), row in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        lines.append(
            f"| {entry} | {noise} | {rate:g} | {fmt(row['peak_test_accuracy_mean'], row['peak_test_accuracy_std'])} "
            f"| {fmt(row['last_test_accuracy_mean'], row['last_test_accuracy_std'])} "
            f"| {fmt(row.get('val_selected_test_accuracy_mean', float('nan')), row.get('val_selected_test_accuracy_std', 0))} "
            f"| {fmt(row.get('last_memorisation_mean'), row.get('last_memorisation_std', 0))} "
            f"| {fmt(row.get('last_clean_auroc_mean', float('nan')), row.get('last_clean_auroc_std', 0), 1.0, 3)} "
            f"| {int(row['seeds'])} |")
    gaps = ["", "CleaR − plain PEFT (same family, same seeds and noisy labels), test accuracy, points:", "",
            "| family | noise | η | Δ last | Δ peak | Δ val-selected |", "|---|---|---|---|---|---|"]
    for (entry, noise, rate), row in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        method, tuning = entry.split(":")
        plain = rows.get((f"ce:{tuning}", noise, rate))
        if method == "clear" and plain is not None:
            gaps.append(f"| {tuning} | {noise} | {rate:g} "
                        f"| {100 * (row['last_test_accuracy_mean'] - plain['last_test_accuracy_mean']):+.1f} "
                        f"| {100 * (row['peak_test_accuracy_mean'] - plain['peak_test_accuracy_mean']):+.1f} "
                        f"| {100 * (row['val_selected_test_accuracy_mean'] - plain['val_selected_test_accuracy_mean']):+.1f} |")
    return "\n".join(lines + gaps) + "\n"


def plots(grid: dict, rows: dict, out: Path) -> None:
    from metafit.runs import plot_curves

    by_entry = defaultdict(list)
    for (entry, noise, rate), row in rows.items():
        if noise == "sym":
            by_entry[entry].append((rate, row["last_test_accuracy_mean"]))
    series = {e: ([r for r, _ in sorted(v)], [a for _, a in sorted(v)]) for e, v in by_entry.items() if len(v) > 1}
    if series:
        plot_curves(out / "accuracy_vs_noise.png", series, xlabel="symmetric noise rate η",
                    ylabel="last test accuracy", title="BBC News, all-MiniLM-L6-v2")
    curves = defaultdict(lambda: defaultdict(list))
    for job in grid["jobs"].values():
        for record in job["curves"]:
            entry, setting, _seed = record["stage"].split("/")
            if setting in ("symmetric0.4",) and "memorisation" in record:
                curves[entry][int(record["epoch"])].append((record["memorisation"], record["test_accuracy"]))
    for index, (metric, name) in enumerate((("memorisation", "memorisation_curves"),
                                            ("test accuracy", "test_accuracy_curves"))):
        series = {entry: (sorted(per_epoch), [float(np.mean([v[index] for v in per_epoch[e]]))
                                              for e in sorted(per_epoch)])
                  for entry, per_epoch in curves.items()}
        if series:
            plot_curves(out / f"{name}.png", series, xlabel="epoch", ylabel=metric,
                        title="BBC News, symmetric η = 0.4 (mean over seeds)")
