"""Reading model files that may come from anyone: nothing outside the folder, no code, bounded reads.

A model folder or GGUF file is untrusted input. Every refusal below raises
:class:`~metafit.models.MalformedWeightsError` (a ``ValueError``) naming the file, the entry,
tensor or field, and what is wrong:

* **Containment.** Every file read from a model folder (weights, shards named by
  ``model.safetensors.index.json``, ``config.json``, tokenizer files) must resolve inside the
  folder and be a regular file: ``../other/model.safetensors``, absolute paths and symlinks
  leading elsewhere are refused, and so are FIFOs and devices (opening a FIFO would hang the
  load). One exception: a hub-cache snapshot (``.../snapshots/<revision>/``) may link into its
  own repository's ``blobs/`` folder, which is how ``huggingface_hub`` lays files out.
* **No code.** A ``config.json`` or ``tokenizer_config.json`` with ``auto_map`` asks to run the
  folder's own Python code. metafit has no implementation of such custom architectures and never
  runs a folder's code, so the folder is refused before transformers sees it; transformers is
  always called with ``trust_remote_code=False``.
* **JSON** (configs, indexes): at most :data:`MAX_JSON_BYTES`, UTF-8, no duplicate keys, nesting
  that Python's parser can handle.
* **safetensors headers** are validated here before the ``safetensors`` package opens the file
  (the format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping each
  tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional
  ``"__metadata__"`` of strings, then the data section): ``N`` at most :data:`MAX_HEADER_BYTES`
  and within the file; a known dtype; non-negative integer dimensions; ``end - begin`` equal to the
  element count times the dtype's size; and the ranges tiling the data section exactly, with no
  overlap, gap or truncation (the reference implementation's rule).
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from .convert import MalformedWeightsError

MAX_JSON_BYTES = 100 * 2**20
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors reference implementation's limit
MAX_DIMS = 64  # numpy's limit: every tensor becomes a numpy array

# safetensors dtype -> bytes per element, for the dtypes the safetensors package reads as numpy.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

# Files transformers may read from a model folder when it builds a config or a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
)


# --------------------------------------------------------------------------------------------
# files


def open_regular(path: str | Path, what: str) -> BinaryIO:
    """Opens ``path`` for reading if it is a regular file; refuses FIFOs, devices, sockets, folders.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer, so the
    check itself cannot hang.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise MalformedWeightsError(f"{path}: {what} is a folder, not a regular file") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise MalformedWeightsError(f"{path}: {what} is not a regular file ({_kind(mode)}); refusing to read it")
    return os.fdopen(fd, "rb")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"


def _allowed_roots(folder: Path) -> list[Path]:
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":  # huggingface_hub cache: snapshots/<rev>/x -> ../../blobs/<hash>
        roots.append(root.parent.parent / "blobs")
    return roots


def file_in_folder(folder: str | Path, relative: Any, what: str) -> Path:
    """``folder / relative`` after checking it resolves inside ``folder`` and is a regular file.

    Args:
      folder: the model folder the user named.
      relative: a file name taken from the folder's own content (an index entry, a known name).
      what: how the entry is named in errors, e.g. ``"model.safetensors.index.json entry for 'x'"``.

    Raises:
      MalformedWeightsError: not a non-empty string, resolves outside the folder, missing, or not
        a regular file.
    """
    folder = Path(folder)
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise MalformedWeightsError(f"{folder}: {what} is {relative!r}, not a file name")
    target = folder / relative
    try:
        resolved = target.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise MalformedWeightsError(f"{folder}: {what} is {relative!r}, which cannot be resolved ({err})") from None
    if not any(resolved.is_relative_to(root) for root in _allowed_roots(folder)):
        raise MalformedWeightsError(
            f"{folder}: {what} is {relative!r}, which resolves to {resolved}, outside the model folder; "
            "refusing to read files outside the folder you named"
        )
    try:
        mode = os.stat(resolved).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise MalformedWeightsError(f"{folder}: {what} is {relative!r}, which does not exist") from None
    except OSError as err:  # a name too long, a loop: the entry is at fault, not the disk
        raise MalformedWeightsError(f"{folder}: {what} is {relative!r}, which cannot be read ({err})") from None
    if not stat.S_ISREG(mode):
        raise MalformedWeightsError(
            f"{folder}: {what} is {relative!r}, which is {_kind(mode)}, not a regular file; refusing to read it"
        )
    return target


def present(folder: Path, name: str) -> bool:
    """Whether ``folder/name`` exists in any form (a dangling link or FIFO counts: it gets refused)."""
    return os.path.lexists(folder / name)


# --------------------------------------------------------------------------------------------
# JSON


def _no_duplicates(path: Path):
    def hook(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise MalformedWeightsError(f"{path}: key {key!r} appears twice in one JSON object")
            out[key] = value
        return out

    return hook


def parse_json(raw: bytes, path: Path, what: str) -> Any:
    """``raw`` parsed as JSON, every failure a :class:`MalformedWeightsError` naming ``path``."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path))
    except MalformedWeightsError:
        raise
    except UnicodeDecodeError as err:
        raise MalformedWeightsError(f"{path}: {what} is not UTF-8 ({err})") from None
    except RecursionError:
        raise MalformedWeightsError(f"{path}: {what} nests too deeply to parse") from None
    except ValueError as err:  # JSONDecodeError, and integers longer than Python parses
        raise MalformedWeightsError(f"{path}: {what} is not valid JSON ({err})") from None


def read_json(path: str | Path, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file read with the limits above."""
    path = Path(path)
    with open_regular(path, what) as handle:
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise MalformedWeightsError(f"{path}: {what} is larger than {max_bytes} bytes")
    return parse_json(raw, path, what)


# --------------------------------------------------------------------------------------------
# safetensors


class SafetensorsEntry(NamedTuple):
    """One tensor of a safetensors header; ``begin``/``end`` are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsHeader(NamedTuple):
    tensors: dict[str, SafetensorsEntry]
    metadata: dict[str, str]
    data_start: int  # absolute byte offset of the data section


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, value: Any) -> SafetensorsEntry:
    def bad(what):
        return MalformedWeightsError(f"{path}: tensor {name!r} {what}")

    if not isinstance(value, dict):
        raise bad(f"has header entry {value!r}, not an object with dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in value]
    if missing:
        raise bad(f"has no {', '.join(missing)} in the header")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"has dtype {dtype!r}, which metafit cannot read (readable: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}; a shape is a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise bad(f"has {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise bad(f"has data_offsets {offsets!r}; expected [begin, end], two non-negative integers")
    begin, end = offsets
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if end - begin != expected:
        raise bad(f"has data_offsets [{begin}, {end}] ({end - begin} bytes), but shape {tuple(shape)} of "
                  f"{dtype} takes {expected} bytes")
    return SafetensorsEntry(dtype, tuple(shape), begin, end)


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """The validated header of a safetensors file (the rules are in the module docstring).

    Raises:
      MalformedWeightsError: the first problem found, naming the file and the tensor or field.
    """
    path = Path(path)
    with open_regular(path, "safetensors file") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise MalformedWeightsError(
                f"{path}: {size} bytes is too short for a safetensors file (8-byte header length)"
            )
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise MalformedWeightsError(
                f"{path}: header length field says {length} bytes, but the file has only {size - 8} bytes after it "
                "(truncated or not a safetensors file)"
            )
        if length > MAX_HEADER_BYTES:
            raise MalformedWeightsError(f"{path}: header of {length} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = handle.read(length)
    if len(raw) != length:
        raise MalformedWeightsError(f"{path}: file shrank while its header was read")
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise MalformedWeightsError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MalformedWeightsError(f"{path}: header field '__metadata__' must map strings to strings")
    tensors = {name: _entry(path, name, value) for name, value in header.items()}
    data_start = 8 + length
    _check_tiling(path, tensors, size - data_start)
    return SafetensorsHeader(tensors, metadata, data_start)


def _check_tiling(path: Path, tensors: dict[str, SafetensorsEntry], data_size: int) -> None:
    covered, previous = 0, None
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.end > data_size:
            raise MalformedWeightsError(
                f"{path}: tensor {name!r} needs bytes [{entry.begin}, {entry.end}) of the data section, which has "
                f"only {data_size} bytes (the file is truncated or its offsets are wrong)"
            )
        if entry.begin < covered:
            raise MalformedWeightsError(
                f"{path}: tensor {name!r} (bytes [{entry.begin}, {entry.end})) overlaps tensor {previous!r}"
            )
        if entry.begin > covered:
            raise MalformedWeightsError(
                f"{path}: bytes [{covered}, {entry.begin}) before tensor {name!r} belong to no tensor"
            )
        covered, previous = entry.end, name
    if covered != data_size:
        raise MalformedWeightsError(
            f"{path}: the data section has {data_size} bytes but its tensors cover only {covered} (trailing bytes)"
        )


# --------------------------------------------------------------------------------------------
# HF folders


def read_index(folder: str | Path, index_name: str) -> dict[str, Path]:
    """``{tensor name: shard path}`` from a sharded-checkpoint index, every shard checked.

    Raises:
      MalformedWeightsError: the index is not a JSON object with a ``weight_map`` of strings, or
        an entry names a file outside the folder, a missing file or something not a regular file
        (the error names the entry).
    """
    folder = Path(folder)
    index = file_in_folder(folder, index_name, "weights index")
    raw = read_json(index, "weights index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MalformedWeightsError(f"{index}: expected an object with a non-empty 'weight_map' of tensor -> file")
    shards: dict[str, Path] = {}
    out = {}
    for tensor, shard in weight_map.items():
        what = f"{index_name} entry for tensor {tensor!r}"
        if not isinstance(shard, str):
            file_in_folder(folder, shard, what)  # raises: not a file name
        if shard not in shards:
            shards[shard] = file_in_folder(folder, shard, what)
        out[tensor] = shards[shard]
    return out


def refuse_remote_code(path: Path, config: dict) -> None:
    """Refuses a config that names the folder's own Python code (``auto_map``)."""
    auto_map = config.get("auto_map")
    if auto_map:
        classes = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else repr(auto_map)
        hint = ("load it with tokenizer=False and bring a tokenizer of your own"
                if path.name == "tokenizer_config.json" else
                "metafit has no implementation of custom architectures; use a checkpoint with a standard model_type")
        raise MalformedWeightsError(
            f"{path}: key 'auto_map' ({classes}) asks to run Python code shipped in the model folder. metafit never "
            f"runs a model folder's code (transformers is called with trust_remote_code=False); {hint}"
        )


def check_layer_claim(layers: Any, tensor_count: int, field: str, source: str) -> None:
    """Refuses a layer count larger than the checkpoint's number of tensors (every layer has several).

    A cheap bound applied before a config object is made: transformers builds per-layer lists
    in some configs (``Qwen2Config`` with 10^7 layers takes minutes).
    """
    from .convert import CheckpointMismatch

    if isinstance(layers, int) and not isinstance(layers, bool) and layers > tensor_count:
        raise CheckpointMismatch(
            f"{field} is {layers}, but {source} holds only {tensor_count} tensors, too few for {layers} layers"
        )


def read_hf_config(folder: str | Path, *, tokenizer: bool, tensor_count: int | None = None):
    """The transformers config of an HF folder, read without running anything from the folder.

    ``config.json`` (and, when ``tokenizer`` is set, the tokenizer files) are checked by the
    rules above and refused if they carry ``auto_map``; the ``model_type`` must be a family
    metafit implements (an unknown one lists the valid names) before transformers reads the file.

    Raises:
      FileNotFoundError: the folder has no ``config.json``.
      MalformedWeightsError: a file breaks the rules, ``auto_map`` is present, or transformers
        rejects a value (the message names the file).
      CheckpointMismatch: the config claims more layers than ``tensor_count`` (the number of
        tensors in the checkpoint) allows, checked before transformers builds the config.
      metafit.registry.UnknownNameError: ``model_type`` is not a metafit family.
    """
    import transformers
    from huggingface_hub.errors import StrictDataclassError

    from .base import family_of

    folder = Path(folder)
    if not present(folder, "config.json"):
        raise FileNotFoundError(f"{folder} has no config.json; an HF folder needs one next to the weights")
    config_path = file_in_folder(folder, "config.json", "config.json")
    raw = read_json(config_path, "model config")
    if not isinstance(raw, dict):
        raise MalformedWeightsError(f"{config_path}: expected a JSON object, found a {type(raw).__name__}")
    refuse_remote_code(config_path, raw)
    if tokenizer:
        for name in TOKENIZER_FILES:
            if present(folder, name):
                file_in_folder(folder, name, "tokenizer file")
        if present(folder, "tokenizer_config.json"):
            tokenizer_config = read_json(folder / "tokenizer_config.json", "tokenizer config")
            if isinstance(tokenizer_config, dict):
                refuse_remote_code(folder / "tokenizer_config.json", tokenizer_config)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise MalformedWeightsError(f"{config_path}: 'model_type' is {model_type!r}; expected a string like 'llama'")
    family_of(model_type)
    if tensor_count is not None:
        for key in ("num_hidden_layers", "n_layer"):
            check_layer_claim(raw.get(key), tensor_count, f"{key} in {config_path}", "the checkpoint")
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as err:
        raise MalformedWeightsError(f"{config_path}: transformers rejects this config: {err}") from err


__all__ = [
    "MalformedWeightsError",
    "open_regular",
    "file_in_folder",
    "present",
    "read_json",
    "parse_json",
    "read_safetensors_header",
    "SafetensorsHeader",
    "SafetensorsEntry",
    "read_index",
    "read_hf_config",
    "check_layer_claim",
    "refuse_remote_code",
    "SAFETENSORS_DTYPES",
    "TOKENIZER_FILES",
]


def _generation_field(path: Path, raw: dict, field: str, kinds: tuple[type, ...], check=None, what: str = ""):
    value = raw.get(field)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or (check and not check(value)):
        raise MalformedWeightsError(f"{path}: '{field}' is {value!r}; expected {what}")
    return value


def read_generation_config(folder: str | Path):
    """The :class:`~metafit.models.base.GenerationDefaults` of an HF folder's ``generation_config.json``.

    Read as transformers' ``GenerationConfig`` reads it: ``eos_token_id`` (an int or a list),
    ``do_sample``, ``temperature`` (default 1.0), ``top_k`` (default 50, as transformers),
    ``top_p``, ``max_new_tokens``. Other fields (beam search, penalties) have no counterpart in
    :func:`metafit.models.generate` and are ignored. No file: the greedy defaults.

    Raises:
      MalformedWeightsError: the file breaks the JSON rules above or a used field has a wrong type.
    """
    from .base import GenerationDefaults

    folder = Path(folder)
    if not present(folder, "generation_config.json"):
        return GenerationDefaults()
    path = file_in_folder(folder, "generation_config.json", "generation config")
    raw = read_json(path, "generation config")
    if not isinstance(raw, dict):
        raise MalformedWeightsError(f"{path}: expected a JSON object, found a {type(raw).__name__}")
    eos = raw.get("eos_token_id")
    eos_list = [eos] if _is_int(eos) else eos
    if eos is not None and not (isinstance(eos_list, list) and eos_list and all(_is_int(e) and e >= 0 for e in eos_list)):
        raise MalformedWeightsError(f"{path}: 'eos_token_id' is {eos!r}; expected a token id or a list of them")
    positive = "a number > 0"
    temperature = _generation_field(path, raw, "temperature", (int, float), lambda v: v > 0, positive)
    top_k = _generation_field(path, raw, "top_k", (int,), lambda v: v >= 0, "an integer >= 0 (0 = off)")
    top_p = _generation_field(path, raw, "top_p", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]")
    max_new = _generation_field(path, raw, "max_new_tokens", (int,), lambda v: v >= 1, "an integer >= 1")
    do_sample = _generation_field(path, raw, "do_sample", (bool,), None, "true or false")
    return GenerationDefaults(
        eos_token_ids=None if eos is None else tuple(int(e) for e in eos_list),
        do_sample=bool(do_sample),
        temperature=1.0 if temperature is None else float(temperature),
        top_k=50 if "top_k" not in raw else (int(top_k) or None),
        top_p=None if top_p is None or top_p >= 1.0 else float(top_p),
        max_new_tokens=max_new,
    )
