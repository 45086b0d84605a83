"""Answer-quality metrics of the selection study: ROUGE-L, exact match, sentence-embedding similarity.

* ROUGE-L F1 through the ``rouge-score`` package (``pip install rouge-score``), stemming off;
* exact match of the stripped strings;
* embedding similarity: mean cosine of mean-pooled, normalised MiniLM embeddings
  (:func:`metafit.models.mean_pool`) of answer and reference.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.models import mean_pool


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ROUGE-L needs the rouge-score package: pip install rouge-score") from err
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def exact_match_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference (both stripped)."""
    return float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)]))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, ids, mask):
    return mean_pool(nnx.merge(graphdef, state)(ids, mask), mask)


def embed_texts(encoder, tokenizer, texts: Sequence[str], *, max_len: int = 64, batch_size: int = 64) -> np.ndarray:
    """Normalised mean-pooled sentence embeddings ``[n, hidden]`` of a BERT-family encoder (MiniLM)."""
    graphdef, state = nnx.split(encoder)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        chunk += [""] * (batch_size - len(chunk))
        enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
        out.append(np.asarray(_embed(graphdef, state, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]))))
    return np.concatenate(out)[: len(texts)]


def embedding_similarity(predictions: Sequence[str], references: Sequence[str], encoder, tokenizer) -> float:
    """Mean cosine similarity of the answers' and references' sentence embeddings."""
    a = embed_texts(encoder, tokenizer, predictions)
    b = embed_texts(encoder, tokenizer, references)
    return float(np.mean((a * b).sum(1)))
