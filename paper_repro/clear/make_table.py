"""CleaR table builder: the tables and plots from the sweep store of ``experiments/clear.yaml``.

    metafit repro clear --scale gpu          # runs the grid's missing jobs, rebuilds results/
    metafit repro clear --table-only         # rebuilds results/table.md and the plots from results/sweep.json
    metafit repro clear --scale cpu          # the CPU grid (and smoke runs): results/cpu/

:func:`collect` keeps a finished run's ``results.json``, its per-epoch curves and the machine it ran
on; :func:`build` writes ``table.md`` and the plots. Every row is rebuilt from *per-seed* numbers
(each seed's per-epoch curve, summarised by :func:`metafit.robust.runner.summarise`; a run stored
without curves counts only if it has one seed), so the spread follows :data:`metafit.stats.CONVENTION`
whatever the run itself reported. Tables:

* per protocol (config and dataset), per method and noise setting: peak / last /
  clean-validation-selected test accuracy, memorisation and the clean-probability AUROC;
* CleaR − each other arm of its family, paired over the seeds both finished (same init, data
  order and noisy labels): mean ± sd, the 95 % Student-t half-width, and in how many seeds CleaR won.

A job of the grid that failed shows as "failed" (its error under the table); one never started as
"not run".
"""
from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from metafit.stats import CONVENTION, format_mean_sd, mean_sd, t_halfwidth

REPO = Path(__file__).resolve().parents[2]
NOISE_NAMES = {"symm": "sym", "asym": "asym", "inst": "inst", "none": "none"}
EPOCH_SPLITS = ("epoch", "eval")  # metafit.robust.EPOCH_HOOK's lines (runs before issue 16 called them "eval")
METRICS = (("peak_test_accuracy", "peak acc", 100.0, 1), ("last_test_accuracy", "last acc", 100.0, 1),
           ("val_selected_test_accuracy", "val-selected acc", 100.0, 1),
           ("last_memorisation", "memorisation", 100.0, 1), ("last_clean_auroc", "clean AUROC", 1.0, 3))


def parse_label(label: str) -> tuple[str, str, float]:
    """``'clear:lora symm0.4'`` -> ``('clear:lora', 'sym', 0.4)``."""
    entry, setting = label.split(" ")
    match = re.fullmatch(r"([a-z]+?)([0-9.]+)", setting)
    return entry, NOISE_NAMES.get(match.group(1), match.group(1)), float(match.group(2))


def parse_setting(setting: str) -> tuple[str, float]:
    """``'symmetric0.4'`` (a curve's stage) or ``'sym0.4'`` (a grid job name) -> ``('sym', 0.4)``."""
    match = re.fullmatch(r"([a-z]+?)([0-9.]+)", setting)
    return NOISE_NAMES.get(match.group(1)[:4], match.group(1)[:4]), float(match.group(2))


def collect(run_dir: Path, results: dict) -> dict:
    """A finished run's results, per-epoch curves (metrics.jsonl lines of the epoch callback) and the
    machine it ran on (:func:`machine`), collected when the job ends."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    curves = [record for record in map(json.loads, lines) if record.get("split") == EPOCH_SPLITS[0]]
    return {"results": results, "curves": curves, "machine": machine()}


def machine() -> dict:
    """The device, core count and load averages (1, 5, 15 min) of this machine: on a shared CPU the
    load says how many other processes the job's ``seconds`` were shared with."""
    import os
    import platform

    import jax  # already loaded by the run this collects

    device = jax.devices()[0]
    return {"device": f"{device.platform}: {device.device_kind}", "machine": platform.machine(),
            "cores": os.cpu_count(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


# ----------------------------------------------------------------------------- per-seed numbers


def seed_summaries(record: dict) -> dict[tuple[str, str, float], dict[int, dict[str, float]]]:
    """``{(entry, noise, rate): {seed: summary}}`` of one done job, from its per-epoch curves.

    A job stored without curves (the first CPU smoke runs) has only its seed means: they count as the
    seed's numbers when the job ran one seed, and are dropped otherwise (no per-seed values to pool).
    """
    from metafit.robust.runner import summarise

    by_stage = defaultdict(dict)
    for line in record["data"]["curves"]:
        if line.get("split") in EPOCH_SPLITS:
            by_stage[line["stage"]][int(line["epoch"])] = line  # a resumed run may log an epoch twice
    out: dict[tuple[str, str, float], dict[int, dict[str, float]]] = defaultdict(dict)
    for stage, epochs in by_stage.items():
        entry, setting, seed = stage.split("/")
        out[(entry, *parse_setting(setting))][int(seed.removeprefix("seed"))] = summarise(
            [{k: v for k, v in epochs[e].items() if k not in ("stage", "split", "step")} for e in sorted(epochs)])
    for label, row in record["data"]["results"]["methods"].items():
        key = parse_label(label)
        if key not in out and int(row["seeds"]) == 1:
            out[key][int(record["tags"]["seed"])] = {k[:-5]: v for k, v in row.items() if k.endswith("_mean")}
    return out


def protocol_of(record: dict) -> tuple[str, str]:
    """(config file, dataset) of a job: rows are pooled only within one protocol."""
    return record["config"], record.get("tags", {}).get("dataset", "bbc_news")


def pooled(records: dict) -> dict[tuple[str, str], dict[tuple[str, str, float], dict[int, dict[str, float]]]]:
    """``{protocol: {(entry, noise, rate): {seed: summary}}}`` over every done job."""
    out = defaultdict(lambda: defaultdict(dict))
    for record in records.values():
        if record["status"] == "done":
            for key, seeds in seed_summaries(record).items():
                out[protocol_of(record)][key].update(seeds)
    return out


def grid_cells(records: dict, scale: str) -> dict[tuple[str, str], dict[tuple[str, str, float], dict[str, list[int]]]]:
    """``{protocol: {(entry, noise, rate): {"failed": seeds, "not run": seeds}}}`` of the grid's one-seed jobs
    (``grid-...`` names; their entries, noise and rate read from the job's overrides) that are not done."""
    from metafit.sweep import load_grid

    out = defaultdict(lambda: defaultdict(lambda: {"failed": [], "not run": []}))
    for job in load_grid(REPO / "experiments" / "clear.yaml", root=REPO).jobs(scale):
        status = records.get(job.name, {}).get("status")
        if not job.name.startswith("grid-") or status == "done":
            continue
        args = dict(o.split("=", 1) for o in job.overrides)
        noise = NOISE_NAMES[args["args.noise"][:4]]
        for entry in json.loads(args["args.methods"]):
            for rate in json.loads(args["args.noise_rates"]):
                key = (entry, noise, float(rate))
                out[(job.config, job.tags.get("dataset", "bbc_news"))][key][
                    "failed" if status == "failed" else "not run"].append(job.seed)
    return out


# ----------------------------------------------------------------------------- tables


def build(records: dict, scale: str, variables: dict) -> dict[str, str | bytes]:
    """``table.md`` and the plots from the sweep records of one scale."""
    failed = {name: r["error"] for name, r in records.items() if r["status"] == "failed"}
    protocols = pooled(records)
    missing = grid_cells(records, scale)
    sections = []
    for protocol in sorted(set(protocols) | set(missing), key=lambda p: (p[0] != variables.get("grid_config"), p)):
        rows, cells = protocols.get(protocol, {}), missing.get(protocol, {})
        config, dataset = protocol
        sections.append(f"## {dataset}, `{config}`\n\n" + table(rows, cells) + "\n" + paired_table(rows)
                        + machines(records, protocol))
    text = "\n".join(sections) + f"\nSpread: {CONVENTION}; 95 % intervals are Student-t (n − 1 degrees of freedom).\n"
    if failed:
        text += "\nFailed jobs (error in sweep.json):\n\n" + "".join(
            f"- {name}: failed ({error.splitlines()[0][:200]})\n" for name, error in failed.items())
    with tempfile.TemporaryDirectory() as tmp:
        plots(records, protocols, Path(tmp))
        return {"table.md": text, **{p.name: p.read_bytes() for p in sorted(Path(tmp).glob("*.png"))}}


def _order(key: tuple[str, str, float]) -> tuple:
    entry, noise, rate = key
    method, tuning = entry.split(":")
    families = ("full", "adapter", "lora", "bitfit", "prefix")
    return (noise != "sym", noise, rate, families.index(tuning) if tuning in families else len(families), tuning,
            method != "ce", method != "clear", method)


def table(rows: dict, cells: dict | None = None) -> str:
    """One line per (method, noise setting): mean ± sd over seeds of each metric, and its seeds."""
    cells = cells or {}
    lines = ["| method | noise | η | " + " | ".join(name for _, name, _, _ in METRICS) + " | seeds |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for key in sorted(set(rows) | set(cells), key=_order):
        entry, noise, rate = key
        seeds = rows.get(key, {})
        values = [format_mean_sd([seeds[s].get(metric, float("nan")) for s in sorted(seeds)], digits, scale)
                  if seeds else ("failed" if cells.get(key, {}).get("failed") else "not run")
                  for metric, _, scale, digits in METRICS]
        values = ["–" if v == "not run" and seeds else v for v in values]  # a metric the method lacks (AUROC)
        status = [f"done: {','.join(map(str, sorted(seeds))) if seeds else 'none'}"]
        for what, listed in cells.get(key, {}).items():
            if listed:
                status.append(f"{what}: {','.join(map(str, sorted(listed)))}")
        lines.append(f"| {entry} | {noise} | {rate:g} | " + " | ".join(values) + f" | {'; '.join(status)} |")
    return "\n".join(lines) + "\n"


def paired_table(rows: dict) -> str:
    """CleaR − every other arm of its family, paired over the seeds both finished, in points of test accuracy."""
    lines = ["CleaR − other arm of the same family, paired over the seeds both finished (same init, data order "
             "and noisy labels), points of test accuracy: mean ± sd [95 % t half-width], CleaR ahead in k of n seeds.",
             "", "| family | noise | η | CleaR − | Δ last | Δ peak | Δ val-selected | CleaR ahead (last) |",
             "|---|---|---|---|---|---|---|---|"]
    found = False
    for key in sorted(rows, key=_order):
        entry, noise, rate = key
        method, tuning = entry.split(":")
        clear = rows.get((f"clear:{tuning}", noise, rate))
        if method == "clear" or clear is None:
            continue
        common = sorted(set(clear) & set(rows[key]))
        if not common:
            continue
        found = True
        cells = []
        for metric in ("last_test_accuracy", "peak_test_accuracy", "val_selected_test_accuracy"):
            diffs = [100 * (clear[s][metric] - rows[key][s][metric]) for s in common]
            mean, sd = mean_sd(diffs)
            half = t_halfwidth(diffs)
            cells.append(f"{mean:+.1f}" + (f" ± {sd:.1f} [±{half:.1f}]" if len(diffs) > 1 else ""))
        ahead = sum(clear[s]["last_test_accuracy"] > rows[key][s]["last_test_accuracy"] for s in common)
        lines.append(f"| {tuning} | {noise} | {rate:g} | {method} | " + " | ".join(cells) + f" | {ahead} of {len(common)} |")
    return "\n".join(lines) + "\n" if found else ""


def machines(records: dict, protocol: tuple[str, str]) -> str:
    """Where the protocol's jobs ran: devices, cores, the range of 15-minute load averages and job seconds."""
    done = [r for r in records.values() if r["status"] == "done" and protocol_of(r) == protocol and "machine" in r["data"]]
    if not done:
        return ""
    devices = sorted({f"{r['data']['machine']['device']}, {r['data']['machine']['cores']} cores" for r in done})
    loads = [r["data"]["machine"]["load_avg_1_5_15"][2] for r in done]
    seconds = [r["seconds"] for r in done]
    return (f"\nRan on {'; '.join(devices)}; 15-minute load average at the end of each job {min(loads):.1f}–"
            f"{max(loads):.1f}; {min(seconds):.0f}–{max(seconds):.0f} s per job ({sum(seconds) / 60:.0f} min for "
            f"these {len(done)} jobs; per job in sweep.json).\n")


def plots(records: dict, protocols: dict, out: Path) -> None:
    """Of the BBC News protocol with the most arms: last accuracy against symmetric η (when it has several
    rates) and, at symmetric η = 0.4, memorisation and test accuracy per epoch (means over seeds)."""
    from metafit.runs import plot_curves

    bbc = [p for p in protocols if p[1] == "bbc_news"]
    if not bbc:
        return
    protocol = max(bbc, key=lambda p: len(protocols[p]))
    by_entry = defaultdict(list)
    for (entry, noise, rate), seeds in protocols[protocol].items():
        if noise == "sym":
            by_entry[entry].append((rate, mean_sd([seeds[s]["last_test_accuracy"] for s in sorted(seeds)])[0]))
    series = {e: ([r for r, _ in sorted(v)], [a for _, a in sorted(v)]) for e, v in by_entry.items() if len(v) > 1}
    if series:
        plot_curves(out / "accuracy_vs_noise.png", series, xlabel="symmetric noise rate η",
                    ylabel="last test accuracy", title="BBC News, all-MiniLM-L6-v2")
    curves = defaultdict(lambda: defaultdict(list))
    for record in records.values():
        if record["status"] != "done" or protocol_of(record) != protocol:
            continue
        for line in record["data"]["curves"]:
            entry, setting, _seed = line["stage"].split("/")
            if setting == "symmetric0.4" and "memorisation" in line:
                curves[entry][int(line["epoch"])].append((line["memorisation"], line["test_accuracy"]))
    for index, (metric, name) in enumerate((("memorisation", "memorisation_curves"),
                                            ("test accuracy", "test_accuracy_curves"))):
        series = {entry: (sorted(per_epoch), [float(np.mean([v[index] for v in per_epoch[e]]))
                                              for e in sorted(per_epoch)])
                  for entry, per_epoch in curves.items()}
        if series:
            plot_curves(out / f"{name}.png", series, xlabel="epoch", ylabel=metric,
                        title="BBC News, symmetric η = 0.4 (mean over seeds)")
