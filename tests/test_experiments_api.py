"""metafit.experiments: the lazy registry, validate-before-write, user experiments, documented default configs."""
import importlib
import json
import sys

import jax
import pytest
import yaml

import metafit.experiments as experiments
from metafit.config import ConfigError
from metafit.experiments import (
    EXPERIMENT_MODULES, RunConfig, config_text, default_config, experiment, get_experiment, resolve_config,
    run_experiment,
)

TINY = ["args.hidden=[16]", "train.steps=2", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0",
        "train.steps_per_dispatch=1"]

USER_MODULE = '''
from dataclasses import dataclass

from metafit.experiments import experiment


@dataclass(frozen=True)
class ToyArgs:
    """Options of the toy experiment.

    Attributes:
      x: the number to double.
      tag: a label
        that spans two lines.
    """

    x: int = 3
    tag: str = "toy"

    def __post_init__(self):
        if self.x > 100:
            raise ValueError(f"args.x must be <= 100, got {self.x}")


def different_from_seed(cfg):
    if cfg.args.x == cfg.seed:
        raise ValueError(f"args.x must differ from seed ({cfg.seed})")


@experiment(config=ToyArgs, validate=different_from_seed)
def doubled(cfg, run):
    """Doubles args.x."""
    run.log({"x": cfg.args.x}, step=0, stage="toy")
    return {"metrics": {"twice": 2 * cfg.args.x, "seed": cfg.seed}}


def plain(cfg, run):
    return {"metrics": {"ran": 1.0}}


def one_argument(cfg):
    return {}


not_a_function = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable user module ``toy_user_experiments`` (dropped from sys.modules afterwards)."""
    name = "toy_user_experiments"
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    yield name
    sys.modules.pop(name, None)


def write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_table_lists_every_experiment_the_package_declares():
    # A module that registers @experiment("new_name") but is missing from the table fails here.
    assert experiments._declared_in_sources() == EXPERIMENT_MODULES
    experiments.load_all()  # and nothing registers names by other means (loops, computed names)
    assert experiments.EXPERIMENTS.names() == sorted(EXPERIMENT_MODULES)


def test_unknown_experiment_lists_names_and_suggests():
    with pytest.raises(ConfigError) as err:
        get_experiment("quickstrat")
    message = str(err.value)
    assert "unknown experiment 'quickstrat'; did you mean 'quickstart'?" in message
    assert "merge_lm" in message and "package.module:function" in message


def test_builtin_names_cannot_be_taken_by_another_module():
    with pytest.raises(ValueError, match="'quickstart' belongs to metafit.experiments.quickstart"):
        experiment("quickstart")(lambda cfg, run: {})


@pytest.mark.parametrize("setting, key", [
    ("train.optimizer=adamz", "train.optimizer"),
    ("mesh.data=0", "mesh.data"),
    ("mesh.fsdp=-2", "mesh.fsdp"),
    (f"mesh.data={jax.device_count() + 1}", "mesh"),
    ("seed=-1", "seed must be in [0, 2**32)"), ("seed=100000000000000000000000", "seed must be in"),
    ("train.steps=0", "train.steps"),
    ("args.test_fraction=2", "args.test_fraction"), ("args.hidden=[0]", "args.hidden"), ("args.hidden=[-3]", "args.hidden"),
    ("args.hidden=[16", "args.hidden"),  # an override that does not parse as YAML
])
def test_bad_setting_fails_before_the_run_folder_exists(repo, tmp_path, setting, key):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run_experiment(repo / "configs/quickstart.yaml", [*TINY, setting], workdir=workdir)
    assert key in str(err.value)
    assert not workdir.exists()


def test_corrected_rerun_runs_in_the_same_folder(tmp_path, user_module):
    config = write_config(tmp_path / "toy.yaml", {"experiment": f"{user_module}:doubled", "args": {"x": 5}})
    workdir = tmp_path / "run"
    for setting in ("train.optimizer=adamz", "mesh.data=0", "seed=-1", "args.x=0"):
        with pytest.raises(ConfigError):
            run_experiment(config, [setting], workdir=workdir)
        assert not workdir.exists()
    run, results = run_experiment(config, ["train.optimizer=adam"], workdir=workdir)
    assert results["metrics"]["twice"] == 10 and (workdir / "results.json").is_file()


def test_merge_lm_arguments_are_validated_before_the_folder_exists(repo, tmp_path):
    config = repo / "configs/merge/lm_smollm2.yaml"
    with pytest.raises(ConfigError, match=r"args.atm_rounds=3 must be 0 or divide train.steps=10"):
        run_experiment(config, ["args.model=/nonexistent", "train.steps=10", "args.atm_rounds=3"],
                       workdir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"args.merges\[0\] \(x\): .*tiess"):
        run_experiment(config, ["args.merges=[{name: x, method: tiess}]"], workdir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(tmp_path, user_module, monkeypatch):
    def broken(cfg, run):
        raise RuntimeError("boom")

    monkeypatch.setattr(importlib.import_module(user_module), "plain", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run_experiment(RunConfig(f"{user_module}:plain"), workdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_user_experiment_runs_from_a_config(tmp_path, user_module):
    config = write_config(tmp_path / "toy.yaml", {"experiment": f"{user_module}:doubled", "seed": 1,
                                                  "args": {"x": 21}})
    run, results = run_experiment(config, workdir=tmp_path / "run")
    assert json.loads((run.path / "results.json").read_text())["metrics"] == {"twice": 42, "seed": 1}
    assert f"experiment: {user_module}:doubled" in (run.path / "config.yaml").read_text()
    assert "x: 21" in (run.path / "config.yaml").read_text()

    plain = write_config(tmp_path / "plain.yaml", {"experiment": f"{user_module}:plain"})
    _, results = run_experiment(plain, workdir=tmp_path / "plain")
    assert results == {"metrics": {"ran": 1.0}}
    _, again = run_experiment(RunConfig(f"{user_module}:plain"), workdir=tmp_path / "plain")  # same config resumes
    assert again == results


@pytest.mark.parametrize("name, overrides, message", [
    ("no_such_module_xyz:run", [], "no module named 'no_such_module_xyz'"),
    ("{mod}:doubel", [], "has no attribute 'doubel'; did you mean 'doubled'?"),
    ("{mod}:one_argument", [], "one_argument(cfg) cannot be called as one_argument(cfg, run)"),
    ("{mod}:not_a_function", [], "'not_a_function' is a int, not a function"),
    ("{mod}:", [], "expected 'package.module:function'"),
    ("{mod}:plain", ["args.x=1"], "takes no arguments"),
    ("{mod}:doubled", ["args.x=200"], "args.x must be <= 100, got 200"),
    ("{mod}:doubled", ["args.y=1"], "unknown key 'args.y'"),
    ("{mod}:doubled", ["args.x=0"], "args.x must differ from seed (0)"),  # the validate hook
])
def test_user_experiment_errors_name_the_problem(tmp_path, user_module, name, overrides, message):
    config = write_config(tmp_path / "bad.yaml", {"experiment": name.format(mod=user_module)})
    with pytest.raises(ConfigError) as err:
        run_experiment(config, overrides, workdir=tmp_path / "run")
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(EXPERIMENT_MODULES))
def test_default_config_text_is_documented_and_resolves_to_the_defaults(name):
    cfg = default_config(name)
    text = config_text(cfg)
    assert resolve_config(yaml.safe_load(text)) == cfg
    assert "# optimiser steps in total.\n  steps: 100" in text  # train's documented fields
    assert "# data-parallel replicas (the batch is split across them).\n  data: -1" in text


def test_default_config_of_a_user_experiment(user_module):
    cfg = default_config(f"{user_module}:doubled")
    assert cfg.args.x == 3
    text = config_text(cfg)
    assert "  # a label that spans two lines.\n  tag: toy" in text
    assert resolve_config(yaml.safe_load(text)) == cfg


def test_run_config_objects_get_their_experiments_args():
    cfg = experiments.validate_config(RunConfig("quickstart", args={"hidden": [8]}), check_devices=False)
    assert cfg.args.hidden == (8,) and cfg.args.test_fraction == 0.25
    assert experiments.validate_config(RunConfig("quickstart")).args == default_config("quickstart").args


def test_config_must_be_a_mapping_naming_an_experiment(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'experiment'"):
        resolve_config({"seed": 1})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        resolve_config(["quickstart"])
