r"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused q/k/v projection.

.. math::
   h = x + W_{proj}\,\mathrm{Attn}(\mathrm{split}_3(W_{attn}\,\mathrm{LN}_1(x))), \qquad
   y = h + W_{proj}'\,\mathrm{gelu}(W_{fc}\,\mathrm{LN}_2(h))

Projections are :class:`~metafit.models.layers.Conv1D` (an ``nnx.Linear`` whose HF kernel is
stored ``[in, out]``). Paths mirror HF: ``transformer.h[i].attn.c_attn``, ``mlp.c_fc``...
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from . import layers as L
from .base import CommonConfig, DecoderOutput, Family, MODELS, common_from_hf, common_to_hf, per_layer
from .remat import maybe_remat

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(CommonConfig):
    """Architecture of a GPT-2 model (field names as in HF ``GPT2Config``)."""

    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    model_type: str = "gpt2"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer: int, *, rngs: nnx.Rngs):
        h, dt = cfg.n_embd, cfg.jnp_dtype
        self.c_attn = L.linear(h, 3 * h, bias=True, dtype=dt, rngs=rngs, cls=L.Conv1D)
        self.c_proj = L.linear(h, h, bias=True, dtype=dt, rngs=rngs, cls=L.Conv1D)
        self.heads, self.head_dim = cfg.n_head, cfg.head_dim
        self.kv_prefix = None  # prefix-tuning hook (metafit.peft.prefix), duck-typed
        scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def __call__(self, x, allowed, *, cache_kv=None, cache_index=0, bias=None, return_probs=False):
        b, s, _ = x.shape
        q, k, v = (t.reshape(b, s, self.heads, self.head_dim) for t in jnp.split(self.c_attn(x), 3, axis=-1))
        if cache_kv is not None:
            k = L.update_cache(cache_kv[0], k, cache_index)
            v = L.update_cache(cache_kv[1], v, cache_index)
        cached = (k, v)  # the cache holds the model's own keys, never the prefix
        if self.kv_prefix is not None:
            k, v, allowed, bias = self.kv_prefix(k, v, allowed, bias)
        out, probs = L.attend(q, k, v, allowed, scale=self.scale, attention_bias=bias, return_probs=return_probs)
        return self.c_proj(out.reshape(b, s, -1)), probs, cached


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        h, dt = cfg.n_embd, cfg.jnp_dtype
        inner = cfg.n_inner or 4 * h
        self.c_fc = L.linear(h, inner, bias=True, dtype=dt, rngs=rngs, cls=L.Conv1D)
        self.c_proj = L.linear(inner, h, bias=True, dtype=dt, rngs=rngs, cls=L.Conv1D)
        self.act = cfg.activation_function

    def __call__(self, x):
        return self.c_proj(L.activation(self.act)(self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer: int, *, rngs: nnx.Rngs):
        eps, dt = cfg.layer_norm_epsilon, cfg.jnp_dtype
        self.ln_1 = L.LayerNorm(cfg.n_embd, eps=eps, param_dtype=dt)
        self.attn = GPT2Attention(cfg, layer, rngs=rngs)
        self.ln_2 = L.LayerNorm(cfg.n_embd, eps=eps, param_dtype=dt)
        self.mlp = GPT2MLP(cfg, rngs=rngs)

    def __call__(self, x, allowed, **attn_kwargs):
        attn_out, probs, kv = self.attn(self.ln_1(x), allowed, **attn_kwargs)
        x = x + attn_out
        return x + self.mlp(self.ln_2(x)), probs, kv


def _block_output(block, x, allowed, bias):
    """A block's output alone (what rematerialisation recomputes)."""
    return block(x, allowed, bias=bias)[0]


class GPT2Model(nnx.Module):
    """HF ``GPT2Model``: token + position embeddings, blocks ``h``, final ``ln_f``."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.wte = L.embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.jnp_dtype, rngs=rngs)
        self.wpe = L.embed(cfg.n_positions, cfg.n_embd, dtype=cfg.jnp_dtype, rngs=rngs)
        self.h = nnx.List([GPT2Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
        self.ln_f = L.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, param_dtype=cfg.jnp_dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        position_ids=None,
        attention_bias=None,
        cache=None,
        cache_index=0,
        return_attentions=False,
    ):
        b, s = input_ids.shape
        query_slots = L.sequence_slots(s, cache_index)
        key_slots = jnp.arange(cache.max_len if cache is not None else s)
        if position_ids is None:
            position_ids = jnp.broadcast_to(query_slots, (b, s))
        x = self.wte(input_ids) + self.wpe(position_ids)
        allowed = L.attention_allowed(attention_mask, query_slots, key_slots, causal=True)
        biases = per_layer(attention_bias, len(self.h))
        attentions, keys, values = [], [], []
        for i, block in enumerate(self.h):
            if cache is None and not return_attentions:  # training / scoring: the block may be rematerialised
                x = maybe_remat(_block_output)(block, x, allowed, biases[i])
                continue
            x, probs, (k, v) = block(
                x,
                allowed,
                cache_kv=None if cache is None else (cache.keys[i], cache.values[i]),
                cache_index=cache_index,
                bias=biases[i],
                return_probs=return_attentions,
            )
            attentions.append(probs)
            keys.append(k)
            values.append(v)
        new_cache = None if cache is None else L.KVCache(tuple(keys), tuple(values))
        return self.ln_f(x), (tuple(attentions) if return_attentions else None), new_cache


class _GPT2Base(nnx.Module):
    def init_cache(self, batch: int, max_len: int) -> L.KVCache:
        """Zeroed KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
        cfg = self.config
        return L.init_cache(cfg.n_layer, batch, max_len, cfg.n_head, cfg.head_dim, cfg.jnp_dtype)


class GPT2LMHeadModel(_GPT2Base):
    """GPT-2 causal LM. ``model(ids, mask)`` -> logits ``[b, s, vocab]``; see
    :meth:`metafit.models.llama.LlamaForCausalLM.forward` for the keyword arguments."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.transformer = GPT2Model(config, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else L.linear(config.n_embd, config.vocab_size, bias=False, dtype=config.jnp_dtype, rngs=rngs)
        )

    def logits(self, hidden: Array) -> Array:
        if self.lm_head is None:
            return self.transformer.wte.attend(hidden)
        return self.lm_head(hidden)

    def output_matrix(self) -> Array | None:
        """``E [vocab, hidden]`` with :meth:`logits` ``= hidden @ E.T`` (None if the head is not a plain matrix)."""
        return L.output_matrix(self.lm_head, self.transformer.wte)

    def forward(self, input_ids, attention_mask=None, *, compute_logits=True, **kwargs) -> DecoderOutput:
        hidden, attentions, cache = self.transformer(input_ids, attention_mask, **kwargs)
        return DecoderOutput(self.logits(hidden) if compute_logits else None, hidden, attentions, cache)

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> Array:
        return self.forward(input_ids, attention_mask, **kwargs).logits


class GPT2ForSequenceClassification(_GPT2Base):
    """GPT-2 classifier: ``score`` on the last real token -> logits ``[b, classes]``."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.transformer = GPT2Model(config, rngs=rngs)
        self.score = L.linear(config.n_embd, config.num_labels, bias=False, dtype=config.jnp_dtype, rngs=rngs)

    def forward(self, input_ids, attention_mask=None, **kwargs) -> DecoderOutput:
        hidden, attentions, _ = self.transformer(input_ids, attention_mask, **kwargs)
        pooled = L.last_token_pool(hidden, input_ids, attention_mask, self.config.pad_token_id)
        return DecoderOutput(self.score(pooled), hidden, attentions, None)

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> Array:
        return self.forward(input_ids, attention_mask, **kwargs).logits


def config_from_hf(hf, dtype=jnp.float32) -> GPT2Config:
    if getattr(hf, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention is not supported")
    return GPT2Config(
        vocab_size=hf.vocab_size,
        n_embd=hf.n_embd,
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        n_positions=hf.n_positions,
        n_inner=hf.n_inner,
        activation_function=hf.activation_function,
        layer_norm_epsilon=hf.layer_norm_epsilon,
        scale_attn_weights=hf.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=hf.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        **common_from_hf(hf, dtype),
    )


def config_to_hf(cfg: GPT2Config):
    import transformers

    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_positions=cfg.n_positions,
        n_inner=cfg.n_inner,
        activation_function=cfg.activation_function,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        scale_attn_weights=cfg.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=cfg.tie_word_embeddings,
        **common_to_hf(cfg),
    )


MODELS.register(
    "gpt2",
    Family(
        "gpt2",
        "GPT2",
        config_from_hf,
        config_to_hf,
        {"LMHeadModel": GPT2LMHeadModel, "ForSequenceClassification": GPT2ForSequenceClassification},
        "LMHeadModel",
        "transformer",
    ),
    kind="decoder",
)
