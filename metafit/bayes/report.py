"""Tables and plots of a sweep's per-cell rows (:func:`metafit.bayes.summarise`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from metafit.bayes.sweep import AXES


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
    from metafit.runs import figure

    fig = figure((10, 4))
    ax_rate, ax_lpd = fig.subplots(1, 2)
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
    return path
