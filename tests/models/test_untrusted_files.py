"""Model files as untrusted input (issue 20): containment, no remote code, early layout checks,
one documented error type for malformed safetensors and GGUF files, and property-based fuzzing.

Every file here is made by the test: a tiny Llama (hidden 8, two heads, one KV head) written as
an HF folder (``config.json`` + safetensors) and as a GGUF file by a byte-level writer that can
also write what no honest writer would.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metafit.models as mm
from metafit.models import llama as llama_module
from metafit.models.gguf_file import GGUFCheckpoint
from metafit.models.loading import _SafetensorsCheckpoint

gguf = pytest.importorskip("gguf")

# --------------------------------------------------------------------------------------------
# a tiny Llama as HF tensors, an HF folder, and a GGUF file

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 8, 2, 1, 4, 16
TOKENS = ["<|endoftext|>", "<s>", "</s>", "a", "b", "ab", "c", "d", "e", "f", "g", "h", "i", "j", "k", "Ġ"]
VOCAB = len(TOKENS)


def hf_tensors(layers: int = 1, *, bias: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        })
        if bias:
            shapes[p + "self_attn.q_proj.bias"] = (HEADS * HEAD_DIM,)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def hf_config(**overrides) -> dict:
    config = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, max_position_embeddings=32, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )
    config.update(overrides)
    return config


def write_folder(folder: Path, tensors=None, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(**config)))
    safetensors.numpy.save_file(hf_tensors() if tensors is None else tensors, str(folder / "model.safetensors"),
                                metadata={"format": "pt"})
    return folder


def write_sharded(folder: Path, weight_map_entry: str) -> Path:
    """An HF folder whose index maps every tensor to ``weight_map_entry``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config()))
    index = {"metadata": {}, "weight_map": {name: weight_map_entry for name in hf_tensors()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_PACK = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
         I64: "<q", F64: "<d"}


def gguf_value(kind: int, value) -> bytes:
    if kind == STRING:
        raw = value.encode() if isinstance(value, str) else value
        return struct.pack("<Q", len(raw)) + raw
    if kind not in _PACK and kind != ARRAY:  # a type no writer knows: raw bytes
        return value
    if kind == ARRAY:
        elem, items = value
        return struct.pack("<IQ", elem, len(items)) + b"".join(gguf_value(elem, v) for v in items)
    return struct.pack(_PACK[kind], value)


def gguf_fields(**replace) -> list[tuple[str, int, object]]:
    """``(key, type, value)`` of the tiny Llama; ``replace`` maps a key (dots as '__') to a new
    ``(type, value)`` or to None (drop it)."""
    fields = [
        ("general.architecture", STRING, "llama"),
        ("general.alignment", U32, 32),
        ("llama.block_count", U32, 1),
        ("llama.context_length", U32, 32),
        ("llama.embedding_length", U32, HIDDEN),
        ("llama.feed_forward_length", U32, FFN),
        ("llama.attention.head_count", U32, HEADS),
        ("llama.attention.head_count_kv", U32, KV_HEADS),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.rope.freq_base", F32, 10000.0),
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.pre", STRING, "smollm"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, TOKENS)),
        ("tokenizer.ggml.token_type", ARRAY, (I32, [3, 3, 3] + [1] * (VOCAB - 3))),
        ("tokenizer.ggml.merges", ARRAY, (STRING, ["a b"])),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.padding_token_id", U32, 0),
    ]
    replace = {k.replace("__", "."): v for k, v in replace.items()}
    out = [(k, *replace[k]) if k in replace else (k, t, v) for k, t, v in fields if replace.get(k, 0) is not None]
    return out + [(k, *v) for k, v in replace.items() if v is not None and k not in {f[0] for f in fields}]


def gguf_tensors(layers: int = 1) -> list[tuple[str, list[int], int, bytes]]:
    """``(name, GGML dims (fastest first), type, data)``, F32, q/k rows as HF stores them."""
    out = []
    for name, value in hf_tensors(layers).items():
        out.append((gguf_name(name), list(reversed(value.shape)), 0, value.tobytes()))
    return out


def gguf_name(hf_name: str) -> str:
    from metafit.models.gguf_file import gguf_tensor_name

    return gguf_tensor_name(hf_name)


def gguf_bytes(fields=None, tensors=None, *, version: int = 3, alignment: int = 32) -> bytes:
    fields = gguf_fields() if fields is None else fields
    tensors = gguf_tensors() if tensors is None else tensors
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(fields))]
    for key, kind, value in fields:
        out += [gguf_value(STRING, key), struct.pack("<I", kind), gguf_value(kind, value)]
    offset, data = 0, []
    for name, dims, qtype, raw in tensors:
        out += [gguf_value(STRING, name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims),
                struct.pack("<IQ", qtype, offset)]
        padded = raw + b"\0" * (-len(raw) % alignment)
        data.append(padded)
        offset += len(padded)
    head = b"".join(out)
    return head + b"\0" * (-len(head) % alignment) + b"".join(data)


def gguf_file(path: Path, payload: bytes | None = None) -> Path:
    path.write_bytes(gguf_bytes() if payload is None else payload)
    return path


def safetensors_bytes(header, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


# --------------------------------------------------------------------------------------------
# the valid files load (the fixtures below are correct)


def test_the_tiny_files_load(tmp_path):
    model, _ = mm.load(write_folder(tmp_path / "hf"), tokenizer=False)
    assert isinstance(model, mm.LlamaForCausalLM)
    path = gguf_file(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(str(path))  # the reference reader agrees with the test's writer
    assert len(reader.tensors) == len(hf_tensors())
    model, tokenizer = mm.load(path)
    assert isinstance(model, mm.LlamaForCausalLM) and model.config.num_hidden_layers == 1
    assert tokenizer.convert_ids_to_tokens(tokenizer("ab")["input_ids"]) == ["ab"]
    q = hf_tensors()["model.layers.0.self_attn.q_proj.weight"]  # GGUF q rows are llama.cpp's permutation of HF's
    from metafit.models.gguf_file import unpermute_rotary

    np.testing.assert_array_equal(model.model.layers[0].self_attn.q_proj.kernel[...].T, unpermute_rotary(q, HEADS))


# --------------------------------------------------------------------------------------------
# containment: weight files named by the index, or linked, must be regular files in the folder


@pytest.mark.parametrize(
    "entry", ["../other/model.safetensors", "ABSOLUTE", "../../etc/passwd", "sub/../../other/model.safetensors"]
)
def test_index_entries_outside_the_folder_are_refused(tmp_path, entry):
    write_folder(tmp_path / "other")  # a perfectly loadable model elsewhere
    if entry == "ABSOLUTE":
        entry = str(tmp_path / "other" / "model.safetensors")
    folder = write_sharded(tmp_path / "model", entry)
    with pytest.raises(mm.MalformedWeightsError, match="outside the model folder") as err:
        mm.load(folder, tokenizer=False)
    assert "model.safetensors.index.json entry for tensor" in str(err.value) and entry in str(err.value)


def test_a_weights_symlink_leading_outside_is_refused(tmp_path):
    write_folder(tmp_path / "other")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config()))
    (folder / "model.safetensors").symlink_to(tmp_path / "other" / "model.safetensors")
    outside = r"weights file is 'model\.safetensors'.*outside the model folder"
    with pytest.raises(mm.MalformedWeightsError, match=outside):
        mm.load(folder, tokenizer=False)


def test_a_hub_cache_snapshot_linking_into_its_blobs_still_loads(tmp_path):
    repo = tmp_path / "models--org--tiny"
    write_folder(repo / "blobs")
    (repo / "blobs" / "model.safetensors").rename(repo / "blobs" / "abc123")
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(repo / "blobs" / "config.json")
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs/abc123"))
    model, _ = mm.load(snapshot, tokenizer=False)
    assert isinstance(model, mm.LlamaForCausalLM)


_UNBLOCK = """
import os, sys, time
time.sleep(float(sys.argv[2]))
try:  # pairs with a reader stuck opening the FIFO, which then reads EOF
    os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))
except OSError:  # nobody is reading: the load did not hang
    pass
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("where", ["index entry", "model.safetensors", "config.json"])
def test_a_fifo_is_refused_instead_of_hanging_the_load(tmp_path, where):
    import subprocess

    if where == "index entry":
        folder = write_sharded(tmp_path / "model", "model-00001-of-00001.safetensors")
        fifo = folder / "model-00001-of-00001.safetensors"
    elif where == "model.safetensors":
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(hf_config()))
        fifo = folder / "model.safetensors"
    else:
        folder = write_folder(tmp_path / "model")
        (folder / "config.json").unlink()
        fifo = folder / "config.json"
    os.mkfifo(fifo)
    # A stuck open() may hold the GIL (the safetensors package opens files in Rust), so a thread
    # cannot rescue it: another process opens the FIFO's writing end after a while.
    delay = 15.0
    helper = subprocess.Popen([sys.executable, "-c", _UNBLOCK, str(fifo), str(delay)])
    start = time.monotonic()
    try:
        with pytest.raises(mm.MalformedWeightsError) as err:
            mm.load(folder, tokenizer=False)
    finally:
        helper.kill()
        helper.wait()
    assert time.monotonic() - start < delay, f"loading a folder with a FIFO as its {where} hung"
    assert "FIFO" in str(err.value) and fifo.name in str(err.value)


# --------------------------------------------------------------------------------------------
# no code from the folder: auto_map is refused, trust_remote_code is never on


@pytest.mark.parametrize("model_type", ["llama", "evil-arch"])
def test_a_config_with_auto_map_is_refused_and_its_code_never_runs(tmp_path, model_type, monkeypatch):
    folder = write_folder(tmp_path / "model", model_type=model_type,
                          auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                    "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    marker = tmp_path / "code-ran"
    for module in ("configuration_evil", "modeling_evil"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked whether to run the folder's code"))
    with pytest.raises(mm.MalformedWeightsError, match=r"config\.json: key 'auto_map'.*never runs") as err:
        mm.load(folder, tokenizer=False)
    assert "AutoConfig" in str(err.value)
    assert not marker.exists()


def test_a_tokenizer_config_with_auto_map_is_refused_but_the_weights_load_without_it(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    (folder / "tokenization_evil.py").write_text(f"open({str(tmp_path / 'code-ran')!r}, 'w')\n")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked whether to run the folder's code"))
    with pytest.raises(mm.MalformedWeightsError, match=r"tokenizer_config\.json: key 'auto_map'.*tokenizer=False"):
        mm.load(folder)
    model, tokenizer = mm.load(folder, tokenizer=False)
    assert tokenizer is None and not (tmp_path / "code-ran").exists()


def test_transformers_is_called_with_trust_remote_code_false(tmp_path, monkeypatch):
    import transformers

    seen = []
    real_config, real_tokenizer = transformers.AutoConfig.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def spy(real):
        def call(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy(real_config))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy(real_tokenizer))
    folder = write_folder(tmp_path / "model")
    (folder / "tokenizer.json").write_text(_tiny_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    _, tokenizer = mm.load(folder)
    assert tokenizer is not None and seen and all(value is False for value in seen)


def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<|endoftext|>")).to_str()


def test_a_config_transformers_rejects_is_a_clear_error(tmp_path):
    folder = write_folder(tmp_path / "model", num_hidden_layers=1e5)
    with pytest.raises(mm.MalformedWeightsError, match=r"config\.json: transformers rejects.*num_hidden_layers"):
        mm.load(folder, tokenizer=False)
    (folder / "config.json").write_text('{"model_type": "llama", "model_type": "gpt2"}')
    with pytest.raises(mm.MalformedWeightsError, match="'model_type' appears twice"):
        mm.load(folder, tokenizer=False)


# --------------------------------------------------------------------------------------------
# names and shapes are checked against the config before the model is built


@pytest.fixture
def layers_built(monkeypatch):
    """Counts decoder layers constructed; more than a handful means the model was built."""
    count = [0]
    real = llama_module.LlamaDecoderLayer.__init__

    def counting(self, *args, **kwargs):
        count[0] += 1
        assert count[0] <= 8, "the model was built before its tensor names were checked"
        real(self, *args, **kwargs)

    monkeypatch.setattr(llama_module.LlamaDecoderLayer, "__init__", counting)
    return count


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # Qwen2Config itself is slow for 10^7 layers
@pytest.mark.parametrize("layers", [1000, 100_000, 10**7])
def test_a_config_with_too_many_layers_fails_before_building(tmp_path, layers, model_type, layers_built):
    folder = write_folder(tmp_path / "model", num_hidden_layers=layers, model_type=model_type,
                          architectures=[f"{model_type.capitalize()}ForCausalLM"])
    start = time.perf_counter()
    with pytest.raises(mm.CheckpointMismatch) as err:
        mm.load(folder, tokenizer=False)
    assert time.perf_counter() - start < 5
    assert f"num_hidden_layers in {folder / 'config.json'} is {layers}, but the checkpoint holds only 11 tensors" \
        in str(err.value)
    assert layers_built[0] == 0


def test_a_config_with_more_layers_than_the_checkpoint_names_the_first_missing_tensor(tmp_path, layers_built):
    folder = write_folder(tmp_path / "model", num_hidden_layers=3)
    with pytest.raises(mm.CheckpointMismatch) as err:
        mm.load(folder, tokenizer=False)
    message = str(err.value)
    assert f"num_hidden_layers in {folder / 'config.json'} is 3, but {folder} has no tensors for layer 1" in message
    assert "(no 'model.layers.1.input_layernorm.weight')" in message and "it holds layer 0" in message
    assert layers_built[0] <= 1


def test_gguf_block_count_is_checked_before_building(tmp_path, layers_built):
    path = gguf_file(tmp_path / "m.gguf", gguf_bytes(gguf_fields(llama__block_count=(U64, 10**9))))
    with pytest.raises(mm.CheckpointMismatch, match=r"GGUF field 'llama\.block_count' is 1000000000, but .* only 11"):
        mm.load(path, tokenizer=False)
    path = gguf_file(tmp_path / "m.gguf", gguf_bytes(gguf_fields(llama__block_count=(U32, 2))))
    with pytest.raises(mm.CheckpointMismatch, match=r"'llama\.block_count'\) is 2, but .* no tensors for layer 1"):
        mm.load(path, tokenizer=False)
    assert layers_built[0] <= 1


def test_layers_beyond_the_config_are_an_error_not_a_warning(tmp_path):
    folder = write_folder(tmp_path / "model", tensors=hf_tensors(layers=3), num_hidden_layers=1)
    with pytest.raises(mm.CheckpointMismatch, match=r"is 1, but .* also has layer 1 \(tensor 'model\.layers\.1\."):
        mm.load(folder, tokenizer=False)


def test_a_tensor_inside_a_layer_the_config_has_no_place_for_is_an_error(tmp_path):
    folder = write_folder(tmp_path / "model", tensors=hf_tensors(bias=True))  # config: attention_bias false
    with pytest.raises(mm.CheckpointMismatch, match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'.*no place"):
        mm.load(folder, tokenizer=False)


def test_a_misshaped_tensor_is_named_before_building(tmp_path, layers_built):
    tensors = hf_tensors(layers=10)  # more layers than `layers_built` lets a build make
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((FFN + 1, HIDDEN), np.float32)
    folder = write_folder(tmp_path / "model", tensors=tensors, num_hidden_layers=10)
    with pytest.raises(mm.CheckpointMismatch, match=r"'model\.layers\.0\.mlp\.up_proj\.weight'.*\(17, 8\).*\(16, 8\)"):
        mm.load(folder, tokenizer=False)
    assert layers_built[0] <= 1


@pytest.mark.parametrize("value", [-1, True])
def test_a_nonsense_layer_count_is_refused(tmp_path, value):
    folder = write_folder(tmp_path / "model", num_hidden_layers=value)
    with pytest.raises(mm.MalformedWeightsError, match="num_hidden_layers"):
        mm.load(folder, tokenizer=False)


def test_a_gpt2_layer_mismatch_names_n_layer(tmp_path):
    from flax import nnx

    model = mm.GPT2LMHeadModel(mm.GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=2, n_head=2, n_positions=16),
                               rngs=nnx.Rngs(0))
    folder = mm.save(model, tmp_path / "gpt2")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "n_layer": 3}))
    with pytest.raises(mm.CheckpointMismatch, match=r"n_layer in .*config\.json is 3, but .* no tensors for layer 2"):
        mm.load(folder, tokenizer=False)


# --------------------------------------------------------------------------------------------
# malformed safetensors files: one error type naming the file, the tensor or field, and the fault

_F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}

SAFETENSORS_CASES = {
    "empty file": (b"", "too short"),
    "header length 2^64 - 1": (struct.pack("<Q", 2**64 - 1) + b"{}", "header length field says 18446744073709551615"),
    "header length past the end": (safetensors_bytes({}, length=1000), "only 2 bytes after it"),
    "header not JSON": (safetensors_bytes(b"{not json"), "not valid JSON"),
    "header not UTF-8": (safetensors_bytes(b'{"\xff": 1}'), "not UTF-8"),
    "header a list": (safetensors_bytes([1, 2]), "JSON list, not an object"),
    "deeply nested header": (safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), "nests too deeply"),
    "duplicate tensor": (safetensors_bytes(b'{"w": {}, "w": {}}'), "key 'w' appears twice"),
    "offsets of 1e12": (safetensors_bytes({"w": {"dtype": "F32", "shape": [250_000_000_000],
                                                 "data_offsets": [0, 10**12]}}, b"\0" * 16),
                        r"tensor 'w' needs bytes \[0, 1000000000000\) of the data section, which has only 16"),
    "truncated data": (safetensors_bytes({"w": _F32_2x2}, b"\0" * 10), r"tensor 'w' needs bytes \[0, 16\).*truncated"),
    "size disagrees with shape": (safetensors_bytes({"w": {**_F32_2x2, "shape": [32, 16]}}, b"\0" * 16),
                                  r"tensor 'w' has data_offsets \[0, 16\] \(16 bytes\), but shape \(32, 16\)"),
    "overlapping tensors": (safetensors_bytes({"a": _F32_2x2, "b": _F32_2x2}, b"\0" * 16), "overlaps tensor"),
    "a gap": (safetensors_bytes({"a": {**_F32_2x2, "data_offsets": [4, 20]}}, b"\0" * 20),
              r"bytes \[0, 4\) before tensor 'a' belong to no tensor"),
    "trailing bytes": (safetensors_bytes({"a": _F32_2x2}, b"\0" * 20), "cover only 16"),
    "unknown dtype": (safetensors_bytes({"w": {**_F32_2x2, "dtype": "F13"}}, b"\0" * 16), "dtype 'F13'"),
    "negative dimension": (safetensors_bytes({"w": {**_F32_2x2, "shape": [-2, -2]}}, b"\0" * 16), "shape"),
    "boolean dimension": (safetensors_bytes({"w": {**_F32_2x2, "shape": [True, 4]}}, b"\0" * 16), "shape"),
    "float offsets": (safetensors_bytes({"w": {**_F32_2x2, "data_offsets": [0.0, 16.0]}}, b"\0" * 16),
                      "data_offsets"),
    "missing field": (safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2]}}, b"\0" * 16), "no data_offsets"),
    "entry not an object": (safetensors_bytes({"w": [1]}, b""), "not an object"),
    "metadata not strings": (safetensors_bytes({"__metadata__": {"a": 1}}, b""), "__metadata__"),
    "huge integer": (safetensors_bytes(b'{"w": {"shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'),
                     "not valid JSON"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_malformed_safetensors_gives_one_clear_error(tmp_path, case):
    payload, expected = SAFETENSORS_CASES[case]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config()))
    (folder / "model.safetensors").write_bytes(payload)
    with pytest.raises(mm.MalformedWeightsError, match=expected) as err:
        mm.load(folder, tokenizer=False)
    assert str(folder / "model.safetensors") in str(err.value)


def test_shards_disagreeing_with_their_index_are_refused(tmp_path):
    folder = write_sharded(tmp_path / "model", "a.safetensors")
    tensors = hf_tensors()
    safetensors.numpy.save_file(tensors, str(folder / "a.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "b.safetensors"
    safetensors.numpy.save_file({"model.norm.weight": tensors["model.norm.weight"]}, str(folder / "b.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(mm.MalformedWeightsError, match="tensor 'model.norm.weight' is stored twice"):
        mm.load(folder, tokenizer=False)
    index["weight_map"] = "nope"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(mm.MalformedWeightsError, match="weight_map"):
        mm.load(folder, tokenizer=False)


# --------------------------------------------------------------------------------------------
# malformed GGUF files: the same error type, naming the field or tensor


def _patched(offset: int, raw: bytes) -> bytes:
    payload = bytearray(gguf_bytes())
    payload[offset: offset + len(raw)] = raw
    return bytes(payload)


def _nested(depth: int):
    value = (U8, [1])
    for _ in range(depth):
        value = (ARRAY, [value])
    return value


GGUF_CASES = {
    "not GGUF": (lambda: b"GGML" + bytes(40), "not a GGUF file"),
    "too short": (lambda: b"GGUF\x03\x00", "too short"),
    "version 1": (lambda: _patched(4, struct.pack("<I", 1)), "version 1 is not supported"),
    "tensor count 2^64 - 1": (lambda: _patched(8, struct.pack("<Q", 2**64 - 1)), "more than the file holds"),
    "metadata count 2^63": (lambda: _patched(16, struct.pack("<Q", 2**63)), "more than the file holds"),
    "key length 2^64 - 1": (lambda: _patched(24, struct.pack("<Q", 2**64 - 1)),
                            "metadata key #0 claims 18446744073709551615 bytes"),
    "unknown value type": (lambda: gguf_bytes(gguf_fields(llama__block_count=(13, b"\x01"))),
                           "metadata 'llama.block_count' has unknown value type 13"),
    "unknown array element type": (lambda: gguf_bytes(gguf_fields(x=(ARRAY, (99, [])))), "unknown value type 99"),
    "deeply nested arrays": (lambda: gguf_bytes(gguf_fields(x=(ARRAY, _nested(6)))), "nests arrays more than 4 deep"),
    "array count past the end": (lambda: _array_count_overflow(),
                                 "claims 4611686018427387904 elements"),
    "duplicate key": (lambda: gguf_bytes(gguf_fields() + [("llama.block_count", U32, 1)]),
                      "'llama.block_count' appears twice"),
    "alignment 0": (lambda: gguf_bytes(gguf_fields(general__alignment=(U32, 0))), "general.alignment' is 0"),
    "alignment a string": (lambda: gguf_bytes(gguf_fields(general__alignment=(STRING, "32"))),
                           "general.alignment' is '32'"),
    "missing embedding_length": (lambda: gguf_bytes(gguf_fields(llama__embedding_length=None)),
                                 "metadata 'llama.embedding_length' is missing"),
    "zero heads": (lambda: gguf_bytes(gguf_fields(llama__attention__head_count=(U32, 0))),
                   "'llama.attention.head_count' is 0; expected an integer >= 1"),
    "heads a string": (lambda: gguf_bytes(gguf_fields(llama__attention__head_count=(STRING, "2"))),
                       "'llama.attention.head_count' is '2'"),
    "per-layer head counts": (lambda: gguf_bytes(gguf_fields(llama__attention__head_count_kv=(ARRAY, (U32, [1])))),
                              r"'llama.attention.head_count_kv' is \[1\]"),
    "kv heads not dividing heads": (lambda: gguf_bytes(gguf_fields(llama__attention__head_count_kv=(U32, 3))),
                                    "a divisor of the head count 2"),
    "NaN rope base": (lambda: gguf_bytes(gguf_fields(llama__rope__freq_base=(F32, float("nan")))),
                      "'llama.rope.freq_base' is nan"),
    "unknown architecture": (lambda: gguf_bytes(gguf_fields(general__architecture=(STRING, "mamba"))),
                             "architecture 'mamba'.*not supported"),
    "no embedding tensor": (lambda: gguf_bytes(tensors=gguf_tensors()[1:]), "tensor 'token_embd.weight' is missing"),
    "unknown tensor type": (lambda: gguf_bytes(tensors=[(n, d, 77 if i == 1 else q, r)
                                                        for i, (n, d, q, r) in enumerate(gguf_tensors())]),
                            "tensor 'output_norm.weight' has unknown type 77"),
    "five dimensions": (lambda: gguf_bytes(tensors=[(n, d + [1, 1, 1, 1] if i == 1 else d, q, r)
                                                    for i, (n, d, q, r) in enumerate(gguf_tensors())]),
                        "tensor 'output_norm.weight' has 5 dimensions"),
    "row not a whole block": (lambda: gguf_bytes(tensors=[(n, d, 8 if i == 0 else q, r)  # Q8_0, rows of 8
                                                          for i, (n, d, q, r) in enumerate(gguf_tensors())]),
                              "8 elements per row, not a multiple of Q8_0's block of 32"),
    "truncated data": (lambda: gguf_bytes()[:-40], "tensor 'blk.0.ffn_down.weight' needs bytes.*truncated"),
    "truncated header": (lambda: gguf_bytes()[:300], "file ends inside|claims"),
    "misaligned offset": (lambda: _misaligned(), "not a multiple of the alignment 32"),
    "overlapping tensors": (lambda: _overlapping(), "overlaps tensor"),
    "duplicate tensor": (lambda: gguf_bytes(tensors=gguf_tensors() + gguf_tensors()[:1]),
                         "tensor 'token_embd.weight' appears twice"),
    "q rows not in heads": (lambda: _odd_q_rows(), r"'model\.layers\.0\.self_attn\.q_proj\.weight' .* shape \(3, 8\)"),
    "not dequantisable": (lambda: gguf_bytes(tensors=[(n, d, 24 if i == 1 else q, r[: len(r) // 4] if i == 1 else r)
                                                      for i, (n, d, q, r) in enumerate(gguf_tensors())]),
                          "tensor 'output_norm.weight' has type I8, which the gguf package cannot dequantise"),
}


def _array_count_overflow() -> bytes:
    fields = gguf_fields()
    payload = gguf_bytes(fields)
    at = payload.index(b"tokenizer.ggml.merges") + len("tokenizer.ggml.merges") + 4 + 4  # key, type, elem type
    return payload[:at] + struct.pack("<Q", 2**62) + payload[at + 8:]


def _misaligned() -> bytes:
    payload = bytearray(gguf_bytes())
    name = b"output_norm.weight"
    at = payload.index(name) + len(name) + 4 + 8 + 4  # dims count, one dim, type -> offset
    (offset,) = struct.unpack_from("<Q", payload, at)
    struct.pack_into("<Q", payload, at, offset + 4)
    return bytes(payload)


def _overlapping() -> bytes:
    payload = bytearray(gguf_bytes())
    name = b"output_norm.weight"
    at = payload.index(name) + len(name) + 4 + 8 + 4
    struct.pack_into("<Q", payload, at, 0)  # on top of token_embd.weight
    return bytes(payload)


def _odd_q_rows() -> bytes:
    tensors = []
    for name, dims, qtype, raw in gguf_tensors():
        if name == "blk.0.attn_q.weight":
            dims, raw = [HIDDEN, 3], raw[: HIDDEN * 3 * 4]
        tensors.append((name, dims, qtype, raw))
    return gguf_bytes(tensors=tensors)


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_malformed_gguf_gives_one_clear_error(tmp_path, case):
    make, expected = GGUF_CASES[case]
    path = gguf_file(tmp_path / "bad.gguf", make())
    with pytest.raises(mm.MalformedWeightsError, match=expected) as err:
        mm.load(path)
    assert str(path) in str(err.value)


GGUF_TOKENIZER_CASES = {
    "token id past the vocabulary": (dict(tokenizer__ggml__eos_token_id=(U32, 999)),
                                     "'tokenizer.ggml.eos_token_id' is 999; expected a token id below"),
    "tokens not strings": (dict(tokenizer__ggml__tokens=(ARRAY, (U32, list(range(VOCAB))))),
                           "'tokenizer.ggml.tokens'.*a list of str"),
    "no tokens": (dict(tokenizer__ggml__tokens=None), "'tokenizer.ggml.tokens' is missing"),
    "pre-tokenizer a list": (dict(tokenizer__ggml__pre=(ARRAY, (STRING, ["x"]))), "'tokenizer.ggml.pre'.*a string"),
    "merge without a space": (dict(tokenizer__ggml__merges=(ARRAY, (STRING, ["ab"]))), "'left right'"),
    "merge of unknown tokens": (dict(tokenizer__ggml__merges=(ARRAY, (STRING, ["x y"]))),
                                "tokenizer.ggml.\\* metadata does not make a tokenizer"),
    "token types of another length": (dict(tokenizer__ggml__token_type=(ARRAY, (I32, [1]))), "one per token"),
}


@pytest.mark.parametrize("case", list(GGUF_TOKENIZER_CASES))
def test_a_malformed_gguf_vocabulary_gives_the_same_error(tmp_path, case):
    replace, expected = GGUF_TOKENIZER_CASES[case]
    path = gguf_file(tmp_path / "bad.gguf", gguf_bytes(gguf_fields(**replace)))
    checkpoint = GGUFCheckpoint(path)  # weights and config are fine
    with pytest.raises(mm.MalformedWeightsError, match=expected):
        checkpoint.tokenizer()


# --------------------------------------------------------------------------------------------
# property-based fuzzing: any bytes give a result or MalformedWeightsError, never anything else

EXAMPLES = int(os.environ.get("METAFIT_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, derandomize="METAFIT_FUZZ_EXAMPLES" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values that break length and count fields, packed at 4 or 8 bytes.
_EDGES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 10**12]
_edge_patch = st.tuples(st.just("edge"), st.integers(0, 2**16), st.sampled_from(_EDGES), st.sampled_from([4, 8]))
_byte_patch = st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 2**16),
                        st.binary(min_size=1, max_size=8), st.just(0))
_truncate = st.tuples(st.just("truncate"), st.integers(0, 2**16), st.just(b""), st.just(0))
mutations = st.lists(st.one_of(_edge_patch, _byte_patch, _truncate), min_size=1, max_size=4)


def mutate(payload: bytes, edits) -> bytes:
    data = bytearray(payload)
    for op, position, value, width in edits:
        at = position % (len(data) + 1)
        if op == "edge":
            data[at: at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif op == "set":
            data[at: at + len(value)] = value
        elif op == "insert":
            data[at:at] = value
        elif op == "delete":
            del data[at: at + len(value)]
        else:
            del data[at:]
    return bytes(data)


def read_safetensors_fully(path: Path) -> dict:
    checkpoint = _SafetensorsCheckpoint([path])
    return {name: checkpoint.get_tensor(name) for name in checkpoint.names}


def read_gguf_fully(path: Path):
    checkpoint = GGUFCheckpoint(path)
    tensors = {name: checkpoint.get_tensor(name) for name in checkpoint.names}
    return tensors, checkpoint.tokenizer()


def _only_the_documented_error(read, path: Path, payload: bytes) -> None:
    path.write_bytes(payload)
    try:
        read(path)
    except mm.MalformedWeightsError:
        pass  # the documented outcome for a bad file


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    read_gguf_fully(gguf_file(folder / "warm.gguf"))  # imports and first-call costs outside the deadline
    return folder


@FUZZ
@given(payload=st.binary(max_size=256))
def test_fuzz_safetensors_any_bytes(fuzz_dir, payload):
    _only_the_documented_error(read_safetensors_fully, fuzz_dir / "any.safetensors", payload)


_VALID_SAFETENSORS = safetensors.numpy.save(
    {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}, metadata={"format": "pt"})


@FUZZ
@given(edits=mutations)
def test_fuzz_safetensors_mutations_of_a_valid_file(fuzz_dir, edits):
    _only_the_documented_error(read_safetensors_fully, fuzz_dir / "mutated.safetensors",
                               mutate(_VALID_SAFETENSORS, edits))


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.floats(allow_nan=False),
                          st.sampled_from(["F32", "F16", "BF16", "U8", "BOOL", "C64", "F8_E4M3", "x"]))
_json = st.recursive(_json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                     max_leaves=8)
_entry = st.fixed_dictionaries({
    "dtype": _json,
    "shape": st.one_of(st.lists(st.integers(-1, 9), max_size=3), _json),
    "data_offsets": st.one_of(st.lists(st.integers(-1, 80), min_size=2, max_size=2), _json),
})


@FUZZ
@given(header=st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), st.one_of(_entry, _json), max_size=3),
       data=st.binary(max_size=80))
def test_fuzz_safetensors_headers(fuzz_dir, header, data):
    _only_the_documented_error(read_safetensors_fully, fuzz_dir / "header.safetensors", safetensors_bytes(header, data))


@FUZZ
@given(payload=st.one_of(st.binary(max_size=256), st.binary(max_size=256).map(lambda b: b"GGUF\x03\0\0\0" + b)))
def test_fuzz_gguf_any_bytes(fuzz_dir, payload):
    _only_the_documented_error(read_gguf_fully, fuzz_dir / "any.gguf", payload)


_VALID_GGUF = gguf_bytes()


@FUZZ
@given(edits=mutations)
def test_fuzz_gguf_mutations_of_a_valid_file(fuzz_dir, edits):
    _only_the_documented_error(read_gguf_fully, fuzz_dir / "mutated.gguf", mutate(_VALID_GGUF, edits))


_gguf_value = st.one_of(
    st.tuples(st.sampled_from([U8, I8, U16, I16, U32, I32, BOOL]), st.integers(0, 1)),
    st.tuples(st.just(U64), st.sampled_from(_EDGES)),
    st.tuples(st.just(I64), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.sampled_from([F32, F64]), st.floats(width=32)),
    st.tuples(st.just(STRING), st.text(max_size=6)),
    st.tuples(st.just(ARRAY), st.tuples(st.sampled_from([U32, I32, STRING]), st.lists(st.integers(0, 40), max_size=3))
              .map(lambda t: (t[0], [str(v) for v in t[1]] if t[0] == STRING else t[1]))),
)


@FUZZ
@given(key=st.sampled_from([f[0] for f in gguf_fields()]), value=st.one_of(st.none(), _gguf_value),
       tensor=st.integers(0, len(gguf_tensors()) - 1),
       dims=st.one_of(st.none(), st.lists(st.integers(0, 40), max_size=5)),
       qtype=st.one_of(st.none(), st.integers(0, 45)))
def test_fuzz_gguf_fields_and_tensor_table(fuzz_dir, key, value, tensor, dims, qtype):
    """A valid file with one metadata value swapped for another of any type (or dropped) and one
    tensor's dimensions or type changed: reaches the config and tokenizer checks."""
    tensors = gguf_tensors()
    name, old_dims, old_qtype, raw = tensors[tensor]
    tensors[tensor] = (name, old_dims if dims is None else dims, old_qtype if qtype is None else qtype, raw)
    payload = gguf_bytes(gguf_fields(**{key.replace(".", "__"): value}), tensors)
    _only_the_documented_error(read_gguf_fully, fuzz_dir / "fields.gguf", payload)


@FUZZ
@given(weight_map=st.one_of(_json, st.dictionaries(
    st.text(max_size=4), st.one_of(st.text(alphabet="./\0ab", max_size=12), st.just("model.safetensors"),
                                   st.just("../outside.safetensors"), _json), max_size=3)))
def test_fuzz_index_entries(fuzz_dir, weight_map):
    """Whatever an index says, every shard it yields is a regular file inside the folder."""
    from metafit.models.model_files import read_index

    folder = fuzz_dir / "indexed"
    if not folder.exists():
        write_folder(folder)
        safetensors.numpy.save_file(hf_tensors(), str(fuzz_dir / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    try:
        shards = read_index(folder, "model.safetensors.index.json")
    except mm.MalformedWeightsError:
        return
    for shard in shards.values():
        assert shard.resolve().is_relative_to(folder.resolve()) and shard.is_file()
