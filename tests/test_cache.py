"""The one cache-directory resolver: METAFIT_CACHE, then XDG_CACHE_HOME, then ~/.cache; 'off' disables."""
from pathlib import Path

import pytest

from metafit.cache import cache_dir


def test_order_of_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("METAFIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir("glyphs") == Path.home() / ".cache" / "metafit" / "glyphs"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("hf", "model") == tmp_path / "xdg" / "metafit" / "hf" / "model"
    monkeypatch.setenv("METAFIT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("METAFIT_CACHE", "~/somewhere")
    assert cache_dir() == Path.home() / "somewhere"


@pytest.mark.parametrize("value", ["off", "0", "none", "", "OFF"])
def test_disabled(monkeypatch, value):
    monkeypatch.setenv("METAFIT_CACHE", value)
    assert cache_dir("glyphs") is None
