"""Compares two runs of one robust config that differ only in the loss's key stream (issue 16).

Reads the per-epoch metrics of every ``method:tuning`` entry and seed from each run folder's
``metrics.jsonl`` (``split`` ``eval`` before issue 16, ``epoch`` after), summarises each seed as
the experiment does (peak / last test accuracy, last memorisation, last clean AUROC), and writes
a markdown table of the paired differences and a JSON file with every per-seed number.

Usage:
    python paper_repro/clear/key_stream.py OLD_RUN NEW_RUN --out paper_repro/clear/results/key_stream
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METRICS = ("peak_test_accuracy", "last_test_accuracy", "last_memorisation", "last_clean_auroc")


def per_seed_summaries(run: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{entry: {seed: summary}}`` from a run folder's per-epoch metric lines."""
    curves: dict[str, dict[str, list[dict]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") in ("eval", "epoch") and "test_accuracy" in record:
            entry, _, seed = record["stage"].split("/")
            curves.setdefault(entry, {}).setdefault(seed, []).append(record)
    return {entry: {seed: summary(curve) for seed, curve in seeds.items()} for entry, seeds in curves.items()}


def summary(curve: list[dict]) -> dict[str, float]:
    accuracy = [c["test_accuracy"] for c in curve]
    aurocs = [c["clean_auroc"] for c in curve if "clean_auroc" in c]
    return {"peak_test_accuracy": max(accuracy), "last_test_accuracy": accuracy[-1],
            "last_memorisation": curve[-1]["memorisation"], "last_clean_auroc": aurocs[-1] if aurocs else None}


def table(old: dict, new: dict) -> list[str]:
    lines = []
    for entry in old:
        seeds = sorted(old[entry])
        lines += [f"### {entry} ({len(seeds)} seeds)", "",
                  "| metric | old stream mean ± sd | new stream mean ± sd | mean paired diff | sd of paired diffs "
                  "| per seed, old → new |", "|---|---|---|---|---|---|"]
        for metric in METRICS:
            if old[entry][seeds[0]][metric] is None:
                continue
            a = np.array([old[entry][s][metric] for s in seeds])
            b = np.array([new[entry][s][metric] for s in seeds])
            diff = b - a
            pairs = ", ".join(f"{x:.3f} → {y:.3f}" for x, y in zip(a, b))
            lines.append(f"| {metric} | {a.mean():.3f} ± {a.std(ddof=1):.3f} | {b.mean():.3f} ± {b.std(ddof=1):.3f} "
                         f"| {diff.mean():+.3f} | {diff.std(ddof=1):.3f} | {pairs} |")
        lines.append("")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="run folder made with the previous key stream")
    parser.add_argument("new", type=Path, help="run folder made with the current key stream")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    old, new = per_seed_summaries(args.old), per_seed_summaries(args.new)
    args.out.with_suffix(".json").write_text(json.dumps({"old": old, "new": new}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(table(old, new)))


if __name__ == "__main__":
    main()
