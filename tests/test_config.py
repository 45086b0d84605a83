import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

import pytest
import yaml

from metafit.config import (
    ConfigError, apply_overrides, dump_yaml, dump_yaml_documented, field_docs, from_dict, load_yaml, parse_override,
    to_dict,
)
from metafit.experiments import load_run_config, resolve_config
from metafit.train import TrainConfig


@dataclass(frozen=True)
class Inner:
    width: int = 4
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    rate: float = 0.1
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = Inner()
    maybe: Optional[int] = None
    flag: bool = False


def test_defaults_nested_and_coercions():
    cfg = from_dict(Outer, {"rate": 1, "sizes": [3, 4, 5], "inner": {"kind": "b"}, "maybe": 3, "flag": True})
    assert cfg == Outer(rate=1.0, sizes=(3, 4, 5), inner=Inner(kind="b"), maybe=3, flag=True)
    assert isinstance(cfg.rate, float)
    assert from_dict(Outer, {"rate": "1e-3"}).rate == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
    assert to_dict(cfg)["inner"] == {"width": 4, "kind": "b"}


def test_unknown_key_names_path_and_suggestion():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"widht": 3}}, "args")
    message = str(err.value)
    assert "unknown key 'args.inner.widht'" in message and "did you mean 'width'?" in message
    assert "kind, width" in message


def test_wrong_type_names_key_expected_type_and_value():
    with pytest.raises(ConfigError, match=r"inner\.width: expected int, got 'ten' \(str\)"):
        from_dict(Outer, {"inner": {"width": "ten"}})
    with pytest.raises(ConfigError, match=r"flag: expected bool"):
        from_dict(Outer, {"flag": "yes please"})
    with pytest.raises(ConfigError, match=r"inner\.kind: expected one of \['a', 'b'\], got 'c'"):
        from_dict(Outer, {"inner": {"kind": "c"}})
    with pytest.raises(ConfigError, match=r"sizes\[1\]: expected int"):
        from_dict(Outer, {"sizes": [1, "two"]})


def test_overrides_parse_ints_floats_bools_lists():
    raw = apply_overrides({"a": {"b": 1}}, ["a.b=7", "a.c=3e-4", "x.y=true", "x.z=[1, 2]", "s=hello"])
    assert raw == {"a": {"b": 7, "c": "3e-4"}, "x": {"y": True, "z": [1, 2]}, "s": "hello"}
    cfg = from_dict(Outer, apply_overrides({}, ["rate=0.5", "sizes=[8,8]", "flag=false"]))
    assert (cfg.rate, cfg.sizes, cfg.flag) == (0.5, (8, 8), False)
    with pytest.raises(ConfigError, match="expects key=value"):
        apply_overrides({}, ["novalue"])


@pytest.mark.parametrize("override", ["args.widths=[32, 32", "args.name={a: 1", "args.name=@home", "x=a: b: c"])
def test_override_that_does_not_parse_is_an_error_naming_it(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, [override])
    message = str(err.value)
    assert message.startswith(f"--set {override}: the value of '{key}' does not parse as YAML")
    suggested = message.split("quote it: --set '", 1)[1].removesuffix("'")
    assert parse_override(suggested) == (key.split("."), override.split("=", 1)[1])  # the quoted form works


@dataclass(frozen=True)
class Documented:
    """A documented config.

    Attributes:
      width: hidden width; a long description that wraps onto a second line in the
        docstring, joined into one comment.
      inner: the nested section (see :class:`Inner`).
      sizes: layer sizes.
    """

    width: int = 8
    inner: Inner = Inner()
    sizes: tuple[int, ...] = (1, 2)
    table: dict[str, Any] = dataclasses.field(default_factory=lambda: {"a": [1, 2], "b": {"c": 1.0e-8}})


def test_field_docs_and_documented_yaml_round_trip():
    docs = field_docs(Documented)
    assert docs["width"] == ("hidden width; a long description that wraps onto a second line in the docstring, "
                             "joined into one comment.")
    assert docs["inner"] == "the nested section (see `Inner`)." and "table" not in docs
    assert field_docs(Inner) == {}  # no docstring of its own: nothing (not dataclass's generated signature)
    config = Documented(width=3, sizes=(4,))
    text = dump_yaml_documented(config, header="first\nsecond")
    assert text.startswith("# first\n# second\n# hidden width;")
    assert "# the nested section (see `Inner`).\ninner:\n  width: 4\n  kind: a\n" in text
    assert "# layer sizes.\nsizes: [4]\n" in text
    assert yaml.safe_load(text) == yaml.safe_load(dump_yaml(config))
    assert from_dict(Documented, yaml.safe_load(text)) == config


def test_yaml_syntax_error_reports_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: quickstart\ntrain:\n  steps: [1, 2\n  lr: 3\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_run_config_validation(repo):
    cfg = load_run_config(repo / "configs/quickstart.yaml", ["train.steps=5", "args.hidden=[16]"])
    assert cfg.train.steps == 5 and cfg.args.hidden == (16,)
    with pytest.raises(ConfigError, match="unknown experiment 'quickstrat'; did you mean 'quickstart'"):
        resolve_config({"experiment": "quickstrat"})
    with pytest.raises(ConfigError, match="unknown key 'args.hiden'"):
        load_run_config(repo / "configs/quickstart.yaml", ["args.hiden=3"])
    with pytest.raises(ConfigError, match="train.batch_size .* divisible by train.grad_accum"):
        resolve_config({"experiment": "quickstart", "train": {"batch_size": 10, "grad_accum": 3}})


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="train.steps must be >= 1"):
        TrainConfig(steps=0)


def test_field_docs_when_the_docstring_starts_with_attributes():
    @dataclass(frozen=True)
    class Short:
        """Attributes:
          n: how many
            (continued).
        """

        n: int = 1

    assert field_docs(Short) == {"n": "how many (continued)."}


def test_yaml_alias_bomb_is_refused_before_expansion(tmp_path):
    import time

    from metafit.config import load_yaml

    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for level in "bcdefghij":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="bomb.yaml: expands to more than 100,000 values"):
        load_yaml(bomb)
    assert time.perf_counter() - start < 2.0
    fine = tmp_path / "fine.yaml"  # aliases themselves are fine
    fine.write_text("base: &base {lr: 0.1}\ntrain: *base\n")
    assert load_yaml(fine) == {"base": {"lr": 0.1}, "train": {"lr": 0.1}}


def test_yaml_duplicate_keys_deep_nesting_and_recursive_aliases_are_refused(tmp_path):
    from metafit.config import load_yaml

    cases = {
        "dup.yaml": ("seed: 0\ntrain: {steps: 1}\nseed: 1\n", "duplicate key 'seed' at line 3 \\(first at line 1\\)"),
        "deep.yaml": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
        "deep2.yaml": ("a: " + "[" * 100 + "]" * 100 + "\n", "deeper than 64 levels"),
        "rec.yaml": ("a: &a [*a]\n", "recursive alias|refers to a node"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_yaml(tmp_path / name)
