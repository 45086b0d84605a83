"""Fixtures shared by the context tests (imported by name, as tests/hpo/hpo_fixtures.py is).

Importing this module puts tests/serve (``serve_tiny``) and tests/models (``models_tiny``) on ``sys.path``.
"""
import sys
from pathlib import Path

import pytest

for _folder in ("serve", "models"):
    if str(Path(__file__).resolve().parents[1] / _folder) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / _folder))


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny chat model folder: a character-level tokenizer with a chat template, numpy weights (well under 1 s)."""
    from serve_tiny import tiny_folder

    return tiny_folder(tmp_path_factory.mktemp("chat"), max_position_embeddings=512)


def forward(model, ids, mask=None, **kwargs):
    """models_tiny's one-jit forward; models_tiny (torch, transformers) is imported on first use, not at collection."""
    from models_tiny import forward as jitted

    return jitted(model, ids, mask, **kwargs)
