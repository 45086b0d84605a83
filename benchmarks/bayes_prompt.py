"""PROMPT posterior speed: effective samples per second, and vmap-over-a-sweep vs one by one.

Measures, on whatever device JAX runs on:

1. Effective samples/s of the PROMPT power posterior (NUTS) for the linear problem (4 sources
   x 50 points, d = 3) and the GP problem (4 x 20 points, 1-D, 48-function Hilbert-space GP):
   ESS is the smallest over the components of f(x*) (the quantity the predictive uses) and
   of theta/phi; time is the compiled run (compile reported apart). Peer: numpyro's own
   ``MCMC`` driver on the same model and data, ``chain_method='vectorized'`` and
   ``'sequential'`` (its second ``run``, so compilation is excluded there too).
2. A sweep of B problems fitted by PROMPT: one ``jit(vmap(...))`` call vs the compiled
   single-problem function called B times (``metafit.bayes.evaluate_sweep`` modes).

numpyro's ``MCMC.run`` re-traces and re-compiles its sampling loop on every call (seen with
``jax_log_compiles``), so its per-run time includes compilation; metafit's jitted functional
core compiles once per shape. The table reports both a first call and a repeated call.

Usage:
    python benchmarks/bayes_prompt.py                      # both parts, CPU-sized
    python benchmarks/bayes_prompt.py --batches 8 32 --json out.json
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import numpy as np
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS

from metafit.bayes import (
    MethodConfig,
    NutsConfig,
    PriorConfig,
    SimulatorConfig,
    SweepGrid,
    evaluate_sweep,
    nuts_sample,
    prompt_weights,
    proxy_posterior,
    simulate,
    sweep_problems,
)
from metafit.bayes.models import FUNCTION_PRIORS, prompt_model

PROBLEMS = {
    "linear": SimulatorConfig(setting="linear", heterogeneity=2.0),
    "gp": SimulatorConfig(setting="gp", n_features=1, source_size=(20,), heterogeneity=2.0),
}
NUTS_CONFIG = NutsConfig(num_warmup=300, num_samples=300, num_chains=4)


def min_ess(samples: dict) -> float:
    return min(float(np.min(effective_sample_size(np.asarray(samples[k], np.float64))))
               for k in ("f_target", "phi_source"))


def ess_per_second(setting: str, repeats: int) -> list[dict]:
    """ESS/s of metafit's functional NUTS vs numpyro's MCMC driver on the PROMPT posterior."""
    data, _ = simulate(jax.random.PRNGKey(0), PROBLEMS[setting])
    prior = PriorConfig()
    q = proxy_posterior(data.proxy, data.proxy_noise, prior)
    weights = prompt_weights(data, FUNCTION_PRIORS.get(setting).kernel, prior, q, MethodConfig())
    kwargs = dict(x=data.x_source, y=data.y_source, x_target=data.x_target, weights=weights,
                  proxy_mean=q.mean, proxy_var=q.var)
    model = functools.partial(prompt_model, prior=prior, function=setting)
    rows = []

    run = jax.jit(lambda key: nuts_sample(model, key, NUTS_CONFIG, **kwargs))
    start = time.perf_counter()
    draws = jax.block_until_ready(run(jax.random.PRNGKey(1)))
    first = time.perf_counter() - start
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        draws = jax.block_until_ready(run(jax.random.PRNGKey(2 + r)))
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    ess = min_ess(draws.samples)
    rows.append(dict(setting=setting, sampler="metafit nuts_sample (jit, vectorised chains)", seconds=seconds,
                     compile_seconds=first - seconds, min_ess=ess, ess_per_s=ess / seconds,
                     steps_per_draw=float(np.mean(draws.num_steps))))

    for method in ("vectorized", "sequential"):
        mcmc = MCMC(NUTS(model, max_tree_depth=NUTS_CONFIG.max_tree_depth), num_warmup=NUTS_CONFIG.num_warmup,
                    num_samples=NUTS_CONFIG.num_samples, num_chains=NUTS_CONFIG.num_chains, chain_method=method,
                    progress_bar=False, jit_model_args=True)
        start = time.perf_counter()
        mcmc.run(jax.random.PRNGKey(1), **kwargs)
        jax.block_until_ready(mcmc.get_samples())
        first = time.perf_counter() - start
        times = []
        for r in range(repeats):
            start = time.perf_counter()
            mcmc.run(jax.random.PRNGKey(2 + r), **kwargs)
            jax.block_until_ready(mcmc.get_samples())
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        ess = min_ess(mcmc.get_samples(group_by_chain=True))
        rows.append(dict(setting=setting, sampler=f"numpyro MCMC chain_method='{method}'", seconds=seconds,
                         compile_seconds=first - seconds, min_ess=ess, ess_per_s=ess / seconds))
    return rows


def sweep_speedup(setting: str, batch: int, loop_max: int) -> dict:
    """PROMPT over B problems: one vmapped call vs the compiled single-problem fit called per problem.

    The one-by-one time is measured on the first ``min(B, loop_max)`` problems and scaled to B
    (every call does the same work), so large B stays affordable.
    """
    seeds = max(1, batch // 4)
    grid = SweepGrid(proxy_noise=(0.1, 1.0), heterogeneity=(0.5, 2.0), seeds=seeds)
    data, _ = sweep_problems(jax.random.PRNGKey(0), PROBLEMS[setting], grid)
    config = MethodConfig(nuts=NutsConfig(num_warmup=200, num_samples=200, num_chains=4))
    run = functools.partial(evaluate_sweep, methods=["prompt"], n_sources=4, key=jax.random.PRNGKey(1),
                            function=setting, config=config, warn=False)
    vmapped = run(data, mode="vmap")["prompt"]
    timed = min(4 * seeds, loop_max)
    looped = run(jax.tree.map(lambda a: a[:timed], data), mode="loop")["prompt"]
    np.testing.assert_allclose(vmapped.lpd[:timed], looped.lpd, rtol=1e-2, atol=1e-2)  # the same fits
    loop_seconds = looped.seconds * (4 * seeds) / timed
    return dict(setting=setting, problems=4 * seeds, vmap_seconds=vmapped.seconds, loop_seconds=loop_seconds,
                loop_problems_timed=timed, speedup=loop_seconds / vmapped.seconds,
                vmap_compile_seconds=vmapped.compile_seconds, loop_compile_seconds=looped.compile_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["linear", "gp"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-max", type=int, default=64, help="time one-by-one fits on at most this many")
    parser.add_argument("--skip-ess", action="store_true")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args()

    device = jax.devices()[0]
    header = dict(device=f"{device.platform}: {device.device_kind}", jax=jax.__version__, host=platform.processor(),
                  nuts=dict(num_warmup=NUTS_CONFIG.num_warmup, num_samples=NUTS_CONFIG.num_samples,
                            num_chains=NUTS_CONFIG.num_chains))
    print(json.dumps(header))
    ess_rows, sweep_rows = [], []
    if not args.skip_ess:
        for setting in args.settings:
            for row in ess_per_second(setting, args.repeats):
                ess_rows.append(row)
                print(json.dumps(row), flush=True)
    for setting in args.settings:
        for batch in args.batches:
            row = sweep_speedup(setting, batch, args.loop_max)
            sweep_rows.append(row)
            print(json.dumps(row), flush=True)

    print("\n| setting | sampler | first call (s) | repeated call (s) | min ESS | ESS/s (repeated) |\n|---|---|---|---|---|---|")
    for r in ess_rows:
        print(f"| {r['setting']} | {r['sampler']} | {r['seconds'] + r['compile_seconds']:.1f} | {r['seconds']:.2f} | "
              f"{r['min_ess']:.0f} | {r['ess_per_s']:.0f} |")
    print("\n| setting | problems | vmap (s) | one by one (s) | speedup | compile vmap / single (s) |\n|---|---|---|---|---|---|")
    for r in sweep_rows:
        scaled = "" if r["loop_problems_timed"] == r["problems"] else f" (timed {r['loop_problems_timed']}, scaled)"
        print(f"| {r['setting']} | {r['problems']} | {r['vmap_seconds']:.2f} | {r['loop_seconds']:.2f}{scaled} | "
              f"{r['speedup']:.2f}x | {r['vmap_compile_seconds']:.0f} / {r['loop_compile_seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, ess=ess_rows, sweep=sweep_rows), f, indent=1)


if __name__ == "__main__":
    main()
