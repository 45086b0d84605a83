"""GGUF files (llama.cpp's format): metadata -> HF config, tensors -> HF names, vocab -> tokenizer.

Quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised to float32 with the
``gguf`` package, then cast to the requested dtype. llama.cpp's converter permutes the rows of
``attn_q``/``attn_k`` of ``llama``-architecture models from HF's rotate-half RoPE layout to the
interleaved one; :func:`unpermute_rotary` undoes it so the weights match HF exactly.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.").
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name, or None for tensors metafit has no use for."""
    stem, _, leaf = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{leaf}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{leaf}"
    return None


def gguf_tensor_name(hf_name: str) -> str:
    """Inverse of :func:`hf_tensor_name` (used to write GGUF files in tests)."""
    for gg, hf in _TOP_NAMES.items():
        if hf_name.startswith(hf + "."):
            return gg + hf_name[len(hf):]
    parts = hf_name.split(".")
    layer, rest = parts[2], ".".join(parts[3:-1])
    reverse = {v: k for k, v in _BLOCK_NAMES.items()}
    return f"blk.{layer}.{reverse[rest]}.{parts[-1]}"


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows (what ``convert_hf_to_gguf`` does)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaved rows -> HF rotate-half rows (inverse of :func:`permute_rotary`)."""
    shape = weight.shape
    return weight.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class GGUFCheckpoint:
    """A GGUF file seen as an HF checkpoint: ``config``, ``names``, ``get_tensor(hf_name)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fields, infos = read_gguf(self.path)
        self.architecture = self.fields.get("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"GGUF architecture '{self.architecture}' in {self.path} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if "rope_freqs.weight" in infos:
            raise ValueError(
                f"{self.path} stores per-frequency RoPE factors (rope_freqs.weight); metafit cannot map them "
                "to an HF rope config yet"
            )
        self._tensors = {hf_tensor_name(n): info for n, info in infos.items() if hf_tensor_name(n) is not None}
        self.names = set(self._tensors)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.config = self._hf_config()

    def _get(self, key: str, default=None):
        return self.fields.get(f"{self.architecture}.{key}", default)

    def _hf_config(self):
        import transformers

        hidden = int(self._get("embedding_length"))
        heads = int(self._get("attention.head_count"))
        kv_heads = int(self._get("attention.head_count_kv", heads))
        vocab = int(self._tensors["model.embed_tokens.weight"].shape[0])
        rope = {"rope_type": "default", "rope_theta": float(self._get("rope.freq_base", 10000.0))}
        scaling = self._get("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling not in ("linear", "yarn"):
                raise ValueError(f"GGUF rope scaling '{scaling}' is not supported")
            rope.update(rope_type=scaling, factor=float(self._get("rope.scaling.factor")))
            if scaling == "yarn":
                rope["original_max_position_embeddings"] = int(self._get("rope.scaling.original_context_length"))
        token_id = lambda key: self.fields.get(f"tokenizer.ggml.{key}")  # noqa: E731
        kwargs = dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(self._get("feed_forward_length")),
            num_hidden_layers=int(self._get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(self._get("attention.key_length", hidden // heads)),
            max_position_embeddings=int(self._get("context_length", 2048)),
            rms_norm_eps=float(self._get("attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            rope_parameters=rope,
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            pad_token_id=token_id("padding_token_id"),
        )
        if self.architecture == "qwen2":
            return transformers.Qwen2Config(**kwargs)
        has_bias = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        return transformers.LlamaConfig(attention_bias=has_bias, **kwargs)

    def get_tensor(self, name: str) -> np.ndarray:
        """The tensor's values as float32 in HF layout (dequantised, RoPE rows un-permuted)."""
        import gguf

        info = self._tensors[name]
        qtype = gguf.GGMLQuantizationType(info.qtype)
        byte_shape = gguf.quant_shape_to_byte_shape(info.shape, qtype)
        # A plain ndarray view: numpy memmap subclasses pay a finalize hook on every slice.
        raw = np.asarray(self._data[info.offset: info.offset + int(np.prod(byte_shape))]).reshape(byte_shape)
        data = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(info.shape)
        if self.architecture == "llama":
            if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
                data = unpermute_rotary(data, self.config.num_attention_heads)
            elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
                data = unpermute_rotary(data, self.config.num_key_value_heads)
        return data

    # ----------------------------------------------------------------------------------------
    # tokenizer

    def tokenizer(self):
        """A transformers fast tokenizer rebuilt from the GGUF vocabulary and merges."""
        import transformers

        tokens = self.fields["tokenizer.ggml.tokens"]
        kind = self.fields.get("tokenizer.ggml.model")
        if kind == "gpt2" and self.fields.get("tokenizer.ggml.pre", "default") in _BYTE_LEVEL_SPLITS:
            backend = self._byte_level_tokenizer()
        else:
            # Sentencepiece and less common byte-level variants: transformers' GGUF converter.
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                convert_gguf_tokenizer,
                get_gguf_tokenizer,
            )

            architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(self.path))
            backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)

        def special(key):
            token_id = self.fields.get(f"tokenizer.ggml.{key}")
            return tokens[token_id] if token_id is not None else None

        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=special("bos_token_id"),
            eos_token=special("eos_token_id"),
            unk_token=special("unknown_token_id"),
            pad_token=special("padding_token_id"),
            chat_template=self.fields.get("tokenizer.chat_template"),
        )

    def _byte_level_tokenizer(self):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

        tokens = self.fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in self.fields.get("tokenizer.ggml.merges", [])]
        pre = self.fields.get("tokenizer.ggml.pre", "default")
        bpe = models.BPE(
            vocab={token: i for i, token in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in _IGNORE_MERGES,
        )
        tokenizer = Tokenizer(bpe)
        split = _BYTE_LEVEL_SPLITS[pre]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=split is None)
        if pre == "smollm":
            # SmolLM's merges were learned on digits split one by one (its vocab has no "12").
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        elif split is not None:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
            )
        else:
            tokenizer.pre_tokenizer = byte_level
        tokenizer.decoder = decoders.ByteLevel()
        types = self.fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
        )
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
        bos_id = self.fields.get("tokenizer.ggml.bos_token_id")
        if self.fields.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
            bos = tokens[bos_id]
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            )
        else:
            tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        return tokenizer


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp ``tokenizer.ggml.pre`` -> split regex before byte-level (None: GPT-2's own regex).
_BYTE_LEVEL_SPLITS = {
    "default": None,
    "gpt-2": None,
    "gpt2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
_IGNORE_MERGES = {"llama-bpe", "llama3"}


# --------------------------------------------------------------------------------------------
# a lean GGUF reader: gguf.GGUFReader builds a numpy view per vocabulary string (seconds for a
# 49k vocabulary); parsing the header with struct takes milliseconds. Dequantisation stays with
# the gguf package.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFTensorInfo(NamedTuple):
    qtype: int
    shape: tuple[int, ...]  # numpy order (GGML lists dims fastest-first; reversed here)
    offset: int  # absolute byte offset in the file


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
    """Metadata and tensor table of a GGUF (v2/v3) file, without reading tensor data."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def take(fmt):
        nonlocal pos
        value = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value[0]

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8", errors="replace")

    def value(kind):
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            elem, count = take("<I"), take("<Q")
            return [value(elem) for _ in range(count)]
        return take(_SCALARS[kind])

    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {buf[:4]!r})")
    pos = 4
    version = take("<I")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is too old (need 2 or 3)")
    n_tensors, n_fields = take("<Q"), take("<Q")
    fields = {}
    for _ in range(n_fields):
        key = string()
        fields[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, take("<I"), tuple(reversed(dims)), take("<Q")))
    alignment = int(fields.get("general.alignment", 32))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = {name: GGUFTensorInfo(qtype, shape, data_start + offset) for name, qtype, shape, offset in infos}
    return fields, tensors
