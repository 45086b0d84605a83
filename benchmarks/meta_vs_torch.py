"""metafit MAML vs the same algorithm in ``torch.func`` on this CPU: meta-iterations/s and final MSE.

Setting (Finn et al. 2017 sinusoid): MLP 1-40-40-1 ReLU, K = 10 support and 10 query
points, meta-batch 25, second-order MAML with inner lr 0.01 and 1 or 5 inner SGD
steps, Adam 1e-3 outside. Both sides start from the *same* initial weights (metafit's,
copied into torch) and are scored on the *same* 600 held-out tasks (numpy, fixed seed).

* metafit: the library path -- ``metafit.train.fit`` with ``DeviceSampler`` (tasks
  sampled inside the jitted step), ``meta_value_and_grad`` (``vmap`` over tasks,
  ``lax.scan`` inner loop), ``steps_per_dispatch`` meta-steps fused per call, donated
  state. Throughput is the trainer's own per-step time of one ``fit`` call
  (``FitResult.timing["step_seconds"]``: every chunk after the first), so the
  compilation inside the first chunk is excluded.
* torch: ``torch.func.functional_call`` + ``grad`` (differentiating through the inner
  ``grad``) + ``vmap`` over tasks, ``torch.optim.Adam``; tasks sampled with torch's RNG.
  Throughput is timed after 20 warm-up iterations; the intra-op thread count is
  probed (``--torch-threads``, 120 iterations each) and the fastest one trains, since
  on a loaded 2-core machine one thread can be many times faster than two.

Run:  python benchmarks/meta_vs_torch.py [--iters 2000] [--inner-steps 1 5]
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

AMP, PHASE, XRANGE = (0.1, 5.0), (0.0, math.pi), (-5.0, 5.0)


def held_out_tasks(num: int = 600, shots: int = 10, queries: int = 10, seed: int = 1234):
    """Numpy sinusoid tasks shared by both sides: ``xs, ys, xq, yq`` with a leading task axis."""
    rng = np.random.default_rng(seed)
    amp = rng.uniform(*AMP, size=(num, 1, 1))
    phase = rng.uniform(*PHASE, size=(num, 1, 1))
    x = rng.uniform(*XRANGE, size=(num, shots + queries, 1))
    y = amp * np.sin(x - phase)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    return f32(x[:, :shots]), f32(y[:, :shots]), f32(x[:, shots:]), f32(y[:, shots:])


# ----------------------------------------------------------------------------- metafit


def metafit_run(iters: int, inner_steps: int, dispatch: int, seed: int = 0):
    import jax
    from flax import nnx

    from metafit.data.tasks import Task, get_tasksets
    from metafit.meta import MLP, batch_meta_loss, evaluate, functional, make_learner, meta_value_and_grad, summarize
    from metafit.train import DeviceSampler, TrainConfig, fit

    tasks = get_tasksets("sinusoid", shots=10, queries=10)
    network, params = functional(MLP(1, (40, 40), 1, rngs=nnx.Rngs(seed)))
    learner = make_learner("maml", network, loss="mse", output_dim=1, inner_lr=0.01, inner_steps=inner_steps)
    sampler = DeviceSampler(tasks.train.batch_fn(25), data=tasks.train.data)
    config = TrainConfig(steps=iters, batch_size=25, lr=1e-3, optimizer="adam", log_every=dispatch,
                         steps_per_dispatch=dispatch)
    start = time.perf_counter()
    result = fit(lambda p, b, k: batch_meta_loss(learner, p, b, k), learner.init(params), sampler, config,
                 key=jax.random.key(seed), grad_fn=lambda p, b, k: meta_value_and_grad(learner, p, b, k),
                 progress=False)
    wall = time.perf_counter() - start
    per_second = 1.0 / result.timing["step_seconds"]  # the first chunk, which carries the compilation, is excluded
    xs, ys, xq, yq = held_out_tasks()
    held = Task((xs, ys), (xq, yq))
    mse = summarize(evaluate(learner, result.params, jax.tree.map(jax.numpy.asarray, held), jax.random.key(0)))
    return {"iters_per_s": per_second, "wall_s": wall, "mse": mse["query_mse"],
            "mse_ci95": mse["query_mse_ci95"]}, params


# ----------------------------------------------------------------------------- torch.func


def torch_run(iters: int, inner_steps: int, init_params, threads: int, seed: int = 0, score: bool = True):
    import torch
    from torch.func import functional_call, grad, vmap

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 1))
    with torch.no_grad():  # metafit's initial weights (flax kernels are [in, out], torch weights [out, in])
        for layer, name in zip((model[0], model[2], model[4]), ("dense0", "dense1", "head")):
            layer.weight.copy_(torch.from_numpy(np.asarray(init_params[name]["kernel"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.asarray(init_params[name]["bias"]).copy()))
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)

    def mse(p, x, y):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    def task_loss(p, xs, ys, xq, yq):
        for _ in range(inner_steps):
            g = grad(mse)(p, xs, ys)
            p = {k: p[k] - 0.01 * g[k] for k in p}
        return mse(p, xq, yq)

    def meta_loss(p, xs, ys, xq, yq):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq).mean()

    meta_grad = grad(meta_loss)

    def sample():
        amp = torch.empty(25, 1, 1).uniform_(*AMP)
        phase = torch.empty(25, 1, 1).uniform_(*PHASE)
        x = torch.empty(25, 20, 1).uniform_(*XRANGE)
        y = amp * torch.sin(x - phase)
        return x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]

    def step():
        grads = meta_grad(params, *sample())
        for k, p in params.items():
            p.grad = grads[k]
        optimizer.step()

    warmup = 20
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters - warmup):
        step()
    seconds = time.perf_counter() - start
    result = {"iters_per_s": (iters - warmup) / seconds, "wall_s": seconds, "threads": threads}
    if not score:
        return result
    xs, ys, xq, yq = (torch.from_numpy(a) for a in held_out_tasks())
    with torch.no_grad():
        per_task = torch.stack([vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, xs[i:i + 100], ys[i:i + 100],
                                                                            xq[i:i + 100], yq[i:i + 100])
                                for i in range(0, 600, 100)]).reshape(-1).numpy()
    return {**result, "mse": float(per_task.mean()),
            "mse_ci95": float(1.96 * per_task.std(ddof=1) / math.sqrt(len(per_task)))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000, help="meta-iterations per side and setting")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--dispatch", type=int, default=100, help="metafit meta-steps fused per jitted call")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op thread counts probed (120 iterations each); the fastest trains")
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    rows = []
    for inner in args.inner_steps:
        ours, init_params = metafit_run(args.iters, inner, args.dispatch)
        probes = {t: torch_run(120, inner, init_params, t, score=False)["iters_per_s"] for t in args.torch_threads}
        best = max(probes, key=probes.get)
        theirs = {**torch_run(args.iters, inner, init_params, best), "thread_probe_iters_per_s": probes}
        rows.append({"inner_steps": inner, "iters": args.iters, "metafit": ours, "torch_func": theirs,
                     "speedup": ours["iters_per_s"] / theirs["iters_per_s"]})
        print(f"inner steps {inner}: metafit {ours['iters_per_s']:.0f} it/s (MSE {ours['mse']:.3f} "
              f"± {ours['mse_ci95']:.3f}) | torch.func {theirs['iters_per_s']:.1f} it/s "
              f"(MSE {theirs['mse']:.3f} ± {theirs['mse_ci95']:.3f}, {best} threads; probes {probes}) | "
              f"speed-up x{rows[-1]['speedup']:.1f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
