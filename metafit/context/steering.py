r"""Attention steering towards user tokens and the attention diagnostics (Wang et al. 2024).

Steering (the paper's Method 1) rescales, in every layer and head, the attention on keys that
are not user tokens:

.. math::

   \mathrm{Att}'(x, y) = \frac{1}{Z}\begin{cases} \mathrm{Att}(x, y) & y \in U \\
                                              \alpha\,\mathrm{Att}(x, y) & y \notin U\end{cases},
   \qquad \alpha \in (0, 1],

which is exactly adding :math:`\log\alpha` to the pre-softmax score of every non-user key
(:func:`steering_bias`; the softmax renormalises). :math:`\alpha = 1` is the unsteered model.
At inference use ``metafit.models.generate(..., steer=(user_mask, alpha))``, which extends the
mask over the cache slots of the generated (non-user) tokens.

Diagnosis: :func:`user_attention` is the attention mass on user tokens at the last position,
:math:`m_{l,h} = \frac{1}{B}\sum_b \sum_{y \in U_b} \mathrm{Att}^{(l,h)}_b(\text{last}, y)`,
read from a prefill plus a one-token cached forward (one ``[b, heads, 1, keys]`` row per layer,
never the ``[b, heads, s, s]`` maps). :func:`retrieval_head` is the middle-layer head with the
largest mass over a set of needle-in-a-haystack prompts.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.models.generate import require_attention_hook, steering_inputs
from metafit.models.layers import positions_from_mask

from .conversation import encode_conversation, left_pad


def steering_bias(user_mask, alpha: float) -> jax.Array:
    """Additive pre-softmax bias ``[b, 1, 1, keys]``: ``log(alpha)`` on non-user keys, 0 on user keys.

    Args:
      user_mask: ``[b, keys]`` (or ``[keys]``), 1 on user tokens.
      alpha: attention scale of non-user keys, in ``(0, 1]``.

    Raises:
      ValueError: ``alpha`` outside ``(0, 1]`` or a mask that is not 1-D/2-D.

    Example:
      >>> bias = steering_bias(jnp.array([[0, 1, 1, 0]]), 0.5)
      >>> logits = model.forward(ids, attention_bias=bias).logits          # doctest: +SKIP
    """
    user_mask = np.asarray(user_mask)
    if user_mask.ndim not in (1, 2):
        raise ValueError(f"user_mask must be [batch, keys] or [keys], got shape {user_mask.shape}")
    mask, log_alpha = steering_inputs((user_mask, alpha), user_mask.shape if user_mask.ndim == 2 else
                                      (1, user_mask.shape[0]))
    return jnp.where(jnp.asarray(mask) != 0, 0.0, jnp.float32(log_alpha))[:, None, None, :]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _last_row_mass(graphdef, state, ids, mask, user, log_alpha):
    """``[b, layers, heads]`` user-token attention mass of the last position (prefill + one cached step)."""
    model = nnx.merge(graphdef, state)
    b, s = ids.shape
    positions = positions_from_mask(mask)
    bias = jnp.where(user != 0, 0.0, log_alpha)[:, None, None, :]
    cache = model.init_cache(b, s)
    if s > 1:
        cache = model.forward(ids[:, :-1], mask, position_ids=positions[:, :-1], cache=cache, cache_index=0,
                              attention_bias=bias, compute_logits=False).cache
    last = model.forward(ids[:, -1:], mask, position_ids=positions[:, -1:], cache=cache, cache_index=s - 1,
                         attention_bias=bias, return_attentions=True, compute_logits=False)
    rows = jnp.stack([a[:, :, 0, :] for a in last.attentions], axis=1)  # [b, layers, heads, keys]
    return jnp.einsum("blhk,bk->blh", rows, (user != 0).astype(rows.dtype))


def user_attention(model, input_ids, user_mask, *, attention_mask=None, alpha: float = 1.0) -> jax.Array:
    """User-token attention mass at the last position, ``[layers, heads]``, averaged over the batch.

    Args:
      model: a metafit causal LM with the attention hook.
      input_ids: ``[b, s]`` (or ``[s]``); padded rows need ``attention_mask`` with padding on the
        left (the last position must be a real token). Positions skip padding, as in generation.
      user_mask: ``[b, s]`` 1 on user tokens.
      attention_mask: ``[b, s]`` 1 = token, 0 = padding.
      alpha: steer while measuring (1 = unsteered).

    Raises:
      ValueError: a mask of another shape than ``input_ids``, alpha outside (0, 1], or a row
        whose last token is padding.
      TypeError: a model without the attention hook.
    """
    require_attention_hook(model)
    ids = np.asarray(input_ids, np.int32)
    ids = ids[None] if ids.ndim == 1 else ids
    user, log_alpha = steering_inputs((user_mask, alpha), ids.shape)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32).reshape(ids.shape)
    if not mask[:, -1].all():
        raise ValueError("user_attention reads the last position: left-pad the rows (attention_mask[:, -1] must be 1)")
    graphdef, state = nnx.split(model)
    mass = _last_row_mass(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(user),
                          jnp.float32(log_alpha))
    return mass.mean(axis=0)


def prompt_attention(model, tokenizer, prompts: Sequence[str], *, template: bool = True, alpha: float = 1.0,
                     batch_size: int = 8) -> np.ndarray:
    """Mean user-token attention mass ``[layers, heads]`` at the generation position of user prompts.

    Each prompt is one user message, rendered with the chat template (and the assistant header)
    when ``template``; the mass is averaged over all prompts.
    """
    encoded = [encode_conversation(tokenizer, [{"role": "user", "content": p}], template=template,
                                   generation_prompt=template) for p in prompts]
    length = max(len(e.ids) for e in encoded)
    total = 0.0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = left_pad([e.ids for e in chunk], length)
        user, _ = left_pad([e.user_mask for e in chunk], length)
        total = total + np.asarray(user_attention(model, ids, user, attention_mask=mask, alpha=alpha)) * len(chunk)
    return total / len(encoded)


def middle_layers(num_layers: int) -> range:
    """Layers ``[L/4, 3L/4)`` (at least one): where the paper looks for the retrieval head."""
    lo = num_layers // 4
    return range(lo, max(lo + 1, (3 * num_layers) // 4))


def retrieval_head(model, tokenizer, probes: Sequence[str], *, layers: Sequence[int] | None = None,
                   template: bool = True) -> tuple[int, int]:
    """``(layer, head)`` with the most user-token attention at the last position over ``probes``.

    Args:
      probes: user messages, typically needle-in-a-haystack prompts.
      layers: layers to search (default :func:`middle_layers`).
      template: render the probes with the chat template.
    """
    if not probes:
        raise ValueError("retrieval_head needs at least one probe prompt")
    mass = prompt_attention(model, tokenizer, probes, template=template)
    layers = list(middle_layers(mass.shape[0]) if layers is None else layers)
    if any(not 0 <= l < mass.shape[0] for l in layers):
        raise ValueError(f"layers {layers} outside the model's {mass.shape[0]} layers")
    sub = mass[layers]
    layer, head = np.unravel_index(int(np.argmax(sub)), sub.shape)
    return int(layers[layer]), int(head)
