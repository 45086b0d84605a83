"""Parameter-efficient fine-tuning for NNX models: LoRA, DoRA, adapters, prefix, BitFit, IA3.

Quick tour::

    from flax import nnx
    import metafit.peft as peft

    model = peft.apply(model, peft.LoraConfig(rank=8, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(0))
    graphdef, adapter_params, frozen = peft.split(model)     # only adapter_params train
    peft.set_gates(model, gates)                               # [count_gated_modules(model), batch]
    peft.merge_lora(model)                                     # fold LoRA into the base kernels
    peft.export_hf_peft(model, "out/adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    peft.load_hf_peft(model, "adapter-saved-by-peft/")          # LoRA/DoRA, IA3, BEFT, prefix tuning
    cfg = peft.LoraConfig.from_hf(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])  # peft's names

Every PEFT module is gated (:mod:`metafit.peft.gates`): gate 1 = plain PEFT, gate 0 = base model.
"""
from metafit.peft.adapter import BottleneckAdapter
from metafit.peft.api import (PEFT_METHODS, apply, as_peft_config, merge_all, merge_lora, remove_peft, split,
                              trainable_filter, trainable_mask)
from metafit.peft.bitfit import BitFitBias
from metafit.peft.config import AdapterConfig, BitFitConfig, IA3Config, LoraConfig, PeftConfig, PrefixConfig
from metafit.peft.core import (AdapterParam, BitFitParam, DoRAMagnitude, Gate, IA3Param, PeftModule, PeftParam,
                               PeftWrapper, PrefixParam, dropout_enabled)
from metafit.peft.gates import (bernoulli_gates, count_gated_modules, gated_paths, get_gates, reset_gates,
                                set_gates)
from metafit.peft.hf_export import export_hf_peft
from metafit.peft.hf_import import load_hf_peft
from metafit.peft.ia3 import IA3Linear
from metafit.peft.lora import LoRALinear
from metafit.peft.memory import memory_report, num_params, optimizer_state_bytes, tree_bytes
from metafit.peft.prefix import KVPrefix

__all__ = [
    "PEFT_METHODS", "AdapterConfig", "AdapterParam", "BitFitBias", "BitFitConfig", "BitFitParam",
    "BottleneckAdapter", "DoRAMagnitude", "Gate", "IA3Config", "IA3Linear", "IA3Param", "KVPrefix",
    "LoRALinear", "LoraConfig", "PeftConfig", "PeftModule", "PeftParam", "PeftWrapper", "PrefixConfig",
    "PrefixParam", "apply", "as_peft_config", "bernoulli_gates", "count_gated_modules", "dropout_enabled", "export_hf_peft",
    "gated_paths", "get_gates", "load_hf_peft", "memory_report", "merge_all", "merge_lora", "num_params", "optimizer_state_bytes",
    "remove_peft", "reset_gates", "set_gates", "split", "trainable_filter", "trainable_mask", "tree_bytes",
]
