"""Tensor-by-tensor safetensors reading and writing for merges larger than memory.

The safetensors layout is: an 8-byte little-endian header length ``N``, ``N`` bytes of
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the raw little-endian tensor bytes. Reading seeks to one tensor's bytes and reads
just those (no memory map, so resident memory is what the merge holds); writing lays out the header from the known shapes first and then
appends tensors as they are produced, so neither side ever holds a whole model.
A folder is either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``weight_map``), as transformers writes them.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from metafit.models.model_files import file_in_folder, present, read_index, read_safetensors_header

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    """A weights file or folder is missing or malformed."""


def read_header(path: str | Path) -> tuple[dict, int]:
    """Returns (header dict without ``__metadata__``, byte offset of the data section).

    The header is validated by :func:`metafit.models.model_files.read_safetensors_header`
    (regular file, bounded length, dtypes, shapes, offsets tiling the data section).

    Raises:
      MalformedWeightsError: naming the file and the tensor or field at fault.
    """
    checked = read_safetensors_header(path)
    header = {name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
              for name, e in checked.tensors.items()}
    return header, checked.data_start


class SafetensorsFolder:
    """Lazy, read-only view of the tensors of an HF folder (or a single .safetensors file).

    Args:
      path: folder with ``model.safetensors`` or ``model.safetensors.index.json``, or a file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            files = [self.path]  # named by the user; read_header refuses anything but a regular file
        elif present(self.path, INDEX_NAME):  # every shard must be a regular file inside the folder
            files = sorted(set(read_index(self.path, INDEX_NAME).values()))
        elif present(self.path, WEIGHTS_NAME):
            files = [file_in_folder(self.path, WEIGHTS_NAME, "weights file")]
        elif self.path.is_dir():
            pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            hint = f" (found pickle weights {pickles}: convert them to safetensors first)" if pickles else ""
            raise SafetensorsError(f"{self.path}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")
        else:
            raise SafetensorsError(f"model not found: {self.path} does not exist")
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for file in files:
            header, start = read_header(file)
            for name, entry in header.items():
                self._entries[name] = (file, entry, start)

    def names(self) -> list[str]:
        """Tensor names in file order (the order they are stored)."""
        return sorted(self._entries, key=lambda n: (str(self._entries[n][0]), self._entries[n][1]["data_offsets"][0]))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entries[name][1]["dtype"]
        if code not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor '{name}' has unsupported dtype {code}")
        return DTYPES[code]

    def read(self, name: str) -> np.ndarray:
        """Reads one tensor from disk into a fresh array (no mapping stays resident)."""
        file, entry, start = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype = self.dtype(name)
        array = np.fromfile(file, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        return array.reshape(self.shape(name))


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in the order given to the constructor.

    Args:
      path: output file.
      layout: ``[(name, dtype, shape), ...]`` in write order.
      metadata: optional ``__metadata__`` string map (transformers expects ``{"format": "pt"}``).
    """

    def __init__(self, path: str | Path, layout: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.layout = [(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in layout]
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in self.layout:
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
        # Written under a temporary name and renamed by close(): an existing file at ``path`` stays
        # intact until the new one is complete, and a killed or failed write leaves no file that
        # looks complete (the header comes first, so a truncated file would otherwise pass for one).
        self.path = Path(path)
        self._partial = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        self._handle = open(self._partial, "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        expected_name, dtype, shape = self.layout[self._next]
        if name != expected_name or array.shape != shape:
            raise SafetensorsError(f"writer expected '{expected_name}' {shape}, got '{name}' {array.shape}")
        self._handle.write(np.ascontiguousarray(array, dtype=dtype).tobytes())
        self._next += 1

    def close(self) -> None:
        self._handle.close()
        if self._next != len(self.layout):
            self._partial.unlink(missing_ok=True)
            raise SafetensorsError(f"only {self._next} of {len(self.layout)} tensors were written")
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Drops the partial file; an existing file at ``path`` is left as it was."""
        self._handle.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.abort()
