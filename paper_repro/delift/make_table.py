"""DELIFT table builder: one table per use case from the sweep store of ``experiments/delift.yaml``.

    metafit repro delift --scale small     # runs the missing jobs, rebuilds results/small/table.md
    metafit repro delift --table-only      # rebuilds it from sweep.json

Cells are x100: one seed shows its value, several show mean ± sample standard deviation (ddof = 1).
"""
from __future__ import annotations

import numpy as np

ARMS = ("initial", "random", "selectit", "less", "deft_ucs", "delift_se", "fl_only", "delift", "full")
METRICS = ("rouge_l", "exact_match", "embedding_similarity")
USE_CASES = ("instruction", "task", "continual")


def collect(run_dir, results: dict) -> dict:
    """Each arm's held-out scores and training-set size."""
    return {arm: {k: scores[k] for k in (*METRICS, "train_size") if k in scores}
            for arm, scores in results["methods"].items()}


def _cell(values: np.ndarray) -> str:
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def build(records: dict, scale: str, variables: dict) -> dict[str, str]:
    done = [r for r in records.values() if r.get("status") == "done"]
    out = []
    for use_case in USE_CASES:
        runs = sorted((r for r in done if r["tags"].get("use_case") == use_case), key=lambda r: r["tags"]["seed"])
        seeds = ", ".join(str(r["tags"]["seed"]) for r in runs) or "none"
        out.append(f"\n### {use_case} (seeds: {seeds})\n\n| arm | " + " | ".join(METRICS) + " | train pairs |")
        out.append("|---" * (len(METRICS) + 2) + "|")
        for arm in ARMS:
            values = [r["data"][arm] for r in runs if arm in r["data"]]
            if not values:
                out.append(f"| {arm} | " + " | ".join(["not run"] * (len(METRICS) + 1)) + " |")
                continue
            cells = [_cell(np.array([v[m] for v in values]) * 100) for m in METRICS]
            out.append(f"| {arm} | " + " | ".join(cells) + f" | {int(values[0]['train_size'])} |")
    failed = {name: r.get("error", "") for name, r in records.items() if r.get("status") == "failed"}
    if failed:
        out += ["", "Failed jobs (error in sweep.json):", ""] + [
            f"- {name}: failed ({error.splitlines()[0][:200] if error else ''})" for name, error in failed.items()]
    return {"table.md": "\n".join(out) + "\n"}
