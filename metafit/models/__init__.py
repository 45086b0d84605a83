"""Transformer models in Flax NNX, loaded from HF folders, GGUF files or embedded packages.

transformers 5 has no Flax classes, so metafit owns the module code and reads checkpoints
itself. Families (registered in :data:`MODELS` by HF ``model_type``):

* ``llama`` / ``qwen2`` / ``mistral`` -- :mod:`metafit.models.llama` (SmolLM2, Llama 2/3,
  Qwen2: GQA, RoPE with linear/dynamic/llama3/yarn scaling, RMSNorm, SwiGLU, tied embeddings,
  q/k/v bias, sliding windows), causal LM and sequence-classification heads;
* ``gpt2`` -- :mod:`metafit.models.gpt2`, causal LM and sequence-classification heads;
* ``bert`` -- :mod:`metafit.models.bert` (BERT, MiniLM), encoder and classification head.

Public API::

    model, tokenizer = metafit.models.load("smollm2-135m-instruct")  # or an HF folder / .gguf
    logits = model(input_ids, attention_mask)          # causal LM: [b, s, vocab]
    hidden = encoder(input_ids, attention_mask)        # BertModel: [b, s, hidden]
    out = model.forward(ids, attention_bias=bias, return_attentions=True)   # steering, probs
    ids = metafit.models.generate(model, prompt_ids, max_new_tokens=32)
    metafit.models.save(model, "out/", tokenizer)      # transformers loads it back

Untrusted files
---------------
Model folders and GGUF files are read as untrusted input (:mod:`metafit.models.model_files`):
weights and index entries must be regular files inside the folder, a config or tokenizer config
with ``auto_map`` is refused (the folder's own code never runs), safetensors headers and GGUF
tables are validated before use, and tensor names and shapes are checked against the config
before the model is built. Every bad file raises :class:`MalformedWeightsError` (a
``ValueError``; :class:`CheckpointMismatch` is its subclass for tensors that do not fit the
config) naming the file, the tensor, entry or field, and what is wrong.

Parameter naming (what PEFT and sharding rules rely on)
-------------------------------------------------------
Attribute paths mirror HF parameter names exactly, so the HF name of every parameter is its
NNX path joined by dots with the leaf renamed ``kernel``/``embedding`` -> ``weight``:

==============================================  ================================================
NNX path                                        HF tensor
==============================================  ================================================
``model.layers[3].self_attn.q_proj.kernel``     ``model.layers.3.self_attn.q_proj.weight`` (T)
``model.layers[3].mlp.gate_proj.kernel``        ``model.layers.3.mlp.gate_proj.weight`` (T)
``model.embed_tokens.embedding``                ``model.embed_tokens.weight``
``lm_head.kernel`` (None when tied)             ``lm_head.weight`` (T)
``transformer.h[0].attn.c_attn.kernel``         ``transformer.h.0.attn.c_attn.weight``
``encoder.layer[1].attention.self.query.kernel``  ``encoder.layer.1.attention.self.query.weight`` (T)
==============================================  ================================================

(T) = transposed: projections are ``nnx.Linear`` with ``[in, out]`` kernels, PyTorch stores
``[out, in]``. GPT-2's projections are :class:`~metafit.models.layers.Conv1D`, a subclass of
``nnx.Linear`` whose HF layout is already ``[in, out]``. Every projection is an ``nnx.Linear``
(``isinstance`` holds), so LoRA can select them by type and by path pattern such as
``r"self_attn\\.(q|v)_proj"``; the module path joined by dots is the HF module name that HF
PEFT's ``target_modules`` and ``adapter_model.safetensors`` keys use. Norms use HF names
(``weight``, ``bias``). Lists of layers are ``nnx.List`` (path element = layer index).
Parameters of type ``nnx.LoRAParam`` are never written by :func:`save` (merge them first), and
``base_layer`` path components (PEFT wrappers) are dropped from HF names.

Conventions
-----------
* Every attention module (``LlamaAttention``, ``GPT2Attention``, ``BertSelfAttention``) has a
  ``kv_prefix`` hook (None by default; :mod:`metafit.peft.prefix` sets it) called after RoPE and
  the KV-cache write, and integer ``heads``/``kv_heads``/``head_dim`` attributes.
* A plain forward uses slot indices as positions (transformers' default); :func:`generate`
  uses ``cumsum(mask) - 1`` so left padding does not shift positions.
* Decoder classification heads pool the last token with ``attention_mask == 1`` when a mask is
  given (transformers pools the last token ``!= pad_token_id``; the two agree whenever padding
  uses the pad id).
* Models have no dropout: they are deterministic functions of their inputs.
"""
from . import bert, gpt2, llama  # noqa: F401  (registers the families)
from .base import MODELS, DecoderOutput, EncoderOutput, Family, family_of
from .bert import BertConfig, BertForSequenceClassification, BertModel, mean_pool
from .convert import CheckpointMismatch, MalformedWeightsError, hf_layout, to_hf_tensors
from .generate import filter_logits, generate
from .gpt2 import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from .layers import Conv1D, KVCache
from .llama import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
from .loading import EMBEDDED, load, resolve, save, save_folder
from .rope import RopeConfig

__all__ = [
    "MODELS",
    "EMBEDDED",
    "load",
    "save",
    "save_folder",
    "generate",
    "resolve",
    "filter_logits",
    "mean_pool",
    "family_of",
    "Family",
    "DecoderOutput",
    "EncoderOutput",
    "KVCache",
    "Conv1D",
    "CheckpointMismatch",
    "MalformedWeightsError",
    "hf_layout",
    "to_hf_tensors",
    "RopeConfig",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2ForSequenceClassification",
    "BertConfig",
    "BertModel",
    "BertForSequenceClassification",
]
