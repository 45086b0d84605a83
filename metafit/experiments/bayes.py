"""PROMPT-style Bayesian transfer from unknown sources: methods compared over a sweep of problems.

``prompt_transfer`` simulates ``seeds`` problems for every cell of a grid over proxy noise,
source heterogeneity and prior misspecification (a single cell when no axis is given), fits
every listed method to all of them in one vectorised call per method, and reports each
method's target log predictive density, MSE and rate of negative transfer (lpd below the
no-transfer reference on the same problem), with NUTS diagnostics.

Run folder extras: ``sweep.json`` / ``sweep.md`` (one row per cell and method, spread over
seeds), ``problems.json`` (every problem's cell, scores and NUTS diagnostics), ``methods/<name>.npz`` (per-problem scores; a rerun reuses them, so an interrupted
run resumes method by method) and, for each swept axis, PNG plots of the negative-transfer
rate and lpd against it; ``posterior/<method>.nc``, each sampled method's NUTS draws for every
problem as ArviZ netCDF (:mod:`metafit.bayes.posterior`), whose R-hat / ESS ``metafit show`` prints.
"""
from __future__ import annotations

import dataclasses
import json

import jax

from metafit.bayes import (
    TRANSFER_METHODS,
    MethodConfig,
    PriorConfig,
    SimulatorConfig,
    SweepGrid,
    evaluate_sweep,
    load_scores,
    plot_axis,
    problem_records,
    save_scores,
    summarise,
    sweep_markdown,
    sweep_problems,
)
from metafit.bayes.posterior import POSTERIOR_DIR, save_posterior
from metafit.experiments import RunConfig, experiment
from metafit.runs import RunDir


@dataclasses.dataclass(frozen=True)
class PromptTransferArgs:
    """Options of the ``prompt_transfer`` experiment.

    Attributes:
      simulator: the problem family (its setting, 'linear' or 'gp', is also the learner's prior of f).
      prior: the learner's prior.
      method: inference and PROMPT options shared by the methods.
      methods: method names (TRANSFER_METHODS); 'no_transfer' is always added as the reference.
      grid: swept knob values and seeds (replicate problems per cell).
      vectorise: fit all problems of the sweep in one ``vmap`` ped call per method (best on a
        GPU); False runs the compiled single-problem fit once per problem, which on a CPU can
        be faster because vmapped NUTS chains move in lockstep (every lane waits for the
        longest trajectory; see benchmarks/README.md).
    """

    simulator: SimulatorConfig = SimulatorConfig()
    prior: PriorConfig = PriorConfig()
    method: MethodConfig = MethodConfig()
    methods: tuple[str, ...] = ("no_transfer", "pooling", "hierarchical_mixture", "oracle", "prompt")
    grid: SweepGrid = SweepGrid()
    vectorise: bool = True

    def __post_init__(self):
        for name in self.methods:
            if name not in TRANSFER_METHODS:  # fail at config time, before any compute
                try:
                    TRANSFER_METHODS.get(name)
                except KeyError as err:
                    raise ValueError(f"args.methods: {err}") from None
        if not self.methods:
            raise ValueError("args.methods is empty: list at least one of " + ", ".join(TRANSFER_METHODS.names()))


@experiment("prompt_transfer", config=PromptTransferArgs)
def prompt_transfer(cfg: RunConfig, run: RunDir) -> dict:
    """Fits every method to every simulated problem; returns per-method lpd, mse, neg_transfer_rate."""
    args: PromptTransferArgs = cfg.args
    key_data, key_fit = jax.random.split(jax.random.PRNGKey(cfg.seed))
    data, cells = sweep_problems(key_data, args.simulator, args.grid)
    methods = ("no_transfer",) + tuple(m for m in args.methods if m != "no_transfer")
    cache = run.subdir("methods")
    scores = {}
    for step, name in enumerate(methods):
        scores[name] = load_scores(cache / f"{name}.npz")
        if scores[name] is None:
            scores[name] = evaluate_sweep(
                data, [name], n_sources=args.simulator.n_sources, key=jax.random.fold_in(key_fit, step),
                function=args.simulator.setting, prior=args.prior, config=args.method,
                mode="vmap" if args.vectorise else "loop")[name]
            if scores[name].draws is not None:  # written before the scores, which mark the method done
                save_posterior(run.subdir(POSTERIOR_DIR) / f"{name}.nc", scores[name].draws, coords=cells)
            save_scores(cache / f"{name}.npz", scores[name])
        run.log({"lpd": float(scores[name].lpd.mean()), "mse": float(scores[name].mse.mean()),
                 "seconds": scores[name].seconds}, step=step, stage=name)
    overall, rows = summarise(scores, cells)
    (run.path / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    (run.path / "problems.json").write_text(json.dumps(problem_records(scores, cells)) + "\n")
    (run.path / "sweep.md").write_text(sweep_markdown(rows))
    for axis, values in args.grid.axes(args.simulator).items():
        if len(values) > 1:
            plot_axis(rows, axis, run.plot_path(f"vs_{axis}"))
    return {"methods": {name: {k: v for k, v in row.items() if k != "n"} for name, row in overall.items()}}
