"""Export metafit adapters in the Hugging Face PEFT format (and the layout tables its loader inverts).

Writes ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained``
loads onto the matching ``transformers`` PyTorch model. One peft type per folder:

=====================  ==============  ======================================================
metafit module          peft type        tensors (torch layout)
=====================  ==============  ======================================================
LoRALinear (LoRA/DoRA)  ``LORA``         ``<m>.lora_A.weight = A.T [r, in]``, ``<m>.lora_B.weight = B.T [out, r]``,
                                         ``<m>.lora_magnitude_vector = m [out]`` (DoRA)
IA3Linear               ``IA3``          ``<m>.ia3_l = l [out, 1]`` (``[1, in]`` for feed-forward targets)
BitFitBias on Linear    ``BEFT``         ``<m>.beft_bias = delta_b [1, out]`` (peft's BEFT = BitFit as a bias offset)
KVPrefix (prefix)       ``PREFIX_TUNING`` ``prompt_embeddings [P, layers * 2 * kv_heads * head_dim]``
=====================  ==============  ======================================================

``<m>`` is ``base_model.model.<HF module name>``. HF module names come from the metafit module path
(``layers.0.self_attn.q_proj``) through ``module_name``: by default the model's ``hf_module_name(path)``
method if it has one, else ``model.hf_prefix + path`` if it has an ``hf_prefix`` string attribute, else
the path itself (metafit's models mirror HF names, so the path is the HF name).

What has no peft format (export raises and says so):

* bottleneck adapters (:class:`~metafit.peft.BottleneckAdapter`, Houlsby/Pfeiffer): peft has no
  bottleneck-adapter type (its ``ADAPTION_PROMPT`` is LLaMA-Adapter, a different method); AdapterHub's
  ``adapters`` library is where that format lives;
* BitFit on LayerNorm or on GPT-2's ``Conv1D``: peft's ``BEFT`` wraps ``nn.Linear`` only;
* prefix tuning on models without rotary positions (GPT-2, BERT) or on a subset of layers: see below.

Prefix positions. peft feeds the prefix as a KV cache of length P, so the real tokens sit at positions
``P .. P+T-1``; metafit keeps them at ``0 .. T-1`` (:mod:`metafit.peft.prefix`). With RoPE only
relative positions matter between real tokens, and a prefix key ``k`` seen by metafit equals the key
``R_P k`` (rotated by P positions) seen by peft, so the export rotates the keys by ``+P`` and the loader
by ``-P``: logits agree exactly. With learned absolute positions (GPT-2) the shift changes the model
itself, so such prefixes are refused rather than exported with other logits.

Gates must be 1 (HF PEFT has no gates); :func:`metafit.peft.reset_gates` first.
:func:`metafit.peft.load_hf_peft` is the inverse and reads these tables (:data:`TENSORS`).
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.peft.bitfit import BitFitBias
from metafit.peft.core import PeftModule, iter_modules, kernel_of, path_str
from metafit.peft.ia3 import IA3Linear
from metafit.peft.lora import LoRALinear
from metafit.peft.prefix import KVPrefix, attention_shape

KEY_PREFIX = "base_model.model."

# Why a metafit method has no peft format; quoted by export errors, the README and load errors.
NO_PEFT_FORMAT = {
    "BottleneckAdapter": "peft has no bottleneck-adapter type (Houlsby/Pfeiffer adapters live in "
                         "AdapterHub's `adapters` library; peft's ADAPTION_PROMPT is LLaMA-Adapter, another method)",
    "BitFitBias": "peft's BEFT (BitFit as a bias offset) wraps nn.Linear only, not LayerNorm or GPT-2's Conv1D",
    "KVPrefix": "peft's PREFIX_TUNING shifts the real tokens to positions P..P+T-1, which metafit can only undo "
                "for rotary (RoPE) models whose every layer has a prefix",
}


class TensorLayout(NamedTuple):
    """One adapter tensor: the metafit wrapper's variable ``attr`` <-> peft's ``<module>.<suffix>``.

    ``transpose``: torch holds the transpose (``[out, in]`` Linear layout); otherwise the torch tensor
    is a reshape of the metafit vector (``[n]`` <-> ``[n, 1]`` / ``[1, n]``).
    """

    attr: str
    transpose: bool

    def to_torch(self, value, shape: tuple[int, ...]) -> np.ndarray:
        value = np.asarray(value, dtype=np.float32)
        return np.ascontiguousarray((value.T if self.transpose else value).reshape(shape))

    def from_torch(self, tensor) -> np.ndarray:
        tensor = np.asarray(tensor)
        return tensor.T if self.transpose else tensor.reshape(-1)


# peft type -> {peft tensor suffix: layout}; torch_shapes says which of them a module has, and their shapes
TENSORS = {
    "LORA": {"lora_A.weight": TensorLayout("lora_A", True), "lora_B.weight": TensorLayout("lora_B", True),
             "lora_magnitude_vector": TensorLayout("lora_magnitude_vector", False)},
    "IA3": {"ia3_l": TensorLayout("ia3_l", False)},
    "BEFT": {"beft_bias": TensorLayout("bias_delta", False)},
}


def torch_shapes(peft_type: str, d_in: int, d_out: int, *, rank: int = 0, use_dora: bool = False,
                 feedforward: bool = False) -> dict[str, tuple[int, ...]]:
    """peft's tensors (suffix -> torch shape) for one module around a Linear layer ``[d_in, d_out]``."""
    if peft_type == "LORA":
        shapes = {"lora_A.weight": (rank, d_in), "lora_B.weight": (d_out, rank)}
        return {**shapes, "lora_magnitude_vector": (d_out,)} if use_dora else shapes
    if peft_type == "IA3":  # [1, in] rescales a feed-forward input, [out, 1] an output (also for Conv1D)
        return {"ia3_l": (1, d_in) if feedforward else (d_out, 1)}
    return {"beft_bias": (1, d_out)}


def wrapper_tensors(peft_type: str, wrapper: nnx.Module) -> dict[str, np.ndarray]:
    """The wrapper's weights as peft's tensors (suffix -> torch-layout array)."""
    d_in, d_out = kernel_of(wrapper.base_layer).get_value().shape
    shapes = torch_shapes(peft_type, d_in, d_out, rank=getattr(wrapper, "rank", 0),
                          use_dora=getattr(wrapper, "use_dora", False),
                          feedforward=getattr(wrapper, "feedforward", False))
    layouts = TENSORS[peft_type]
    return {s: layouts[s].to_torch(getattr(wrapper, layouts[s].attr).get_value(), shape) for s, shape in shapes.items()}


def default_module_name(model: nnx.Module) -> Callable[[str], str]:
    if callable(getattr(model, "hf_module_name", None)):
        return model.hf_module_name
    prefix = getattr(model, "hf_prefix", "")
    return lambda path: (prefix + path) if isinstance(prefix, str) else path


def _check_gate(name: str, module: PeftModule) -> None:
    gate = np.asarray(module.gate.get_value())
    if gate.ndim != 0 or gate != 1:
        raise ValueError(f"{name}: gate is {gate.tolist()}, but HF PEFT has no gates; call "
                         "metafit.peft.reset_gates(model) before exporting")


def is_conv1d(layer: nnx.Module) -> bool:
    """GPT-2's Conv1D stores its torch weight ``[in, out]``; HF PEFT then needs ``fan_in_fan_out=True``."""
    return any(cls.__name__ == "Conv1D" for cls in type(layer).__mro__)


def _module_tensors(peft_type, modules, name_of):
    tensors, names = {}, []
    for path, m in modules:
        name = name_of(path_str(path))
        _check_gate(name, m)
        for suffix, tensor in wrapper_tensors(peft_type, m).items():
            tensors[f"{KEY_PREFIX}{name}.{suffix}"] = tensor
        names.append(name)
    return tensors, names


def _lora_entries(modules, name_of, model):
    tensors, names = _module_tensors("LORA", modules, name_of)
    ranks = {n: m.rank for n, (_, m) in zip(names, modules)}
    alphas = {n: m.alpha for n, (_, m) in zip(names, modules)}
    first = modules[0][1]
    if len({(m.use_dora, m.use_rslora, m.dropout_rate, is_conv1d(m.base_layer)) for _, m in modules}) != 1:
        raise ValueError("HF PEFT needs one use_dora/use_rslora/dropout/layer-kind setting per adapter "
                         "(e.g. GPT-2 Conv1D and nn.Linear targets mixed); export them separately")
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "lora_dropout": first.dropout_rate,
        "use_dora": first.use_dora,
        "use_rslora": first.use_rslora,
        "target_modules": sorted(names),
        "bias": "none",
        "fan_in_fan_out": is_conv1d(first.base_layer),
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    return tensors, config


def _ia3_entries(modules, name_of, model):
    tensors, names = _module_tensors("IA3", modules, name_of)
    config = {
        "peft_type": "IA3",
        "target_modules": sorted(names),
        "feedforward_modules": sorted(n for n, (_, m) in zip(names, modules) if m.feedforward),
        "fan_in_fan_out": is_conv1d(modules[0][1].base_layer),
        "init_ia3_weights": True,
        "modules_to_save": None,
    }
    return tensors, config


def _beft_entries(modules, name_of, model):
    for path, m in modules:
        layer = m.base_layer
        if not isinstance(layer, nnx.Linear) or is_conv1d(layer):
            raise ValueError(f"{name_of(path_str(path))}: BitFit on {type(layer).__name__} has no peft format: "
                             f"{NO_PEFT_FORMAT['BitFitBias']}; export BitFit on Linear layers only")
    tensors, names = _module_tensors("BEFT", modules, name_of)
    return tensors, {"peft_type": "BEFT", "target_modules": sorted(names), "init_weights": True,
                     "modules_to_save": None}


# ----------------------------------------------------------------------------- prefix tuning


def attention_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """Attention modules carrying the ``kv_prefix`` hook, in layer order (NNX sorts list indices numerically)."""
    return [(p, m) for p, m in iter_modules(model) if hasattr(m, "kv_prefix") and not isinstance(m, PeftModule)]


def rope_of(model: nnx.Module):
    """The model's RoPE config (``model.config.rope``); raises for models without rotary positions."""
    rope = getattr(getattr(model, "config", None), "rope", None)
    if rope is None:
        raise ValueError(f"{type(model).__name__} has no rotary position embedding, so prefix tuning has no "
                         f"exact peft format for it: {NO_PEFT_FORMAT['KVPrefix']}")
    return rope


def rotate_prefix_keys(model: nnx.Module, keys: np.ndarray, positions: int) -> np.ndarray:
    """Keys ``[P, kv_heads, head_dim]`` rotated by RoPE over ``positions`` (negative undoes it).

    A pure rotation: YaRN's attention factor scales the queries alike in both conventions.
    """
    from metafit.models.rope import inv_frequencies, rotate_half

    inv_freq, _ = inv_frequencies(rope_of(model), keys.shape[-1])
    angles = positions * np.asarray(inv_freq, np.float64)
    angles = np.concatenate([angles, angles])
    rotated = keys * np.cos(angles) + np.asarray(rotate_half(jnp.asarray(keys))) * np.sin(angles)
    return rotated.astype(np.float32)


def prefix_geometry(model: nnx.Module):
    """``(attention modules, kv_heads, head_dim)`` of a model whose layers take prefixes (raises otherwise)."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention module with a kv_prefix hook")
    shapes = {attention_shape(m) for _, m in layers}
    if len(shapes) != 1:
        raise ValueError(f"attention layers differ in (kv_heads, head_dim): {sorted(shapes)}; peft's prefix "
                         "format needs one shape for all layers")
    (heads, head_dim), = shapes
    return layers, heads, head_dim


def _prefix_entries(prefixes, name_of, model):
    rope_of(model)  # the format exists only for rotary models: say so before looking at values
    layers, heads, head_dim = prefix_geometry(model)
    missing = [path_str(p) for p, m in layers if not isinstance(m.kv_prefix, KVPrefix)]
    if missing:
        raise ValueError(f"peft's PREFIX_TUNING has a prefix in every layer; these have none: {missing}")
    stacked = []
    for path, attention in layers:
        prefix = attention.kv_prefix
        _check_gate(path_str(path) + ".kv_prefix", prefix)
        num_prefix = prefix.prefix_k.get_value().shape[0]
        keys = rotate_prefix_keys(model, np.asarray(prefix.prefix_k.get_value(), np.float32), num_prefix)
        stacked.append([keys, np.asarray(prefix.prefix_v.get_value(), np.float32)])
    if len({kv[0].shape for kv in stacked}) != 1:
        raise ValueError("peft's PREFIX_TUNING needs the same number of prefix tokens in every layer")
    # [layers, 2, P, kv_heads, head_dim] -> peft's [P, layers * 2 * kv_heads * head_dim]
    table = np.asarray(stacked).transpose(2, 0, 1, 3, 4)
    num_prefix = table.shape[0]
    config = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": num_prefix,
        "token_dim": heads * head_dim,
        "num_attention_heads": heads,
        "num_layers": len(layers),
        "num_transformer_submodules": 1,
        "encoder_hidden_size": heads * head_dim,
        "prefix_projection": False,
        "init_weights": None,
        "modules_to_save": None,
    }
    return {"prompt_embeddings": np.ascontiguousarray(table.reshape(num_prefix, -1))}, config


# metafit module class -> (peft type, writer)
FORMATS = {
    LoRALinear: ("LORA", _lora_entries),
    IA3Linear: ("IA3", _ia3_entries),
    BitFitBias: ("BEFT", _beft_entries),
    KVPrefix: ("PREFIX_TUNING", _prefix_entries),
}


def export_hf_peft(model: nnx.Module, directory, *, base_model_name_or_path: str | None = None,
                   task_type: str | None = "CAUSAL_LM",
                   module_name: Callable[[str], str] | None = None) -> Path:
    """Writes the model's adapter as an HF PEFT adapter folder (LoRA/DoRA, IA3, BEFT or prefix tuning).

    Args:
      model: a model after :func:`metafit.peft.apply` with one exportable method (see the module docstring's
        table; bottleneck adapters have no peft format).
      directory: output folder (created).
      base_model_name_or_path: stored in ``adapter_config.json`` (HF loads the base model from it).
      task_type: HF ``TaskType`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...) or None.
      module_name: maps a metafit module path to the HF module name (see module docstring).

    Returns:
      The directory path.

    Raises:
      ValueError: no, or more than one, exportable method; a method without a peft format (the message
        says why); gates other than 1.
    """
    name_of = module_name or default_module_name(model)
    found = collections.defaultdict(list)
    for path, m in iter_modules(model):
        if isinstance(m, PeftModule):
            found[type(m)].append((path, m))
    kinds = ", ".join(f"{cls.__name__} x{len(v)}" for cls, v in found.items()) or "none"
    unsupported = [cls.__name__ for cls in found if cls not in FORMATS]
    if unsupported or len(found) != 1:
        why = "".join(f" {n} has no peft format: {NO_PEFT_FORMAT[n]}." for n in unsupported if n in NO_PEFT_FORMAT)
        raise ValueError(
            "export_hf_peft writes exactly one HF PEFT type per folder (LoRA/DoRA, IA3, BitFit as BEFT, or "
            f"prefix tuning); this model has: {kinds}.{why}"
        )
    (cls, modules), = found.items()
    peft_type, write = FORMATS[cls]
    tensors, config = write(modules, name_of, model)
    config.update(base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                  inference_mode=True, revision=None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory
