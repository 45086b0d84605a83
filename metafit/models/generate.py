r"""Autoregressive generation with a fixed-shape KV cache, compiled once per shape.

The prompt ``[b, P]`` is left-aligned (padding first), a cache of ``T = P + max_new_tokens``
slots is prefilled in one call, then a ``lax.while_loop`` feeds one token per step. Every
array keeps its shape through the loop, so one compilation serves all steps (and all later
calls with the same batch shape and settings). Positions skip padding (``cumsum(mask) - 1``),
as transformers' ``generate`` does, so a padded prompt continues exactly like the unpadded one.

Token choice at each step, from logits :math:`z`:

* greedy (``temperature == 0``): :math:`\arg\max z`;
* sampling: :math:`z / \tau`, keep the ``top_k`` largest, then the smallest set whose
  probability reaches ``top_p`` (nucleus), and draw from the softmax of what is left.

Sequences that emit a stop token are padded with ``pad_token_id`` afterwards; the loop ends
early when every sequence has stopped.

Attention steering (``steer=(user_mask, alpha)``, :mod:`metafit.context`): every layer and head
adds :math:`\log\alpha` to the pre-softmax score of each key that is not a user token, i.e.
:math:`p'(x, y) \propto p(x, y)` for user keys and :math:`\alpha\, p(x, y)` otherwise. The user
mask is left-aligned with the prompt and extended over the ``max_new_tokens`` cache slots here
(generated tokens are not user tokens), so the bias always lands on the slots it names.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import GenerationDefaults
from .layers import positions_from_mask
from .remat import remat_policy, scanning

Array = jax.Array


# The nucleus is looked for among the largest NUCLEUS_CANDIDATES logits first: a vocabulary-wide sort
# costs ~130 ms for 8 rows of SmolLM2's 49,152 on CPU, ``lax.top_k`` of 256 ~2.5 ms.
NUCLEUS_CANDIDATES = 256


def _nucleus_cutoff(ordered: Array, logits: Array, top_p: Array) -> tuple[Array, Array]:
    """The smallest logit kept by the nucleus, and the mass of ``ordered``, from a descending prefix of each row.

    ``ordered`` is ``[b, k]``: the ``k`` largest logits of each row in descending order (all of them,
    or the top ``k``); probabilities are normalised over the whole row of ``logits``, so the cutoff
    is the full sort's whenever the nucleus lies inside the prefix (its mass reaches ``top_p``).
    """
    peak = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(ordered - peak) / jnp.sum(jnp.exp(logits - peak), axis=-1, keepdims=True)
    mass = jnp.cumsum(probs, axis=-1)
    keep = (mass - probs < top_p) | (jnp.arange(ordered.shape[-1]) == 0)
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return cutoff, mass[:, -1:]


def filter_logits(logits: Array, *, top_k: int | None = None, top_p: Array | float | None = None) -> Array:
    """Sets logits outside the top-k / nucleus (top-p) set to ``-inf``.

    Args:
      logits: ``[b, vocab]``.
      top_k: keep the ``top_k`` largest (static; None = all).
      top_p: keep the smallest prefix of the sorted distribution whose mass reaches ``top_p``
        (the most likely token is always kept; ``top_p >= 1`` keeps every token; None = all). A
        scalar or one value per row (``[b]`` or ``[b, 1]``). The prefix is searched among the
        ``NUCLEUS_CANDIDATES`` largest logits, and the whole row is sorted only when some row's
        nucleus is larger than that.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        top_p = jnp.broadcast_to(jnp.reshape(jnp.asarray(top_p, logits.dtype), (-1, 1)), (logits.shape[0], 1))
        candidates = min(NUCLEUS_CANDIDATES, logits.shape[-1])
        cutoff, mass = _nucleus_cutoff(jax.lax.top_k(logits, candidates)[0], logits, top_p)
        inside = (mass >= top_p) | (top_p >= 1.0) | (candidates == logits.shape[-1])
        cutoff = jax.lax.cond(jnp.all(inside), lambda: cutoff,
                              lambda: _nucleus_cutoff(jnp.sort(logits, axis=-1)[:, ::-1], logits, top_p)[0])
        cutoff = jnp.where(top_p >= 1.0, -jnp.inf, cutoff)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _choose(logits, key, temperature, top_p, *, sample: bool, top_k, use_top_p: bool):
    logits = logits.astype(jnp.float32)
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p if use_top_p else None)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
    """The loop carry: step ``i`` (tokens generated so far), the token buffer, the cache, who has stopped."""

    i: Array
    tokens: Array
    cache: Any
    done: Array


class _Context(NamedTuple):
    full_mask: Array
    positions: Array
    bias: Array | None


def _context(mask, steer_mask, log_alpha, max_new_tokens) -> _Context:
    """Mask, positions and steering bias over the ``P + max_new_tokens`` slots (pure function of the prompt)."""
    b = mask.shape[0]
    full_mask = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), mask.dtype)], axis=1)
    bias = None
    if steer_mask is not None:  # [b, 1, 1, T]: broadcast over heads and query rows, one for every layer
        user = jnp.concatenate([steer_mask != 0, jnp.zeros((b, max_new_tokens), bool)], axis=1)
        bias = jnp.where(user, 0.0, log_alpha)[:, None, None, :].astype(jnp.float32)
    return _Context(full_mask, positions_from_mask(full_mask), bias)


def _step_logits(model, context, tokens, cache, slot, use_cache):
    """Logits predicting slot ``slot + 1`` (only token ``slot`` is fed when caching)."""
    if use_cache:
        fed = jax.lax.dynamic_slice_in_dim(tokens, slot, 1, axis=1)
        out = model.forward(
            fed, context.full_mask, position_ids=jax.lax.dynamic_slice_in_dim(context.positions, slot, 1, axis=1),
            cache=cache, cache_index=slot, attention_bias=context.bias, compute_logits=False,
        )
        return model.logits(out.hidden_states[:, 0]), out.cache
    # Reference path: recompute the whole fixed-size buffer; causality hides later slots.
    out = model.forward(tokens, context.full_mask, position_ids=context.positions, attention_bias=context.bias,
                        compute_logits=False)
    hidden = jax.lax.dynamic_index_in_dim(out.hidden_states, slot, axis=1, keepdims=False)
    return model.logits(hidden), None


def start_decoding(model, ids, mask, choose, stops, pad_id, steer_mask=None, log_alpha=None, *,
                   max_new_tokens, use_cache=True) -> DecodeState:
    """Prefills the cache with the prompt and chooses the first new token (step 1 of the loop).

    ``choose(logits [b, vocab], step) -> [b]`` picks the tokens (:func:`token_chooser` for
    :func:`generate`'s settings; :mod:`metafit.serve` passes one with per-row settings).
    """
    b, prompt_len = ids.shape
    context = _context(mask, steer_mask, log_alpha, max_new_tokens)
    tokens = jnp.concatenate([ids, jnp.full((b, max_new_tokens), pad_id, ids.dtype)], axis=1)
    if use_cache:
        prefill = model.forward(
            ids, context.full_mask, position_ids=context.positions[:, :prompt_len],
            cache=model.init_cache(b, prompt_len + max_new_tokens), cache_index=0, attention_bias=context.bias,
            compute_logits=False,
        )
        logits, cache = model.logits(prefill.hidden_states[:, -1]), prefill.cache
    else:
        logits, cache = _step_logits(model, context, tokens, None, prompt_len - 1, use_cache)
    first = choose(logits, 0)
    tokens = tokens.at[:, prompt_len].set(first)
    return DecodeState(jnp.int32(1), tokens, cache, jnp.isin(first, stops))


def decode_step(model, state: DecodeState, mask, choose, stops, pad_id, steer_mask=None, log_alpha=None, *,
                max_new_tokens, use_cache=True) -> DecodeState:
    """Chooses token ``i + 1`` of every sequence (``pad_id`` for those already stopped)."""
    i, tokens, cache, done = state
    context = _context(mask, steer_mask, log_alpha, max_new_tokens)
    slot = mask.shape[1] + i - 1
    logits, cache = _step_logits(model, context, tokens, cache, slot, use_cache)
    token = jnp.where(done, pad_id, choose(logits, i))
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], slot + 1, axis=1)
    return DecodeState(i + 1, tokens, cache, done | jnp.isin(token, stops))


def token_chooser(key, temperature, top_p, *, sample: bool, top_k, use_top_p: bool):
    """:func:`generate`'s token choice: step ``i`` uses ``fold_in(key, i)`` (see the module docstring)."""
    return lambda logits, step: _choose(logits, jax.random.fold_in(key, step), temperature, top_p, sample=sample,
                                        top_k=top_k, use_top_p=use_top_p)


_STATIC = ("graphdef", "max_new_tokens", "top_k", "sample", "use_top_p", "use_cache", "scan_layers")


def _split_args(mask, key, temperature, top_p, stops, pad_id, steer_mask, log_alpha, *, max_new_tokens, top_k,
                sample, use_top_p, use_cache, scan_layers):
    """:func:`generate`'s jitted arguments as ``(decoding args, decoding keywords)`` of :func:`start_decoding`.

    ``scan_layers`` is not among them: the jitted functions trace under it (:func:`_layer_mode`).
    """
    choose = token_chooser(key, temperature, top_p, sample=sample, top_k=top_k, use_top_p=use_top_p)
    return (mask, choose, stops, pad_id, steer_mask, log_alpha), dict(max_new_tokens=max_new_tokens,
                                                                      use_cache=use_cache)


def _layer_mode(scan_layers: bool):
    """The decoder stack's mode while generation traces: blocks scanned or unrolled, never rematerialised.

    A jitted function's cache is keyed on its static arguments only: a mode read from the
    :func:`~metafit.models.remat.remat_policy` context while tracing would stick to the first
    call's context. So :func:`generate` reads it when called and passes it as ``scan_layers``.
    """
    return remat_policy("none", scan_layers=scan_layers)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(graphdef, state, ids, mask, key, temperature, top_p, stops, pad_id, steer_mask=None,
              log_alpha=None, **static):
    model = nnx.merge(graphdef, state)
    args, kwargs = _split_args(mask, key, temperature, top_p, stops, pad_id, steer_mask, log_alpha, **static)

    def cond(carry):
        return (carry.i < static["max_new_tokens"]) & ~jnp.all(carry.done)

    with _layer_mode(static["scan_layers"]):
        carry = start_decoding(model, ids, *args, **kwargs)
        carry = jax.lax.while_loop(cond, lambda carry: decode_step(model, carry, *args, **kwargs), carry)
    return carry.tokens


@functools.partial(jax.jit, static_argnames=_STATIC)
def _start_jit(graphdef, state, ids, *arrays, **static):
    args, kwargs = _split_args(*arrays, **static)
    with _layer_mode(static["scan_layers"]):
        return start_decoding(nnx.merge(graphdef, state), ids, *args, **kwargs)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("carry",))
def _step_jit(graphdef, state, carry, *arrays, **static):
    args, kwargs = _split_args(*arrays, **static)
    with _layer_mode(static["scan_layers"]):
        return decode_step(nnx.merge(graphdef, state), carry, *args, **kwargs)


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray, *aligned: np.ndarray) -> tuple[np.ndarray, ...]:
    """Moves each row's padding to the left (generation appends on the right).

    ``aligned`` arrays of the same shape (a steering user mask) are permuted the same way.
    """
    order = np.argsort(attention_mask != 0, axis=1, kind="stable")  # pads (False) first, order kept
    arrays = (input_ids, attention_mask) + aligned
    return tuple(np.take_along_axis(a, order, 1) for a in arrays)


def require_attention_hook(model) -> None:
    """Raises a ``TypeError`` unless ``model.forward`` takes ``attention_bias`` and returns attentions."""
    forward = getattr(model, "forward", None)
    params = inspect.signature(forward).parameters if callable(forward) else {}
    if not {"attention_bias", "return_attentions"} <= set(params) or not hasattr(model, "init_cache"):
        raise TypeError(f"{type(model).__name__} has no attention hook: context methods need a metafit causal LM "
                        "whose forward takes attention_bias= and return_attentions= and that has init_cache() "
                        "(metafit.models Llama family or GPT-2)")


def steering_inputs(steer, shape: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """Checks ``steer = (user_mask, alpha)`` against the prompt shape; returns ``(mask [b, P], log alpha)``.

    Raises:
      ValueError: ``alpha`` outside ``(0, 1]`` or a mask whose shape is not the prompt's.
    """
    try:
        user_mask, alpha = steer
    except (TypeError, ValueError):
        raise ValueError("steer must be a pair (user_mask, alpha), e.g. steer=(user_mask, 0.9)") from None
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"steering alpha must lie in (0, 1] (1 = no steering), got {alpha}")
    user_mask = np.asarray(user_mask)
    user_mask = user_mask[None] if user_mask.ndim == 1 else user_mask
    if user_mask.shape != shape:
        raise ValueError(f"steering user_mask shape {user_mask.shape} differs from the prompt shape {shape}: "
                         "it needs one entry per prompt token (1 = user token)")
    return (user_mask != 0).astype(np.int32), float(np.log(alpha))


def _settings(model, ids, *, max_new_tokens=None, attention_mask=None, temperature=None, top_k=None, top_p=None,
              stop_tokens=None, pad_token_id=None, key=None, use_cache=True, steer=None, scan_layers=None):
    """Checks the arguments, fills omitted ones from ``model.config.generation``; returns the jitted call's inputs."""
    if steer is not None:
        require_attention_hook(model)
    config = model.config
    defaults = getattr(config, "generation", None) or GenerationDefaults()
    if max_new_tokens is None:
        max_new_tokens = defaults.max_new_tokens
        if max_new_tokens is None:
            raise ValueError("max_new_tokens is not set and the model has no default (generation_config.json "
                             "max_new_tokens): pass max_new_tokens=N")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature is None:
        temperature = defaults.temperature if defaults.do_sample else 0.0
        top_k = defaults.top_k if top_k is None and defaults.do_sample else top_k
        top_p = defaults.top_p if top_p is None and defaults.do_sample else top_p
        if temperature > 0 and key is None:
            raise ValueError(f"the model's generation_config.json asks for sampling (do_sample=true, temperature="
                             f"{temperature}): pass key=jax.random.key(...) to sample, or temperature=0 for greedy")
    sample = temperature > 0
    if sample and key is None:
        raise ValueError("sampling (temperature > 0) needs key=jax.random.key(...)")
    ids = np.asarray(ids, dtype=np.int32)
    squeeze = ids.ndim == 1
    ids = ids[None] if squeeze else ids
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int32)
    mask = mask[None] if mask.ndim == 1 else mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    user_mask, log_alpha = (None, None) if steer is None else steering_inputs(steer, ids.shape)
    if not mask[:, -1].all():
        ids, mask, *rest = left_align(ids, mask, *(() if user_mask is None else (user_mask,)))
        user_mask = rest[0] if rest else None
    stops = _stop_ids(model, stop_tokens)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
    arrays = (
        jnp.asarray(mask),
        key if key is not None else jax.random.key(0),
        jnp.float32(temperature if sample else 1.0),
        jnp.float32(1.0 if top_p is None else top_p),
        jnp.asarray(stops if stops else (-1,), jnp.int32),
        jnp.int32(pad_token_id),
        None if user_mask is None else jnp.asarray(user_mask),
        None if log_alpha is None else jnp.float32(log_alpha),
    )
    static = dict(max_new_tokens=int(max_new_tokens), top_k=None if top_k is None else int(top_k),
                  sample=bool(sample), use_top_p=top_p is not None and top_p < 1.0, use_cache=bool(use_cache),
                  scan_layers=scanning() if scan_layers is None else bool(scan_layers))
    return jnp.asarray(ids), arrays, static, squeeze


def generate(
    model,
    input_ids,
    *,
    max_new_tokens: int | None = None,
    attention_mask=None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    key: Array | None = None,
    use_cache: bool = True,
    steer: tuple | None = None,
    scan_layers: bool | None = None,
) -> Array:
    """Generates continuations of ``input_ids`` with a causal LM.

    Arguments left ``None`` come from ``model.config.generation`` (an HF folder's
    ``generation_config.json``, read by :func:`metafit.models.load`), as in transformers: its eos
    id list, ``do_sample``/``temperature``/``top_k``/``top_p`` and ``max_new_tokens``; without
    that file decoding is greedy and stops at the config's ``eos_token_ids``.

    Args:
      model: a metafit causal LM (Llama family, GPT-2).
      input_ids: ``[b, P]`` (or ``[P]``) prompt token ids; padded rows need ``attention_mask``.
      max_new_tokens: tokens to append (static: a new value compiles once more).
      attention_mask: ``[b, P]`` 1 = token, 0 = padding (left or right; rows are left-aligned).
      temperature: 0 = greedy decoding; > 0 = sampling at this temperature (needs ``key``);
        None = the model's default (greedy unless its generation config has ``do_sample``).
      top_k: sample among the ``top_k`` most likely tokens only.
      top_p: nucleus sampling mass (``None``/1.0 = off).
      stop_tokens: ids that end a sequence; default the generation config's eos ids, else the
        model's ``eos_token_ids``; ``()`` = none. For stop *strings* see :func:`stream_text`.
      pad_token_id: filler after a sequence stops; default the model's pad, else first stop, else 0.
      key: ``jax.random`` key for sampling (step ``i`` uses ``fold_in(key, i)``).
      use_cache: False recomputes the full sequence each step (a reference path, same output).
      steer: ``(user_mask, alpha)`` attention steering: ``user_mask`` ``[b, P]`` (or ``[P]``)
        marks the user tokens of the prompt (1), ``alpha`` in ``(0, 1]`` scales the attention on
        every other key (prompt tokens, padding aside, and all generated tokens) in every layer
        and head; see :func:`metafit.context.steering_bias`. None = no steering.
      scan_layers: run a Llama-family stack's blocks as one ``lax.scan`` over their stacked
        weights and KV cache, so XLA compiles one block instead of every layer, and the tokens
        are those of the unrolled stack (False). The trade: SmolLM2-135M (30 layers) on CPU
        compiles in 5.7 s instead of 19 s, but each token costs 0.20 s instead of 0.12 s (every
        step slices each layer's weights out of the stack), so scanning pays for short answers
        and for deep models. None = the mode of the enclosing
        :func:`~metafit.models.remat.remat_policy` (unrolled outside one). Models whose blocks
        differ (LoRA on some layers only) and GPT-2 run unrolled either way.

    Returns:
      ``[b, P + max_new_tokens]`` int32: the left-aligned prompt followed by the generated
      tokens (``pad_token_id`` after a stop token). ``[P + max_new_tokens]`` for a 1-D prompt.

    Example:
      >>> out = generate(model, ids, max_new_tokens=16)                       # doctest: +SKIP
      >>> out = generate(model, ids, max_new_tokens=16, temperature=0.7, top_p=0.9,
      ...                key=jax.random.key(0))                               # doctest: +SKIP
    """
    ids, arrays, static, squeeze = _settings(
        model, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask, temperature=temperature,
        top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, pad_token_id=pad_token_id, key=key, use_cache=use_cache,
        steer=steer, scan_layers=scan_layers)
    graphdef, state = nnx.split(model)
    tokens = _generate(graphdef, state, ids, *arrays, **static)
    return tokens[0] if squeeze else tokens


def stream(model, input_ids, **kwargs) -> Iterator[np.ndarray]:
    """Yields the new tokens of every sequence as they are produced: ``[b]`` per step (``[]`` for a 1-D prompt).

    Takes :func:`generate`'s arguments and produces the same tokens (same prefill, same step
    function, same per-step keys), one jitted step per token instead of one ``while_loop``.
    Sequences that stopped yield ``pad_token_id``; the iterator ends after ``max_new_tokens``
    steps or when every sequence has stopped. Closing it early (``break``) stops generating.

    Example:
      >>> for token in stream(model, ids, max_new_tokens=16):                 # doctest: +SKIP
      ...     print(tokenizer.decode(token))
    """
    ids, arrays, static, squeeze = _settings(model, input_ids, **kwargs)
    graphdef, state = nnx.split(model)
    prompt_len = ids.shape[1]
    carry = _start_jit(graphdef, state, ids, *arrays, **static)
    while True:
        step = int(carry.i)
        token, done = np.asarray(carry.tokens[:, prompt_len + step - 1]), np.asarray(carry.done)
        yield token[0] if squeeze else token
        if step >= static["max_new_tokens"] or done.all():
            return
        carry = _step_jit(graphdef, state, carry, *arrays, **static)


class TextStream:
    """Turns generated token ids into text pieces, holding back what may start a stop string.

    Each :meth:`push` decodes all tokens so far (``skip_special_tokens``) and returns the new
    text that is final: not ending in an incomplete UTF-8 character and not a possible start of
    a stop string. When a stop string appears, the text is cut just before its first occurrence
    and :attr:`stopped` is set (push nothing more). :meth:`flush` returns what was held back
    once generation ends without a stop.

    Args:
      tokenizer: a transformers tokenizer.
      stop: stop strings (empty strings are refused).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        if isinstance(stop, str):
            stop = (stop,)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text that became final (may be empty)."""
        self.ids.append(int(token_id))
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, self.text[:cut]
            return self._emit(len(self.text))
        final = len(self.text) - (1 if self.text.endswith("\ufffd") else 0)
        held = max((n for s in self.stop for n in range(1, len(s)) if self.text[:final].endswith(s[:n])), default=0)
        return self._emit(final - held)

    def flush(self) -> str:
        """The rest of the text (call once generation ended)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


def stream_text(model, tokenizer, input_ids, *, stop: Sequence[str] = (), **kwargs) -> Iterator[str]:
    """Yields the text of one prompt's continuation piece by piece, ending before any stop string.

    Generation stops at the first stop string (checked on the decoded text, so a stop split
    across tokens is found) or at a stop token; the text returned never contains the stop string.
    Other keyword arguments are :func:`generate`'s.

    Example:
      >>> ids = tokenizer("Q: 2+2?\nA:")["input_ids"]                         # doctest: +SKIP
      >>> "".join(stream_text(model, tokenizer, ids, stop=["\n"], max_new_tokens=20))
    """
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 1:
        raise ValueError(f"stream_text takes one prompt ([P] token ids), got shape {ids.shape}; "
                         "batch with generate() or metafit.serve")
    text = TextStream(tokenizer, stop)
    steps = stream(model, ids, **kwargs)
    stops = set(_stop_ids(model, kwargs.get("stop_tokens")))
    for token in steps:
        if int(token) in stops:
            break
        piece = text.push(int(token))
        if piece:
            yield piece
        if text.stopped:
            steps.close()
            return
    rest = text.flush()
    if rest:
        yield rest


def generate_text(model, tokenizer, input_ids, *, stop: Sequence[str] = (), **kwargs) -> str:
    """The continuation of one prompt as text, cut before the first stop string (see :func:`stream_text`)."""
    return "".join(stream_text(model, tokenizer, input_ids, stop=stop, **kwargs))


def _stop_ids(model, stop_tokens) -> tuple[int, ...]:
    """The stop token ids :func:`generate` uses for ``stop_tokens``."""
    if stop_tokens is not None:
        return tuple(stop_tokens)
    defaults = getattr(model.config, "generation", None) or GenerationDefaults()
    return tuple(defaults.eos_token_ids if defaults.eos_token_ids is not None else model.config.eos_token_ids)
