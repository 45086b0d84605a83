"""Post-training table builder: exact match per category from the sweep store of ``experiments/posttrain.yaml``.

    metafit repro posttrain                 # runs the missing jobs, rebuilds table.md and results.json
    metafit repro posttrain --table-only    # rebuilds them from sweep.json

:func:`collect` keeps each finished run's scores (exact match per category, overall, and the mean
response-token cross-entropy of the gold answers, nats/token); :func:`build` shows the mean and
sample standard deviation (ddof=1; 0.00 for one seed) over the seeds that finished, per row.
"""
from __future__ import annotations

import json

import numpy as np

CATEGORIES = ("math", "string", "extraction", "classification", "unsafe")
METRICS = tuple(f"{c}_em" for c in CATEGORIES) + ("mean_em", "mean_loss")
# (table row, the job's stage tag, the method inside that run's results)
ROWS = (("student before", "sft", "start"), ("SFT", "sft", "sft"), ("KTO", "kto", "kto"), ("DPO", "dpo", "dpo"),
        ("SFT -> KTO", "sft_kto", "kto"), ("avg(SFT seed s, SFT seed s+1)", "merge_sft_average", "merge"),
        ("0.05 SFT + 0.95 (SFT -> KTO)", "merge_sft_kto", "merge"), ("TIES(SFT, SFT -> KTO)", "merge_ties", "merge"))


def collect(run_dir, results: dict) -> dict:
    """``{method: {metric: value}}`` of a training or merge run; the data run has no scores."""
    methods = results.get("methods", {})
    return {name: {m: scores[m] for m in METRICS} for name, scores in methods.items()
            if isinstance(scores, dict) and all(m in scores for m in METRICS)}


def _seed(record: dict) -> int:
    tags = record.get("tags", {})
    return int(tags.get("seed_of_row", tags.get("seed", 0)))


def rows(records: dict) -> dict[str, dict[str, list]]:
    """``{row: {metric: [value per seed], "seeds": [...]}}`` over the finished jobs, seeds ascending."""
    done = sorted((r for r in records.values() if r.get("status") == "done"), key=_seed)
    collected: dict[str, dict[str, list]] = {}
    for label, stage, method in ROWS:
        for record in done:
            if record.get("tags", {}).get("stage") != stage or method not in record.get("data", {}):
                continue
            row = collected.setdefault(label, {})
            for metric in METRICS:
                row.setdefault(metric, []).append(record["data"][method][metric])
            row.setdefault("seeds", []).append(_seed(record))
    return collected


def _std(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def build(records: dict, scale: str, variables: dict) -> dict[str, str]:
    collected = rows(records)
    lines = ["| model | seeds | " + " | ".join(CATEGORIES) + " | overall | gold-answer loss |",
             "|---" * (len(CATEGORIES) + 4) + "|"]
    for label, row in collected.items():
        cells = [f"{np.mean(row[f'{c}_em']):.2f} ± {_std(row[f'{c}_em']):.2f}" for c in CATEGORIES + ("mean",)]
        cells.append(f"{np.mean(row['mean_loss']):.2f} ± {_std(row['mean_loss']):.2f}")
        lines.append(f"| {label} | {','.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample standard deviation (ddof = 1) over the seeds listed; one seed shows ± 0.00."]
    failed = {name: r.get("error", "") for name, r in records.items() if r.get("status") == "failed"}
    if failed:
        lines += ["", "Failed jobs (error in sweep.json):", ""] + [
            f"- {name}: failed ({error.splitlines()[0][:200] if error else ''})" for name, error in failed.items()]
    return {"table.md": "\n".join(lines) + "\n", "results.json": json.dumps(collected, indent=1)}
