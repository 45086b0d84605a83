"""Proxy-informed Bayesian transfer from unknown sources (PROMPT reconstruction) in NumPyro.

Parts, bottom-up:
  gaussian   closed-form conjugate posteriors (the references tests check NUTS against)
  data       TransferData, the simulator (linear and GP settings) and input validation
  models     NumPyro models: PROMPT power posterior, pooling, oracle, hierarchical mixture;
             priors of the transferable f by name (FUNCTION_PRIORS: 'linear', 'gp')
  inference  functional NUTS / SVI (jit- and vmap-able) and diagnostics (R-hat, ESS, divergences)
  methods    registered transfer methods (TRANSFER_METHODS), PROMPT's steps, scoring
  sweep      one vectorised evaluation over a grid of simulator knobs and seeds; per-method
             scores saved to / loaded from .npz files
  report     markdown table and plots of a sweep's per-cell rows

Example:
    >>> import jax
    >>> from metafit.bayes import SimulatorConfig, simulate, fit_transfer, predictive_scores
    >>> data, truth = simulate(jax.random.PRNGKey(0), SimulatorConfig(heterogeneity=2.0))
    >>> fit, diagnostics = fit_transfer("prompt", data, n_sources=4, key=jax.random.PRNGKey(1))
    >>> predictive_scores(fit, data.y_target)["lpd"]
"""
from metafit.bayes.data import (
    SimulatorConfig,
    TransferData,
    TransferDataError,
    TransferTruth,
    simulate,
    validate_transfer_data,
)
from metafit.bayes.gaussian import Gaussian, gp_condition, linear_posterior, normal_posterior, rbf_kernel
from metafit.bayes.inference import (
    ConvergenceGate,
    Diagnostics,
    Draws,
    NutsConfig,
    PosteriorDiagnosticsWarning,
    SviConfig,
    check_diagnostics,
    diagnose,
    nuts_sample,
    run_nuts,
    svi_sample,
)
from metafit.bayes.methods import (
    TRANSFER_METHODS,
    MethodConfig,
    MethodFit,
    fit_transfer,
    predictive_scores,
    prompt_weights,
    proxy_posterior,
    relevance_weights,
)
from metafit.bayes.models import FUNCTION_PRIORS, PriorConfig, mixture_responsibilities
from metafit.bayes.report import plot_axis, sweep_markdown
from metafit.bayes.sweep import (MethodScores, SweepGrid, evaluate_sweep, load_scores, problem_records, save_scores,
                                 summarise, sweep_problems)

__all__ = [
    "SimulatorConfig", "TransferData", "TransferDataError", "TransferTruth", "simulate", "validate_transfer_data",
    "Gaussian", "gp_condition", "linear_posterior", "normal_posterior", "rbf_kernel",
    "ConvergenceGate", "Diagnostics", "Draws", "NutsConfig", "PosteriorDiagnosticsWarning", "SviConfig", "check_diagnostics",
    "diagnose", "nuts_sample", "run_nuts", "svi_sample",
    "TRANSFER_METHODS", "MethodConfig", "MethodFit", "fit_transfer", "predictive_scores",
    "prompt_weights", "proxy_posterior", "relevance_weights", "FUNCTION_PRIORS", "PriorConfig", "mixture_responsibilities",
    "MethodScores", "SweepGrid", "evaluate_sweep", "summarise", "sweep_problems", "problem_records", "load_scores", "save_scores",
    "sweep_markdown", "plot_axis",
]
