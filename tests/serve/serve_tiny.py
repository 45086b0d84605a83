"""A tiny Llama folder with a character-level tokenizer and a chat template, built in well under a second.

Imported as ``serve_tiny`` by the tests of metafit.serve (and the generation conventions). The
folder is what transformers' ``save_pretrained`` writes for a random ``LlamaForCausalLM`` (same
``config.json``, ``generation_config.json`` and safetensors names), its weights drawn with numpy:
building it through transformers imports ``modeling_llama`` (1.2 s of CPU in every xdist worker),
though only the generation-conventions test runs transformers (its ``generate`` is the reference
there, reading this folder). The tokenizer maps each printable ASCII character to one id, with
the chat role tokens of metafit's small LM.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # newline last: the printable ids stay those of before
VOCAB = 128  # 6 specials + 96 characters, rounded up
CHAT_TEMPLATE = ("{{ '<|bos|>' }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def char_tokenizer():
    """A transformers fast tokenizer: one id per character (no merges), specials first."""
    import transformers
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|end|>",
        additional_special_tokens=SPECIALS[3:], chat_template=CHAT_TEMPLATE)


LLAMA = dict(  # tests/models/models_tiny.py's llama_config, with this tokenizer's ids and a longer context
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_folder(path, *, seed: int = 0, **config) -> str:
    """Saves a random tiny Llama (eos = ``<|end|>``) and the tokenizer to ``path``; returns it.

    ``config`` overrides :data:`LLAMA`'s fields; ``tie_word_embeddings=True`` writes no ``lm_head``.

    Weights are N(0, 0.2^2) (models_tiny's ``initializer_range``: O(1) logits), norms 1 + N(0, 0.1^2).
    """
    from safetensors.numpy import save_file

    c = {**LLAMA, **config}
    tied = c.pop("tie_word_embeddings", False)
    hidden, head_dim = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv, inner = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim, c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], hidden), "model.norm.weight": (hidden,),
              **({} if tied else {"lm_head.weight": (c["vocab_size"], hidden)})}
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update({layer + "input_layernorm.weight": (hidden,),
                       layer + "post_attention_layernorm.weight": (hidden,),
                       layer + "self_attn.q_proj.weight": (q, hidden), layer + "self_attn.k_proj.weight": (kv, hidden),
                       layer + "self_attn.v_proj.weight": (kv, hidden), layer + "self_attn.o_proj.weight": (hidden, q),
                       layer + "mlp.gate_proj.weight": (inner, hidden), layer + "mlp.up_proj.weight": (inner, hidden),
                       layer + "mlp.down_proj.weight": (hidden, inner)})
    rng = np.random.default_rng(seed)
    tensors = {name: (1.0 + rng.normal(0, 0.1, shape) if name.endswith("norm.weight") else rng.normal(0, 0.2, shape))
               .astype(np.float32) for name, shape in shapes.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **c, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False, "dtype": "float32"}, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"],
         "pad_token_id": c["pad_token_id"]}, indent=2))
    char_tokenizer().save_pretrained(str(path))
    return str(path)


def set_generation_config(path, **fields) -> None:
    """Rewrites ``generation_config.json`` of a saved folder with ``fields``."""
    (Path(path) / "generation_config.json").write_text(json.dumps(fields))
