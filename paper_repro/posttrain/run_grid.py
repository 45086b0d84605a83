"""The post-training grid: data once, then per seed SFT, KTO, DPO, SFT -> KTO and the merges; then the table.

    python paper_repro/posttrain/run_grid.py --seeds 0 1 2          # resumable: finished runs are skipped
    python paper_repro/posttrain/run_grid.py --table-only           # rebuild results.json + table.md

Every run is ``metafit run configs/posttrain/<stage>.yaml`` into ``runs/posttrain/<stage>_s<seed>``
(the data run is ``runs/posttrain/data``), one at a time; a run folder holding ``results.json``
is finished and skipped, an unfinished one resumes from its checkpoints. Results of every
finished run are collected into ``paper_repro/posttrain/results.json`` and ``table.md``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS = REPO / "runs" / "posttrain"
CATEGORIES = ("math", "string", "extraction", "classification", "unsafe")
ROWS = (("student before", "sft", "start"), ("SFT", "sft", "sft"), ("KTO", "kto", "kto"), ("DPO", "dpo", "dpo"),
        ("SFT -> KTO", "sft_kto", "kto"), ("avg(SFT seed s, SFT seed s+1)", "merge_sft_average", "merge"),
        ("0.05 SFT + 0.95 (SFT -> KTO)", "merge_sft_kto", "merge"), ("TIES(SFT, SFT -> KTO)", "merge_ties", "merge"))


def run(stage: str, seed: int, overrides: list[str], folder: Path) -> None:
    if (folder / "results.json").exists():
        return
    command = [sys.executable, "-m", "metafit.cli", "run", f"configs/posttrain/{stage}.yaml", "--workdir", str(folder),
               "--set", f"seed={seed}", *[x for o in overrides for x in ("--set", o)]]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def grid(seeds: list[int]) -> None:
    data = RUNS / "data"
    run("data", 0, [], data)
    common = [f"args.data_run={data}"]
    folder = lambda stage, seed: RUNS / f"{stage}_s{seed}"
    for seed in seeds:  # seed order first: a partial grid has whole seeds
        run("sft", seed, common, folder("sft", seed))
        for stage in ("kto", "dpo"):
            run(stage, seed, common, folder(stage, seed))
        run("sft_kto", seed, common + [f"args.init_run={folder('sft', seed)}"], folder("sft_kto", seed))
        pair = f"args.runs=[{folder('sft', seed)},{folder('sft_kto', seed)}]"
        run("merge_sft_kto", seed, common + [pair], folder("merge_sft_kto", seed))
        run("merge_ties", seed, common + [pair], folder("merge_ties", seed))
        run("sft", seed + 1, common, folder("sft", seed + 1))  # the second SFT seed of the plain average
        average = f"args.runs=[{folder('sft', seed)},{folder('sft', seed + 1)}]"
        run("merge_sft_average", seed, common + [average], folder("merge_sft_average", seed))


def table() -> dict:
    """Mean and std over the seeds that finished: exact match per category, overall, and the mean
    response-token cross-entropy of the gold answers (nats/token, lower is better)."""
    collected: dict[str, dict[str, list[float]]] = {}
    for label, stage, method in ROWS:
        for path in sorted(RUNS.glob(f"{stage}_s*/results.json")):
            scores = json.loads(path.read_text())["methods"][method]
            row = collected.setdefault(label, {})
            for name in [f"{c}_em" for c in CATEGORIES] + ["mean_em", "mean_loss"]:
                row.setdefault(name, []).append(scores[name])
            row.setdefault("seeds", []).append(int(path.parent.name.rsplit("_s", 1)[1]))
    lines = ["| model | seeds | " + " | ".join(CATEGORIES) + " | overall | gold-answer loss |",
             "|---" * (len(CATEGORIES) + 4) + "|"]
    for label, row in collected.items():
        cells = [f"{np.mean(row[f'{c}_em']):.2f} ± {np.std(row[f'{c}_em']):.2f}" for c in CATEGORIES + ("mean",)]
        cells.append(f"{np.mean(row['mean_loss']):.2f} ± {np.std(row['mean_loss']):.2f}")
        lines.append(f"| {label} | {','.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    (HERE / "results.json").write_text(json.dumps(collected, indent=1))
    (HERE / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return collected


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--table-only", action="store_true")
    options = parser.parse_args()
    if not options.table_only:
        grid(options.seeds)
    table()
