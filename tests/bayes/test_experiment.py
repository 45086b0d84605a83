"""The prompt_transfer experiment end to end (tiny), its configs, and config errors."""
import json
from pathlib import Path

import pytest

from metafit.bayes import PosteriorDiagnosticsWarning
from metafit.bayes.sweep import _simulate_batch
from metafit.config import ConfigError
from metafit.experiments import load_run_config, run_experiment

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "bayes").glob("*.yaml"))
# sequential chains: the unbatched sampler compiles in half the time (vectorised chains: test_posteriors.py)
TINY = ["args.grid.seeds=2", "args.method.nuts.num_warmup=30", "args.method.nuts.num_samples=30",
        "args.method.nuts.num_chains=2", "args.method.nuts.chain_method=sequential", "args.simulator.source_size=[8]",
        "args.simulator.n_target=5", "args.methods=[no_transfer,prompt]"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_bayes_config_validates(path):
    cfg = load_run_config(path)
    assert cfg.experiment == "prompt_transfer" and "no_transfer" in cfg.args.methods


def test_tiny_sweep_writes_results_tables_plots_and_resumes(tmp_path):
    config = CONFIGS[[p.stem for p in CONFIGS].index("prompt_sweep_linear")]
    overrides = TINY + ["args.grid.proxy_noise=[0.1,1.0]", "args.grid.heterogeneity=[1.0]"]
    simulators_compiled = _simulate_batch._cache_size()
    with pytest.warns(PosteriorDiagnosticsWarning, match="prompt: .* poor NUTS diagnostics"):  # 2 x 30 draws
        run, results = run_experiment(config, overrides, workdir=tmp_path / "run")
    methods = results["methods"]
    assert set(methods) == {"no_transfer", "prompt"}
    for row in methods.values():
        assert {"lpd", "mse", "neg_transfer_rate"} <= set(row) and 0.0 <= row["neg_transfer_rate"] <= 1.0
    assert methods["no_transfer"]["neg_transfer_rate"] == 0.0 and "rhat_max" in methods["prompt"]
    rows = json.loads((run.path / "sweep.json").read_text())
    assert len(rows) == 2 * 2 and (run.path / "vs_proxy_noise.png").stat().st_size > 0
    # Every problem's record: its cell, scores and diagnostics (what the paper table gates rows on).
    problems = json.loads((run.path / "problems.json").read_text())
    assert problems["cells"]["seed"] == [0, 1, 0, 1] and problems["cells"]["proxy_noise"] == pytest.approx([0.1, 0.1, 1, 1])
    prompt = problems["methods"]["prompt"]
    assert max(prompt["max_rhat"]) == pytest.approx(methods["prompt"]["rhat_max"]) and prompt["draws"] == [60] * 4
    assert sum(prompt["lpd"]) / 4 == pytest.approx(methods["prompt"]["lpd"], rel=1e-5)
    assert "max_rhat" not in problems["methods"]["no_transfer"]
    _check_posterior_file(run.path, methods["prompt"])
    # A rerun reuses the per-method scores: same numbers, nothing refitted.
    stamp = (run.path / "methods" / "prompt.npz").stat().st_mtime
    _, again = run_experiment(config, overrides, workdir=tmp_path / "run")
    assert again["methods"]["prompt"]["lpd"] == methods["prompt"]["lpd"]
    assert (run.path / "methods" / "prompt.npz").stat().st_mtime == stamp
    assert _simulate_batch._cache_size() == simulators_compiled + 1  # the rerun's problems reuse the compiled simulator


def _check_posterior_file(run_path, prompt_row):
    """posterior/prompt.nc opens in ArviZ with every site [chain, draw, problem, ...]; split R-hat = diagnose()."""
    import arviz as az
    import numpy as np

    from metafit.bayes import Draws, diagnose
    from metafit.bayes.posterior import posterior_summary

    assert not (run_path / "posterior" / "no_transfer.nc").exists()  # closed form: no draws
    idata = az.from_netcdf(str(run_path / "posterior" / "prompt.nc"))
    assert {"posterior", "sample_stats"} <= set(idata.groups())
    posterior = idata.posterior
    assert posterior.sizes["chain"] == 2 and posterior.sizes["draw"] == 30 and posterior.sizes["problem"] == 4
    assert list(posterior.proxy_noise.values) == [0.1, 0.1, 1.0, 1.0] and list(posterior.seed.values) == [0, 1, 0, 1]
    assert idata.sample_stats.diverging.dims == ("chain", "draw", "problem")
    summary = posterior_summary(run_path / "posterior" / "prompt.nc")
    assert set(summary) <= set(posterior.data_vars) and summary
    # metafit's diagnose() per problem on the same draws: its worst split R-hat is ArviZ's split R-hat
    per_problem = []
    for b in range(4):
        samples = {k: posterior[k].isel(problem=b).values for k in posterior.data_vars}  # [chain, draw, ...]
        per_problem.append(diagnose(Draws(samples, idata.sample_stats.diverging.isel(problem=b).values)))
    worst = max(d.max_rhat for d in per_problem)
    assert abs(max(row["r_hat_split"] for row in summary.values()) - worst) < 1e-6
    assert abs(worst - prompt_row["rhat_max"]) < 1e-6
    # the rank-normalised R-hat is a different statistic (>= 1, not equal to the split one here)
    assert all(row["r_hat"] >= 1.0 and row["ess_bulk"] > 0 for row in summary.values())


def test_show_prints_arviz_summary_of_posterior_draws(tmp_path, capsys):
    """`metafit show` prints, beside the results, the ArviZ table whose split R-hat is diagnose()'s."""
    import numpy as np

    from metafit import cli
    from metafit.bayes import Draws, diagnose
    from metafit.bayes.posterior import save_posterior

    rng = np.random.default_rng(0)
    # 2 problems, 3 chains, 40 draws; chain 2 of problem 1 is shifted, so R-hat is clearly above 1
    mu = rng.normal(size=(2, 3, 40))
    mu[1, 2] += 1.5
    beta = rng.normal(size=(2, 3, 40, 2))
    draws = Draws({"mu": mu, "beta": beta}, np.zeros((2, 3, 40), bool), np.ones((2, 3, 40), np.int32))
    run_dir = tmp_path / "run"
    save_posterior(run_dir / "posterior" / "prompt.nc", draws, coords={"seed": np.array([0, 1])})
    (run_dir / "results.json").write_text(json.dumps({"methods": {"prompt": {"lpd": -1.0}}}))
    assert cli.main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    expected = diagnose(Draws({"mu": mu[1], "beta": beta[1]}))
    assert expected.worst_site == "mu" and expected.max_rhat > 1.1
    assert f"{expected.max_rhat:.6f}" in out and "ess_bulk" in out and "lpd" in out


def test_config_errors_name_the_key(tmp_path):
    config = CONFIGS[0]
    with pytest.raises(ConfigError, match="did you mean 'heterogeneity'"):
        load_run_config(config, ["args.simulator.heterogenity=2"])
    with pytest.raises(ConfigError, match="did you mean 'prompt'"):
        load_run_config(config, ["args.methods=[promt]"])
    with pytest.raises(ConfigError, match="n_sources must be >= 1"):
        load_run_config(config, ["args.simulator.n_sources=0"])
