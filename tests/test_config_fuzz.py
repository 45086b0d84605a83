"""Property-based fuzzing of the config loader: any text is a mapping or a ConfigError, never another error."""
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from metafit.config import ConfigError, apply_overrides, load_yaml

EXAMPLES = int(os.environ.get("METAFIT_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=2000, derandomize="METAFIT_FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

YAML_PIECES = st.sampled_from(["a: 1\n", "&x [1, 2]", "*x", "b: *x\n", "- ", "{", "}", "[", "]", ": ", "!!python/object:os.system ",
                               "!!binary ", "'", '"', "\t", "<<: *x\n", "seed: 1\n", "seed: 2\n", "\x00", "%YAML 1.1\n", "---\n"])


def _check(tmp_path, data: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    try:
        loaded = load_yaml(path)
    except ConfigError:
        return
    assert isinstance(loaded, dict)


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_load_or_give_a_config_error(tmp_path, data):
    _check(tmp_path, data)


@SETTINGS
@given(st.lists(YAML_PIECES, max_size=30))
def test_yaml_shaped_text_loads_or_gives_a_config_error(tmp_path, pieces):
    _check(tmp_path, "".join(pieces).encode())


@SETTINGS
@given(st.text(max_size=60))
def test_any_override_applies_or_gives_a_config_error(text):
    try:
        apply_overrides({"train": {"steps": 1}}, [text])
    except ConfigError:
        pass
