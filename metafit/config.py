"""YAML -> frozen dataclasses, validated before any compute.

Configs are plain frozen dataclasses; defaults live only in the dataclass. This
module turns parsed YAML (or any mapping) into instances and reports problems
precisely:

* unknown key   -> ``ConfigError: unknown key 'train.lrr'; did you mean 'lr'? valid keys: ...``
* wrong type    -> ``ConfigError: train.steps: expected int, got 'ten' (str)``
* YAML syntax   -> ``ConfigError: configs/x.yaml: YAML syntax error at line 3, column 7: ...``

Supported field types: ``int``, ``float`` (ints and float strings such as ``1e-3``
accepted), ``bool``, ``str``, ``Literal[...]``, ``Optional[T]``, ``tuple[T, ...]``,
``tuple[A, B]``, ``dict[str, T]``, ``Any`` and nested dataclasses.

Command-line overrides ``--set a.b=c`` are parsed as YAML scalars/flow lists, so
``--set train.steps=10 --set args.widths=[32,32] --set train.lr=3e-4`` work.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

import yaml

from metafit.registry import did_you_mean

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration is invalid; the message names the key and what to do."""


MAX_YAML_NODES = 100_000  # scalars + collections after alias expansion; real configs have a few hundred
MAX_YAML_DEPTH = 64


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"{self.source}: duplicate key '{key}' at line {key_node.start_mark.line + 1} "
                                  f"(first at line {seen[key] + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def safe_yaml(text: str, source: str = "config") -> Any:
    """Parses YAML text safely: no tags beyond the safe ones, no duplicate keys, bounded size.

    Aliases make a few hundred bytes expand to gigabytes (an "alias bomb") once the result is
    copied or walked, so the composed node graph is measured with aliases expanded *before*
    anything is constructed, and deep nesting is refused before it meets Python's recursion limit.

    Raises:
      ConfigError: naming ``source`` and the problem; ``yaml.YAMLError`` for syntax errors.
    """
    loader = _StrictLoader(text)
    loader.source = source
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source}: nested more than Python can parse; flatten the config") from None
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_size(root, source: str) -> None:
    """Counts nodes with aliases expanded (memoised per node) and the depth, without recursion."""
    sizes: dict[int, int] = {}
    stack = [(root, 1, False)]
    on_path: set[int] = set()
    while stack:
        node, depth, children_done = stack.pop()
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{source}: nested deeper than {MAX_YAML_DEPTH} levels; flatten the config")
        children = _children(node)
        if children_done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise ConfigError(f"{source}: expands to more than {MAX_YAML_NODES:,} values (aliases repeated "
                                  "inside aliases?); configs that large are refused")
            continue
        if id(node) in sizes:
            continue
        if id(node) in on_path:
            raise ConfigError(f"{source}: an alias refers to a node that contains it (a recursive alias)")
        on_path.add(id(node))
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in children if id(child) not in sizes)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping from ``path`` with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path; configs live under configs/)")
    try:
        data = safe_yaml(path.read_bytes().decode("utf-8"), str(path))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}); "
                          "configs are UTF-8 YAML") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``a.b.c=value`` into (['a', 'b', 'c'], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in '{text}'")
    try:
        value = safe_yaml(raw, f"--set {key}") if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        quoted = '"' + raw.replace("\\", "\\\\").replace('"', '\\"') + '"'
        raise ConfigError(
            f"--set {text}: the value of '{key}' does not parse as YAML ({problem}); "
            f"to pass it as a string, quote it: --set '{key}={quoted}'"
        ) from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of ``raw`` with each ``a.b=c`` override set (validation happens later)."""
    out = _deep_copy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def from_dict(cls: type[C], data: Mapping[str, Any] | None, path: str = "") -> C:
    """Builds the dataclass ``cls`` from ``data``, validating keys and types recursively.

    Args:
      cls: a dataclass type.
      data: a mapping (e.g. parsed YAML); missing keys take the dataclass defaults.
      path: dotted prefix used in error messages (e.g. ``"args"``).

    Returns:
      An instance of ``cls``.

    Raises:
      ConfigError: naming the offending key path, the expected type and the given value.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            valid = sorted(fields)
            raise ConfigError(
                f"unknown key '{where}';{did_you_mean(str(key), valid)} valid keys"
                f"{' under ' + path if path else ''}: {', '.join(valid)}"
            )
    kwargs = {}
    for name, field in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = coerce(hints[name], data[name], where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{where}'")
    return cls(**kwargs)


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Checks ``value`` against type ``tp`` and converts it (lists -> tuples, ints -> floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = did_you_mean(str(value), [str(c) for c in choices])
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r};{hint}".rstrip(";"))
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _type_error(where, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        _, value_type = typing.get_args(tp) or (str, Any)
        if not isinstance(value, Mapping):
            raise _type_error(where, "a mapping", value)
        return {str(k): coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}
    return _coerce_scalar(tp, value, where)


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(where, "bool (true/false)", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(where, "int", value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(where, "float", value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(where, "str", value)
    raise TypeError(f"{where}: unsupported config field type {tp}")


def _type_error(where: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")


def to_dict(config: Any) -> Any:
    """Converts a config dataclass (recursively) into plain YAML-friendly Python values."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def dump_yaml(data: Any) -> str:
    """YAML text of a config (dataclass or mapping), keys in declaration order."""
    return yaml.safe_dump(to_dict(data), sort_keys=False)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description from the ``Attributes:`` section of a dataclass's docstring.

    Google style, as every metafit config documents its fields::

        Attributes:
          steps: optimiser steps in total.
          lr: peak learning rate; continuation lines
            are joined.

    Sphinx roles are reduced to their text (``:class:`x.Y``` -> ```x.Y```). Fields
    without a description are absent from the result.
    """
    lines = (cls.__dict__.get("__doc__") or "").expandtabs().splitlines()
    headers = [i for i, line in enumerate(lines) if line.strip() == "Attributes:"]
    docs: dict[str, str] = {}
    indent, current = None, None
    for line in lines[headers[0] + 1:] if headers else ():
        if not line.strip():
            if docs:  # a blank line after the entries ends the section
                break
            continue
        lead = len(line) - len(line.lstrip())
        indent = lead if indent is None else indent
        if lead < indent:  # dedented: the next section
            break
        entry = re.match(r"(\w+)\s*(?:\([^)]*\))?:\s*(.*)", line.strip())
        if lead == indent and entry:
            current = entry[1]
            docs[current] = entry[2]
        elif current is not None and lead > indent:
            docs[current] += " " + line.strip()
    return {name: _plain(text) for name, text in docs.items()}


def _plain(text: str) -> str:
    """Docstring markup as plain text: ``:role:`x` `` and double backticks become single backticks."""
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def dump_yaml_documented(config: Any, *, header: str = "", width: int = 100) -> str:
    """YAML text of a config dataclass with each field's documentation as a comment above it.

    The comments come from the ``Attributes:`` sections of the dataclasses (see
    :func:`field_docs`), nested dataclasses included. The YAML itself equals
    :func:`dump_yaml`'s, so loading the text back gives the same config.

    Args:
      config: a dataclass instance.
      header: text put first, as ``#`` comment lines.
      width: wrap comments at this many characters.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"dump_yaml_documented needs a dataclass instance, got {config!r}")
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    _emit_documented(config, 0, out, width)
    return "\n".join(out) + "\n"


def _emit_documented(config: Any, indent: int, out: list[str], width: int) -> None:
    pad = " " * indent
    docs = field_docs(type(config))
    for field in dataclasses.fields(config):
        if not field.init:
            continue
        value = getattr(config, field.name)
        comment = docs.get(field.name, "")
        nested = dataclasses.is_dataclass(value) and not isinstance(value, type)
        own_doc = type(value).__dict__.get("__doc__") or ""
        if nested and not comment and own_doc and not own_doc.startswith(type(value).__name__ + "("):
            comment = _plain(inspect.cleandoc(own_doc).splitlines()[0])  # not dataclass's generated signature
        if comment:
            out.extend(textwrap.wrap(comment, width, initial_indent=pad + "# ", subsequent_indent=pad + "# ",
                                     break_on_hyphens=False))
        if nested and any(f.init for f in dataclasses.fields(value)):
            out.append(f"{pad}{field.name}:")
            _emit_documented(value, indent + 2, out, width)
        else:
            out.extend(pad + line for line in _yaml_entry(field.name, to_dict(value)))


def _yaml_entry(name: str, value: Any) -> list[str]:
    """``name: value`` lines: flow style for scalars and flat collections, block style above them."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if any(isinstance(item, (dict, list)) for item in items):
        text = yaml.safe_dump({name: value}, sort_keys=False, default_flow_style=None, width=float("inf"))
        return text.rstrip("\n").splitlines()
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
    return [f"{name}: {text.removesuffix(chr(10)).removesuffix(chr(10) + '...').strip()}"]


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
