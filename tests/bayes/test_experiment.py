"""The prompt_transfer experiment end to end (tiny), its configs, and config errors."""
import json
from pathlib import Path

import pytest

from metafit.bayes import PosteriorDiagnosticsWarning
from metafit.config import ConfigError
from metafit.experiments import load_run_config, run_experiment

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "bayes").glob("*.yaml"))
TINY = ["args.grid.seeds=2", "args.method.nuts.num_warmup=30", "args.method.nuts.num_samples=30",
        "args.method.nuts.num_chains=2", "args.simulator.source_size=[8]", "args.simulator.n_target=5",
        "args.methods=[no_transfer,prompt]"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_bayes_config_validates(path):
    cfg = load_run_config(path)
    assert cfg.experiment == "prompt_transfer" and "no_transfer" in cfg.args.methods


def test_tiny_sweep_writes_results_tables_plots_and_resumes(tmp_path):
    config = CONFIGS[[p.stem for p in CONFIGS].index("prompt_sweep_linear")]
    overrides = TINY + ["args.grid.proxy_noise=[0.1,1.0]", "args.grid.heterogeneity=[1.0]"]
    with pytest.warns(PosteriorDiagnosticsWarning, match="prompt: .* poor NUTS diagnostics"):  # 2 x 30 draws
        run, results = run_experiment(config, overrides, workdir=tmp_path / "run")
    methods = results["methods"]
    assert set(methods) == {"no_transfer", "prompt"}
    for row in methods.values():
        assert {"lpd", "mse", "neg_transfer_rate"} <= set(row) and 0.0 <= row["neg_transfer_rate"] <= 1.0
    assert methods["no_transfer"]["neg_transfer_rate"] == 0.0 and "rhat_max" in methods["prompt"]
    rows = json.loads((run.path / "sweep.json").read_text())
    assert len(rows) == 2 * 2 and (run.path / "vs_proxy_noise.png").stat().st_size > 0
    # A rerun reuses the per-method scores: same numbers, nothing refitted.
    stamp = (run.path / "methods" / "prompt.npz").stat().st_mtime
    _, again = run_experiment(config, overrides, workdir=tmp_path / "run")
    assert again["methods"]["prompt"]["lpd"] == methods["prompt"]["lpd"]
    assert (run.path / "methods" / "prompt.npz").stat().st_mtime == stamp


def test_config_errors_name_the_key(tmp_path):
    config = CONFIGS[0]
    with pytest.raises(ConfigError, match="did you mean 'heterogeneity'"):
        load_run_config(config, ["args.simulator.heterogenity=2"])
    with pytest.raises(ConfigError, match="did you mean 'prompt'"):
        load_run_config(config, ["args.methods=[promt]"])
    with pytest.raises(ConfigError, match="n_sources must be >= 1"):
        load_run_config(config, ["args.simulator.n_sources=0"])
