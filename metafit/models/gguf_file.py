"""GGUF files (llama.cpp's format): metadata -> HF config, tensors -> HF names, vocab -> tokenizer.

Quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised to float32 with the
``gguf`` package, then cast to the requested dtype. llama.cpp's converter permutes the rows of
``attn_q``/``attn_k`` of ``llama``-architecture models from HF's rotate-half RoPE layout to the
interleaved one; :func:`unpermute_rotary` undoes it so the weights match HF exactly.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .convert import MalformedWeightsError
from .model_files import check_layer_claim, open_regular

# GGUF architectures whose tensors use llama.cpp's llama block names (below); their configs come from
# transformers' own GGUF table. llama.cpp writes Mistral models as "llama" (told apart by
# general.name, as transformers does), and permutes the q/k rows of both.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_PERMUTED_ROTARY = ("llama", "mistral")
_REQUIRED_FIELDS = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "layer_norm_eps")

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


_MISSING = object()


def _is_a(value, kind: type) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


class GGUFCheckpoint:
    """A GGUF file seen as an HF checkpoint: ``config``, ``names``, ``shapes``, ``get_tensor(hf_name)``.

    Every metadata value used is checked for presence, type and range; a bad one raises
    :class:`MalformedWeightsError` naming the field.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fields, infos = read_gguf(self.path)
        self.architecture = self.fields.get("general.architecture")
        name = self.fields.get("general.name")
        # what transformers' GGUF loader does: llama.cpp stores Mistral models under "llama"
        self.model_type = "mistral" if self.architecture == "llama" and name == "mistral" else self.architecture
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise MalformedWeightsError(
                f"GGUF architecture {self.architecture!r} (metadata 'general.architecture') in {self.path} is not "
                f"supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if "rope_freqs.weight" in infos:
            raise MalformedWeightsError(
                f"{self.path} stores per-frequency RoPE factors (rope_freqs.weight); metafit cannot map them "
                "to an HF rope config yet"
            )
        self._tensors = {hf_tensor_name(n): info for n, info in infos.items() if hf_tensor_name(n) is not None}
        self._gguf_names = {hf_tensor_name(n): n for n in infos if hf_tensor_name(n) is not None}
        self.names = set(self._tensors)
        self.shapes = {name: info.shape for name, info in self._tensors.items()}
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.config = self._hf_config()

    def _bad(self, key: str, value, expected: str) -> MalformedWeightsError:
        if value is _MISSING:
            return MalformedWeightsError(f"{self.path}: metadata {key!r} is missing; it must be {expected}")
        shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
        return MalformedWeightsError(f"{self.path}: metadata {key!r} is {shown}; expected {expected}")

    def _int(self, key: str, default=_MISSING, *, minimum: int = 1, arch: bool = True):
        key = f"{self.architecture}.{key}" if arch else key
        value = self.fields.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self._bad(key, value, f"an integer >= {minimum}")
        return value

    def _float(self, key: str, default, *, minimum: float = 0.0):
        key = f"{self.architecture}.{key}"
        value = self.fields.get(key, default)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < minimum:
            raise self._bad(key, value, f"a finite number >= {minimum}")
        return float(value)

    def _hf_config(self):
        """The HF config, its fields read through transformers' own GGUF table (``GGUF_CONFIG_MAPPING``).

        Each mapped metadata value is checked for type and range (a bad one names its field); the
        vocabulary size comes from the embedding, ``head_dim`` from ``attention.key_length`` when the
        file has it, the RoPE scaling and special tokens from their own fields.
        """
        import transformers
        from huggingface_hub.errors import StrictDataclassError
        from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

        kwargs = {**GGUF_CONFIG_DEFAULTS_MAPPING.get(self.model_type, {}), **self._mapped_fields(GGUF_CONFIG_MAPPING)}
        hidden, heads = kwargs["hidden_size"], kwargs["num_attention_heads"]
        kv_heads = kwargs.setdefault("num_key_value_heads", heads)
        if heads % kv_heads:
            raise self._bad(f"{self.architecture}.attention.head_count_kv", kv_heads,
                            f"a divisor of the head count {heads}")
        head_dim = self._int("attention.key_length", kwargs.get("head_dim", max(hidden // heads, 1)))
        if head_dim % 2:
            raise self._bad(f"{self.architecture}.attention.key_length", head_dim, "an even number (RoPE pairs)")
        embedding = self._tensors.get("model.embed_tokens.weight")
        if embedding is None or len(embedding.shape) != 2:
            raise MalformedWeightsError(
                f"{self.path}: tensor 'token_embd.weight' is "
                + ("missing" if embedding is None else f"of shape {embedding.shape}, not [vocab, hidden]")
            )
        check_layer_claim(kwargs["num_hidden_layers"], len(self._tensors),
                          f"GGUF field '{self.architecture}.block_count'", str(self.path))
        token_id = lambda key: self._int(f"tokenizer.ggml.{key}", None, minimum=0, arch=False)  # noqa: E731
        kwargs.update(
            vocab_size=embedding.shape[0], head_dim=head_dim,
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            rope_parameters=self._rope(kwargs.pop("rope_theta", 10000.0)),
            bos_token_id=token_id("bos_token_id"), eos_token_id=token_id("eos_token_id"),
            pad_token_id=token_id("padding_token_id"),
        )
        kwargs.setdefault("max_position_embeddings", 2048)
        kwargs.setdefault("rms_norm_eps", 1e-6)
        if self.model_type == "llama":
            kwargs["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        try:
            return transformers.AutoConfig.for_model(self.model_type, **kwargs)
        except (ValueError, TypeError, StrictDataclassError) as err:
            raise MalformedWeightsError(f"{self.path}: its metadata makes an invalid config: {err}") from err

    def _mapped_fields(self, table) -> dict[str, Any]:
        """``{hf_field: value}`` for every ``<architecture>.<key>`` of transformers' table that the file holds."""
        fields = {}
        for key, hf_name in table[self.model_type].items():
            if hf_name is None or hf_name == "vocab_size":  # the vocabulary is the embedding's row count
                continue
            value = self.fields.get(f"{self.architecture}.{key}", _MISSING)
            if value is _MISSING:
                if hf_name in _REQUIRED_FIELDS:
                    raise self._bad(f"{self.architecture}.{key}", value, "an integer >= 1")
                continue
            if isinstance(value, float) or hf_name in _FLOAT_FIELDS:
                fields[hf_name] = self._float(key, _MISSING, minimum=1e-30 if hf_name == "rope_theta" else 0.0)
            else:
                fields[hf_name] = self._int(key, minimum=0 if hf_name == "num_hidden_layers" else 1)
        return fields

    def _rope(self, theta: float) -> dict[str, Any]:
        rope = {"rope_type": "default", "rope_theta": theta}
        scaling = self.fields.get(f"{self.architecture}.rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling not in ("linear", "yarn"):
                raise MalformedWeightsError(
                    f"{self.path}: GGUF rope scaling {scaling!r} (metadata '{self.architecture}.rope.scaling.type') "
                    "is not supported; supported: none, linear, yarn"
                )
            rope.update(rope_type=scaling, factor=self._float("rope.scaling.factor", _MISSING, minimum=1e-30))
            if scaling == "yarn":
                rope["original_max_position_embeddings"] = self._int("rope.scaling.original_context_length")
        return rope

    def get_tensor(self, name: str) -> np.ndarray:
        """The tensor's values as float32 in HF layout (dequantised, RoPE rows un-permuted)."""
        import gguf

        info = self._tensors[name]
        qtype = gguf.GGMLQuantizationType(info.qtype)
        byte_shape = gguf.quant_shape_to_byte_shape(info.shape, qtype)
        # A plain ndarray view: numpy memmap subclasses pay a finalize hook on every slice.
        # read_gguf checked that [offset, offset + nbytes) lies inside the file.
        raw = np.asarray(self._data[info.offset: info.offset + info.nbytes]).reshape(byte_shape)
        try:
            data = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(info.shape)
        except NotImplementedError:
            raise MalformedWeightsError(
                f"{self.path}: tensor {self._gguf_names[name]!r} has type {qtype.name}, which the gguf package "
                "cannot dequantise"
            ) from None
        if self.model_type in _PERMUTED_ROTARY:
            heads = None
            if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
                heads = self.config.num_attention_heads
            elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
                heads = self.config.num_key_value_heads
            if heads is not None:
                if not data.ndim or data.shape[0] % (2 * heads):
                    raise MalformedWeightsError(
                        f"{self.path}: tensor {self._gguf_names[name]!r} has shape {info.shape}; its rows must split "
                        f"into {heads} heads of an even size"
                    )
                data = unpermute_rotary(data, heads)
        return data

    # ----------------------------------------------------------------------------------------
    # tokenizer

    def _list(self, key: str, item: type, default=_MISSING) -> list:
        value = self.fields.get(key, default)
        if not isinstance(value, list) or not all(_is_a(v, item) for v in value):
            raise self._bad(key, value, f"a list of {item.__name__}")
        return value

    def _string(self, key: str, default):
        value = self.fields.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def tokenizer(self):
        """A transformers fast tokenizer rebuilt from the GGUF vocabulary and merges.

        Raises:
          MalformedWeightsError: a ``tokenizer.ggml.*`` field is missing, of the wrong type or out
            of range, or the tokenizers library rejects the vocabulary (names the field).
        """
        import transformers

        tokens = self._list("tokenizer.ggml.tokens", str)
        if not tokens:
            raise self._bad("tokenizer.ggml.tokens", tokens, "a non-empty list of tokens")
        kind = self._string("tokenizer.ggml.model", None)
        pre = self._string("tokenizer.ggml.pre", "default")

        def special(key):
            token_id = self._int(f"tokenizer.ggml.{key}", None, minimum=0, arch=False)
            if token_id is not None and token_id >= len(tokens):
                raise self._bad(f"tokenizer.ggml.{key}", token_id,
                                f"a token id below the vocabulary size {len(tokens)}")
            return tokens[token_id] if token_id is not None else None

        specials = {name: special(key) for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                         ("unk_token", "unknown_token_id"),
                                                         ("pad_token", "padding_token_id"))}
        chat_template = self._string("tokenizer.chat_template", None)
        with self._building_tokenizer():
            if kind == "gpt2" and pre in _BYTE_LEVEL_SPLITS:
                backend = self._byte_level_tokenizer(tokens, pre)
            else:
                # Sentencepiece and less common byte-level variants: transformers' GGUF converter.
                from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                    convert_gguf_tokenizer,
                    get_gguf_tokenizer,
                )

                architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(self.path))
                backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
            return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template,
                                                        **specials)

    @contextlib.contextmanager
    def _building_tokenizer(self):
        try:
            yield
        except MalformedWeightsError:
            raise
        except Exception as err:  # tokenizers raises plain Exception for a vocabulary it rejects
            raise MalformedWeightsError(
                f"{self.path}: its tokenizer.ggml.* metadata does not make a tokenizer ({type(err).__name__}: {err})"
            ) from err

    def _byte_level_tokenizer(self, tokens: list[str], pre: str):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

        merges = []
        for merge in self._list("tokenizer.ggml.merges", str, []):
            if " " not in merge:
                raise self._bad("tokenizer.ggml.merges", merge, "merges of the form 'left right'")
            merges.append(tuple(merge.split(" ", 1)))
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
        has_types = "tokenizer.ggml.token_type" in self.fields
        types = (self._list("tokenizer.ggml.token_type", int) if has_types else None) or [1] * len(tokens)
        if len(types) != len(tokens):
            raise self._bad("tokenizer.ggml.token_type", f"{len(types)} entries", f"one per token ({len(tokens)})")
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
        )
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
        bos_id = self._int("tokenizer.ggml.bos_token_id", None, minimum=0, arch=False)
        add_bos = self.fields.get("tokenizer.ggml.add_bos_token", False)
        if not isinstance(add_bos, (bool, int)):
            raise self._bad("tokenizer.ggml.add_bos_token", add_bos, "a boolean")
        if add_bos and bos_id is not None:
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
# the gguf package. The file is untrusted: every count, length, type and offset is checked
# against the file before it is used, and every failure is a MalformedWeightsError naming the
# file, the field or tensor, and the byte position.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Fewest bytes one value of a type takes (bounds an array's count by the bytes left).
_MIN_SIZE = {**{k: struct.calcsize(v) for k, v in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ...; real files nest at most once
MAX_ARRAY_LENGTH = 2**24  # 64x the largest vocabularies; a Python int per element costs ~36 bytes
MAX_DIMS = 4  # GGML_MAX_DIMS


class GGUFTensorInfo(NamedTuple):
    qtype: int
    shape: tuple[int, ...]  # numpy order (GGML lists dims fastest-first; reversed here)
    offset: int  # absolute byte offset in the file
    nbytes: int = 0  # bytes of (possibly quantised) data at ``offset``


class _Cursor:
    """Reads little-endian values from ``buf``, refusing to run past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, what: str):
        return MalformedWeightsError(f"{self.path}: {what} (at byte {self.pos} of {len(self.buf)})")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: str, what: str):
        return self.take_many(fmt, what)[0]

    def take_many(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        if size > self.left():
            raise self.fail(f"file ends inside {what}")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def string(self, what: str) -> str:
        n = self.take("<Q", f"the length of {what}")
        if n > self.left():
            raise self.fail(f"{what} claims {n} bytes, more than the {self.left()} left in the file")
        self.pos += n
        return self.buf[self.pos - n:self.pos].decode("utf-8", errors="replace")

    def strings(self, count: int, field: str) -> list[str]:
        """``count`` strings (a vocabulary, merges): :meth:`string` unrolled, as it runs 10^5 times."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        for i in range(count):
            if end - pos < 8:
                self.pos = pos
                raise self.fail(f"file ends inside metadata {f'{field}[{i}]'!r}")
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
            if n > end - pos:
                self.pos = pos
                raise self.fail(f"metadata {f'{field}[{i}]'!r} claims {n} bytes, more than the {end - pos} "
                                "left in the file")
            out.append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, kind: int, field: str, depth: int = 0):
        if kind == _STRING:
            return self.string(f"metadata {field!r}")
        if kind in _SCALARS:
            return self.take(_SCALARS[kind], f"metadata {field!r}")
        if kind != _ARRAY:
            raise self.fail(f"metadata {field!r} has unknown value type {kind}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"metadata {field!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        elem = self.take("<I", f"the element type of metadata {field!r}")
        count = self.take("<Q", f"the length of metadata {field!r}")
        if elem not in _MIN_SIZE:
            raise self.fail(f"metadata {field!r} is an array of unknown value type {elem}")
        if count * _MIN_SIZE[elem] > self.left():
            raise self.fail(f"metadata {field!r} claims {count} elements, more than the file holds")
        if count > MAX_ARRAY_LENGTH:
            raise self.fail(f"metadata {field!r} has {count} elements; metafit reads at most {MAX_ARRAY_LENGTH}")
        if elem in _SCALARS and count:  # one struct call for token types, scores...
            return list(self.take_many("<" + str(count) + _SCALARS[elem][1:], f"metadata {field!r}"))
        if elem == _STRING:
            return self.strings(count, field)
        return [self.value(elem, f"{field}[{i}]", depth + 1) for i in range(count)]


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
    """Metadata and tensor table of a GGUF (v2/v3) file, without reading tensor data.

    Raises:
      MalformedWeightsError: not a regular file, not GGUF, or a count, length, type, dimension,
        alignment or tensor range that the file cannot hold (names the field or tensor).
    """
    import gguf

    path = Path(path)
    with open_regular(path, "GGUF file") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 24:
            raise MalformedWeightsError(f"{path}: {size} bytes is too short for a GGUF file (24-byte header)")
        buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buf, path)
    if buf[:4] != b"GGUF":
        raise MalformedWeightsError(f"{path} is not a GGUF file (magic {buf[:4]!r})")
    cursor.pos = 4
    version = cursor.take("<I", "the version")
    if version not in (2, 3):
        raise MalformedWeightsError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
    n_tensors = cursor.take("<Q", "the tensor count")
    n_fields = cursor.take("<Q", "the metadata count")
    # A metadata entry takes at least 13 bytes (key length, type, one byte), a tensor entry 24.
    if n_fields * 13 > cursor.left() or n_tensors * 24 > cursor.left():
        raise cursor.fail(f"header claims {n_fields} metadata entries and {n_tensors} tensors, "
                          "more than the file holds")
    fields = {}
    for i in range(n_fields):
        key = cursor.string(f"metadata key #{i}")
        if key in fields:
            raise cursor.fail(f"metadata key {key!r} appears twice")
        fields[key] = cursor.value(cursor.take("<I", f"the type of metadata {key!r}"), key)
    infos = []
    for i in range(n_tensors):
        name = cursor.string(f"the name of tensor #{i}")
        n_dims = cursor.take("<I", f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = [cursor.take("<Q", f"the dimensions of tensor {name!r}") for _ in range(n_dims)]
        qtype = cursor.take("<I", f"the type of tensor {name!r}")
        infos.append((name, dims, qtype, cursor.take("<Q", f"the offset of tensor {name!r}")))
    alignment = fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
        raise MalformedWeightsError(f"{path}: metadata 'general.alignment' is {alignment!r}; expected a power of two")
    data_start = (cursor.pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, dims, qtype, offset in infos:
        if name in tensors:
            raise MalformedWeightsError(f"{path}: tensor {name!r} appears twice in the tensor table")
        tensors[name] = _tensor_info(path, name, dims, qtype, offset, alignment, data_start, size, gguf)
    _check_disjoint(path, tensors)
    return fields, tensors


def _tensor_info(path, name, dims, qtype, offset, alignment, data_start, size, gguf) -> GGUFTensorInfo:
    def bad(what):
        return MalformedWeightsError(f"{path}: tensor {name!r} {what}")

    try:
        kind = gguf.GGMLQuantizationType(qtype)
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise bad(f"has unknown type {qtype}") from None
    if math.prod(max(d, 1) for d in dims) >= 2**62:
        raise bad(f"has dimensions {dims} whose product overflows")
    if dims and dims[0] % block:
        raise bad(f"has {dims[0]} elements per row, not a multiple of {kind.name}'s block of {block}")
    nbytes = math.prod(dims) // block * block_bytes
    if offset % alignment:
        raise bad(f"starts at data offset {offset}, not a multiple of the alignment {alignment}")
    if data_start + offset + nbytes > size:
        raise bad(f"needs bytes [{data_start + offset}, {data_start + offset + nbytes}) but the file has only {size} "
                  "(truncated, or a wrong offset)")
    return GGUFTensorInfo(qtype, tuple(reversed(dims)), data_start + offset, nbytes)


def _check_disjoint(path: Path, tensors: dict[str, GGUFTensorInfo]) -> None:
    end, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        if info.nbytes and info.offset < end:
            raise MalformedWeightsError(f"{path}: tensor {name!r} overlaps tensor {previous!r}")
        if info.nbytes:
            end, previous = info.offset + info.nbytes, name
