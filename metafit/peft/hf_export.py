"""Export LoRA / DoRA / IA3 adapters in the Hugging Face PEFT format.

Writes ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained``
loads onto the matching ``transformers`` PyTorch model. Tensor names are
``base_model.model.<HF module name>.<param>`` with torch's Linear layout ``[out, in]``:

    lora_A.weight = A.T   [r, in]        lora_B.weight = B.T   [out, r]
    lora_magnitude_vector = m [out]      (DoRA)
    ia3_l = l [out, 1]  (or [1, in] for feed-forward targets)

HF module names come from the metafit module path (``layers.0.self_attn.q_proj``) through
``module_name``: by default the model's ``hf_module_name(path)`` method if it has one, else
``model.hf_prefix + path`` if it has an ``hf_prefix`` string attribute, else the path itself.
Gates must be 1 (HF PEFT has no gates); :func:`metafit.peft.reset_gates` first.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Callable

import numpy as np
from flax import nnx

from metafit.peft.core import PeftModule, iter_modules, path_str
from metafit.peft.ia3 import IA3Linear
from metafit.peft.lora import LoRALinear


def default_module_name(model: nnx.Module) -> Callable[[str], str]:
    if callable(getattr(model, "hf_module_name", None)):
        return model.hf_module_name
    prefix = getattr(model, "hf_prefix", "")
    return lambda path: (prefix + path) if isinstance(prefix, str) else path


def _numpy(variable: nnx.Variable) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(variable.get_value(), dtype=np.float32))


def _check_gate(name: str, module: PeftModule) -> None:
    gate = np.asarray(module.gate.get_value())
    if gate.ndim != 0 or gate != 1:
        raise ValueError(f"{name}: gate is {gate.tolist()}, but HF PEFT has no gates; call "
                         "metafit.peft.reset_gates(model) before exporting")


def _fan_in_fan_out(wrapper) -> bool:
    # GPT-2's Conv1D stores its torch weight [in, out]; HF PEFT then needs fan_in_fan_out=True.
    return any(cls.__name__ == "Conv1D" for cls in type(wrapper.base_layer).__mro__)


def _lora_entries(modules, name_of):
    tensors, ranks, alphas = {}, {}, {}
    for path, m in modules:
        name = name_of(path_str(path))
        _check_gate(name, m)
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = _numpy(m.lora_A).T.copy()
        tensors[f"{key}.lora_B.weight"] = _numpy(m.lora_B).T.copy()
        if m.use_dora:
            tensors[f"{key}.lora_magnitude_vector"] = _numpy(m.lora_magnitude_vector)
        ranks[name], alphas[name] = m.rank, m.alpha
    first = modules[0][1]
    if len({(m.use_dora, m.use_rslora, m.dropout_rate, _fan_in_fan_out(m)) for _, m in modules}) != 1:
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
        "target_modules": sorted(ranks),
        "bias": "none",
        "fan_in_fan_out": _fan_in_fan_out(first),
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    return tensors, config


def _ia3_entries(modules, name_of):
    tensors, feedforward = {}, []
    for path, m in modules:
        name = name_of(path_str(path))
        _check_gate(name, m)
        scale = _numpy(m.ia3_l)
        # torch shapes: [1, in] rescales a feed-forward input, [out, 1] an output (also for Conv1D)
        tensors[f"base_model.model.{name}.ia3_l"] = scale[None, :] if m.feedforward else scale[:, None]
        if m.feedforward:
            feedforward.append(name)
    config = {
        "peft_type": "IA3",
        "target_modules": sorted(name_of(path_str(p)) for p, _ in modules),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": _fan_in_fan_out(modules[0][1]),
        "init_ia3_weights": True,
        "modules_to_save": None,
    }
    return tensors, config


def export_hf_peft(model: nnx.Module, directory, *, base_model_name_or_path: str | None = None,
                   task_type: str | None = "CAUSAL_LM",
                   module_name: Callable[[str], str] | None = None) -> Path:
    """Writes the model's LoRA/DoRA or IA3 adapter as an HF PEFT adapter folder.

    Args:
      model: a model after :func:`metafit.peft.apply` with LoRA/DoRA or IA3 (one kind per export).
      directory: output folder (created).
      base_model_name_or_path: stored in ``adapter_config.json`` (HF loads the base model from it).
      task_type: HF ``TaskType`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...) or None.
      module_name: maps a metafit module path to the HF module name (see module docstring).

    Returns:
      The directory path.
    """
    name_of = module_name or default_module_name(model)
    peft = [(p, m) for p, m in iter_modules(model) if isinstance(m, PeftModule)]
    lora = [(p, m) for p, m in peft if isinstance(m, LoRALinear)]
    ia3 = [(p, m) for p, m in peft if isinstance(m, IA3Linear)]
    others = sorted({type(m).__name__ for _, m in peft if not isinstance(m, (LoRALinear, IA3Linear))})
    if others or (lora and ia3) or not (lora or ia3):
        raise ValueError(
            "export_hf_peft writes exactly one HF PEFT type: LoRA/DoRA or IA3; this model has "
            f"{len(lora)} LoRA, {len(ia3)} IA3 modules and others: {others or 'none'}"
        )
    tensors, config = _lora_entries(lora, name_of) if lora else _ia3_entries(ia3, name_of)
    config.update(base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                  inference_mode=True, revision=None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory

