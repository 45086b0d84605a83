r"""DELIFT's pairwise in-context utility, computed in jitted, padded, resumable blocks.

For a query pair :math:`(x_i, y_i)` and an example pair :math:`(x_j, y_j)`,

.. math::

    UF_{ij} = d\big(GT_i, p(y_i \mid x_i)\big) - d\big(GT_i, p(y_i \mid x_j, y_j, x_i)\big),

where :math:`p(y \mid \cdot) \in [0, 1]^T` holds the teacher-forced probabilities of the
:math:`T` ground-truth response tokens (response tokens only, never the prompt's). Two
distances are kept for every pair, so one computation serves both forms:

* ``"l2"`` (the paper's): :math:`d = \lVert 1 - p \rVert_2 / \sqrt{T}`;
* ``"kl"``: :math:`d = -\frac{1}{T}\sum_t \log p_t` (the KL divergence from the one-hot ground
  truth), so :math:`UF_{ij} = \frac{1}{T}\log p(y_i \mid x_i, x_j, y_j) / p(y_i \mid x_i)`, the
  per-token conditional pointwise mutual information.

Prompts (DELIFT's reference code; the with-example instruction's middle sentence is the
paper's "Use the following example as a guide")::

    no example:   "Instruction: Please generate a response to the following query.\n\n\nQuery: " + x_i + "\n" + y_i
    with example: "Instruction: ... Use the following example as a guide.\n\n\nExample:\n" + x_j + "\n" + y_j
                  + "\n\n\nQuery:\n" + x_i + "\n" + y_i

Token boundaries: every prompt is tokenised as three pieces joined by concatenating ids,
``head`` (all text before the query: the instruction, and the example if any), ``x_i + "\n"``
and ``y_i``. So the example's tokens are a shared prefix of every joined prompt of column ``j``
and the response tokens are identical with and without the example.

Speed: the prefix's KV cache is computed once per example and reused for every query of the
block (``lax.map`` over examples, ``vmap`` over a chunk of them, each query batch read against
the broadcast cache; a forward of only the query and response tokens). The no-example pass is
one more shared prefix, computed once. Lengths are padded to multiples of :data:`PAD_TO`, and
blocks to ``block`` rows, so few shapes compile. ``reuse_prefix=False`` runs each joined
prompt as its own padded row instead (the same numbers; for benchmarks and checks).

Resume: with ``workdir``, each ``block x block`` tile of distances is saved as it finishes
(``tile_<qi>_<ej>.npy``, written atomically) next to ``manifest.json``, which fingerprints
the model's weights, the token ids of every prompt piece and the block size. A rerun skips
finished tiles; a folder made for another model, example set or block size is refused. With
``cache_dir`` instead, the tiles go to ``cache_dir/<digest of that manifest>``: runs that ask for
the same kernel (the same pool under the same model, e.g. the use cases of one seed) share it,
and a different kernel gets its own folder.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.models.layers import KVCache

PAD_TO = 16
"""Sequence lengths are padded up to a multiple of this (one compilation per bucket)."""

DISTANCES = ("l2", "kl")


@dataclasses.dataclass(frozen=True)
class Prompts:
    """The text around the pairs; ``head`` pieces end where the query starts."""

    no_example: str = "Instruction: Please generate a response to the following query.\n\n\nQuery: "
    with_example: str = ("Instruction: Please generate a response to the following query. "
                         "Use the following example as a guide.\n\n\nExample:\n{instruction}\n{response}"
                         "\n\n\nQuery:\n")
    query: str = "{instruction}\n"


def as_pair(item: Any) -> tuple[str, str]:
    """``(instruction, response)`` from a tuple, a dict or an object with ``prompt``/``response``."""
    if isinstance(item, dict):
        return str(item["instruction"]), str(item["response"])
    if hasattr(item, "prompt") and hasattr(item, "response"):
        return item.prompt, item.response
    instruction, response = item
    return str(instruction), str(response)


@dataclasses.dataclass(frozen=True)
class _Encoded:
    """Token ids of every prompt piece."""

    heads: list[list[int]]        # per example: the with-example head (instruction + example)
    bare_head: list[int]          # the no-example head
    queries: list[list[int]]      # per query: x_i + "\n" then y_i
    response_start: list[int]     # per query: index of y_i's first token inside its piece
    response_len: list[int]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(tokenizer, queries: Sequence, examples: Sequence, prompts: Prompts = Prompts()) -> _Encoded:
    """Tokenises the prompt pieces (see the module docstring) and validates the pairs.

    Raises:
      ValueError: no queries or examples, or a pair with an empty instruction or response
        (named with its index).
    """
    if not len(queries) or not len(examples):
        raise ValueError(f"need at least one query and one example, got {len(queries)} and {len(examples)}")
    query_pairs = [_checked(as_pair(q), "queries", i) for i, q in enumerate(queries)]
    example_pairs = [_checked(as_pair(e), "examples", j) for j, e in enumerate(examples)]
    heads = [_ids(tokenizer, prompts.with_example.format(instruction=x, response=y)) for x, y in example_pairs]
    pieces, starts, lengths = [], [], []
    for x, y in query_pairs:
        prompt, response = _ids(tokenizer, prompts.query.format(instruction=x)), _ids(tokenizer, y)
        pieces.append(prompt + response)
        starts.append(len(prompt))
        lengths.append(len(response))
    return _Encoded(heads, _ids(tokenizer, prompts.no_example), pieces, starts, lengths)


def _checked(pair: tuple[str, str], name: str, index: int) -> tuple[str, str]:
    if not pair[1].strip():
        raise ValueError(f"{name}[{index}] has an empty response; DELIFT scores response tokens, "
                         "so drop the pair or give it a response")
    if not pair[0].strip():
        raise ValueError(f"{name}[{index}] has an empty instruction; drop the pair or give it an instruction")
    return pair


def context_length(model) -> int | None:
    """The model's declared context (``max_position_embeddings``), or None if unknown."""
    config = model.config
    rope = getattr(config, "rope", None)
    return getattr(rope, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)


def _check_lengths(encoded: _Encoded, context: int | None) -> None:
    if context is None:
        return
    longest_query = int(np.argmax([len(q) for q in encoded.queries]))
    query_len = len(encoded.queries[longest_query])
    if len(encoded.bare_head) + query_len > context:
        raise ValueError(f"queries[{longest_query}] takes {len(encoded.bare_head) + query_len} tokens with the "
                         f"prompt, more than the model's context of {context}; shorten or drop it")
    for j, head in enumerate(encoded.heads):
        if len(head) + query_len > context:
            raise ValueError(f"examples[{j}] with queries[{longest_query}] takes {len(head) + query_len} tokens, "
                             f"more than the model's context of {context}; shorten or drop examples[{j}]")


def _round_up(n: int, multiple: int = PAD_TO) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _power_of_two(n: int) -> int:
    """Head lengths vary most, so they round to powers of two (fewer compilations)."""
    return max(PAD_TO, 1 << (n - 1).bit_length())


def _pad_rows(rows: Sequence[Sequence[int]], length: int, count: int | None = None) -> np.ndarray:
    out = np.zeros((count or len(rows), length), np.int32)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = ids
    return out


def _response_distances(logp: jax.Array, mask: jax.Array) -> jax.Array:
    """``[2, ...]`` = (L2, KL) distances from teacher-forced log-probabilities ``[..., R]``."""
    count = mask.sum(-1)
    l2 = jnp.sqrt((mask * (1.0 - jnp.exp(logp)) ** 2).sum(-1) / count)
    kl = -(mask * logp).sum(-1) / count
    return jnp.stack([l2, kl])


def _response_logp(model, hidden: jax.Array, first: jax.Array, targets: jax.Array) -> jax.Array:
    """Log-probabilities ``[b, R]`` of ``targets`` read at hidden positions ``first - 1 + t``."""
    positions = jnp.clip(first[:, None] - 1 + jnp.arange(targets.shape[1]), 0, hidden.shape[1] - 1)
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    logits = model.logits(picked).astype(jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _tile_with_prefix_cache(graphdef, state, heads, head_len, pieces, start, targets, mask, *, chunk):
    """Distances ``[2, J, B]``: the ``J`` heads' caches are built once, then each is reused by all ``B`` queries."""
    model = nnx.merge(graphdef, state)
    n_heads, batch = heads.shape[0], pieces.shape[0]
    cache = model.init_cache(n_heads, heads.shape[1] + pieces.shape[1])
    cache = model.forward(heads, cache=cache, cache_index=0, compute_logits=False).cache

    def one_head(args):
        keys, values, length = args
        broadcast = lambda a: jnp.broadcast_to(a[None], (batch,) + a.shape)  # noqa: E731
        shared = KVCache(tuple(map(broadcast, keys)), tuple(map(broadcast, values)))
        # Writing the queries from slot ``length`` on overwrites the head's padding; slots later
        # than a query token are causally invisible to it, so no padding mask is needed.
        hidden = model.forward(pieces, cache=shared, cache_index=length, compute_logits=False).hidden_states
        return _response_distances(_response_logp(model, hidden, start, targets), mask)

    per_head = jax.lax.map(one_head, (cache.keys, cache.values, head_len), batch_size=chunk)  # [J, 2, B]
    return per_head.transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _rows_without_reuse(graphdef, state, rows, start, targets, mask):
    """Distances ``[2, b]`` of fully joined, right-padded prompts (one forward per row)."""
    model = nnx.merge(graphdef, state)
    hidden = model.forward(rows, compute_logits=False).hidden_states
    return _response_distances(_response_logp(model, hidden, start, targets), mask)


class _Tiler:
    """Pads one block of queries and computes its distances to a list of heads."""

    def __init__(self, model, encoded: _Encoded, block: int, batch_pairs: int):
        self.graphdef, self.state = nnx.split(model)
        self.encoded, self.block = encoded, block
        self.chunk = max(1, batch_pairs // block)
        self.piece_len = _round_up(max(len(q) for q in encoded.queries))
        self.response_len = _round_up(max(encoded.response_len), 8)

    def _queries(self, rows: np.ndarray):
        enc, n = self.encoded, self.block
        pieces = _pad_rows([enc.queries[i] for i in rows], self.piece_len, n)
        start = np.ones(n, np.int32)
        targets = np.zeros((n, self.response_len), np.int32)
        mask = np.zeros((n, self.response_len), np.float32)
        mask[:, 0] = 1.0  # padding rows score one dummy token (discarded) so no row divides by zero
        for r, i in enumerate(rows):
            s, t = enc.response_start[i], enc.response_len[i]
            start[r], targets[r, :t] = s, enc.queries[i][s:s + t]
            mask[r, :t] = 1.0
        return pieces, start, targets, mask

    def with_cache(self, heads: list[list[int]], query_rows: np.ndarray, *, n_heads: int = 0,
                   head_len: int = 0) -> np.ndarray:
        """``[2, len(query_rows), len(heads)]`` distances via the shared-prefix cache.

        Heads are padded to at least ``n_heads`` rows of at least ``head_len`` tokens (padding slots
        are overwritten by the queries or causally invisible to them), so that tiles of one matrix
        share one compiled program.
        """
        n_heads = max(n_heads, _round_up(len(heads), self.chunk))
        head_ids = _pad_rows(heads, max(head_len, _power_of_two(max(map(len, heads)))), n_heads)
        head_len = np.array([len(h) for h in heads] + [1] * (n_heads - len(heads)), np.int32)
        out = _tile_with_prefix_cache(self.graphdef, self.state, jnp.asarray(head_ids), jnp.asarray(head_len),
                                      *map(jnp.asarray, self._queries(query_rows)), chunk=self.chunk)
        return np.asarray(out)[:, : len(heads), : len(query_rows)].transpose(0, 2, 1)

    def without_cache(self, heads: list[list[int]], query_rows: np.ndarray) -> np.ndarray:
        """The same distances from fully joined prompts, ``block`` rows per forward."""
        pieces, start, targets, mask = self._queries(query_rows)
        out = np.zeros((2, len(query_rows), len(heads)), np.float32)
        head_len = _round_up(max(map(len, heads)))
        for j, head in enumerate(heads):
            rows = np.zeros((self.block, head_len + self.piece_len), np.int32)
            rows[:, : len(head)] = head
            rows[:, len(head): len(head) + self.piece_len] = pieces
            d = _rows_without_reuse(self.graphdef, self.state, jnp.asarray(rows), jnp.asarray(start + len(head)),
                                    jnp.asarray(targets), jnp.asarray(mask))
            out[:, :, j] = np.asarray(d)[:, : len(query_rows)]
        return out


def fingerprint_model(model) -> str:
    """SHA-256 of the model's config and every weight's bytes."""
    digest = hashlib.sha256(repr(model.config).encode())
    for leaf in jax.tree.leaves(nnx.state(model)):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _fingerprint_ids(rows: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(map(int, r)) for r in rows]).encode()).hexdigest()


class _TileStore:
    """Finished tiles in ``workdir`` (atomic ``.npy`` files) behind a fingerprint manifest."""

    def __init__(self, workdir: str | Path | None, manifest: dict[str, Any]):
        self.root = None if workdir is None else Path(workdir)
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "manifest.json"
        if path.exists():
            old = json.loads(path.read_text())
            wrong = [key for key in manifest if old.get(key) != manifest[key]]
            if wrong:
                raise ValueError(f"{self.root} holds utilities of a different {', '.join(wrong)}; nothing was "
                                 "changed there: pass another workdir (or delete that folder to recompute)")
        else:
            path.write_text(json.dumps(manifest, indent=1))

    def get(self, name: str) -> np.ndarray | None:
        if self.root is None or not (self.root / f"{name}.npy").exists():
            return None
        return np.load(self.root / f"{name}.npy")

    def put(self, name: str, value: np.ndarray) -> None:
        if self.root is not None:
            tmp = self.root / f"{name}.tmp.npy"
            np.save(tmp, value)
            os.replace(tmp, self.root / f"{name}.npy")


def pair_distances(model, tokenizer, queries: Sequence, examples: Sequence, *, workdir=None, block: int = 64,
                   batch_pairs: int = 256, reuse_prefix: bool = True, prompts: Prompts = Prompts(),
                   cache_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """Distances of every query's response without and with each example in context.

    ``workdir`` or ``cache_dir`` (not both) keep finished tiles (module docstring).

    Returns:
      ``(bare [2, n_q], joined [2, n_q, n_e])``; index 0 of the first axis is the L2 distance,
      1 the KL (mean negative log-probability).
    """
    if block < 1 or batch_pairs < 1:
        raise ValueError(f"block and batch_pairs must be >= 1, got {block} and {batch_pairs}")
    if workdir is not None and cache_dir is not None:
        raise ValueError("pass workdir (tiles of this kernel) or cache_dir (a folder per kernel), not both")
    encoded = encode(tokenizer, queries, examples, prompts)
    _check_lengths(encoded, context_length(model))
    manifest = {
        "model": fingerprint_model(model), "queries": _fingerprint_ids(encoded.queries),
        "examples": _fingerprint_ids(encoded.heads), "prompts": _fingerprint_ids([encoded.bare_head]),
        "block": block,
    }
    if cache_dir is not None:
        workdir = Path(cache_dir) / hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]
    store = _TileStore(workdir, manifest)
    tiler = _Tiler(model, encoded, block, batch_pairs)
    n_q, n_e = len(encoded.queries), len(encoded.heads)
    query_blocks = [np.arange(s, min(s + block, n_q)) for s in range(0, n_q, block)]
    # Every tile padded to one shape: one compiled program for the whole matrix. The no-example head
    # gets a second program of one chunk of heads: padded to a full tile it cost another 1 / (n_e / block)
    # of the matrix (12.5 % at 500 examples, block 64) to score one head.
    tile_shape = dict(n_heads=_round_up(min(block, n_e), tiler.chunk),
                      head_len=_power_of_two(max(map(len, [*encoded.heads, encoded.bare_head]))))
    bare = store.get("bare")
    if bare is None:
        bare = np.concatenate([tiler.with_cache([encoded.bare_head], rows, head_len=tile_shape["head_len"])[:, :, 0]
                               for rows in query_blocks], 1)
        store.put("bare", bare)
    joined = np.zeros((2, n_q, n_e), np.float32)
    run = functools.partial(tiler.with_cache, **tile_shape) if reuse_prefix else tiler.without_cache
    for qi, rows in enumerate(query_blocks):
        for ej, start in enumerate(range(0, n_e, block)):
            name = f"tile_{qi}_{ej}"
            tile = store.get(name)
            if tile is None:
                tile = run(encoded.heads[start:start + block], rows)
                store.put(name, tile)
            joined[:, rows, start:start + tile.shape[2]] = tile
    return bare, joined


def utility_matrix(model, tokenizer, queries: Sequence, examples: Sequence, *, distance: str = "l2",
                   workdir=None, block: int = 64, batch_pairs: int = 256, reuse_prefix: bool = True,
                   prompts: Prompts = Prompts(), cache_dir=None) -> np.ndarray:
    r"""``U[i, j]`` = utility of ``examples[j]`` as an in-context demonstration for ``queries[i]``.

    :math:`U_{ij} = d(GT_i, p(y_i|x_i)) - d(GT_i, p(y_i|x_j, y_j, x_i))` (module docstring);
    positive when the example makes the query's answer more likely.

    Args:
      model: a metafit causal LM (Llama family) with a KV cache.
      tokenizer: ``tokenizer(text, add_special_tokens=False)["input_ids"]`` gives token ids.
      queries, examples: ``(instruction, response)`` pairs (tuples, dicts with those keys, or
        :class:`~metafit.data.instructions.Instruction`).
      distance: ``"l2"`` (the paper's) or ``"kl"`` (conditional PMI per token).
      workdir: folder for resumable tiles (None = keep nothing).
      cache_dir: instead of ``workdir``, a folder shared by many kernels: this one's tiles go to a
        subfolder named by the digest of its model, queries, examples, prompts and block size, so
        a later call for the same kernel (another run, another use case) computes nothing.
      block: queries and examples per tile (the unit of checkpointing).
      batch_pairs: pairs per forward (memory knob; examples per chunk = ``batch_pairs // block``).
      reuse_prefix: reuse each example's KV cache for all queries (False: one joined row per pair).
      prompts: the prompt text.

    Returns:
      ``[n_queries, n_examples]`` float32, not scaled (see :func:`similarity_from_utility`).

    Raises:
      ValueError: unknown distance, empty response or instruction, a prompt longer than the
        model's context (named with its index), a ``workdir`` made for another model,
        example set, query set or block size, or both ``workdir`` and ``cache_dir``. Raised before
        any compute.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    bare, joined = pair_distances(model, tokenizer, queries, examples, workdir=workdir, block=block,
                                  batch_pairs=batch_pairs, reuse_prefix=reuse_prefix, prompts=prompts,
                                  cache_dir=cache_dir)
    k = DISTANCES.index(distance)
    return (bare[k][:, None] - joined[k]).astype(np.float32)


def similarity_from_utility(utility, *, exclude_diagonal: bool | None = None, diagonal: float = 1.0) -> np.ndarray:
    r"""Min-max scales a utility matrix to a similarity kernel in ``[0, 1]``.

    .. math:: S_{ij} = (U_{ij} - \min U) / (\max U - \min U)

    For a square pool-by-pool matrix the diagonal (an example as its own demonstration, which
    can copy the answer) is left out of the min and max, as DELIFT's code does, and set to
    ``diagonal`` (1 = an item serves itself best).

    Args:
      utility: ``[n, m]`` from :func:`utility_matrix`.
      exclude_diagonal: default True when square.
      diagonal: value of the diagonal when it is excluded.

    Raises:
      ValueError: not 2-D, NaN/inf entries, or constant (nothing to scale).
    """
    u = np.asarray(utility, np.float64)
    if u.ndim != 2:
        raise ValueError(f"utility must be a 2-D matrix, got shape {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError(f"utility has {int((~np.isfinite(u)).sum())} non-finite entries; recompute it")
    exclude = (u.shape[0] == u.shape[1]) if exclude_diagonal is None else exclude_diagonal
    values = u[~np.eye(*u.shape, dtype=bool)] if exclude else u
    low, high = values.min(), values.max()
    if high <= low:
        raise ValueError("utility is constant, so it cannot be min-max scaled; check the model and data")
    s = (u - low) / (high - low)
    if exclude:
        np.fill_diagonal(s, diagonal)
    return s.astype(np.float32)
