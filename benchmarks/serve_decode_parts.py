"""What one decode step of SmolLM2-135M costs on this CPU, part by part (the serving benchmark's step).

* the step's matrix products alone (30 layers x q, k, v, o, gate, up, down, and the tied LM head) at
  1, 2, 4 and 8 rows: the floor of a step whatever else it does;
* the engine's per-row token chooser (:func:`metafit.serve.engine._row_chooser`) on 8 rows of the
  49,152-token vocabulary: all greedy, sampling at top_p 1, nucleus sampling at top_p 0.9 on flat logits
  (nucleus beyond the top 256: the whole-row sort runs) and on peaked ones (the top 256 suffice);
* a whole-row sort against ``lax.top_k`` of :data:`metafit.models.generate.NUCLEUS_CANDIDATES`.

    PYTHONPATH=. python benchmarks/serve_decode_parts.py [--out benchmarks/results/serve_decode_parts.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from metafit.models.generate import NUCLEUS_CANDIDATES
from metafit.serve.engine import _row_chooser

HIDDEN, MLP, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30  # SmolLM2-135M
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, MLP), (HIDDEN, MLP), (MLP, HIDDEN)]


def ms_per_call(fn, *args, calls: int = 20) -> float:
    fn(*args).block_until_ready()
    started = time.perf_counter()
    for _ in range(calls):
        fn(*args).block_until_ready()
    return (time.perf_counter() - started) / calls * 1e3


def matmuls_ms(rows: int) -> float:
    key = jax.random.key(0)
    weights = [[jax.random.normal(key, s) * 0.02 for s in SHAPES] for _ in range(LAYERS)]
    head = jax.random.normal(key, (HIDDEN, VOCAB)) * 0.02

    @jax.jit
    def step(x, weights, head):
        for q, k, v, o, gate, up, down in weights:
            mixed = x @ o + 1e-3 * ((x @ q)[:, :1] + (x @ k)[:, :1] + (x @ v)[:, :1])
            x = x + (jax.nn.silu(mixed @ gate) * (mixed @ up)) @ down
        return x @ head

    return ms_per_call(step, jnp.ones((rows, HIDDEN)), weights, head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/serve_decode_parts.json")
    args = parser.parse_args()
    result = {"matmuls_ms": {rows: matmuls_ms(rows) for rows in (1, 2, 4, 8)}}
    logits = jax.random.normal(jax.random.key(1), (8, VOCAB))
    keys = jax.random.split(jax.random.key(0), 8)
    choose = jax.jit(lambda x, k, t, p: _row_chooser(k, t, p)(x, 1))
    # flat: standard-normal logits, whose 0.9 nucleus spans most of the row (the whole-row sort runs);
    # peaked: the same x 8, a nucleus of a few tokens as a trained LM's usually is (top 256 only)
    cases = (("greedy", logits, 0.0, 1.0), ("sample_top_p_1", logits, 0.7, 1.0),
             ("sample_top_p_0.9_flat", logits, 0.7, 0.9), ("sample_top_p_0.9_peaked", 8 * logits, 0.7, 0.9))
    result["chooser_ms_8_rows"] = {name: ms_per_call(choose, x, keys, jnp.full(8, t), jnp.full(8, p), calls=10)
                                   for name, x, t, p in cases}
    result["sort_row_ms_8_rows"] = ms_per_call(jax.jit(lambda x: jnp.sort(x, axis=-1)), logits, calls=10)
    result["top_k_ms_8_rows"] = ms_per_call(jax.jit(lambda x: jax.lax.top_k(x, NUCLEUS_CANDIDATES)[0]), logits)
    result["load_average"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
