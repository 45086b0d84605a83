"""PROMPT-style Bayesian transfer from unknown sources: methods compared over a sweep of problems.

``prompt_transfer`` simulates ``seeds`` problems for every cell of a grid over proxy noise,
source heterogeneity and prior misspecification (a single cell when no axis is given), fits
every listed method to all of them in one vectorised call per method, and reports each
method's target log predictive density, MSE and rate of negative transfer (lpd below the
no-transfer reference on the same problem), with NUTS diagnostics.

Run folder extras: ``sweep.json`` / ``sweep.md`` (one row per cell and method, spread over
seeds), ``methods/<name>.npz`` (per-problem scores; a rerun reuses them, so an interrupted
run resumes method by method) and, for each swept axis, PNG plots of the negative-transfer
rate and lpd against it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from metafit.bayes import (
    TRANSFER_METHODS,
    MethodConfig,
    MethodScores,
    PriorConfig,
    SimulatorConfig,
    SweepGrid,
    evaluate_sweep,
    summarise,
    sweep_problems,
)
from metafit.bayes.sweep import AXES
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
        scores[name] = _load(cache / f"{name}.npz")
        if scores[name] is None:
            scores[name] = evaluate_sweep(
                data, [name], n_sources=args.simulator.n_sources, key=jax.random.fold_in(key_fit, step),
                function=args.simulator.setting, prior=args.prior, config=args.method,
                mode="vmap" if args.vectorise else "loop")[name]
            _save(cache / f"{name}.npz", scores[name])
        run.log({"lpd": float(scores[name].lpd.mean()), "mse": float(scores[name].mse.mean()),
                 "seconds": scores[name].seconds}, step=step, stage=name)
    overall, rows = summarise(scores, cells)
    (run.path / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    (run.path / "sweep.md").write_text(sweep_markdown(rows))
    for axis, values in args.grid.axes(args.simulator).items():
        if len(values) > 1:
            plot_axis(rows, axis, run.plot_path(f"vs_{axis}"))
    return {"methods": {name: {k: v for k, v in row.items() if k != "n"} for name, row in overall.items()}}


def sweep_markdown(rows: list[dict]) -> str:
    """One table row per (cell, method): lpd and mse as mean ± sd over seeds, negative-transfer rate."""
    lines = ["| " + " | ".join(AXES) + " | method | lpd | mse | neg. transfer |", "|---" * (len(AXES) + 4) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[a]:g}" for a in AXES)
                     + f" | {r['method']} | {r['lpd']:.3f} ± {r['lpd_sd']:.3f} | {r['mse']:.3f} ± {r['mse_sd']:.3f}"
                     f" | {r['neg_transfer_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_axis(rows: list[dict], axis: str, path: Path, lpd_floor: float = -8.0) -> Path:
    """Negative-transfer rate and lpd (mean ± sd over seeds, averaged over the other axes) against ``axis``.

    The lpd panel is clipped below at ``lpd_floor`` (pooling's lpd can reach -100 and would
    flatten every other curve); the tables hold the unclipped numbers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_lpd) = plt.subplots(1, 2, figsize=(10, 4))
    values = sorted({r[axis] for r in rows})
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        at = lambda x, key: np.mean([r[key] for r in mine if r[axis] == x])  # noqa: E731
        ax_rate.plot(values, [at(x, "neg_transfer_rate") for x in values], marker="o", label=method)
        lpd, sd = np.array([at(x, "lpd") for x in values]), np.array([at(x, "lpd_sd") for x in values])
        ax_lpd.plot(values, lpd, marker="o", label=method)
        ax_lpd.fill_between(values, lpd - sd, lpd + sd, alpha=0.12)
    log_axis = min(values) > 0 and max(values) / min(values) > 5
    for ax in (ax_rate, ax_lpd):
        if log_axis:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.set_xlabel(axis)
        ax.grid(alpha=0.3)
    ax_rate.set(ylabel="negative-transfer rate (lpd below no transfer)", ylim=(-0.05, 1.05))
    top = max(r["lpd"] + r["lpd_sd"] for r in rows)
    ax_lpd.set(ylabel=f"target lpd, mean ± sd over seeds (clipped at {lpd_floor:g})", ylim=(lpd_floor, top + 0.2))
    ax_lpd.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _save(path: Path, scores: MethodScores) -> None:
    diag = scores.diagnostics or []
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, lpd=scores.lpd, mse=scores.mse, seconds=scores.seconds, compile_seconds=scores.compile_seconds,
             diagnostics=json.dumps([d._asdict() for d in diag]) if scores.diagnostics is not None else "null")
    tmp.replace(path)


def _load(path: Path) -> MethodScores | None:
    if not path.exists():
        return None
    from metafit.bayes import Diagnostics

    with np.load(path) as f:
        diag = json.loads(str(f["diagnostics"]))
        return MethodScores(f["lpd"], f["mse"], None if diag is None else [Diagnostics(**d) for d in diag],
                            float(f["seconds"]), float(f["compile_seconds"]))
