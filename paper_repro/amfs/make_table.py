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


from metafit.stats import CONVENTION, mean_sd

SINUSOID_LEARNERS = ("maml", "maml5", "fomaml", "anil", "metasgd", "reptile", "r2d2", "i-amfs", "o-amfs", "amfs")
HETERO_LEARNERS = ("maml", "o-amfs", "i-amfs", "amfs")
GLYPH_LEARNERS = ("maml", "fomaml", "anil", "metasgd", "reptile", "protonet", "r2d2", "i-amfs", "amfs")
WEIGHTED_LEARNERS = ("o-amfs", "amfs")
WEIGHTINGS = ("gradient_agreement", "gradient_agreement_clipped", "softmax_cosine")
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


def cell(rows: list[dict], key: str, scale: float = 1.0, digits: int = 3, failed: bool = False) -> str:
    """``mean ± sd (n=k)`` over seeds (:data:`metafit.stats.CONVENTION`); one seed shows its value alone."""
    values = [r[key] * scale for r in rows if key in r]
    if not values:
        return "failed" if failed else "not run"
    mean, sd = mean_sd(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {sd:.{digits}f} (n={len(values)})"


def plain(rows: list[dict], key: str, fmt: str, failed: bool = False) -> str:
    values = [r[key] for r in rows if key in r]
    return format(sum(values) / len(values), fmt) if values else ("failed" if failed else "not run")


def weighting_of(row: dict) -> str:
    """The outer-loop weighting a row ran with: its tag, else the learner's configured one (the main grid)."""
    return row.get("weighting") or ("gradient_agreement" if row["learner"] in WEIGHTED_LEARNERS else "uniform")


def sinusoid_table(by: dict, mse) -> list[str]:
    lines = ["| learner | K=5 MSE | K=10 MSE | heterogeneous K=10 MSE | s / meta-iter (K=10) | meta-loss var (K=10) "
             "| meta-loss CV (K=10) |",
             "|---|---|---|---|---|---|---|"]
    for learner in SINUSOID_LEARNERS:
        k10 = by[("sinusoid_k10", learner)]
        lines.append(f"| {learner} | {mse('sinusoid_k5', learner)} | {mse('sinusoid_k10', learner)} | "
                     f"{mse('hetero_k10', learner) if learner in HETERO_LEARNERS else '—'} | "
                     f"{plain(k10, 'seconds_per_iter', '.2e')} | {plain(k10, 'meta_loss_var', '.3g')} | "
                     f"{plain(k10, 'meta_loss_cv', '.3f')} |")
    return lines


def weighting_table(by: dict, rows: list[dict], failed: set) -> list[str]:
    """Per learner and weighting: K=10 and heterogeneous MSE, the share of negative weights and the largest weight.

    The gradient-agreement MSEs are the main grid's rows; their weight statistics come from reruns of
    the same configs (``weighting_*_gradient_agreement_*``), whose MSEs are compared with the main rows.
    """
    study = defaultdict(list)
    for r in rows:
        if r["group"].startswith("weighting_"):
            study[(r["group"].removeprefix("weighting_"), r["learner"], r["weighting"])].append(r)
    lines = ["| learner | weighting | K=10 MSE | heterogeneous K=10 MSE | negative weights (K=10 / het.) "
             "| largest weight (K=10 / het.) |",
             "|---|---|---|---|---|---|"]
    for learner, baseline in (("o-amfs", "maml"), ("amfs", "i-amfs")):
        lines.append(f"| {baseline} | uniform (1/25) | {cell(by[('sinusoid_k10', baseline)], 'query_mse')} | "
                     f"{cell(by[('hetero_k10', baseline)], 'query_mse')} | 0 / 0 | 0.040 / 0.040 |")
        for weighting in WEIGHTINGS:
            def mse_rows(group):
                return by[(group, learner)] if weighting == "gradient_agreement" else study[(group, learner, weighting)]

            def stat(key, fmt):
                return " / ".join(plain(study[(g, learner, weighting)], key, fmt) for g in ("sinusoid_k10", "hetero_k10"))

            mses = [cell(mse_rows(g), "query_mse", failed=(f"weighting_{g}", learner) in failed)
                    for g in ("sinusoid_k10", "hetero_k10")]
            lines.append(f"| {learner} | {weighting} | {mses[0]} | {mses[1]} | {stat('weight_negative_mean', '.1%')} "
                         f"| {stat('weight_max_mean', '.3f')} |")
    # the reruns of the gradient-agreement rows should reproduce them (same config, seed and tasks)
    gaps = defaultdict(list)
    for (group, learner, weighting), reruns in study.items():
        if weighting == "gradient_agreement":
            gaps[learner] += [abs(rerun["query_mse"] - main["query_mse"]) for rerun in reruns
                              for main in by[(group, learner)] if main["seed"] == rerun["seed"]]
    gaps = {learner: g for learner, g in gaps.items() if g}  # reruns whose main rows exist
    if not gaps:
        return lines + ["", "The gradient-agreement weight statistics need the reruns "
                            "`weighting_*_gradient_agreement_*` (not run)."]
    per_learner = "; ".join(f"{learner} {len(g)} reruns, largest gap {max(g):.2g}" for learner, g in sorted(gaps.items()))
    note = ("The gradient-agreement MSEs are the main table's; reruns of those jobs (same config and seed, which "
            f"log the weights) differ from them by at most: {per_learner} (query MSE; the reruns are not bit-identical "
            "to the main rows, which ran in an earlier round).")
    return lines + ["", note]


def glyph_table(by: dict, failed: set, seed: int | None = None) -> list[str]:
    """Accuracy per learner and setting over every seed run, or over ``seed`` alone (like-with-like
    comparisons with the learners that have fewer seeds)."""
    lines = ["| learner | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot | s / meta-iter (5w1s) |", "|---|---|---|---|---|"]
    for learner in GLYPH_LEARNERS:
        cells = [cell([r for r in by[(f"glyphs_{s}", learner)] if seed is None or r["seed"] == seed],
                      "query_accuracy", 100.0, 1, (f"glyphs_{s}", learner) in failed)
                 for s in GLYPH_SETTINGS]
        timed = [r for r in by[("glyphs_5w1s", learner)] if seed is None or r["seed"] == seed]
        lines.append(f"| {learner} | {' | '.join(cells)} | {plain(timed, 'seconds_per_iter', '.2e')} |")
    return lines


def long_table(by: dict) -> list[str]:
    """MAML at 30,000 meta-iterations beside MAML and I-AMFS at 2,000 (the sinusoid rows), the same seeds."""
    seeds = {r["seed"] for r in by[("long_k10", "maml")]}  # like with like: the seeds the long runs have
    lines = ["| learner | meta-iterations | K=10 query MSE | training seconds |", "|---|---|---|---|"]
    for learner, group, steps in (("maml", "long_k10", "30,000"), ("maml", "sinusoid_k10", "2,000"),
                                  ("i-amfs", "sinusoid_k10", "2,000")):
        runs = [r for r in by[(group, learner)] if r["seed"] in seeds]
        lines.append(f"| {learner} | {steps} | {cell(runs, 'query_mse')} | {cell(runs, 'train_seconds', digits=0)} |")
    return lines


def conv4_table(by: dict, failed: set) -> list[str]:
    """Conv4 at 5-way 1-shot beside the MLP rows of the same learners, setting and iterations."""
    lines = ["| learner | Conv4 (32 filters) accuracy | MLP 784-64-64 accuracy | Conv4 s / meta-iter |", "|---|---|---|---|"]
    for learner in ("protonet", "maml"):
        conv = by[("conv4_5w1s", learner)]
        lines.append(f"| {learner} | {cell(conv, 'query_accuracy', 100.0, 1, ('conv4_5w1s', learner) in failed)} | "
                     f"{cell(by[('glyphs_5w1s', learner)], 'query_accuracy', 100.0, 1)} | "
                     f"{plain(conv, 'seconds_per_iter', '.2f')} |")
    return lines


def conv4_line(by: dict) -> str:
    """Seconds per meta-iteration of the Conv4 timing runs (20 iterations each)."""
    parts = [f"{learner} {plain(by[('conv4_timing', learner)], 'seconds_per_iter', '.2f')}"
             for learner in ("protonet", "maml")]
    return ("Conv4 timing runs of an earlier round (32 filters, 5-way 1-shot, meta-batch 8, MAML's tasks vmapped, "
            "10 steps per dispatch: both slow paths of XLA's CPU backend; first-chunk compilation included, 20 "
            f"iterations at the lowest priority): {', '.join(parts)} s per meta-iteration.")


def build_table(rows: list[dict], scale_name: str, eval_tasks: int, failed: set = frozenset()) -> str:
    """The Markdown tables; ``failed`` holds the (group, learner) cells with a failed job and no finished one."""
    by = defaultdict(list)
    for r in rows:
        by[(r["group"], r["learner"])].append(r)

    def mse(group, learner):
        return cell(by[(group, learner)], "query_mse", failed=(group, learner) in failed)

    spread = f"Spread: {CONVENTION}."
    lines = [f"Scale: `{scale_name}` (the `{scale_name}` scale of experiments/amfs.yaml).", "",
             f"Sinusoid regression, query MSE on {eval_tasks} held-out tasks (lower is better); "
             "O-AMFS and AMFS with gradient-agreement weights (the card's). "
             "At K=10: seconds per meta-iteration, variance and CV (std / mean) of the logged training "
             "meta-loss over the second half of training, means over seeds.", "",
             *sinusoid_table(by, mse), "", spread, "",
             "Outer-loop weighting, K=10 sinusoids (clean, and with 25% outlier tasks in meta-training), the same "
             f"seeds, steps and {eval_tasks} held-out tasks as above. Negative weights: share of a meta-batch's "
             "weights below 0; largest weight: the biggest of the 25 task weights (uniform: 0.040); both averaged "
             "over the logged training steps and seeds.", "",
             *weighting_table(by, rows, failed), "", spread, "",
             f"Glyph few-shot classification, query accuracy (%) on {eval_tasks} held-out tasks of the evaluation "
             "alphabets (MLP 784-64-64 backbone, 300 meta-iterations). Seconds per meta-iteration are means over "
             "the runs and depend on the shared machine's load when each ran (load 4 to 16 over the rounds; "
             "a job run in process after another also reuses its compiled programs): they order the "
             "learners only roughly.", "",
             *glyph_table(by, failed), "", spread, "",
             "The same, seed 0 only (every learner has it where the cell ran; compare the NTK learners, which "
             "have fewer seeds, here).", "",
             *glyph_table(by, failed, seed=0), "",
             f"Glyph 5-way 1-shot on the Conv4 backbone (32 filters, transductive batch norm, meta-batch 8, 300 "
             f"meta-iterations, {eval_tasks} held-out tasks), beside the MLP rows above; MAML's tasks unrolled "
             "(`args.task_batching=unroll`, the same numbers as vmap, 10x faster on this CPU), one step per dispatch "
             "(a convolution inside XLA's loop takes a slow path on CPU).", "",
             *conv4_table(by, failed), "", spread, "",
             conv4_line(by), "",
             "MAML at its config's length (30,000 meta-iterations) beside the 2,000-iteration rows above restricted "
             "to the seeds the long runs have, K=10 sinusoids, the same held-out tasks; training seconds as logged "
             "on the shared CPU (the 2,000-iteration rows ran in an earlier round, at another load).", "",
             *long_table(by), "", spread]
    return "\n".join(lines) + "\n"
def build(records: dict, scale: str, variables: dict) -> dict[str, str]:
    """``{"table.md": ...}`` from the sweep records of one scale."""
    rows, failed = [], set()
    for record in records.values():
        tags = record["tags"]
        if record["status"] == "done":
            rows.append({"seed": tags.get("seed"), **tags, **record["data"]})
        else:
            failed.add((tags["group"], tags["learner"]))
    return {"table.md": build_table(rows, scale, variables["eval_tasks"], failed)}
