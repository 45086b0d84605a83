r"""The context-dependency indicator token: vocabulary, embedding row, and a loss that trains the row.

Indicator-conditioned SFT (Wang et al. 2024, Method 2) appends a new special token ``[IND]`` to
user turns whose answer depends on the context (:func:`metafit.context.mark_dependent`), and at
evaluation to queries that need the context. :func:`add_indicator` adds the token to a copy of
the tokenizer and gives it an embedding row: when the model's vocabulary is padded beyond the
tokenizer (many checkpoints round it up), the token takes the first spare row; otherwise the
vocabulary grows by one. Either way the row starts at the mean of the tokenizer's rows (so its
first forward is in distribution) and an untied output head gets the mean column. With tied
embeddings the one matrix serves both ends.

The new row must train even when the rest of the embedding is frozen (LoRA). The trainer's
parameters are therefore ``{"model": model_state, "indicator": row}`` (:func:`indicator_params`):
the loss writes ``row`` into the embedding at the indicator id before the forward
(:func:`with_indicator_row`), so the gradient reaches ``row``, which is always trainable, while
the model's own copy of that row receives zero gradient. :func:`indicator_trainable` builds
the ``trainable=`` mask of :func:`metafit.train.fit` from the model's own mask (LoRA or full).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INDICATOR = "[IND]"
_INPUT_EMBEDDINGS = ("embed_tokens", "wte")


def _is_input_embedding(path) -> bool:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return "embedding" in keys and any(name in keys for name in _INPUT_EMBEDDINGS)


def _grow(leaf: np.ndarray, axis: int) -> np.ndarray:
    """Appends the mean slice along ``axis`` (the vocabulary axis)."""
    return np.concatenate([leaf, leaf.mean(axis=axis, keepdims=True)], axis=axis)


def _with_mean_slice(leaf: np.ndarray, axis: int, index: int) -> np.ndarray:
    """``leaf`` with slice ``index`` along ``axis`` set to the mean of the slices before it (the tokenizer's rows)."""
    out = np.array(leaf, copy=True)
    rows = np.take(out, np.arange(index), axis=axis)
    np.put_along_axis(out, np.full([1 if a == axis else n for a, n in enumerate(out.shape)], index),
                      rows.mean(axis=axis, keepdims=True), axis=axis)
    return out


def add_indicator(model, tokenizer, token: str = INDICATOR):
    """A copy of ``model`` and ``tokenizer`` with ``token`` added; returns ``(model, tokenizer, token_id)``.

    Parameters with a vocabulary axis (input embedding, untied output head) give the token the
    mean slice of the tokenizer's rows: in the first spare row when the model's vocabulary is
    padded beyond the tokenizer, else in one new slice (the vocabulary grows by one). Everything
    else is copied unchanged. Add the token before applying LoRA.

    Raises:
      ValueError: the token is already in the vocabulary, the model's config has no
        ``vocab_size``, or the tokenizer is larger than the model's vocabulary.
    """
    if token in tokenizer.get_vocab():
        raise ValueError(f"{token!r} is already in the tokenizer's vocabulary; pick another indicator token")
    config = model.config
    if not hasattr(config, "vocab_size"):
        raise ValueError(f"{type(model).__name__} has no vocab_size in its config; the indicator needs a causal LM")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([token], special_tokens=True)
    token_id = int(tokenizer.convert_tokens_to_ids(token))
    vocab = config.vocab_size
    if token_id > vocab:
        raise ValueError(f"the tokenizer gave {token!r} id {token_id}, but the model's vocabulary has only {vocab} "
                         "rows: the tokenizer and the model disagree on the vocabulary size")
    # the structure of the model with one more row (shapes only: an eager random initialisation would
    # compile and run one program per parameter shape for nothing); the leaves whose shape changes
    # are the ones with a vocabulary axis
    graphdef, shapes = nnx.split(nnx.eval_shape(
        lambda: type(model)(dataclasses.replace(config, vocab_size=vocab + 1), rngs=nnx.Rngs(0))))
    old = dict(jax.tree_util.tree_leaves_with_path(nnx.state(model)))

    def vocab_axis(path, grown) -> int | None:
        before = old[path].shape
        return next((a for a, (m, n) in enumerate(zip(before, grown.shape)) if m != n), None)

    if token_id == vocab:  # no spare row: grow by one slice
        new_state = jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.asarray(_grow(np.asarray(old[path]), axis)
                                           if (axis := vocab_axis(path, leaf)) is not None else old[path], leaf.dtype),
            shapes)
        return nnx.merge(graphdef, new_state), tokenizer, token_id
    graphdef, _ = nnx.split(model)
    new_state = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(_with_mean_slice(np.asarray(old[path]), axis, token_id)
                                       if (axis := vocab_axis(path, leaf)) is not None else old[path], old[path].dtype),
        shapes)
    return nnx.merge(graphdef, new_state), tokenizer, token_id


def indicator_params(model, token_id: int) -> dict[str, Any]:
    """Trainer parameters ``{"model": nnx.state(model), "indicator": the token's embedding row}``."""
    embedding = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model))
                 if _is_input_embedding(path)]
    if len(embedding) != 1:
        raise ValueError(f"found {len(embedding)} input embeddings in {type(model).__name__}; expected one")
    return {"model": nnx.state(model), "indicator": embedding[0][token_id]}


def with_indicator_row(params: dict[str, Any], token_id: int):
    """The model state of ``params`` with the ``indicator`` row written into the input embedding."""
    row = params["indicator"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf.at[token_id].set(row.astype(leaf.dtype)) if _is_input_embedding(path) else leaf,
        params["model"])


@functools.lru_cache(maxsize=32)
def indicator_loss(model_loss: Callable, token_id: int) -> Callable:
    """Wraps a trainer loss over model states into one over :func:`indicator_params` trees.

    One wrapper per ``(model_loss, token_id)``: :func:`metafit.train.fit` caches its compiled step by
    the loss function's identity, so the vanilla and the indicator arm of one model (same graphdef,
    hence the same :func:`~metafit.train.losses.next_token_loss`) share one compilation.
    """

    def loss_fn(params, batch, key):
        return model_loss(with_indicator_row(params, token_id), batch, key)

    return loss_fn


def indicator_trainable(params: dict[str, Any], model_mask: Any = True) -> dict[str, Any]:
    """``trainable=`` mask of :func:`indicator_params` trees: the row always trains.

    ``model_mask`` is the model's own mask (e.g. :func:`metafit.peft.trainable_mask` under LoRA),
    or one bool for the whole model (True = full fine-tuning, False = only the row).
    """
    if isinstance(model_mask, bool):
        model_mask = jax.tree.map(lambda _: model_mask, params["model"])
    return {"model": model_mask, "indicator": True}


__all__ = ["INDICATOR", "add_indicator", "indicator_params", "with_indicator_row", "indicator_loss",
           "indicator_trainable"]
