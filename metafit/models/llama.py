r"""Llama-family decoders: Llama 2/3, SmolLM2, Qwen2, Mistral.

One pre-norm block, repeated:

.. math::
   h &= x + W_o\,\mathrm{Attn}(\mathrm{RoPE}(W_q n), \mathrm{RoPE}(W_k n), W_v n),
   \quad n = \mathrm{RMSNorm}(x) \\
   y &= h + W_{down}\,(\mathrm{silu}(W_{gate} m) \odot W_{up} m), \quad m = \mathrm{RMSNorm}(h)

with grouped-query attention (``num_key_value_heads`` <= ``num_attention_heads``), optional
q/k/v bias (Qwen2), optional per-layer sliding windows (Mistral, Qwen2) and optionally tied
input/output embeddings (SmolLM2, small Qwen2). Attribute paths mirror HF parameter names
(``model.layers[i].self_attn.q_proj`` is ``model.layers.{i}.self_attn.q_proj.weight``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from . import layers as L
from .base import CommonConfig, DecoderOutput, Family, MODELS, common_from_hf, common_to_hf, per_layer
from .remat import maybe_remat, scan_blocks, scanning
from .rope import RopeConfig, apply_rotary, cos_sin

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(CommonConfig):
    """Architecture of a Llama-family decoder (see HF ``LlamaConfig``/``Qwen2Config``).

    ``qkv_bias``/``o_bias``: bias on q/k/v and on the output projection (Llama's
    ``attention_bias`` sets both; Qwen2 has q/k/v bias only). ``sliding_windows``: one entry per
    layer, None = full attention; empty = no layer slides.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_windows: tuple[Optional[int], ...] = ()
    model_type: str = "llama"

    def window(self, layer: int) -> Optional[int]:
        return self.sliding_windows[layer] if self.sliding_windows else None


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
        h, d, dt = cfg.hidden_size, cfg.head_dim, cfg.jnp_dtype
        self.q_proj = L.linear(h, cfg.num_attention_heads * d, bias=cfg.qkv_bias, dtype=dt, rngs=rngs)
        self.k_proj = L.linear(h, cfg.num_key_value_heads * d, bias=cfg.qkv_bias, dtype=dt, rngs=rngs)
        self.v_proj = L.linear(h, cfg.num_key_value_heads * d, bias=cfg.qkv_bias, dtype=dt, rngs=rngs)
        self.o_proj = L.linear(cfg.num_attention_heads * d, h, bias=cfg.o_bias, dtype=dt, rngs=rngs)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.kv_prefix = None  # prefix-tuning hook (metafit.peft.prefix), duck-typed

    def __call__(self, x, cos, sin, allowed, *, cache_kv=None, cache_index=0, bias=None, return_probs=False):
        b, s, _ = x.shape
        q = apply_rotary(self.q_proj(x).reshape(b, s, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim)
        if cache_kv is not None:
            k = L.update_cache(cache_kv[0], k, cache_index)
            v = L.update_cache(cache_kv[1], v, cache_index)
        cached = (k, v)  # the cache holds the model's own keys, never the prefix
        if self.kv_prefix is not None:
            k, v, allowed, bias = self.kv_prefix(k, v, allowed, bias)
        out, probs = L.attend(
            q, k, v, allowed, scale=self.head_dim**-0.5, attention_bias=bias, return_probs=return_probs
        )
        return self.o_proj(out.reshape(b, s, -1)), probs, cached


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        h, f, dt, bias = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_dtype, cfg.mlp_bias
        self.gate_proj = L.linear(h, f, bias=bias, dtype=dt, rngs=rngs)
        self.up_proj = L.linear(h, f, bias=bias, dtype=dt, rngs=rngs)
        self.down_proj = L.linear(f, h, bias=bias, dtype=dt, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.down_proj(L.activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(cfg, layer, rngs=rngs)
        self.mlp = LlamaMLP(cfg, rngs=rngs)
        pdt = cfg.jnp_dtype
        self.input_layernorm = L.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.post_attention_layernorm = L.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)

    def __call__(self, x, cos, sin, allowed, **attn_kwargs):
        attn_out, probs, kv = self.self_attn(self.input_layernorm(x), cos, sin, allowed, **attn_kwargs)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, probs, kv


def _block_output(layer: LlamaDecoderLayer, x, cos, sin, allowed, bias):
    """A block's output alone (what rematerialisation recomputes)."""
    return layer(x, cos, sin, allowed, bias=bias)[0]


class LlamaModel(nnx.Module):
    """The decoder stack without a head (HF ``LlamaModel``): embeddings, layers, final norm."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = L.embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = L.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.jnp_dtype)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        position_ids: Array | None = None,
        attention_bias=None,
        cache: L.KVCache | None = None,
        cache_index=0,
        return_attentions: bool = False,
    ):
        cfg = self.config
        b, s = input_ids.shape
        query_slots = L.sequence_slots(s, cache_index)
        key_slots = jnp.arange(cache.max_len if cache is not None else s)
        if position_ids is None:
            position_ids = jnp.broadcast_to(query_slots, (b, s))
        x = self.embed_tokens(input_ids)
        cos, sin = cos_sin(cfg.rope, cfg.head_dim, position_ids, x.dtype)
        # Masks differ per layer only through the sliding window; build each distinct one once.
        masks = {}
        biases = per_layer(attention_bias, cfg.num_hidden_layers)
        attentions, new_keys, new_values = [], [], []
        if not return_attentions and scanning():
            for window in {cfg.window(i) for i in range(cfg.num_hidden_layers)}:
                masks[window] = L.attention_allowed(attention_mask, query_slots, key_slots, causal=True, window=window)
            inputs = [(masks[cfg.window(i)], biases[i]) for i in range(cfg.num_hidden_layers)]
            scanned = self._scanned(x, cos, sin, inputs, cache, cache_index)
            if scanned is not None:
                return self.norm(scanned[0]), None, scanned[1]
        for i, layer in enumerate(self.layers):
            window = cfg.window(i)
            if window not in masks:
                masks[window] = L.attention_allowed(attention_mask, query_slots, key_slots, causal=True, window=window)
            if cache is None and not return_attentions:  # training / scoring: the block may be rematerialised
                x = maybe_remat(_block_output)(layer, x, cos, sin, masks[window], biases[i])
                continue
            x, probs, (k, v) = layer(
                x,
                cos,
                sin,
                masks[window],
                cache_kv=None if cache is None else (cache.keys[i], cache.values[i]),
                cache_index=cache_index,
                bias=biases[i],
                return_probs=return_attentions,
            )
            attentions.append(probs)
            new_keys.append(k)
            new_values.append(v)
        new_cache = None if cache is None else L.KVCache(tuple(new_keys), tuple(new_values))
        return self.norm(x), (tuple(attentions) if return_attentions else None), new_cache


    def _scanned(self, x, cos, sin, inputs, cache, cache_index):
        """``(hidden, new cache)`` with the blocks run as one ``lax.scan`` (None when they do not stack).

        With a cache, each layer's key/value buffers are scanned alongside its weights and the
        new cache comes back stacked ``[layers, b, T, kv_heads, head_dim]`` (see
        :class:`~metafit.models.layers.KVCache`), so a generation loop carries it stacked.
        """
        if cache is None:
            step = lambda layer, h, allowed, bias: _block_output(layer, h, cos, sin, allowed, bias)  # noqa: E731
            hidden = scan_blocks(step, list(self.layers), x, inputs)
            return None if hidden is None else (hidden, None)

        def step(layer, h, allowed, bias, kv):
            h, _, kv = layer(h, cos, sin, allowed, cache_kv=kv, cache_index=cache_index, bias=bias)
            return h, kv

        out = scan_blocks(step, list(self.layers), x, inputs, stacked=L.stacked_cache(cache))
        return None if out is None else (out[0], L.KVCache(*out[1]))


class _LlamaBase(nnx.Module):
    config: LlamaConfig

    def init_cache(self, batch: int, max_len: int) -> L.KVCache:
        """Zeroed KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
        cfg = self.config
        return L.init_cache(
            cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim, cfg.jnp_dtype
        )


class LlamaForCausalLM(_LlamaBase):
    """Llama-family causal LM. ``model(ids, mask)`` -> logits ``[b, s, vocab]``.

    Example:
      >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      ...                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
      >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((1, 5), jnp.int32)).shape
      (1, 5, 64)
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else L.linear(config.hidden_size, config.vocab_size, bias=False, dtype=config.jnp_dtype, rngs=rngs)
        )

    def logits(self, hidden: Array) -> Array:
        """Vocabulary logits of final hidden states (for chunked losses over long sequences)."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def output_matrix(self) -> Array | None:
        """``E [vocab, hidden]`` with :meth:`logits` ``= hidden @ E.T`` (None if the head is not a plain matrix)."""
        return L.output_matrix(self.lm_head, self.model.embed_tokens)

    def forward(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        position_ids: Array | None = None,
        attention_bias=None,
        cache: L.KVCache | None = None,
        cache_index=0,
        return_attentions: bool = False,
        compute_logits: bool = True,
    ) -> DecoderOutput:
        """Full forward pass.

        Args:
          input_ids: ``[b, s]`` token ids.
          attention_mask: ``[b, keys]`` 1/0 padding mask over the keys: the ``s`` inputs, or,
            with a cache, all ``cache.max_len`` slots.
          position_ids: ``[b, s]`` RoPE positions; default: slot indices
            (``cache_index + arange(s)``).
          attention_bias: additive pre-softmax bias broadcastable to ``[b, heads, s, keys]``,
            one array for every layer or a sequence with one entry (or None) per layer.
          cache: a :class:`~metafit.models.layers.KVCache`; the new keys/values are written at
            slots ``cache_index .. cache_index + s`` and the updated cache is returned.
          cache_index: first slot of these tokens in the cache (may be traced).
          return_attentions: also return each layer's ``[b, heads, s, keys]`` probabilities.
          compute_logits: skip the vocabulary projection (``logits=None``).
        """
        hidden, attentions, cache = self.model(
            input_ids,
            attention_mask,
            position_ids=position_ids,
            attention_bias=attention_bias,
            cache=cache,
            cache_index=cache_index,
            return_attentions=return_attentions,
        )
        logits = self.logits(hidden) if compute_logits else None
        return DecoderOutput(logits, hidden, attentions, cache)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, **kwargs) -> Array:
        """Logits ``[b, s, vocab]``; keyword arguments as in :meth:`forward`."""
        return self.forward(input_ids, attention_mask, **kwargs).logits


class LlamaForSequenceClassification(_LlamaBase):
    """Llama-family classifier: ``score`` on the last real token -> logits ``[b, classes]``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        self.score = L.linear(config.hidden_size, config.num_labels, bias=False, dtype=config.jnp_dtype, rngs=rngs)

    def forward(self, input_ids, attention_mask=None, *, attention_bias=None, return_attentions=False, **kwargs):
        hidden, attentions, _ = self.model(
            input_ids, attention_mask, attention_bias=attention_bias, return_attentions=return_attentions, **kwargs
        )
        pooled = L.last_token_pool(hidden, input_ids, attention_mask, self.config.pad_token_id)
        return DecoderOutput(self.score(pooled), hidden, attentions, None)

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> Array:
        return self.forward(input_ids, attention_mask, **kwargs).logits


# --------------------------------------------------------------------------------------------
# HF config conversion


def _sliding_windows(hf) -> tuple[Optional[int], ...]:
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    n = hf.num_hidden_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if hf.model_type == "qwen2":
        if not getattr(hf, "use_sliding_window", False):
            return ()
        return tuple(window if i >= hf.max_window_layers else None for i in range(n))
    return (window,) * n if window else ()


def config_from_hf(hf, dtype=jnp.float32) -> LlamaConfig:
    """metafit :class:`LlamaConfig` from a transformers Llama/Qwen2/Mistral config."""
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope_params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None)
    rope_params = dict(rope_params or {})
    rope_params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if hf.model_type == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(getattr(hf, "attention_bias", False))
    windows = _sliding_windows(hf)
    return LlamaConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        rope=RopeConfig.from_hf(rope_params, hf.max_position_embeddings),
        hidden_act=hf.hidden_act,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        sliding_windows=windows if any(w is not None for w in windows) else (),
        model_type=hf.model_type,
        **common_from_hf(hf, dtype),
    )


def config_to_hf(cfg: LlamaConfig):
    """The transformers config (``LlamaConfig``/``Qwen2Config``/``MistralConfig``) for ``cfg``."""
    import transformers

    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.rope.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=cfg.rope.to_hf(),
        **common_to_hf(cfg),
    )
    windows = {w for w in cfg.sliding_windows if w is not None}
    if len(windows) > 1:
        raise ValueError(f"sliding windows {sorted(windows)} differ between layers; HF configs hold one")
    window = windows.pop() if windows else None
    if cfg.model_type == "qwen2":
        if not (cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias):
            raise ValueError("a Qwen2 config has q/k/v bias, no output or MLP bias; this model differs")
        kwargs["use_sliding_window"] = window is not None
        if window is not None:
            kwargs["sliding_window"] = window
            kwargs["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows]
        return transformers.Qwen2Config(**kwargs)
    if cfg.qkv_bias != cfg.o_bias:
        raise ValueError(f"HF {cfg.model_type} configs bias q/k/v/o together; this model has "
                         f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}: save it with model_type='qwen2'")
    if cfg.model_type == "mistral":
        if cfg.qkv_bias or cfg.mlp_bias:
            raise ValueError("a Mistral config has no biases; this model has some")
        return transformers.MistralConfig(sliding_window=window, **kwargs)
    if window is not None:
        raise ValueError("a Llama config has no sliding window; this model has one")
    return transformers.LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **kwargs)


_HEADS = {"ForCausalLM": LlamaForCausalLM, "ForSequenceClassification": LlamaForSequenceClassification}
for _model_type, _prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral")):
    MODELS.register(
        _model_type,
        Family(_model_type, _prefix, config_from_hf, config_to_hf, _HEADS, "ForCausalLM", "model"),
        kind="decoder",
    )
