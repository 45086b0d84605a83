"""Builds the CleaR reproduction table and plots from ``run_grid.py``'s ``grid_results.json``.

Usage:
    python paper_repro/clear/make_table.py GRID.json [GRID2.json ...] --out paper_repro/clear/results

Writes the merged ``grid_results.json``, ``table.md`` (mean ± std over seeds of peak / last /
clean-validation-selected test accuracy, memorisation and
clean-probability AUROC, per method and noise setting; the CleaR − plain-PEFT gaps) and
``accuracy_vs_noise.png``, ``memorisation_curves.png``, ``test_accuracy_curves.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
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


def rows_of(grid: dict) -> dict[tuple[str, str, float], dict]:
    rows = {}
    for job in grid["jobs"].values():
        for label, row in job["results"]["methods"].items():
            rows[parse_label(label)] = row
    return rows


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="+", help="grid_results.json files (jobs are merged; later files win)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    grid = {"jobs": {}}
    for path in args.grids:
        grid["jobs"].update(json.loads(Path(path).read_text())["jobs"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_of(grid)
    (out / "table.md").write_text(table(rows))
    (out / "grid_results.json").write_text(json.dumps(grid, indent=1))
    plots(grid, rows, out)
    print(table(rows))


if __name__ == "__main__":
    main()
