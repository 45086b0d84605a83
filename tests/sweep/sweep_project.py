"""A tiny fake project for sweep tests: a user experiment, a table builder and grids, in a temporary root."""
import sys
import textwrap
from pathlib import Path

import pytest

EXPERIMENT = '''
import dataclasses
import json
from pathlib import Path

from metafit.experiments import experiment


@dataclasses.dataclass(frozen=True)
class SquareArgs:
    x: float = 1.0
    fail: bool = False
    source: str = ""  # another run folder whose y is added (a chained job)


@experiment(config=SquareArgs)
def square(cfg, run):
    """y = x^2 + seed; ``fail`` raises, as a broken job would."""
    if cfg.args.fail:
        raise ValueError(f"x={cfg.args.x} was asked to fail")
    (run.path / "calls.txt").open("a").write("ran\\n")  # how many times the job really ran
    before = json.loads((Path(cfg.args.source) / "results.json").read_text())["metrics"]["y"] if cfg.args.source else 0.0
    return {"metrics": {"y": cfg.args.x ** 2 + cfg.seed + before}}
'''

BUILDER = '''
def collect(run_dir, results):
    return {"y": results["metrics"]["y"]}


def build(records, scale, variables):
    lines = ["| job | y |", "|---|---|"]
    for name, record in records.items():
        cell = f"{record['data']['y']:g}" if record["status"] == "done" else f"failed ({record['error'][:60]})"
        lines.append(f"| {name} | {cell} |")
    return {"table.md": "\\n".join(lines) + "\\n"}
'''

GRID = '''
paper: fake
builder: paper_repro/fake/make_table.py
results: paper_repro/fake/results/{{scale}}
default_scale: tiny
scales:
  tiny: {{seeds: [0, 1], xs: {xs}}}
blocks:
  - name: "x{{x}}_s{{seed}}"
    config: configs/square.yaml
    seeds: $seeds
    axes: {{x: $xs}}
    overrides: ["seed={{seed}}", "args.x={{x}}"]
    tags: {{x: "{{x}}"}}
  - name: broken
    config: configs/square.yaml
    overrides: ["args.fail=true"]
    priority: 1
'''


CHAIN = '''
  - name: "chain_s{seed}"
    config: configs/square.yaml
    seeds: $seeds
    after: ["x2_s{seed}"]
    overrides: ["seed={seed}", "args.source={runs}/x2_s{seed}"]
  - name: after_broken
    config: configs/square.yaml
    after: [broken]
'''


def make_project(root: Path, module: str, xs=(1, 2)) -> Path:
    """Writes the fake project under ``root``; returns the grid path."""
    (root / f"{module}.py").write_text(EXPERIMENT)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs/square.yaml").write_text(f"experiment: {module}:square\nseed: 0\n")
    (root / "paper_repro/fake").mkdir(parents=True, exist_ok=True)
    (root / "paper_repro/fake/make_table.py").write_text(BUILDER)
    return write_grid(root, xs)


def write_grid(root: Path, xs, extra: str = "") -> Path:
    (root / "experiments").mkdir(exist_ok=True)
    path = root / "experiments/fake.yaml"
    path.write_text(textwrap.dedent(GRID.format(xs=list(xs))) + extra)
    return path


@pytest.fixture
def fake_project(tmp_path, monkeypatch):
    module = f"square_{tmp_path.name.replace('-', '_')}"  # a fresh module name per test (sys.modules caches)
    grid = make_project(tmp_path, module)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield grid
    sys.modules.pop(module, None)
