"""NNX parameters <-> HF tensor names, derived from attribute paths (no per-model tables).

Module attribute paths mirror HF's, so the HF name of a parameter is its path joined by dots,
with NNX leaf names renamed (``kernel`` and ``embedding`` -> ``weight``). ``nnx.Linear``
kernels are ``[in, out]`` while PyTorch ``nn.Linear`` weights are ``[out, in]``: they are
transposed, except in :class:`~metafit.models.layers.Conv1D` (GPT-2 stores ``[in, out]``).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import Conv1D

_LEAF_NAMES = {"kernel": "weight", "embedding": "weight"}

# Checkpoint entries that are buffers, not parameters: never an error when left unused.
_IGNORED_SUFFIXES = (
    "rotary_emb.inv_freq",
    "attn.bias",
    "attn.masked_bias",
    "embeddings.position_ids",
    # A tied-embedding model reads the output projection from the input embedding.
    "lm_head.weight",
)

# Legacy HF layer-norm names.
_LEGACY = {".gamma": ".weight", ".beta": ".bias"}


def _base_params(model) -> nnx.State:
    # LoRA and other adapter parameters are not part of the HF base checkpoint.
    return nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))


def _owner(model, path) -> nnx.Module:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def hf_name(path: tuple) -> str:
    """HF tensor name of the parameter at NNX ``path`` (e.g. ``('lm_head', 'kernel')``)."""
    # PEFT wrappers keep the wrapped layer as ``.base_layer`` (HF PEFT's name); HF base names lack it.
    *owner, leaf = (str(p) for p in path if p != "base_layer")
    return ".".join(owner + [_LEAF_NAMES.get(leaf, leaf)])


def _transposed(model, path) -> bool:
    return path[-1] == "kernel" and not isinstance(_owner(model, path[:-1]), Conv1D)


def hf_layout(model) -> Iterator[tuple[tuple, str, bool]]:
    """``(nnx_path, hf_name, transposed)`` for every base parameter of ``model``."""
    for path, _ in nnx.to_flat_state(_base_params(model)):
        yield path, hf_name(path), _transposed(model, path)


def to_hf_tensors(model, dtype=None) -> dict[str, np.ndarray]:
    """The model's parameters as an HF state dict of numpy arrays (PyTorch layouts)."""
    out = {}
    flat = dict(nnx.to_flat_state(_base_params(model)))
    for path, name, transposed in hf_layout(model):
        value = np.asarray(jax.device_get(flat[path][...]))
        if dtype is not None:
            value = value.astype(dtype)
        out[name] = np.ascontiguousarray(value.T if transposed else value)
    return out


class MalformedWeightsError(ValueError):
    """A model file cannot be used as it is: metafit's one error type for bad model files.

    Raised for a malformed or truncated safetensors or GGUF file, a weights index whose entries
    leave the model folder or name something that is not a regular file, a config that is not
    valid JSON or asks to run the folder's own code (``auto_map``), a GGUF feature metafit does
    not support, and (as the subclass :class:`CheckpointMismatch`) tensors that do not fit the
    config. The message names the file, the tensor, entry or field, and what is wrong.
    """


class CheckpointMismatch(MalformedWeightsError):
    """A checkpoint's tensors do not fit the architecture its config describes."""


def _ignored(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in _IGNORED_SUFFIXES)


class _CheckpointNames:
    """Looks up HF parameter names among a checkpoint's tensor names.

    Legacy layer-norm names (``gamma``/``beta``) are accepted, and so are checkpoints saved with
    or without the HF ``base_model_prefix`` (``model.``, ``transformer.``, ``bert.``).
    """

    def __init__(self, names, base_prefix: str):
        self.prefix = base_prefix + "."
        self.aliases = {}
        for name in names:
            canonical = name
            for old, new in _LEGACY.items():
                if canonical.endswith(old):
                    canonical = canonical[: -len(old)] + new
            self.aliases[canonical] = name

    def forms(self, name: str) -> tuple[str, str]:
        """``name`` and its other spelling (with the base prefix added or removed)."""
        other = name[len(self.prefix):] if name.startswith(self.prefix) else self.prefix + name
        return name, other

    def find(self, name: str) -> str | None:
        return next((self.aliases[c] for c in self.forms(name) if c in self.aliases), None)


def load_hf_tensors(
    model,
    get_tensor: Callable[[str], np.ndarray],
    names: set[str],
    *,
    base_prefix: str,
    source: str,
):
    """Fills ``model``'s parameters from HF-named tensors, in place; returns ``model``.

    Args:
      model: an NNX model (may be abstract, from ``nnx.eval_shape``).
      get_tensor: reads one tensor (numpy, PyTorch layout) by its checkpoint name.
      names: all tensor names in the checkpoint.
      base_prefix: HF ``base_model_prefix`` (``"model"``, ``"transformer"``, ``"bert"``);
        checkpoints saved from a base model lack it, those from a head model have it.
      source: checkpoint description for error messages.

    Raises:
      CheckpointMismatch: a tensor is missing or its shape differs (the message names the
        tensor and both shapes).
    """
    find = _CheckpointNames(names, base_prefix).find
    state = _base_params(model)
    flat = dict(nnx.to_flat_state(state))
    used, missing = set(), []
    for path, name, transposed in hf_layout(model):
        key = find(name)
        if key is None:
            missing.append(name)
            continue
        variable = flat[path]
        expected = tuple(variable.shape)
        expected_hf = expected[::-1] if transposed else expected
        tensor = np.asarray(get_tensor(key))
        if tuple(tensor.shape) != expected_hf:
            raise CheckpointMismatch(
                f"tensor {key!r} in {source} has shape {tuple(tensor.shape)}, but the architecture in its "
                f"config expects {expected_hf} for {type(model).__name__}"
            )
        value = tensor.T if transposed else tensor
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
        used.add(key)
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise CheckpointMismatch(f"{source} lacks tensors that {type(model).__name__} needs: {shown}")
    unused = sorted(n for n in names - used if not _ignored(n))
    if unused:
        shown = ", ".join(unused[:8]) + (f" (+{len(unused) - 8} more)" if len(unused) > 8 else "")
        warnings.warn(f"{source}: {len(unused)} tensors unused by {type(model).__name__}: {shown}", stacklevel=3)
    nnx.update(model, state)
    return model


def check_checkpoint_layout(
    template,
    num_layers: Any,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    base_prefix: str,
    source: str,
    layers_field: str = "num_hidden_layers",
) -> None:
    """Checks a checkpoint's tensor names and shapes against an architecture before it is built.

    Building a model costs time in its number of layers (and a config may claim 10^5 of them), so
    names and shapes are compared first, from what a file's header says. ``template`` is the
    architecture built abstractly with one layer; its layer stands for each of ``num_layers``.
    The cost is linear in the checkpoint's size, whatever the config claims.

    Args:
      template: the model class built (``nnx.eval_shape``) from the config with one layer.
      num_layers: the layer count the config asks for.
      shapes: every tensor name in the checkpoint -> its shape (PyTorch layout).
      base_prefix: HF ``base_model_prefix`` (see :func:`load_hf_tensors`).
      source: checkpoint description for error messages.
      layers_field: where ``num_layers`` comes from, for error messages.

    Raises:
      MalformedWeightsError: ``num_layers`` is not a non-negative integer.
      CheckpointMismatch: naming the first tensor that is missing, has another shape, or is extra:
        a layer beyond ``num_layers``, or a tensor inside a layer that the architecture has no
        place for (a bias the config turns off). Extra tensors outside the layers (a
        classification head when loading the base model) stay a warning of :func:`load_hf_tensors`.
    """
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 0:
        raise MalformedWeightsError(f"{layers_field} is {num_layers!r}; expected a non-negative integer")
    cls = type(template).__name__
    flat = dict(nnx.to_flat_state(_base_params(template)))
    top, per_layer, layer_prefix = [], [], None
    for path, name, transposed in hf_layout(template):
        shape = tuple(flat[path].shape)
        expected = shape[::-1] if transposed else shape
        at = next((i for i, part in enumerate(path) if isinstance(part, int)), None)
        if at is None:
            top.append((name, expected))
            continue
        layer_prefix = ".".join(str(p) for p in path[:at] if p != "base_layer") + "."
        per_layer.append((name[len(layer_prefix) + len(str(path[at])) + 1:], expected))
    names = _CheckpointNames(shapes, base_prefix)
    used = set()

    def check(name, expected):
        key = names.find(name)
        if key is None:
            raise CheckpointMismatch(f"{source} lacks tensor {name!r} that {cls} needs")
        if tuple(shapes[key]) != expected:
            raise CheckpointMismatch(
                f"tensor {key!r} in {source} has shape {tuple(shapes[key])}, but the architecture in its "
                f"config expects {expected} for {cls}"
            )
        used.add(key)

    for name, expected in top:
        check(name, expected)
    if layer_prefix is None:
        return
    layers, inside = {}, []  # layer index -> a tensor of it; checkpoint names under the layer prefix
    for canonical, key in names.aliases.items():
        form = next((f for f in names.forms(canonical) if f.startswith(layer_prefix)), None)
        if form is None:
            continue
        inside.append(key)
        index = form[len(layer_prefix):].partition(".")[0]
        if index.isascii() and index.isdecimal() and str(int(index)) == index:
            layers.setdefault(int(index), key)
    first_absent = next(i for i in range(len(layers) + 1) if i not in layers)
    if first_absent < num_layers:
        top = max(layers, default=None)
        held = ("no layers" if top is None else "layer 0" if top == 0 else
                f"layers 0-{top}" if len(layers) == top + 1 else f"{len(layers)} layers numbered up to {top}")
        raise CheckpointMismatch(
            f"{layers_field} is {num_layers}, but {source} has no tensors for layer {first_absent} (no "
            f"'{layer_prefix}{first_absent}.{per_layer[0][0]}'); it holds {held}"
        )
    beyond = [i for i in layers if i >= num_layers]
    if beyond:
        extra = min(beyond)
        raise CheckpointMismatch(
            f"{layers_field} is {num_layers}, but {source} also has layer {extra} (tensor {layers[extra]!r}); "
            f"the config and the checkpoint disagree on the number of layers"
        )
    for layer in range(num_layers):
        for suffix, expected in per_layer:
            check(f"{layer_prefix}{layer}.{suffix}", expected)
    extra = sorted(key for key in inside if key not in used and not _ignored(key))
    if extra:
        raise CheckpointMismatch(
            f"{source} has tensor {extra[0]!r} (shape {tuple(shapes[extra[0]])}) that {cls} as configured has no "
            f"place for" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
            + "; its config and weights disagree (a bias or norm the config turns off?)"
        )
