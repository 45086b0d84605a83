"""A pretraining corpus for small causal LMs: offline text plus synthetic instruction chats.

Two kinds of documents, both available offline:

* **text** -- the registered text datasets of :mod:`metafit.data.text` (BBC News articles,
  Rotten Tomatoes snippets; the synthetic ``keywords`` corpus for tests), split into train and
  held-out documents by a stratified split that is a pure function of a key;
* **chats** -- conversations in the HF ``messages`` format (``[{"role", "content"}, ...]``)
  whose turns are the exact-answer instructions of :mod:`metafit.data.instructions`. A share of
  them opens with a system message and a share has several user/assistant exchanges, so role
  markers are seen in every position. Conversation ``i`` is a pure function of ``(seed, i)``;
  held-out conversations take indices after the training ones.

:func:`pack_rows` turns token sequences into fixed-shape rows for next-token training:
text is cut anywhere (a stream of documents), a conversation is never cut (so every answer
keeps its prompt) and rows are filled greedily, padded, with the loss masked on padding.

Example:
    >>> corpus = pretraining_corpus(("keywords",), n_chats=100, n_heldout_chats=10, seed=0)
    >>> corpus.train_chats[0][-1]["role"]
    'assistant'
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple, Sequence

import jax
import numpy as np

from metafit.data.instructions import INSTRUCTION_TASKS
from metafit.data.text import load_text_dataset, split_dataset

Chat = list[dict[str, str]]

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful assistant. Give the exact answer and nothing else.",
    "Answer as briefly as possible.",
    "You are a small language model trained by metafit.",
)
# Tags the random stream of conversations, so that conversation i never shares its draws
# with instruction i of make_instructions at the same seed (used for held-out evaluation).
_CHAT_STREAM = 0x43484154


class PretrainingCorpus(NamedTuple):
    """Documents for pretraining and their held-out counterparts.

    Attributes:
      train_texts / heldout_texts: plain-text documents.
      train_chats / heldout_chats: conversations (lists of ``{"role", "content"}``).
    """

    train_texts: tuple[str, ...]
    heldout_texts: tuple[str, ...]
    train_chats: tuple[Chat, ...]
    heldout_chats: tuple[Chat, ...]


def instruction_chat(index: int, *, seed: int, tasks: Sequence[str] | None = None, system_fraction: float = 0.25,
                     multi_turn_fraction: float = 0.25, max_turns: int = 3) -> Chat:
    """Conversation ``index``: an optional system message, then 1..``max_turns`` instruction exchanges.

    Each turn's task is drawn uniformly from ``tasks`` (default: every registered task).
    """
    names = list(tasks or INSTRUCTION_TASKS.names())
    rng = np.random.default_rng([seed, index, _CHAT_STREAM])
    chat: Chat = []
    if rng.random() < system_fraction:
        chat.append({"role": "system", "content": SYSTEM_PROMPTS[rng.integers(len(SYSTEM_PROMPTS))]})
    turns = int(rng.integers(2, max_turns + 1)) if rng.random() < multi_turn_fraction else 1
    for _ in range(turns):
        prompt, response = INSTRUCTION_TASKS.get(names[rng.integers(len(names))])(rng)
        chat += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return chat


def instruction_chats(n: int, *, seed: int, offset: int = 0, **kwargs) -> tuple[Chat, ...]:
    """Conversations ``offset .. offset + n`` (keyword arguments as in :func:`instruction_chat`)."""
    return tuple(instruction_chat(i, seed=seed, **kwargs) for i in range(offset, offset + n))


def text_documents(names: Sequence[str], *, key: jax.Array, heldout_fraction: float,
                   max_documents: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Train and held-out documents of the text datasets ``names`` (stratified by class).

    Args:
      names: registered text datasets (``bbc_news``, ``rotten_tomatoes``, ``keywords``).
      key: the split key (one sub-key per dataset).
      heldout_fraction: share of each dataset's documents held out.
      max_documents: keep only the first ``max_documents`` documents of each dataset before
        splitting (0 = all); a quick slice for tests.
    """
    train, heldout = [], []
    for name, sub in zip(names, jax.random.split(key, len(names))):
        dataset = load_text_dataset(name)
        if max_documents:
            dataset = dataset.take(np.arange(min(max_documents, dataset.size)))
        splits = split_dataset(dataset, key=sub, val_fraction=0.0, test_fraction=heldout_fraction)
        train += splits.train.texts
        heldout += splits.test.texts
    return tuple(train), tuple(heldout)


def pretraining_corpus(text_datasets: Sequence[str] = ("bbc_news", "rotten_tomatoes"), *, n_chats: int,
                       n_heldout_chats: int, seed: int, heldout_fraction: float = 0.05, max_documents: int = 0,
                       tasks: Sequence[str] | None = None, system_fraction: float = 0.25,
                       multi_turn_fraction: float = 0.25) -> PretrainingCorpus:
    """Text documents and instruction conversations, split into train and held-out parts.

    Held-out text is a stratified ``heldout_fraction`` of every dataset (split by
    ``jax.random.key(seed)``); held-out chats are conversations ``n_chats .. n_chats +
    n_heldout_chats``. Note that the easy instruction families have few distinct prompts
    (30 words), so a held-out *conversation* may repeat a training *prompt*.
    """
    train_texts, heldout_texts = text_documents(text_datasets, key=jax.random.key(seed),
                                                heldout_fraction=heldout_fraction, max_documents=max_documents)
    chat_kwargs = dict(seed=seed, tasks=tasks, system_fraction=system_fraction,
                       multi_turn_fraction=multi_turn_fraction)
    return PretrainingCorpus(
        train_texts, heldout_texts,
        instruction_chats(n_chats, **chat_kwargs),
        instruction_chats(n_heldout_chats, offset=n_chats, **chat_kwargs),
    )


def text_digest(texts: Sequence[str]) -> str:
    """SHA-256 of the documents' bytes (order matters): a content key for caches."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: no two lists collide
        digest.update(encoded)
    return digest.hexdigest()


def pack_rows(sequences: Sequence[Sequence[int]], seq_len: int, *, split: bool, pad_id: int) -> dict[str, np.ndarray]:
    """Packs token sequences into rows ``[n, seq_len]`` for next-token training.

    Args:
      sequences: token id lists (documents or conversations, special tokens included).
      seq_len: row length.
      split: True: one stream cut every ``seq_len`` tokens (text; the ragged tail is
        dropped). False: sequences are kept whole and placed greedily in order, a new row
        starting when the next one does not fit (chats); a sequence longer than
        ``seq_len`` is truncated.
      pad_id: filler after the last sequence of a row.

    Returns:
      ``input_ids`` int32 and ``loss_mask`` float32 ``[n, seq_len]``; ``loss_mask[:, t]`` is 1
      where token ``t + 1`` is real (the convention of :func:`metafit.train.losses.causal_lm_loss`).
    """
    if split:
        stream = np.fromiter((t for s in sequences for t in s), np.int32)
        ids = stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)
        lengths = np.full(len(ids), seq_len)
    else:
        rows, lengths, current = [], [], []
        for seq in sequences:
            seq = list(seq[:seq_len])
            if len(current) + len(seq) > seq_len:
                rows.append(current)
                current = []
            current = current + seq
        if current:
            rows.append(current)
        ids = np.full((len(rows), seq_len), pad_id, np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        lengths = np.asarray([len(r) for r in rows])
    loss_mask = (np.arange(seq_len)[None, :] + 1 < lengths[:, None]).astype(np.float32)
    return {"input_ids": ids, "loss_mask": loss_mask}


def unigram_cross_entropy(train_ids: np.ndarray, train_mask: np.ndarray, eval_ids: np.ndarray,
                          eval_mask: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the counted targets of ``eval`` under the train unigram.

    The baseline a language model must beat: token frequencies of the training targets with
    add-one smoothing, no context. Masks follow :func:`pack_rows` (``mask[:, t]`` counts
    token ``t + 1``).
    """
    targets = lambda ids, mask: ids[:, 1:][mask[:, :-1] > 0]
    counts = np.bincount(targets(train_ids, train_mask), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets(eval_ids, eval_mask)].mean())
