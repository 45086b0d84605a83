"""The merge-family experiment modules stay thin: parse args, call the library, write results.

Scoped to ``merge.py``, ``merge_lm.py`` and ``finetune.py``; each module lists the only names it
may define at top level. A loss, model, loader or training helper belongs in the library
(``metafit.data``, ``metafit.train``, ``metafit.merge``, ...), where it is tested on its own.
"""
import ast
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "metafit" / "experiments"
ALLOWED = {
    "merge.py": {"functions": {"merge_atm", "merge_compatible"}, "classes": {"ATMArgs", "CompatibleArgs"}},
    "merge_lm.py": {"functions": {"merge_lm", "check_args"}, "classes": {"MergeLMArgs"}},
    "finetune.py": {"functions": {"lora_sft"}, "classes": {"FinetuneArgs"}},
    "context.py": {"functions": {"context_nih", "context_sft", "validate_nih", "validate_sft"},
                   "classes": {"NIHArgs", "SFTArgs"}},
    "select.py": {"functions": {"delift"}, "classes": {"DeliftArgs"}},
    "multitask.py": {"functions": {"multitask"}, "classes": {"MultitaskArgs"}},
}


def _tree(name):
    return ast.parse((EXPERIMENTS / name).read_text())


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_only_registered_experiments_their_args_and_validation_at_top_level(name):
    tree = _tree(name)
    functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert functions <= ALLOWED[name]["functions"], f"{name} defines {functions - ALLOWED[name]['functions']}"
    assert classes <= ALLOWED[name]["classes"], f"{name} defines {classes - ALLOWED[name]['classes']}"
    for node in tree.body:
        if isinstance(node, ast.ClassDef):  # args classes are frozen dataclasses, nothing more
            assert any("dataclass" in ast.unparse(d) for d in node.decorator_list), node.name
            methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            assert methods <= {"__post_init__"}, f"{name}: {node.name} defines {methods}"


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_no_nested_functions_or_classes_inside_experiments(name):
    """Closures that define a loss, a fine-tune or a training loop inside an experiment are library code."""
    for top in _tree(name).body:
        if isinstance(top, ast.FunctionDef):
            nested = [n.name for n in ast.walk(top) if n is not top
                      and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            assert not nested, f"{name}: {top.name} defines {nested}"


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_experiments_do_not_import_each_other_or_build_losses(name):
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("metafit.experiments."), f"{name} imports {node.module}"
            assert node.module != "optax", name
        if isinstance(node, ast.Import):
            assert all(a.name != "optax" and not a.name.startswith("metafit.experiments.") for a in node.names), name
