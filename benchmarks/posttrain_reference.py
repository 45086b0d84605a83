"""KTO and DPO step time with the reference log-probabilities cached once per dataset vs recomputed every step.

    python benchmarks/posttrain_reference.py --data-run runs/posttrain/data --steps 20 --json bench.json

Both sides train the small LM (metafit-small-lm, full fine-tuning) through ``metafit.train.fit`` on the
same batches of the data run with the same objective (:func:`metafit.posttrain.kto_objective` /
:func:`~metafit.posttrain.dpo_objective`); the cached side reads ``ref_logp`` from the batch (computed
by one jitted pass over the dataset before training, timed separately), the other runs the frozen
reference forward inside each step (``reference_params=``). ``step_seconds`` is the trainer's mean
per-step time after the first (compiling) dispatch.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
from flax import nnx

from metafit.data.batching import epoch_batches
from metafit.models import load
from metafit.posttrain import dpo_objective, kto_objective
from metafit.posttrain.stages import dpo_arrays, kto_arrays, load_records
from metafit.train import TrainConfig, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-run", default="runs/posttrain/data")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", default="")
    options = parser.parse_args()
    records = load_records(options.data_run)
    model, tokenizer = load("metafit-small-lm")
    graphdef, params = nnx.split(model)
    config = TrainConfig(steps=options.steps, batch_size=options.batch_size, lr=5e-4, log_every=options.steps)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("kto", "dpo"):
            started = time.perf_counter()
            if method == "kto":
                arrays = kto_arrays(tokenizer, records, (64, 96), 0, (graphdef, params), Path(tmp))
                objective = lambda ref: kto_objective(graphdef, beta=0.1, reference_params=ref)
            else:
                arrays = dpo_arrays(tokenizer, records, (64, 96), (graphdef, params), Path(tmp))
                objective = lambda ref: dpo_objective(graphdef, beta=0.1, reference_params=ref)
            results[f"{method}_reference_pass_seconds"] = time.perf_counter() - started
            for side, ref in (("cached", None), ("recomputed", params)):
                out = fit(objective(ref), params, epoch_batches(arrays, options.batch_size, 0), config,
                          key=jax.random.key(0), progress=False)
                results[f"{method}_{side}_step_seconds"] = out.timing["step_seconds"]
            results[f"{method}_speedup"] = (results[f"{method}_recomputed_step_seconds"]
                                            / results[f"{method}_cached_step_seconds"])
    results["load_average"] = open("/proc/loadavg").read().split()[0]
    print(json.dumps(results, indent=1))
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
