r"""Context-dependency score :math:`s_M` of assistant turns and the indicator relabelling.

For an assistant turn :math:`Y_m` (its content tokens) of a conversation, on one middle layer
with heads :math:`H` (Wang et al. 2024, Method 2):

.. math::

   s_M(Y_m) = \frac{1}{|Y_m|} \sum_{y \in Y_m} \max_{h \in H} \sum_{x \in U} \widetilde{\mathrm{Att}}_h(y, x),

where :math:`U` are the content tokens of the user turns and :math:`\widetilde{\mathrm{Att}}`
is the attention with newline, BOS and EOS keys masked out: their probability is removed and
each row renormalised over the remaining keys, so attention sinks do not dilute the score. A
turn with :math:`s_M > \beta` (0.6 in the paper) depends on its context: its preceding user turn
gets the indicator token appended (:func:`mark_dependent`).

The single layer's ``[b, heads, s, s]`` map is computed inside one jitted call that returns
only that layer; the other layers' maps are never materialised as outputs.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.models.generate import require_attention_hook

from .conversation import Message, encode_conversation


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _layer_attention(graphdef, state, ids, mask, *, layer):
    model = nnx.merge(graphdef, state)
    return model.forward(ids, mask, return_attentions=True, compute_logits=False).attentions[layer]


def sink_token_ids(tokenizer, ids: np.ndarray) -> set[int]:
    """Ids among ``ids`` that are masked in :math:`s_M`: BOS, EOS and tokens that are only whitespace with a newline."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    newline = {int(i) for i in set(ids.tolist()) if "\n" in tokenizer.decode([int(i)]) and
               not tokenizer.decode([int(i)]).strip()}
    return {i for i in special | newline if i is not None}


def turn_scores(probs: np.ndarray, user_mask: np.ndarray, sink_mask: np.ndarray,
                turns: Sequence[tuple[str, int, int]]) -> list[float]:
    """:math:`s_M` of each assistant turn from one layer's ``[heads, s, s]`` probabilities (host side)."""
    kept = probs * (1 - sink_mask)[None, None, :]
    kept = kept / np.maximum(kept.sum(-1, keepdims=True), 1e-30)
    user_share = kept @ ((user_mask != 0) & (sink_mask == 0)).astype(kept.dtype)  # [heads, s]
    best = user_share.max(axis=0)
    return [float(best[start:end].mean()) for role, start, end in turns if role == "assistant" and end > start]


def dependency_score(model, tokenizer, conversation: Sequence[Message], *, layer: int | None = None,
                     bucket: int = 64) -> list[float]:
    """:math:`s_M` of every (non-empty) assistant turn of ``conversation``, in order.

    Args:
      model: a metafit causal LM with the attention hook.
      tokenizer: its fast tokenizer with a chat template.
      conversation: ``[{"role", "content"}, ...]`` with at least one assistant turn.
      layer: the layer scored (default: the middle layer ``L // 2``).
      bucket: sequences are right-padded to a multiple of this (fewer compilations; causal
        attention makes the padding invisible to real tokens).

    Raises:
      ValueError: no assistant turn, a layer outside the model, or no chat template.
      TypeError: a model without the attention hook.
    """
    require_attention_hook(model)
    num_layers = len(model.init_cache(1, 1).keys)
    layer = num_layers // 2 if layer is None else layer
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside the model's {num_layers} layers")
    if not any(m.get("role") == "assistant" for m in conversation):
        raise ValueError("dependency_score scores assistant turns; the conversation has none")
    encoded = encode_conversation(tokenizer, conversation)
    s = len(encoded.ids)
    length = -(-s // bucket) * bucket
    ids = np.zeros((1, length), np.int32)
    mask = np.zeros((1, length), np.int32)
    ids[0, :s], mask[0, :s] = encoded.ids, 1
    graphdef, state = nnx.split(model)
    probs = np.asarray(_layer_attention(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), layer=layer))[0, :, :s, :s]
    sinks = np.isin(encoded.ids, list(sink_token_ids(tokenizer, encoded.ids))).astype(np.int32)
    return turn_scores(probs, encoded.user_mask, sinks, encoded.turns)


def mark_dependent(conversation: Sequence[Message], scores: Sequence[float], *, beta: float = 0.6,
                   indicator: str = "[IND]") -> tuple[list[Message], list[bool]]:
    """Appends ``indicator`` to the user turn before each assistant turn whose score exceeds ``beta``.

    Returns the relabelled conversation and, per assistant turn, whether it was flagged.
    """
    out, flags, k = [dict(m) for m in conversation], [], 0
    for i, message in enumerate(out):
        if message["role"] != "assistant" or not message["content"]:
            continue
        flagged = scores[k] > beta
        flags.append(bool(flagged))
        k += 1
        previous = next((j for j in range(i - 1, -1, -1) if out[j]["role"] == "user"), None)
        if flagged and previous is not None:
            out[previous]["content"] = with_indicator(out[previous]["content"], indicator)
    return out, flags


def with_indicator(user_content: str, indicator: str = "[IND]") -> str:
    """A user message with the indicator appended (one space before it)."""
    return f"{user_content} {indicator}"


__all__ = ["dependency_score", "mark_dependent", "with_indicator", "turn_scores", "sink_token_ids"]
