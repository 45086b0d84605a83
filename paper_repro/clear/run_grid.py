"""Runs the CleaR reproduction grid (noise settings x method groups) and collects one JSON.

Each job is ``paper_repro/clear/bbc_minilm.yaml`` with overrides (noise model and rates,
one ``method:tuning`` entry, seeds); jobs run in priority order (the CleaR-vs-PEFT
comparison first, then asymmetric noise, then the other baselines) until the time budget
is spent, so a partial grid is still a consistent table. After every job the collected
``results.json`` rows and per-epoch curves are written to ``--out/grid_results.json``.

Usage:
    python paper_repro/clear/run_grid.py --out paper_repro/clear/results --budget-s 3600
    python paper_repro/clear/run_grid.py --out /tmp/x --budget-s 60 --set args.epochs=2  # smoke
Set ``JAX_COMPILATION_CACHE_DIR`` so seeds and noise rates reuse compiled programs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BASE = Path(__file__).with_name("bbc_minilm.yaml")
PEFT_PAIRS = ["ce:adapter", "clear:adapter", "ce:lora", "clear:lora", "ce:full"]
BASELINES = ["gce:lora", "coteaching:lora", "gmm_filter:lora", "ce:bitfit", "clear:bitfit", "ce:prefix",
             "clear:prefix"]


def jobs(seeds: str) -> list[tuple[str, list[str]]]:
    """(name, overrides) in priority order."""
    out = []
    for noise, rates in (("symmetric", "[0.2,0.4,0.6]"), ("asymmetric", "[0.2,0.4]")):
        for entry in PEFT_PAIRS:
            out.append((f"{noise}-{entry}", [f"args.noise={noise}", f"args.noise_rates={rates}",
                                             f"args.methods=[\"{entry}\"]", f"args.seeds={seeds}"]))
    for entry in BASELINES:
        out.append((f"symmetric-{entry}", ["args.noise=symmetric", "args.noise_rates=[0.4]",
                                           f"args.methods=[\"{entry}\"]", f"args.seeds={seeds}"]))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="/tmp/clear_grid_runs", help="run folders (checkpoints, metrics)")
    parser.add_argument("--budget-s", type=float, default=3600.0, help="start no job after this many seconds")
    parser.add_argument("--seeds", default="[0,1,2]")
    parser.add_argument("--only", default=None, help="comma-separated job names")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra key=value overrides")
    args = parser.parse_args(argv)

    import jax

    from metafit.experiments import run_experiment
    from metafit.robust import EPOCH_HOOK

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    collected = {"device": jax.devices()[0].device_kind, "base_config": BASE.name, "jobs": {}}
    start = time.perf_counter()
    selected = set(args.only.split(",")) if args.only else None
    for name, overrides in jobs(args.seeds):
        if selected is not None and name not in selected:
            continue
        if time.perf_counter() - start > args.budget_s:
            print(f"[grid] budget spent; skipping {name}", flush=True)
            continue
        job_start = time.perf_counter()
        run, results = run_experiment(BASE, overrides + args.overrides, workdir=Path(args.runs) / name,
                                      force_new=True)
        curves = [r for r in run.metrics.read() if r.get("split") == EPOCH_HOOK]  # per-epoch metrics
        collected["jobs"][name] = {"overrides": overrides + args.overrides, "results": results,
                                   "curves": curves, "seconds": time.perf_counter() - job_start}
        (out / "grid_results.json").write_text(json.dumps(collected, indent=1, default=float))
        print(f"[grid] {name}: {time.perf_counter() - job_start:.1f}s (total {time.perf_counter() - start:.0f}s)",
              flush=True)


if __name__ == "__main__":
    main()
