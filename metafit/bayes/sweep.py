"""A sweep of transfer problems, every method fitted to all of them in one vectorised call.

A sweep is the product of simulator knobs (proxy noise, heterogeneity, prior
misspecification) times ``seeds`` replicates. Replicate ``i`` draws its problem from the
same key in every cell (common random numbers), so differences between cells are the
knobs' doing, not the dice's. Each method is ``jax.jit(jax.vmap(method))`` over the whole
batch: one compilation, one dispatch (``mode='loop'`` runs the same compiled single-problem
function once per problem instead; the benchmark compares the two).

Example:
    >>> grid = SweepGrid(proxy_noise=(0.1, 1.0), heterogeneity=(0.5, 2.0), seeds=2)
    >>> data, cells = sweep_problems(jax.random.PRNGKey(0), SimulatorConfig(), grid)
    >>> out = evaluate_sweep(data, ["no_transfer", "prompt"], n_sources=4, key=jax.random.PRNGKey(1))
    >>> out["prompt"].lpd.shape      # one score per problem
    (8,)
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
import warnings
from pathlib import Path
from typing import Literal, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metafit.bayes.data import SimulatorConfig, TransferData, simulate, validate_transfer_data
from metafit.bayes.inference import Diagnostics, Draws, PosteriorDiagnosticsWarning, check_diagnostics, diagnose
from metafit.bayes.methods import TRANSFER_METHODS, MethodConfig, predictive_scores
from metafit.bayes.models import FUNCTION_PRIORS, PriorConfig

AXES = ("proxy_noise", "heterogeneity", "prior_misspecification")


@dataclasses.dataclass(frozen=True)
class SweepGrid:
    """Values of each swept knob (empty = the simulator config's single value) and replicates.

    Attributes:
      proxy_noise: sigma_z values.
      heterogeneity: tau values (sd of phi across tasks).
      prior_misspecification: centres of the true phi population.
      seeds: replicate problems per cell.
    """

    proxy_noise: tuple[float, ...] = ()
    heterogeneity: tuple[float, ...] = ()
    prior_misspecification: tuple[float, ...] = ()
    seeds: int = 5

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if any(v <= 0 for v in self.proxy_noise) or any(v < 0 for v in self.heterogeneity):
            raise ValueError(f"proxy_noise values must be > 0 and heterogeneity values >= 0, got {self}")

    def axes(self, config: SimulatorConfig) -> dict[str, tuple[float, ...]]:
        """Each knob's values, falling back to the simulator's own value."""
        return {name: getattr(self, name) or (float(getattr(config, name)),) for name in AXES}


def sweep_problems(key: jax.Array, config: SimulatorConfig, grid: SweepGrid) -> tuple[TransferData, dict[str, np.ndarray]]:
    """Simulates every (cell, replicate) problem in one ``vmap``.

    Returns:
      ``(data, cells)``: data with a leading batch axis B = cells x seeds, and ``cells``
      mapping each knob name and ``'seed'`` to its [B] values.
    """
    axes = grid.axes(config)
    rows = [(*values, seed) for values in itertools.product(*axes.values()) for seed in range(grid.seeds)]
    cells = {name: np.array([r[i] for r in rows], np.float32) for i, name in enumerate(AXES)}
    cells["seed"] = np.array([r[-1] for r in rows], np.int32)
    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.asarray(cells["seed"]))
    data = _simulate_batch(keys, config, *(jnp.asarray(cells[name]) for name in AXES))
    validate_transfer_data(data, batch_ndim=1)
    return data, cells


@functools.partial(jax.jit, static_argnames="config")
def _simulate_batch(keys: jax.Array, config: SimulatorConfig, proxy_noise: jax.Array, heterogeneity: jax.Array,
                    prior_misspecification: jax.Array) -> TransferData:
    # Module level with the (hashable) config static, so a second sweep_problems call with the same
    # config and batch size (a resumed run, a benchmark repeat) reuses the compiled simulator; a
    # jit of a fresh lambda per call traced and compiled it again every time.
    return jax.vmap(lambda k, z, t, c: simulate(k, config, proxy_noise=z, heterogeneity=t, prior_misspecification=c)[0])(
        keys, proxy_noise, heterogeneity, prior_misspecification)


class MethodScores(NamedTuple):
    """One method's scores over a sweep.

    Attributes:
      lpd: [B] mean log predictive density per target point.
      mse: [B] mean squared error of the predictive mean.
      diagnostics: per problem (None for closed-form methods).
      seconds: wall time of the fit (compile excluded) and compile time.
      draws: the NUTS draws, site arrays ``[B, chains, draws, ...]`` on the host (None for
        closed-form methods and for scores read back by :func:`load_scores`).
    """

    lpd: np.ndarray
    mse: np.ndarray
    diagnostics: Optional[list[Diagnostics]]
    seconds: float
    compile_seconds: float
    draws: Optional[Draws] = None


def evaluate_sweep(data: TransferData, methods: Sequence[str], *, n_sources: int, key: jax.Array,
                   function: str = "linear", prior: PriorConfig = PriorConfig(),
                   config: MethodConfig = MethodConfig(), mode: Literal["vmap", "loop"] = "vmap",
                   warn: bool = True) -> dict[str, MethodScores]:
    """Fits each method to every problem of a batched ``data`` and scores its target predictive.

    Args:
      data: a batch of problems (leading axis B), e.g. from :func:`sweep_problems`.
      methods: names in ``TRANSFER_METHODS``.
      n_sources, function, prior, config: as for :func:`metafit.bayes.methods.fit_transfer`.
      key: PRNG key; problem b uses ``fold_in(key, b)`` whatever the mode.
      mode: 'vmap' (one compiled call over the batch) or 'loop' (the single-problem function,
        compiled once, called B times).
      warn: emit one :class:`PosteriorDiagnosticsWarning` per method whose NUTS runs are poor.

    Returns:
      method name -> :class:`MethodScores`.
    """
    validate_transfer_data(data, batch_ndim=1)
    FUNCTION_PRIORS.get(function)
    batch = data.x_source.shape[0]
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))
    out = {}
    for name in methods:
        method = functools.partial(TRANSFER_METHODS.get(name), function=function, prior=prior, config=config,
                                   n_sources=n_sources)

        def scored(problem, problem_key, method=method):
            fit = method(problem, key=problem_key)
            return predictive_scores(fit, problem.y_target), fit.draws

        if mode == "vmap":
            start = time.perf_counter()
            compiled = jax.jit(jax.vmap(scored)).lower(data, keys).compile()
            compile_seconds = time.perf_counter() - start
            start = time.perf_counter()
            scores, draws = jax.block_until_ready(compiled(data, keys))
            seconds = time.perf_counter() - start
        else:
            single = jax.tree.map(lambda a: a[0], data)
            start = time.perf_counter()
            compiled = jax.jit(scored).lower(single, keys[0]).compile()
            compile_seconds = time.perf_counter() - start
            start = time.perf_counter()
            results = [compiled(jax.tree.map(lambda a, b=b: a[b], data), keys[b]) for b in range(batch)]
            results = jax.block_until_ready(results)
            seconds = time.perf_counter() - start
            scores, draws = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
        diagnostics, kept = None, None
        if draws.diverging is not None:
            kept = jax.tree.map(np.asarray, draws)
            diagnostics = [diagnose(jax.tree.map(lambda a, b=b: a[b], draws)) for b in range(batch)]
            if warn:
                _warn_sweep(name, diagnostics)
        out[name] = MethodScores(np.asarray(scores["lpd"]), np.asarray(scores["mse"]), diagnostics, seconds,
                                 compile_seconds, kept)
    return out


def _warn_sweep(name: str, diagnostics: list[Diagnostics]) -> None:
    poor = [d for d in diagnostics if check_diagnostics(d, warn=False)]
    if poor:
        warnings.warn(
            f"{name}: {len(poor)}/{len(diagnostics)} posteriors have poor NUTS diagnostics (worst R-hat "
            f"{max(d.max_rhat for d in poor):.3f}, lowest ESS {min(d.min_ess for d in poor):.0f}, "
            f"{sum(d.divergences for d in poor)} divergences); see the rhat_max/ess_min/divergences columns.",
            PosteriorDiagnosticsWarning, stacklevel=2)


def summarise(scores: dict[str, MethodScores], cells: dict[str, np.ndarray],
              reference: str = "no_transfer") -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Aggregates scores overall and per cell; negative transfer = lpd below the reference's.

    Returns:
      ``(overall, rows)``: ``overall[method]`` has lpd / lpd_sd / mse / mse_sd /
      neg_transfer_rate (share of problems whose lpd is below the reference's) /
      neg_transfer_rate_mse (same on MSE) and, for sampled methods, rhat_max, ess_min and
      divergences; ``rows`` has one dict per (cell, method) with the spread over seeds.
    """
    if reference not in scores:
        raise ValueError(f"negative transfer is measured against '{reference}': include it in the methods")
    ref = scores[reference]
    keys = [k for k in AXES]
    cell_ids = sorted({tuple(cells[k][i] for k in keys) for i in range(len(cells["seed"]))})
    overall, rows = {}, []
    for name, s in scores.items():
        worse = s.lpd < ref.lpd
        worse_mse = s.mse > ref.mse
        overall[name] = _stats(s.lpd, s.mse, worse, worse_mse)
        if s.diagnostics:
            overall[name].update(
                rhat_max=max(d.max_rhat for d in s.diagnostics), ess_min=min(d.min_ess for d in s.diagnostics),
                divergences=sum(d.divergences for d in s.diagnostics))
        for cell in cell_ids:
            mask = np.all([cells[k] == v for k, v in zip(keys, cell)], axis=0)
            rows.append({"method": name, **{k: float(v) for k, v in zip(keys, cell)},
                         **_stats(s.lpd[mask], s.mse[mask], worse[mask], worse_mse[mask])})
    return overall, rows


def problem_records(scores: dict[str, MethodScores], cells: dict[str, np.ndarray]) -> dict:
    """Every problem's scores and NUTS diagnostics as plain lists: what a table builder needs to
    recompute each row and decide, per posterior, whether it converged (:class:`ConvergenceGate`).

    Returns:
      ``{"cells": {axis or 'seed': [B]}, "methods": {name: {"lpd": [B], "mse": [B]}}}``; a sampled
      method also has ``max_rhat``, ``min_ess``, ``divergences``, ``draws`` and ``worst_site`` [B].
    """
    out = {"cells": {k: [float(v) if k != "seed" else int(v) for v in values] for k, values in cells.items()},
           "methods": {}}
    for name, s in scores.items():
        record = {"lpd": [float(v) for v in s.lpd], "mse": [float(v) for v in s.mse]}
        if s.diagnostics is not None:
            for field in Diagnostics._fields:
                record[field] = [getattr(d, field) for d in s.diagnostics]
        out["methods"][name] = record
    return out


def _stats(lpd: np.ndarray, mse: np.ndarray, worse: np.ndarray, worse_mse: np.ndarray) -> dict[str, float]:
    return {"lpd": float(lpd.mean()), "lpd_sd": float(lpd.std()), "mse": float(mse.mean()),
            "mse_sd": float(mse.std()), "neg_transfer_rate": float(worse.mean()),
            "neg_transfer_rate_mse": float(worse_mse.mean()), "n": int(lpd.size)}


def save_scores(path: Path, scores: MethodScores) -> None:
    """Writes ``scores`` to the ``.npz`` file ``path`` atomically (a temporary file, then a rename)."""
    diag = scores.diagnostics or []
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, lpd=scores.lpd, mse=scores.mse, seconds=scores.seconds, compile_seconds=scores.compile_seconds,
             diagnostics=json.dumps([d._asdict() for d in diag]) if scores.diagnostics is not None else "null")
    tmp.replace(path)


def load_scores(path: Path) -> MethodScores | None:
    """The scores :func:`save_scores` wrote to ``path``, or None when there is no such file."""
    if not path.exists():
        return None
    with np.load(path) as f:
        diag = json.loads(str(f["diagnostics"]))
        return MethodScores(f["lpd"], f["mse"], None if diag is None else [Diagnostics(**d) for d in diag],
                            float(f["seconds"]), float(f["compile_seconds"]))
