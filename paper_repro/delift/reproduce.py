"""Runs the DELIFT grid (use cases x seeds) one run at a time, resumably, and builds the table.

Each (use case, seed) is one ``metafit run configs/select/delift_<use_case>.yaml`` into
``paper_repro/delift/runs/<use_case>_s<seed>``; a run folder with ``results.json`` is skipped, a
killed one resumes (its utility tiles and checkpoints are kept). The table (mean +- std over the
seeds run) goes to ``results/table.md``.

    python paper_repro/delift/reproduce.py --use-cases instruction --seeds 0 --set args.n_pool=120 ...
    python paper_repro/delift/reproduce.py --table-only
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ARMS = ("initial", "random", "selectit", "less", "deft_ucs", "delift_se", "fl_only", "delift", "full")
METRICS = ("rouge_l", "exact_match", "embedding_similarity")


def run(use_case: str, seed: int, overrides: list[str]) -> None:
    folder = HERE / "runs" / f"{use_case}_s{seed}"
    if (folder / "results.json").exists():
        return
    command = [sys.executable, "-m", "metafit", "run", str(ROOT / f"configs/select/delift_{use_case}.yaml"),
               "--workdir", str(folder), "--set", f"seed={seed}"]
    for override in overrides:
        command += ["--set", override]
    subprocess.run(command, check=True, cwd=ROOT)


def table() -> str:
    lines = []
    for folder in sorted((HERE / "runs").glob("*_s*")):
        if (folder / "results.json").exists():
            lines.append((folder.name.rsplit("_s", 1)[0], json.loads((folder / "results.json").read_text())))
    out = []
    for use_case in ("instruction", "task", "continual"):
        runs = [r for u, r in lines if u == use_case]
        out.append(f"\n### {use_case} ({len(runs)} seed(s))\n\n| arm | " + " | ".join(METRICS) + " | train pairs |")
        out.append("|---" * (len(METRICS) + 2) + "|")
        for arm in ARMS:
            values = [r["methods"][arm] for r in runs if arm in r.get("methods", {})]
            if not values:
                out.append(f"| {arm} | " + " | ".join(["not run"] * (len(METRICS) + 1)) + " |")
                continue
            cells = []
            for metric in METRICS:
                v = np.array([x[metric] for x in values]) * 100
                cells.append(f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}")
            out.append(f"| {arm} | " + " | ".join(cells) + f" | {int(values[0]['train_size'])} |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--use-cases", nargs="+", default=["instruction", "task", "continual"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. args.n_pool=120")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.table_only:
        for use_case in args.use_cases:
            for seed in args.seeds:
                run(use_case, seed, args.set)
    (HERE / "results").mkdir(exist_ok=True)
    text = table()
    (HERE / "results" / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
