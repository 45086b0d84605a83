"""The quickstart, meta, bayes and robust experiment modules are thin (issue 16).

An experiment module parses its arguments, calls the library and writes results: at top level
it defines only its arguments dataclass, its registered experiment function(s) and the small
result/plot writers listed here. A loss, a model, a data loader or a training helper belongs
to the library (``metafit.train.losses``, ``metafit.models``, ``metafit.data``, the family's
package), where other code can use it and tests check it.
"""
import ast
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "metafit" / "experiments"
WRITERS = {
    "quickstart": set(),
    "meta": set(),
    "bayes": set(),
    "robust": {"write_plots"},
}
# Owned by the digits change of issue 16 (one digits loader in metafit.data.digits), which replaces
# quickstart's split with it; delete this entry when that lands.
PENDING: dict[str, set[str]] = {}


def _experiment_decorator(node: ast.AST) -> ast.Call | None:
    for decorator in getattr(node, "decorator_list", []):
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "experiment":
            return decorator
    return None


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_module_defines_only_its_experiments_args_and_listed_writers(name):
    tree = ast.parse((EXPERIMENTS / f"{name}.py").read_text())
    registered, arg_classes, others = [], set(), []
    for node in tree.body:
        decorator = _experiment_decorator(node)
        if decorator is not None:
            registered.append(node.name)
            arg_classes |= {kw.value.id for kw in decorator.keywords if kw.arg == "config"}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name not in registered:
            others.append(node.name)
    assert registered, f"{name}.py registers no experiment"
    extra = set(others) - arg_classes - WRITERS[name] - PENDING.get(name, set())
    assert not extra, (f"metafit/experiments/{name}.py defines {sorted(extra)}: move library code to the "
                       "package it belongs to, or list a small result/plot writer in WRITERS")


def test_the_listed_writers_exist():
    """A stale allow-list would let a helper of the same name back in unnoticed."""
    for name, writers in WRITERS.items():
        defined = {n.name for n in ast.parse((EXPERIMENTS / f"{name}.py").read_text()).body
                   if isinstance(n, ast.FunctionDef)}
        assert writers <= defined, f"{name}.py no longer defines {sorted(writers - defined)}: drop them from WRITERS"
