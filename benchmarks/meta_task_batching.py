"""Meta-gradient time of second-order MAML on Conv4: tasks vmapped vs unrolled (``args.task_batching``).

Setting: DejaVu glyphs 5-way 1-shot, 15 queries per class, meta-batch 8, Conv4 with 32 filters and
transductive batch norm, MAML with 1 inner step (``configs/meta/glyphs_maml.yaml`` at the filters and
meta-batch of the AMFS CPU timing jobs). Each variant is one jitted ``meta_value_and_grad`` on the same
task batch; the first call (compilation) is reported apart, then the best of ``--repeats`` calls.
ProtoNet (shared weights, no per-task convolution) is timed the same way for reference. Last, a plain
SGD step of the same Conv4 on 640 images, jitted alone vs inside ``lax.scan`` (``steps_per_dispatch``).

Why: under ``vmap`` the adapted weights differ per task, so each convolution becomes a grouped
convolution, which XLA's CPU backend runs far slower than the same convolutions one task at a time;
and a convolution inside a loop takes a slow path there (jax-ml/jax#12868).

    PYTHONPATH=. python benchmarks/meta_task_batching.py [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import jax


def time_variant(learner, params, tasks, batching: str, repeats: int) -> dict:
    from metafit.meta import meta_value_and_grad

    step = jax.jit(lambda p: meta_value_and_grad(learner, p, tasks, jax.random.key(0), batching=batching))
    start = time.perf_counter()
    jax.block_until_ready(step(params))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params))
        times.append(time.perf_counter() - start)
    return {"first_call_s": round(first, 2), "step_s": round(min(times), 3)}


def time_loops(filters: int, repeats: int) -> dict:
    """A plain SGD step of Conv4 on 640 glyph-sized images: 5 jitted calls vs the same 5 steps as one
    ``lax.scan`` (what ``train.steps_per_dispatch=5`` compiles), and one step alone vs a scan of length 1."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from metafit.meta import Conv4

    graphdef, params = nnx.split(Conv4(1, 5, hidden=filters, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((640, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, 640))

    def loss(p):
        logits = nnx.merge(graphdef, p)(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))

    def sgd(p):
        return jax.tree.map(lambda a, g: a - 1e-3 * g, p, jax.grad(loss)(p))

    def scan(n):
        return jax.jit(lambda p: jax.lax.scan(lambda q, _: (sgd(q), None), p, None, length=n)[0])

    def best(fn, calls: int = 1) -> float:
        jax.block_until_ready(fn(params))
        times = []
        for _ in range(repeats):
            start, out = time.perf_counter(), params
            for _ in range(calls):
                out = fn(out)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
        return round(min(times), 3)

    step = jax.jit(sgd)
    return {"5 jitted steps_s": best(step, 5), "scan of 5_s": best(scan(5)),
            "1 jitted step_s": best(step), "scan of 1_s": best(scan(1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from metafit.data.tasks import get_tasksets
    from metafit.meta import build_backbone, make_learner

    tasks = get_tasksets("glyphs", 5, 1, 15)
    batch = tasks.train.sample_batch(jax.random.key(0), args.batch)
    network, params = build_backbone("conv4", tasks.input_shape, tasks.output_dim, seed=0, conv_hidden=args.filters)
    rows = {}
    for name, learner_args in (("maml", {"inner_lr": 0.4, "inner_steps": 1}), ("protonet", {})):
        learner = make_learner(name, network, loss="xent", output_dim=tasks.output_dim, **learner_args)
        for batching in ("vmap", "unroll"):
            rows[f"{name} {batching}"] = time_variant(learner, learner.init(params), batch, batching, args.repeats)
            print(f"{name:9s} {batching:7s} {rows[f'{name} {batching}']}", flush=True)
    loops = time_loops(args.filters, args.repeats)
    print("steps in a loop:", loops, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"filters": args.filters, "batch": args.batch, "rows": rows, "loops": loops}, f, indent=1)


if __name__ == "__main__":
    main()
