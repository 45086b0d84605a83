"""``python -m metafit.peft [--rank R]``: PEFT vs full fine-tuning memory for SmolLM2-135M's architecture."""
from __future__ import annotations

import argparse

from flax import nnx

from metafit.peft.config import AdapterConfig, BitFitConfig, IA3Config, LoraConfig, PrefixConfig
from metafit.peft.memory import memory_report


def _smollm2_135m():
    from metafit.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    all_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    configs = {
        f"lora r={args.rank} q,v": LoraConfig(rank=args.rank),
        f"lora r={args.rank} all linear": LoraConfig(rank=args.rank, targets=all_linear),
        f"dora r={args.rank} q,v": LoraConfig(rank=args.rank, use_dora=True),
        "adapter houlsby m=16": AdapterConfig(bottleneck=16),
        "ia3 k,v,down": IA3Config(),
        "bitfit (+missing bias)": BitFitConfig(add_missing_bias=True),
        "prefix P=10": PrefixConfig(num_prefix=10),
    }
    print("SmolLM2-135M architecture, optax.adamw, float32 (shapes only: nnx.eval_shape / jax.eval_shape)")
    print(f"{'method':24s} {'trainable':>10s} {'opt state':>12s} {'full-FT opt state':>18s} {'ratio':>7s}")
    for name, cfg in configs.items():
        r = memory_report(_smollm2_135m, cfg)
        print(f"{name:24s} {r['adapter_params']:10,d} {r['peft_opt_state_bytes'] / 2**20:8.2f} MiB "
              f"{r['full_ft_opt_state_bytes'] / 2**20:14.1f} MiB "
              f"{r['peft_opt_state_bytes'] / r['full_ft_opt_state_bytes']:7.2%}")
    print(f"base parameters: {r['base_params']:,d}")


if __name__ == "__main__":
    main()
