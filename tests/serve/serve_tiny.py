"""A tiny Llama folder with a character-level tokenizer and a chat template, built in well under a second.

Imported as ``serve_tiny`` by the tests of metafit.serve (and the generation conventions). The
model is a random transformers ``LlamaForCausalLM`` (tests/models/models_tiny.py) saved with
``save_pretrained``, so transformers' ``generate`` is the reference; the tokenizer maps each
printable ASCII character to one id, with the chat role tokens of metafit's small LM.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
# models_tiny (torch, transformers) is imported by the functions that build: collecting the tests stays cheap

SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = [chr(c) for c in range(32, 127)]
VOCAB = 128  # 6 specials + 95 characters, rounded up
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


def tiny_folder(path, *, seed: int = 0, **config) -> str:
    """Saves the tiny model (eos = ``<|end|>``) and the tokenizer to ``path``; returns it."""
    from models_tiny import build, llama_config, save

    tokenizer = char_tokenizer()
    settings = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=128)
    reference = build("LlamaForCausalLM", llama_config(**{**settings, **config}), seed=seed)
    save(reference, path)
    tokenizer.save_pretrained(str(path))
    return str(path)


def set_generation_config(path, **fields) -> None:
    """Rewrites ``generation_config.json`` of a saved folder with ``fields``."""
    (Path(path) / "generation_config.json").write_text(json.dumps(fields))
