"""Runs the PROMPT reproduction configs (the same code `metafit run` calls) into run folders.

Each config is one :func:`metafit.experiments.run_experiment` call, which imports only the
Bayesian experiment module, so this also runs where other metafit families' optional
dependencies are missing (e.g. a GPU machine's own Python image).

Usage (from the repository root):
    python paper_repro/prompt/run_sweeps.py --out runs              # the three sweeps, in turn
    python paper_repro/prompt/run_sweeps.py --out runs --configs configs/bayes/prompt_sweep_gp.yaml
    python paper_repro/prompt/run_sweeps.py --out runs --set args.grid.seeds=2   # smoke
Equivalent to ``metafit run CONFIG --workdir OUT/<config name>`` for each config.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from metafit.experiments import run_experiment

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [REPO / "configs/bayes" / f"{name}.yaml"
           for name in ("prompt_sweep_linear", "prompt_sweep_gp", "prompt_misspec_linear")]


def run_config(path: Path, out: Path, overrides: list[str]) -> dict:
    _, results = run_experiment(path, overrides, workdir=out / path.stem)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--configs", nargs="+", type=Path, default=CONFIGS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    for path in args.configs:
        start = time.perf_counter()
        results = run_config(path, args.out, args.overrides)
        print(f"{path.stem}: {time.perf_counter() - start:.0f} s", flush=True)
        for method, row in results["methods"].items():
            print(f"  {method:22s} lpd {row['lpd']:8.3f}  mse {row['mse']:7.3f}  neg {row['neg_transfer_rate']:.2f}")


if __name__ == "__main__":
    main()
