"""metafit's small LM: a ~2M-parameter Llama pretrained here on CPU, built once and cached.

Methods that need a causal LM at CPU scale (DELIFT's n x n in-context utility kernel, a
post-training student, the tuning meta-dataset, multi-task serving, indicator-conditioned SFT,
attention steering) use this model instead of SmolLM2-135M, which is 70x larger. It is a plain
HF folder, so everything that takes a model takes it::

    model, tokenizer = metafit.models.load("metafit-small-lm")   # builds on first use, then cached
    folder = build()                                             # the same, returning the folder
    folder = build(SmallLMConfig(hidden_size=256), train=dataclasses.replace(PRETRAIN, steps=2000))

Design
------
**Model** (:func:`llama_config`): metafit's NNX Llama with no new code -- hidden 192, 4 layers,
6 query heads of 32 dimensions sharing 2 key/value heads (GQA), SwiGLU width 512, RMSNorm,
RoPE, tied input/output embeddings, vocabulary 2,048: 1,967,808 parameters (393,216 of them
the embedding). The size is set by the budget: this shared 2-core CPU trains it at about 2.4k
tokens/s (819k tokens in 5.6 min at load average ~2.5), so a build of a few minutes sees under a
million tokens, which a larger model could not use; and later methods call it n^2 times.
Cap: 5M parameters.

**Tokenizer** (:mod:`metafit.pretrain.tokenizer`): byte-level BPE learned from the training
documents and the message contents of the training chats (digits split singly), with
``<|pad|> <|bos|> <|endoftext|> <|system|> <|user|> <|assistant|> <|end|>`` (ids 0-6) and a
chat template, saved as ``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja``
(transformers 5 keeps the template in its own file).

**Corpus** (:func:`metafit.data.pretraining.pretraining_corpus`): BBC News (2,225 articles)
and Rotten Tomatoes (12,752 snippets), 5 % of each held out; and 12,000 generated
conversations over the six instruction families of :mod:`metafit.data.instructions`
(a quarter with a system message, a quarter with 2-3 exchanges), 512 more held out. A
document is ``<|bos|> text <|endoftext|>``; text is packed into 128-token rows cut anywhere,
conversations are packed whole; padding only ever ends a row, so the causal mask alone keeps
real tokens from seeing it and batches carry no attention mask. Half of each batch's rows are
conversations (``chat_fraction``). The loss is :func:`metafit.train.losses.next_token_loss` on
every real token (prompts included).

**Training**: :func:`metafit.train.fit` with :data:`PRETRAIN`: 400 steps of 16 rows (AdamW,
lr 3e-3, cosine, 40 warm-up steps, clipping at 1). A killed build resumes from its last
checkpoint (every 100 steps); two builds give bit-identical weights.

**Cache key** (:func:`cache_key`): SHA-256 over the settings (:class:`SmallLMConfig`, the
:class:`~metafit.train.TrainConfig`, the seed), the bytes of every text document, the code of
the modules that generate the data and build the model (their syntax trees without
docstrings: a documentation edit keeps the cache, a code edit rebuilds), and the metafit and
JAX versions. The folder is ``$METAFIT_CACHE/small-lm/<key>/`` (default ``~/.cache/metafit``),
written under a temporary name and renamed, so an existing folder is complete; a cache hit only
re-reads the text corpus to recompute the key (about 1 s). ``metafit_small_lm.json`` in the
folder records the settings, the key, the size, the time and the final held-out losses.
Two processes building the same key at once both train; the last rename wins.

Measured (``metafit run configs/pretrain/small_lm.yaml``, seed 0; numbers in that file's header):
held-out loss 4.87 nats/token on text and 0.52 on chats, against 6.56 and 4.22 for the
training unigram; greedy exact match 1.00 on ``upper`` and ``count``, 0.81 on ``reverse``, 0.03
on ``successor``, 0 on ``add`` and ``sort``: it has memorised the small families (30 words)
and has not learnt to copy digits or letters, so it does not generalise to unseen prompts.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import metafit
from metafit.config import to_dict
from metafit.data.batching import epoch_batches
from metafit.data.pretraining import (
    Chat,
    PretrainingCorpus,
    pack_rows,
    pretraining_corpus,
    text_digest,
    unigram_cross_entropy,
)
from metafit.data.text import load_text_dataset
from metafit import cache
from metafit.models import LlamaConfig, LlamaForCausalLM, RopeConfig, save_folder
from metafit.pretrain.tokenizer import SPECIAL_IDS, train_chat_tokenizer
from metafit.train import TrainConfig, fit
from metafit.train.losses import causal_lm_loss, next_token_loss
from metafit.train.metrics import MetricsWriter

BUILD_INFO = "metafit_small_lm.json"
# Modules whose source decides what a build produces (see cache_key).
_SOURCE_MODULES = (
    "metafit.data.instructions", "metafit.data.pretraining", "metafit.data.text",
    "metafit.pretrain.tokenizer", __name__,
)


@dataclasses.dataclass(frozen=True)
class SmallLMConfig:
    """What the small LM is: its corpus, tokenizer, architecture and batch layout.

    Training settings are a :class:`~metafit.train.TrainConfig` (:data:`PRETRAIN`) and the seed,
    passed beside it, so an experiment's ``train:`` section and ``seed`` are the build's.

    Attributes:
      text_datasets: registered text datasets (:mod:`metafit.data.text`) to pretrain on.
      max_documents: use only the first this many documents of each dataset (0 = all).
      heldout_fraction: share of each text dataset held out (stratified by class).
      n_chats: generated training conversations.
      n_heldout_chats: generated held-out conversations (indices after the training ones).
      system_fraction: share of conversations that open with a system message.
      multi_turn_fraction: share of conversations with 2-3 user/assistant exchanges.
      vocab_size: BPE vocabulary size (the model's is the tokenizer's real size).
      hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads: the Llama architecture (head_dim = hidden / heads).
      max_position_embeddings: context the config declares (RoPE has no learned positions;
        the model is trained on ``seq_len`` tokens).
      rope_theta: RoPE base.
      seq_len: tokens per training row.
      chat_fraction: share of each batch's rows that are conversations (the rest is text).
      eval_rows: held-out rows of each kind used for the held-out losses.
    """

    text_datasets: tuple[str, ...] = ("bbc_news", "rotten_tomatoes")
    max_documents: int = 0
    heldout_fraction: float = 0.05
    n_chats: int = 12_000
    n_heldout_chats: int = 512
    system_fraction: float = 0.25
    multi_turn_fraction: float = 0.25
    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10_000.0
    seq_len: int = 128
    chat_fraction: float = 0.5
    eval_rows: int = 64

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if not 0.0 <= self.chat_fraction <= 1.0:
            raise ValueError(f"chat_fraction must be in [0, 1], got {self.chat_fraction}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len {self.seq_len} exceeds max_position_embeddings {self.max_position_embeddings}")


PRETRAIN = TrainConfig(
    steps=400, batch_size=16, lr=3e-3, optimizer="adamw", weight_decay=0.01, schedule="cosine",
    warmup_steps=40, clip_norm=1.0, log_every=20, eval_every=100, ckpt_every=100, keep_checkpoints=1,
    steps_per_dispatch=10,
)
"""The default pretraining schedule of :func:`build` (and of ``configs/pretrain/small_lm.yaml``)."""


TINY = SmallLMConfig(
    text_datasets=("keywords",), max_documents=120, n_chats=160, n_heldout_chats=16, vocab_size=320, hidden_size=32,
    intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, seq_len=64, eval_rows=8,
)
TINY_TRAIN = TrainConfig(steps=4, batch_size=8, lr=1e-2, log_every=4, steps_per_dispatch=4)
"""A build in seconds (synthetic keyword corpus, one layer, 4 steps) with the real tokenizer and chat
template: for tests of code that needs the small LM's interface, not its skill."""


class PretrainingData(NamedTuple):
    """The tokenised corpus: rows ``{"input_ids", "loss_mask"}`` of each kind and split.

    Attributes:
      tokenizer: the chat tokenizer (trained here, or the one of a built model).
      train_text, train_chat, heldout_text, heldout_chat: packed rows (:func:`pack_rows`).
      corpus: the documents and conversations they were made from.
    """

    tokenizer: Any
    train_text: dict[str, np.ndarray]
    train_chat: dict[str, np.ndarray]
    heldout_text: dict[str, np.ndarray]
    heldout_chat: dict[str, np.ndarray]
    corpus: PretrainingCorpus


def pretraining_data(config: SmallLMConfig, *, seed: int, tokenizer=None) -> PretrainingData:
    """Builds the corpus of ``config``, trains its tokenizer (unless given) and packs the rows."""
    corpus = pretraining_corpus(
        config.text_datasets, n_chats=config.n_chats, n_heldout_chats=config.n_heldout_chats, seed=seed,
        heldout_fraction=config.heldout_fraction, max_documents=config.max_documents,
        system_fraction=config.system_fraction, multi_turn_fraction=config.multi_turn_fraction,
    )
    if tokenizer is None:
        contents = [message["content"] for chat in corpus.train_chats for message in chat]
        tokenizer = train_chat_tokenizer([*corpus.train_texts, *contents], config.vocab_size,
                                         model_max_length=config.max_position_embeddings)
    pad_id = tokenizer.pad_token_id
    text_rows = lambda texts: pack_rows(_encode_documents(tokenizer, texts), config.seq_len, split=True, pad_id=pad_id)
    chat_rows = lambda chats: pack_rows(_encode_chats(tokenizer, chats), config.seq_len, split=False, pad_id=pad_id)
    return PretrainingData(
        tokenizer,
        text_rows(corpus.train_texts), chat_rows(corpus.train_chats),
        text_rows(corpus.heldout_texts), chat_rows(corpus.heldout_chats),
        corpus,
    )


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # The backend tokenizer: no warning for documents longer than the context (rows are cut later).
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []


def _encode_documents(tokenizer, texts) -> list[list[int]]:
    bos, end = SPECIAL_IDS["bos"], SPECIAL_IDS["end_of_text"]
    return [[bos, *row, end] for row in _encode(tokenizer, list(texts))]


def _encode_chats(tokenizer, chats: tuple[Chat, ...]) -> list[list[int]]:
    return _encode(tokenizer, tokenizer.apply_chat_template(list(chats), tokenize=False) if chats else [])


def llama_config(config: SmallLMConfig, vocab_size: int | None = None) -> LlamaConfig:
    """The small LM's architecture (metafit's NNX Llama) with ``vocab_size`` (default the config's).

    A trained tokenizer may have fewer tokens than ``config.vocab_size`` asked for (a small
    corpus runs out of merges); :func:`build` passes ``len(tokenizer)``.
    """
    return LlamaConfig(
        vocab_size=vocab_size or config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings),
        tie_word_embeddings=True,
        bos_token_id=SPECIAL_IDS["bos"],
        eos_token_ids=(SPECIAL_IDS["end_of_turn"], SPECIAL_IDS["end_of_text"]),  # generation stops at either
        pad_token_id=SPECIAL_IDS["pad"],
    )


def eval_batches(data: PretrainingData, rows: int) -> dict[str, dict[str, np.ndarray]]:
    """The first ``rows`` held-out rows of each kind (a fixed shape, so evaluation compiles once)."""
    return {kind: jax.tree.map(lambda a: a[:rows], getattr(data, f"heldout_{kind}")) for kind in ("text", "chat")}


def heldout_metrics(model, data: PretrainingData, rows: int) -> dict[str, float]:
    """Held-out next-token loss of ``model`` and the unigram baseline, per kind (nats/token).

    Returns ``heldout_{text,chat}_loss``, their perplexities, ``unigram_{text,chat}_loss`` (the
    training unigram's cross-entropy on the same tokens) and ``heldout_{text,chat}_tokens``.
    """
    batches = eval_batches(data, rows)
    losses = heldout_losses(*nnx.split(model), batches)
    out = {}
    for kind, batch in batches.items():
        train = getattr(data, f"train_{kind}")
        loss = float(losses[f"heldout_{kind}_loss"])
        out[f"heldout_{kind}_loss"] = loss
        out[f"heldout_{kind}_perplexity"] = float(np.exp(loss))
        out[f"unigram_{kind}_loss"] = unigram_cross_entropy(train["input_ids"], train["loss_mask"], batch["input_ids"],
                                                            batch["loss_mask"], model.config.vocab_size)
        out[f"heldout_{kind}_tokens"] = int(batch["loss_mask"][:, :-1].sum())
    return out


@functools.partial(jax.jit, static_argnums=0)
def heldout_losses(graphdef: nnx.GraphDef, params, batches: dict[str, dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """``{"heldout_<kind>_loss": loss}`` for the batches of :func:`eval_batches`.

    The kinds go through the model as one batch (one forward to compile), then each kind's
    rows are scored apart.
    """
    ids = jnp.concatenate([b["input_ids"] for b in batches.values()])
    logits = nnx.merge(graphdef, params)(ids)
    out, start = {}, 0
    for kind, batch in batches.items():
        rows = slice(start, start + len(batch["input_ids"]))
        out[f"heldout_{kind}_loss"] = causal_lm_loss(logits[rows], ids[rows], batch["loss_mask"])[0]
        start = rows.stop
    return out


def training_batches(data: PretrainingData, batch_size: int, chat_fraction: float, seed: int) -> Callable[[int], dict]:
    """``batch_at(step)``: ``round(batch_size * chat_fraction)`` chat rows then text rows, each pool
    visited in a fresh permutation per epoch (a pure function of the step, so resume is exact)."""
    n_chat = int(round(batch_size * chat_fraction))
    parts = [epoch_batches(rows, n, seed + i) for i, (rows, n) in
             enumerate(((data.train_chat, n_chat), (data.train_text, batch_size - n_chat))) if n]
    return lambda step: jax.tree.map(lambda *xs: np.concatenate(xs), *[part(step) for part in parts])


@functools.lru_cache(maxsize=8)
def _text_digest(names: tuple[str, ...], max_documents: int) -> str:
    """Digest of the documents before the split: the split is a pure function of them, the seed
    and :mod:`metafit.data.text` (its code is in :func:`code_version`), and skipping it keeps a
    cache hit free of JAX compilations."""
    digest = hashlib.sha256()
    for name in names:
        texts = load_text_dataset(name).texts
        digest.update(f"{name}:{text_digest(texts[:max_documents] if max_documents else texts)}".encode())
    return digest.hexdigest()


def code_version() -> str:
    """SHA-256 of the code of the modules that decide what a build produces, with the versions.

    The code is each module's syntax tree without docstrings, so editing documentation,
    comments or formatting keeps the cache; any change to what runs rebuilds.
    """
    digest = hashlib.sha256(f"metafit {metafit.__version__} | jax {jax.__version__}".encode())
    for name in _SOURCE_MODULES:
        tree = ast.parse(Path(importlib.import_module(name).__file__).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                    isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:]
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()


def cache_key(config: SmallLMConfig = SmallLMConfig(), *, train: TrainConfig = PRETRAIN, seed: int = 0) -> str:
    """The content hash naming a build: settings, text bytes and code (see the module docstring)."""
    settings = json.dumps({"config": to_dict(config), "train": to_dict(train), "seed": seed}, sort_keys=True)
    text = _text_digest(tuple(config.text_datasets), config.max_documents)
    return hashlib.sha256(f"{settings}|{text}|{code_version()}".encode()).hexdigest()[:16]


def default_cache_root() -> Path | None:
    """Where builds are cached: ``metafit.cache.cache_dir("small-lm")`` (None when caching is off)."""
    return cache.cache_dir("small-lm")


def build(config: SmallLMConfig = SmallLMConfig(), *, train: TrainConfig = PRETRAIN, seed: int = 0,
          cache_dir: str | Path | None = None, workdir: str | Path | None = None, log: MetricsWriter | None = None,
          progress: bool = True) -> Path:
    """The HF folder of the small LM ``config`` trained with ``train``: from the cache, or built now.

    Args:
      config: corpus, tokenizer and architecture (:class:`SmallLMConfig`).
      train: the pretraining schedule (:data:`PRETRAIN`).
      seed: seeds the text split, the conversations, the initialisation and the batch order.
      cache_dir: folder of cached builds (default :func:`default_cache_root`; with caching
        disabled, ``METAFIT_CACHE=off``, a new temporary folder).
      workdir: checkpoint folder of the training run (default: beside the cached folder,
        removed once the build is saved). A killed build resumes from it.
      log: metrics writer for the training and held-out losses (stage ``pretrain``).
      progress: show a progress bar.

    Returns:
      ``<cache_dir>/<cache_key>/``: ``config.json``, ``model.safetensors``, the tokenizer files and
      ``metafit_small_lm.json``. :func:`metafit.models.load` and transformers read it.

    Example:
      >>> model, tokenizer = metafit.models.load(build())             # doctest: +SKIP
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    if root is None:  # METAFIT_CACHE=off: build into a folder of its own, every time
        root = Path(tempfile.mkdtemp(prefix="metafit-small-lm-"))
    key = cache_key(config, train=train, seed=seed)
    folder = root / key
    if (folder / "model.safetensors").is_file():  # save_folder renames a complete folder into place
        return folder
    started = time.perf_counter()
    data = pretraining_data(config, seed=seed)
    architecture = llama_config(config, len(data.tokenizer))
    # initialised in one compiled program instead of one compilation per tensor
    model = nnx.jit(lambda: LlamaForCausalLM(architecture, rngs=nnx.Rngs(seed)))()
    graphdef, params = nnx.split(model)
    batches = jax.tree.map(jnp.asarray, eval_batches(data, config.eval_rows))
    heldout = lambda p: heldout_losses(graphdef, p, batches)
    own_workdir = workdir is None
    if own_workdir:  # checkpoints only serve resuming a killed build; without periodic ones there is none
        workdir = root / f"{key}.checkpoints" if train.ckpt_every else None
    result = fit(next_token_loss(graphdef), params,
                 training_batches(data, train.batch_size, config.chat_fraction, seed), train,
                 key=jax.random.key(seed), workdir=workdir, eval_fn=heldout, name="pretrain",
                 progress=progress, log=log)
    nnx.update(model, result.params)
    save_folder(model, folder, data.tokenizer)
    info = {
        "key": key, "config": to_dict(config), "train": to_dict(train), "seed": seed, "code_version": code_version(),
        "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.params)),
        "vocab_size": len(data.tokenizer), "train_tokens_seen": train.steps * train.batch_size * config.seq_len,
        "seconds": round(time.perf_counter() - started, 1), "resumed_from": result.resumed_from,
        "heldout": {k: float(v) for k, v in result.eval.items() if k != "step"},
    }
    (folder / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if own_workdir and workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    return folder


def build_info(folder: str | Path) -> dict[str, Any]:
    """The ``metafit_small_lm.json`` record of a built folder (settings, key, size, time, losses)."""
    return json.loads((Path(folder) / BUILD_INFO).read_text())


__all__ = [
    "SmallLMConfig", "PRETRAIN", "TINY", "TINY_TRAIN", "PretrainingData", "build", "build_info", "cache_key",
    "code_version", "default_cache_root", "eval_batches", "heldout_losses", "heldout_metrics", "llama_config",
    "pretraining_data", "training_batches",
]
