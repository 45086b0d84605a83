"""Noisy-label text classification tasks: tokenised splits with corrupted training labels.

:func:`encoded_splits` loads a text dataset, splits it (stratified, fixed by ``split_seed``),
optionally subsamples train / test, and tokenises every split; :func:`noisy_task` corrupts
the training labels of those splits for one seed and noise rate. Validation and test
labels stay clean.

Example::

    backbone = tiny_keyword_backbone(num_classes=4)
    splits = encoded_splits("keywords", backbone.tokenizer, max_len=32, num_examples=600, num_classes=4)
    task = noisy_task(splits, "symmetric", 0.4, seed=0)
    task.noise.noise_rate       # realised fraction of corrupted training labels
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from metafit.data.noise import NoisyLabels, add_label_noise
from metafit.data.text import encode_texts, load_text_dataset, split_dataset, stratified_subset


class EncodedSplit(NamedTuple):
    """Tokenised texts with labels: ``input_ids``/``attention_mask`` int32 ``[n, L]``, ``labels`` ``[n]``."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    @property
    def size(self) -> int:
        return len(self.labels)


class NoisyTask(NamedTuple):
    """A noisy-label classification task: noisy train set, clean val/test sets.

    ``train.labels`` are the *noisy* labels; ``noise`` holds the truth.
    """

    train: EncodedSplit
    noise: NoisyLabels
    val: EncodedSplit
    test: EncodedSplit
    num_classes: int


class EncodedSplits(NamedTuple):
    """Clean tokenised splits (see :func:`encoded_splits`); ``train_texts`` feed instance-dependent noise."""

    train: EncodedSplit
    val: EncodedSplit
    test: EncodedSplit
    train_texts: tuple[str, ...]
    num_classes: int


def encoded_splits(dataset: str, tokenizer: Any, *, max_len: int, split_seed: int = 0, val_fraction: float = 0.1,
                   test_fraction: float = 0.2, train_size: int | None = None, test_size: int | None = None,
                   **dataset_options: Any) -> EncodedSplits:
    """The dataset's stratified train / val / test splits, tokenised to ``max_len`` tokens.

    Args:
      dataset: a name of :func:`metafit.data.text.load_text_dataset`.
      tokenizer: the backbone's tokenizer.
      max_len: tokens per text (truncate / pad).
      split_seed: ``split, train-subset, test-subset = split(key(split_seed), 3)``, so every
        seed and method of a run sees the same samples.
      val_fraction, test_fraction: the stratified split.
      train_size, test_size: stratified subsets of the train / test split (None = all).
      **dataset_options: passed to the dataset (e.g. ``num_examples`` of ``keywords``).
    """
    data = load_text_dataset(dataset, **dataset_options)
    split_key, train_key, test_key = jax.random.split(jax.random.key(split_seed), 3)
    splits = split_dataset(data, key=split_key, val_fraction=val_fraction, test_fraction=test_fraction)
    train = stratified_subset(splits.train, train_size, key=train_key)
    test = stratified_subset(splits.test, test_size, key=test_key)

    def encode(part):
        enc = encode_texts(tokenizer, part.texts, max_len)
        return EncodedSplit(enc["input_ids"], enc["attention_mask"], part.labels)

    return EncodedSplits(encode(train), encode(splits.val), encode(test), train.texts, data.num_classes)


def noise_key(seed: int, rate: float) -> jax.Array:
    """The key of the label-noise draw: ``fold_in(key(seed + 1_000_003), round(1000 rate))``.

    It depends on the seed and the rate only, so every method of a seed sees the same noisy
    labels at a rate (a paired comparison), and the training key ``key(seed)`` is unrelated.
    """
    return jax.random.fold_in(jax.random.key(seed + 1_000_003), int(round(rate * 1000)))


def noisy_task(splits: EncodedSplits, noise: str, rate: float, *, seed: int,
               features: np.ndarray | None = None) -> NoisyTask:
    """``splits`` with the training labels corrupted by ``noise`` at ``rate`` (key :func:`noise_key`).

    Args:
      splits: from :func:`encoded_splits`.
      noise: ``symmetric``, ``asymmetric``, ``instance`` or ``none`` (:func:`metafit.data.noise.add_label_noise`).
      rate: η.
      seed: the training seed.
      features: ``[n, d]`` training-text features (``instance`` noise only).
    """
    noisy = add_label_noise(noise, noise_key(seed, rate), splits.train.labels, num_classes=splits.num_classes,
                            rate=rate, features=features)
    return NoisyTask(splits.train._replace(labels=noisy.labels), noisy, splits.val, splits.test, splits.num_classes)
