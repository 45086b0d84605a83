"""What every model family shares: outputs, config fields, the family record and the registry.

A *family* (:class:`Family`) ties one HF ``model_type`` to metafit's NNX classes and to the two
config converters (HF ``PretrainedConfig`` <-> metafit's frozen dataclass). Families are
registered in :data:`MODELS` under their HF ``model_type``; ``metafit list`` shows them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from metafit.registry import Registry

from .layers import KVCache

Array = jax.Array

MODELS: Registry["Family"] = Registry("model")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationDefaults:
    """A model's default generation settings (an HF folder's ``generation_config.json``).

    :func:`metafit.models.generate` uses them for every argument left ``None``, as transformers'
    ``generate`` does. The defaults here (no file) are greedy decoding with the config's eos ids.

    Attributes:
      eos_token_ids: ids that end a sequence; None = the model config's ``eos_token_ids``.
      do_sample: sample (at ``temperature``, ``top_k``, ``top_p``) instead of greedy decoding.
      temperature, top_k, top_p: sampling settings (``top_k``/``top_p`` None = off).
      max_new_tokens: default number of tokens to generate (None = the caller must say).
    """

    eos_token_ids: Optional[tuple[int, ...]] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    max_new_tokens: Optional[int] = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonConfig:
    """Fields every family config has. Frozen and hashable: it lives in the NNX graphdef.

    Attributes:
      dtype: parameter and compute dtype name (``"float32"``, ``"bfloat16"``).
      bos_token_id, pad_token_id: special token ids from the HF config (or None).
      eos_token_ids: all end-of-sequence ids (HF allows an int or a list).
      id2label: class names of a sequence-classification head, in label order.
      generation: default generation settings (from ``generation_config.json`` when loaded from a folder).
    """

    dtype: str = "float32"
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    id2label: tuple[str, ...] = ()
    generation: GenerationDefaults = GenerationDefaults()

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


def common_from_hf(hf, dtype) -> dict[str, Any]:
    """The :class:`CommonConfig` fields read from a transformers config."""
    eos = getattr(hf, "eos_token_id", None)
    eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
    num_labels = getattr(hf, "num_labels", 2)
    id2label = getattr(hf, "id2label", None) or {i: f"LABEL_{i}" for i in range(num_labels)}
    return dict(
        dtype=jnp.dtype(dtype).name,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=eos,
        pad_token_id=getattr(hf, "pad_token_id", None),
        id2label=tuple(str(id2label[i]) for i in sorted(int(k) for k in id2label)),
    )


def common_to_hf(cfg: CommonConfig) -> dict[str, Any]:
    eos = cfg.eos_token_ids
    return dict(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=(eos[0] if len(eos) == 1 else list(eos)) if eos else None,
        pad_token_id=cfg.pad_token_id,
        id2label={i: label for i, label in enumerate(cfg.id2label)},
        label2id={label: i for i, label in enumerate(cfg.id2label)},
        dtype=cfg.dtype,
    )


class DecoderOutput(NamedTuple):
    """What a causal decoder's ``forward`` returns.

    Attributes:
      logits: ``[b, s, vocab]`` (or ``[b, classes]`` for a classification head; None when
        ``compute_logits=False``).
      hidden_states: final-norm hidden states ``[b, s, hidden]``.
      attentions: per layer ``[b, heads, s, keys]`` probabilities when requested, else None.
      cache: the updated :class:`KVCache` when one was passed, else None.
    """

    logits: Optional[Array]
    hidden_states: Array
    attentions: Optional[tuple[Array, ...]]
    cache: Optional[KVCache]


class EncoderOutput(NamedTuple):
    """What an encoder's ``forward`` returns (``pooled``/``logits`` None when the head is absent)."""

    last_hidden_state: Array
    pooled: Optional[Array]
    logits: Optional[Array]
    attentions: Optional[tuple[Array, ...]]


def per_layer(bias, num_layers: int) -> Sequence[Optional[Array]]:
    """Expands ``attention_bias`` (None, one array for all layers, or one per layer) to a list."""
    if bias is None or not isinstance(bias, (list, tuple)):
        return [bias] * num_layers
    if len(bias) != num_layers:
        raise ValueError(f"attention_bias has {len(bias)} entries; the model has {num_layers} layers")
    return list(bias)


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF ``model_type`` in metafit.

    Attributes:
      model_type: the HF ``model_type`` (``"llama"``, ``"qwen2"``, ``"gpt2"``, ``"bert"``...).
      class_prefix: HF class-name prefix (``"Llama"``, ``"Qwen2"``, ``"GPT2"``, ``"Bert"``).
      config_from_hf: ``(hf_config, dtype) -> metafit config``.
      config_to_hf: ``metafit config -> transformers PretrainedConfig``.
      heads: HF class-name suffix (``"ForCausalLM"``, ``"Model"``...) -> NNX class.
      default_head: suffix used when the checkpoint names an architecture metafit lacks.
      base_prefix: HF ``base_model_prefix`` (``"model"``, ``"transformer"``, ``"bert"``): head
        checkpoints carry it, base-model checkpoints do not; loading accepts both.
    """

    model_type: str
    class_prefix: str
    config_from_hf: Callable[[Any, Any], Any]
    config_to_hf: Callable[[Any], Any]
    heads: dict[str, type]
    default_head: str
    base_prefix: str

    def model_class(self, architecture: str | None) -> type:
        """The NNX class for an HF architecture name like ``"Qwen2ForCausalLM"``."""
        if architecture and architecture.startswith(self.class_prefix):
            suffix = architecture[len(self.class_prefix):]
            if suffix in self.heads:
                return self.heads[suffix]
        return self.heads[self.default_head]

    def architecture(self, model) -> str:
        """The HF architecture name transformers should instantiate for ``model``."""
        for suffix, cls in self.heads.items():
            if type(model) is cls:
                return self.class_prefix + suffix
        raise TypeError(f"{type(model).__name__} is not a {self.model_type} model class")


def family_of(model_type: str) -> Family:
    """The registered :class:`Family` for an HF ``model_type`` (unknown types list the valid ones)."""
    return MODELS.get(model_type)
