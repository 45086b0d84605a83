"""Every Python example in README.md and docs/*.md runs, and every config-field table matches its dataclass.

Examples: each ```python block is executed in a fresh namespace, in a temporary working
directory. A block that is deliberately not standalone is preceded by a comment line
``<!-- no-run: why -->`` (the reason is required). New pages under docs/ are picked up
automatically.

Field tables: a line ``<!-- fields: package.module.Dataclass -->`` followed by a Markdown table
whose first column is `` `field` `` and second the default lists exactly the dataclass's
fields, in order, with their defaults (the text of :func:`default_text`). To write a new table
(descriptions from the dataclass's ``Attributes:``; fill in any ``TODO``)::

    python -c "from tests.test_docs_examples import field_table; print(field_table('metafit.train.config.TrainConfig'))"
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import types
from pathlib import Path

import pytest

from metafit.config import field_docs, to_dict

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = re.compile(r"<!--\s*no-run:\s*(?P<why>\S.*?)\s*-->")
FIELDS = re.compile(r"<!--\s*fields:\s*(?P<path>[\w.]+)\s*-->")


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    source: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of ``page`` with the no-run reason of the line before each (if any)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise AssertionError(f"{page.name}:{start + 1}: ```python block is never closed")
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marker = NO_RUN.search(before)
            blocks.append(Block(page, start + 1, "\n".join(lines[start + 1:end]) + "\n",
                                marker["why"] if marker else None))
            i = end + 1
        else:
            i += 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def test_pages_have_examples():
    """Guards the collection itself: a parser that finds nothing would make every example test vacuous."""
    assert len(BLOCKS) >= len(PAGES)
    assert any(block.page.name == "README.md" for block in BLOCKS)


def test_no_run_markers_stay_rare():
    skipped = [block.name for block in BLOCKS if block.skip_reason]
    assert len(skipped) <= len(BLOCKS) // 4, f"too many examples marked no-run: {skipped}"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_example_runs(block: Block, tmp_path, monkeypatch):
    if block.skip_reason:
        pytest.skip(f"no-run: {block.skip_reason}")
    monkeypatch.chdir(tmp_path)
    # A real module, so that dataclasses and pickling defined in an example can find it; compiled
    # without this file's __future__ flags, as the reader's own script would be.
    module = types.ModuleType("__docs_example__")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(block.source, block.name, "exec", dont_inherit=True), module.__dict__)  # noqa: S102 - our own docs


def default_text(field: dataclasses.Field) -> str:
    """How a field table writes a default: YAML-like scalars in backticks, `Name()` for a dataclass."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return f"`{type(value).__name__}()`"
    value = to_dict(value)
    if isinstance(value, tuple):
        value = list(value)
    if value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    else:
        text = value if isinstance(value, str) else repr(value)
    return f"`{text}`"


def field_table(path: str) -> str:
    """A field table of the dataclass at ``path``, descriptions from its (and its bases') docstrings.

    Writes the page text that :func:`test_field_table_matches_dataclass` checks; fields without an
    ``Attributes:`` entry get ``TODO`` for a person to fill in.
    """
    cls = _dataclass(path)
    docs = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    rows = [f"<!-- fields: {path} -->", "| field | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.init:
            meaning = docs.get(field.name, "TODO").replace("|", "\\|")
            rows.append(f"| `{field.name}` | {default_text(field)} | {meaning} |")
    return "\n".join(rows) + "\n"


def _dataclass(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def field_tables() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """``(page:line, dataclass path, [(field, default), ...])`` for every field table in the docs."""
    tables = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            marker = FIELDS.search(line)
            if not marker:
                continue
            rows = []
            for row in lines[i + 3:]:  # skip the header and the |---| line
                if not row.startswith("|"):
                    break
                cells = [cell.strip() for cell in row.strip("|").split(" | ")]
                rows.append((cells[0].strip("`"), cells[1]))
            tables.append((f"{page.relative_to(ROOT)}:{i + 1}", marker["path"], rows))
    return tables


TABLES = field_tables()


def test_field_tables_exist():
    assert len(TABLES) >= 10


@pytest.mark.parametrize("where, path, rows", TABLES, ids=[f"{w}:{p}" for w, p, _ in TABLES])
def test_field_table_matches_dataclass(where, path, rows):
    fields = [field for field in dataclasses.fields(_dataclass(path)) if field.init]
    assert [row[0] for row in rows] == [field.name for field in fields], f"{where}: fields of {path} differ"
    assert [row[1] for row in rows] == [default_text(field) for field in fields], f"{where}: defaults of {path} differ"
