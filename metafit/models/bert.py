r"""BERT encoders (BERT, MiniLM, all-MiniLM-L6-v2) with an optional sequence-classification head.

Post-LayerNorm blocks with bidirectional attention:

.. math::
   h = \mathrm{LN}(x + W_o\,\mathrm{Attn}(W_q x, W_k x, W_v x)), \qquad
   y = \mathrm{LN}(h + W_2\,\mathrm{gelu}(W_1 h))

Embeddings are word + absolute position + token type, then LayerNorm. The classifier reads
``tanh(W_p h_{[CLS]})`` (the pooler). Paths mirror HF: ``encoder.layer[i].attention.self.query``,
``attention.output.dense``, ``intermediate.dense``, ``output.LayerNorm``... Dropout is omitted:
metafit's models are deterministic functions of their inputs (adapters bring their own dropout).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from . import layers as L
from .base import CommonConfig, EncoderOutput, Family, MODELS, common_from_hf, common_to_hf, per_layer

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig(CommonConfig):
    """Architecture of a BERT encoder (field names as in HF ``BertConfig``)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    add_pooling_layer: bool = True
    model_type: str = "bert"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _linear(cfg: BertConfig, n_in: int, n_out: int, rngs):
    return L.linear(n_in, n_out, bias=True, dtype=cfg.jnp_dtype, rngs=rngs)


def _norm(cfg: BertConfig):
    return L.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=cfg.jnp_dtype)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        dt = cfg.jnp_dtype
        self.word_embeddings = L.embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, rngs=rngs)
        self.position_embeddings = L.embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dt, rngs=rngs)
        self.token_type_embeddings = L.embed(cfg.type_vocab_size, cfg.hidden_size, dtype=dt, rngs=rngs)
        self.LayerNorm = _norm(cfg)

    def __call__(self, input_ids, token_type_ids, position_ids):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(position_ids))


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.query, self.key, self.value = (_linear(cfg, h, h, rngs) for _ in range(3))
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.kv_prefix = None  # prefix-tuning hook (metafit.peft.prefix), duck-typed

    def __call__(self, x, allowed, *, bias=None, return_probs=False):
        b, s, _ = x.shape
        q, k, v = (proj(x).reshape(b, s, self.heads, self.head_dim) for proj in (self.query, self.key, self.value))
        if self.kv_prefix is not None:
            k, v, allowed, bias = self.kv_prefix(k, v, allowed, bias)
        out, probs = L.attend(q, k, v, allowed, scale=self.head_dim**-0.5, attention_bias=bias, return_probs=return_probs)
        return out.reshape(b, s, -1), probs


class BertSelfOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, rngs)
        self.LayerNorm = _norm(cfg)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, rngs=rngs)
        self.output = BertSelfOutput(cfg, rngs=rngs)

    def __call__(self, x, allowed, **kwargs):
        attended, probs = self.self(x, allowed, **kwargs)
        return self.output(attended, x), probs


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return L.activation(self.act)(self.dense(x))


class BertOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)
        self.LayerNorm = _norm(cfg)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, rngs=rngs)
        self.output = BertOutput(cfg, rngs=rngs)

    def __call__(self, x, allowed, **kwargs):
        h, probs = self.attention(x, allowed, **kwargs)
        return self.output(self.intermediate(h), h), probs


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class BertPooler(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, rngs)

    def __call__(self, hidden):
        return jnp.tanh(self.dense(hidden[:, 0]))


class BertModel(nnx.Module):
    """HF ``BertModel``. ``model(ids, mask)`` -> last hidden states ``[b, s, hidden]``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.encoder = BertEncoder(config, rngs=rngs)
        self.pooler = BertPooler(config, rngs=rngs) if config.add_pooling_layer else None

    def forward(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        attention_bias=None,
        return_attentions: bool = False,
    ) -> EncoderOutput:
        """Encodes ``input_ids`` ``[b, s]``.

        Args:
          attention_mask: ``[b, s]`` 1 = token, 0 = padding (padding keys are never attended).
          token_type_ids: ``[b, s]`` segment ids (default zeros).
          position_ids: ``[b, s]`` (default ``arange(s)``).
          attention_bias: additive pre-softmax bias broadcastable to ``[b, heads, s, s]``, one
            array for every layer or one entry per layer.
          return_attentions: also return each layer's ``[b, heads, s, s]`` probabilities.
        """
        b, s = input_ids.shape
        slots = jnp.arange(s)
        if position_ids is None:
            position_ids = jnp.broadcast_to(slots, (b, s))
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, s), jnp.int32)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        allowed = L.attention_allowed(attention_mask, slots, slots, causal=False)
        attentions = []
        for layer, bias in zip(self.encoder.layer, per_layer(attention_bias, len(self.encoder.layer))):
            x, probs = layer(x, allowed, bias=bias, return_probs=return_attentions)
            attentions.append(probs)
        pooled = self.pooler(x) if self.pooler is not None else None
        return EncoderOutput(x, pooled, None, tuple(attentions) if return_attentions else None)

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> Array:
        return self.forward(input_ids, attention_mask, **kwargs).last_hidden_state


class BertForSequenceClassification(nnx.Module):
    """HF ``BertForSequenceClassification``: ``classifier(pooler(h))`` -> logits ``[b, classes]``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        config = dataclasses.replace(config, add_pooling_layer=True)
        self.config = config
        self.bert = BertModel(config, rngs=rngs)
        self.classifier = _linear(config, config.hidden_size, config.num_labels, rngs)

    def forward(self, input_ids, attention_mask=None, **kwargs) -> EncoderOutput:
        out = self.bert.forward(input_ids, attention_mask, **kwargs)
        return out._replace(logits=self.classifier(out.pooled))

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> Array:
        return self.forward(input_ids, attention_mask, **kwargs).logits


def mean_pool(hidden: Array, attention_mask: Array | None = None, *, normalize: bool = True) -> Array:
    r"""Sentence embedding: mean of token states over real tokens, optionally L2-normalised.

    :math:`e = \sum_t m_t h_t / \sum_t m_t` (sentence-transformers' ``all-MiniLM-L6-v2`` recipe,
    followed by :math:`e / \lVert e \rVert`).
    """
    if attention_mask is None:
        attention_mask = jnp.ones(hidden.shape[:2], hidden.dtype)
    weights = attention_mask.astype(hidden.dtype)[..., None]
    pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


def config_from_hf(hf, dtype=jnp.float32) -> BertConfig:
    if getattr(hf, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"BERT position_embedding_type '{hf.position_embedding_type}' is not supported")
    if getattr(hf, "is_decoder", False):
        raise ValueError("BERT as a decoder is not supported")
    return BertConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        hidden_act=hf.hidden_act,
        max_position_embeddings=hf.max_position_embeddings,
        type_vocab_size=hf.type_vocab_size,
        layer_norm_eps=hf.layer_norm_eps,
        **common_from_hf(hf, dtype),
    )


def config_to_hf(cfg: BertConfig):
    import transformers

    return transformers.BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        **common_to_hf(cfg),
    )


MODELS.register(
    "bert",
    Family(
        "bert",
        "Bert",
        config_from_hf,
        config_to_hf,
        {"Model": BertModel, "ForSequenceClassification": BertForSequenceClassification},
        "Model",
        "bert",
    ),
    kind="encoder",
)
