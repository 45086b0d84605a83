"""Posterior draws as ArviZ ``InferenceData`` in netCDF files, and their ArviZ diagnostics.

A sweep's NUTS draws of one method are ``[problems, chains, draws, ...]`` per site. They are
saved with ArviZ's layout, dims ``(chain, draw, problem, <site>_dim_0, ...)``, in a netCDF-4 file
written through ``h5netcdf``: group ``posterior`` holds every sampled or deterministic site,
group ``sample_stats`` holds ``diverging`` and ``n_steps`` (leapfrog steps per draw). The
problem coordinates (the swept knobs and the seed) are attached to the ``problem`` dim, so
``idata.posterior.sel(problem=idata.posterior.proxy_noise == 0.1)`` works.

ArviZ < 1.0 (``InferenceData``) is pinned: arviz >= 1.0 (``xarray.DataTree``) needs Python >= 3.12.

Diagnostics per site (:func:`posterior_summary`), worst over problems and components:

* ``r_hat``: ArviZ's default, the rank-normalised split R-hat of Vehtari et al. (2021),
  ``max(R̂(z(rank(θ))), R̂(z(rank(|θ − median θ|))))``;
* ``r_hat_split``: the classic split R-hat, ``R̂ = √((N−1)/N + B/(N W))`` over the 2C half chains
  of length N (W: mean within-half variance, B/N: variance of the half-chain means). This is
  what :func:`metafit.bayes.diagnose` reports (numpyro's ``split_gelman_rubin``), so the two
  agree to float rounding; the rank-normalised value differs by definition (it also catches
  chains that differ in scale or tails);
* ``ess_bulk``, ``ess_tail``: ArviZ's rank-normalised bulk ESS and the tail ESS (5% / 95% quantiles).

Example:
    >>> save_posterior(run.path / "posterior" / "prompt.nc", draws, coords=cells)
    >>> posterior_summary(run.path / "posterior" / "prompt.nc")["phi"]["r_hat"]
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from metafit.bayes.inference import Draws

POSTERIOR_DIR = "posterior"
SUMMARY_COLUMNS = ("r_hat", "r_hat_split", "ess_bulk", "ess_tail")


def to_inference_data(draws: Draws, coords: Mapping[str, np.ndarray] | None = None):
    """ArviZ ``InferenceData`` of batched draws (site arrays ``[problems, chains, draws, ...]``).

    Args:
      draws: NUTS draws with a leading problem axis (as :func:`metafit.bayes.evaluate_sweep` keeps them).
      coords: optional per-problem values (``{"proxy_noise": [B], "seed": [B], ...}``) attached
        to the ``problem`` dim.
    """
    import arviz as az

    def chain_major(value) -> np.ndarray:  # [B, C, D, ...] -> [C, D, B, ...]: ArviZ wants chain, draw first
        return np.moveaxis(np.asarray(value), 0, 2)

    posterior = {name: chain_major(value) for name, value in draws.samples.items()}
    stats = {name: chain_major(value) for name, value in
             (("diverging", draws.diverging), ("n_steps", draws.num_steps)) if value is not None}
    batch = next(iter(posterior.values())).shape[2]
    idata = az.from_dict(posterior=posterior, sample_stats=stats or None,
                         dims={name: ["problem"] for name in [*posterior, *stats]},
                         coords={"problem": np.arange(batch)})
    for key, values in (coords or {}).items():
        values = np.asarray(values)
        if values.shape != (batch,):
            raise ValueError(f"coords['{key}'] has shape {values.shape}; expected one value per problem ({batch},)")
        for group in idata.groups():
            idata[group] = idata[group].assign_coords({key: ("problem", values)})
    return idata


def save_posterior(path: str | Path, draws: Draws, coords: Mapping[str, np.ndarray] | None = None) -> Path:
    """Writes ``draws`` as ArviZ netCDF (h5netcdf) to ``path``, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        to_inference_data(draws, coords).to_netcdf(str(partial), engine="h5netcdf")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def posterior_summary(path: str | Path) -> dict[str, dict[str, float]]:
    """Per site: worst ``r_hat`` / ``r_hat_split`` (max) and ``ess_bulk`` / ``ess_tail`` (min), by ArviZ.

    Constant components (no R-hat or ESS) are left out, as :func:`metafit.bayes.diagnose` does.
    """
    import arviz as az

    idata = az.from_netcdf(str(path), engine="h5netcdf")
    posterior = idata.posterior
    columns = {"r_hat": az.rhat(posterior, method="rank"), "r_hat_split": az.rhat(posterior, method="split"),
               "ess_bulk": az.ess(posterior, method="bulk"), "ess_tail": az.ess(posterior, method="tail")}
    rows = {}
    for site in posterior.data_vars:
        varying = (posterior[site].std(dim=("chain", "draw")) > 0).values
        if posterior.sizes["draw"] < 4 or not varying.any():
            continue
        rows[site] = {}
        for column, values in columns.items():
            kept = np.asarray(values[site].values, np.float64)[varying]
            rows[site][column] = float(np.nanmax(kept) if column.startswith("r_hat") else np.nanmin(kept))
    return rows


def print_posterior_summaries(run_dir: str | Path) -> None:
    """Prints one table per ``posterior/*.nc`` file of a run folder (nothing when there is none)."""
    files = sorted((Path(run_dir) / POSTERIOR_DIR).glob("*.nc"))
    if not files:
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # site names come from a file: never parsed as markup

    console = Console()
    for file in files:
        table = Table(title=f"{POSTERIOR_DIR}/{file.name}: ArviZ diagnostics, worst over problems and components")
        table.add_column("site")
        for column in SUMMARY_COLUMNS:
            table.add_column(column, justify="right")
        for site, row in posterior_summary(file).items():
            table.add_row(Text(site), *(f"{row[c]:.6f}" if c.startswith("r_hat") else f"{row[c]:.1f}"
                                  for c in SUMMARY_COLUMNS))
        console.print(table)
