"""Fixtures shared by the context experiment tests (imported by name, as tests/hpo/hpo_fixtures.py is)."""
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny chat model folder: a character-level tokenizer with a chat template, numpy weights (well under 1 s)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
    from serve_tiny import tiny_folder

    return tiny_folder(tmp_path_factory.mktemp("chat"), max_position_embeddings=512)


def forward(model, ids, mask=None, **kwargs):
    """models_tiny's one-jit forward; models_tiny (torch, transformers) is imported on first use, not at collection."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from models_tiny import forward as jitted

    return jitted(model, ids, mask, **kwargs)
