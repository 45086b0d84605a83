"""AMFS table builder: ``results/<scale>/table.md`` from the sweep store of ``experiments/amfs.yaml``.

    metafit repro amfs --scale cpu        # runs the grid's missing jobs, then rebuilds the table
    metafit repro amfs --table-only       # rebuilds results/cpu/table.md from results/cpu/sweep.json

:func:`collect` turns one finished run folder into the numbers the table needs (the run's
metrics and the CV of its training meta-loss); :func:`build` writes the table from every
collected job of a scale. A cell with no finished job reads "not run", or "failed" when its
jobs failed (their errors are in ``sweep.json``).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

SINUSOID_LEARNERS = ("maml", "maml5", "fomaml", "anil", "metasgd", "reptile", "r2d2", "i-amfs", "o-amfs", "amfs")
HETERO_LEARNERS = ("maml", "o-amfs", "i-amfs", "amfs")
GLYPH_LEARNERS = ("maml", "fomaml", "protonet", "r2d2", "i-amfs", "amfs")
GLYPH_SETTINGS = ("5w1s", "5w5s", "20w1s")


def collect(run_dir: Path, results: dict) -> dict:
    """The run's metrics, the CV of its logged training meta-loss and, for weighted outer loops,
    the task-weight statistics averaged over the logged training steps."""
    row = dict(results["metrics"])
    if (run_dir / "metrics.jsonl").is_file():
        row["meta_loss_cv"] = meta_loss_cv(run_dir / "metrics.jsonl")
        row.update(weight_stats(run_dir / "metrics.jsonl"))
    return row


def weight_stats(path: Path) -> dict:
    """Means over logged training steps of ``weight_negative`` (share of negative task weights),
    ``weight_min`` and ``weight_max`` (empty for unweighted learners, which log none)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if '"split": "train"' in line]
    return {f"{key}_mean": sum(line[key] for line in lines) / len(lines)
            for key in ("weight_negative", "weight_min", "weight_max") if lines and key in lines[0]}


def meta_loss_cv(path: Path) -> float:
    """std / mean of the logged training meta-loss over the second half: stability relative to its level."""
    losses = [json.loads(line)["loss"] for line in path.read_text().splitlines() if '"split": "train"' in line]
    half = losses[len(losses) // 2:]
    mean = sum(half) / len(half)
    return math.sqrt(sum((v - mean) ** 2 for v in half) / len(half)) / mean


def _mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t-interval half-width over seeds (0 for one seed)."""
    t975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975.get(n, 1.96) * sd / math.sqrt(n)


def cell(rows: list[dict], key: str, scale: float = 1.0, digits: int = 3, failed: bool = False) -> str:
    """``mean ± CI`` over seeds; a single seed shows its 600-task CI marked with a dagger."""
    values = [r[key] * scale for r in rows if key in r]
    if not values:
        return "failed" if failed else "not run"
    if len(values) == 1:
        ci = rows[0].get(f"{key}_ci95", 0.0) * scale
        return f"{values[0]:.{digits}f} ± {ci:.{digits}f}†"
    mean, ci = _mean_ci(values)
    return f"{mean:.{digits}f} ± {ci:.{digits}f} (n={len(values)})"


def plain(rows: list[dict], key: str, fmt: str, failed: bool = False) -> str:
    values = [r[key] for r in rows if key in r]
    return format(sum(values) / len(values), fmt) if values else ("failed" if failed else "not run")


def build_table(rows: list[dict], scale_name: str, eval_tasks: int, failed: set = frozenset()) -> str:
    """The Markdown table; ``failed`` holds the (group, learner) cells with a failed job and no finished one."""
    by = defaultdict(list)
    for r in rows:
        by[(r["group"], r["learner"])].append(r)

    def mse(group, learner):
        return cell(by[(group, learner)], "query_mse", failed=(group, learner) in failed)

    def timing(group, learner, key, fmt):
        return plain(by[(group, learner)], key, fmt, failed=(group, learner) in failed)

    lines = [f"Scale: `{scale_name}` (the `{scale_name}` scale of experiments/amfs.yaml).", "",
             f"Sinusoid regression, query MSE on {eval_tasks} held-out tasks (lower is better), "
             "mean ± 95% CI over seeds; "
             "at K=10: seconds per meta-iteration, variance and CV (std / mean) of the logged training "
             "meta-loss over the second half of training, means over seeds.", "",
             "| learner | K=5 MSE | K=10 MSE | heterogeneous K=10 MSE | s / meta-iter (K=10) | meta-loss var (K=10) "
             "| meta-loss CV (K=10) |",
             "|---|---|---|---|---|---|---|"]
    for learner in SINUSOID_LEARNERS:
        k10 = ("sinusoid_k10", learner)
        lines.append(f"| {learner} | {mse('sinusoid_k5', learner)} | {mse(*k10)} | "
                     f"{mse('hetero_k10', learner) if learner in HETERO_LEARNERS else '—'} | "
                     f"{timing(*k10, 'seconds_per_iter', '.2e')} | {timing(*k10, 'meta_loss_var', '.3g')} | "
                     f"{timing(*k10, 'meta_loss_cv', '.3f')} |")
    lines += ["", f"Glyph few-shot classification, query accuracy (%) on {eval_tasks} held-out "
              "tasks of the evaluation alphabets († = one seed, ± is the 95% CI over tasks).", "",
              "| learner | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot | s / meta-iter (5w1s) |", "|---|---|---|---|---|"]
    for learner in GLYPH_LEARNERS:
        cells = [cell(by[(f"glyphs_{s}", learner)], "query_accuracy", 100.0, 1, (f"glyphs_{s}", learner) in failed)
                 for s in GLYPH_SETTINGS]
        lines.append(f"| {learner} | {' | '.join(cells)} | {timing('glyphs_5w1s', learner, 'seconds_per_iter', '.2e')} |")
    return "\n".join(lines) + "\n"


def build(records: dict, scale: str, variables: dict) -> dict[str, str]:
    """``{"table.md": ...}`` from the sweep records of one scale."""
    rows, failed = [], set()
    for record in records.values():
        tags = record["tags"]
        if record["status"] == "done":
            rows.append({**tags, **record["data"]})
        else:
            failed.add((tags["group"], tags["learner"]))
    return {"table.md": build_table(rows, scale, variables["eval_tasks"], failed)}
