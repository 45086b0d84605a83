"""LoRA fine-tuning throughput of the SmolLM2-135M architecture through metafit.train.fit.

Random weights and random tokens (the architecture is what costs time, not the values), so it runs
anywhere, including a GPU machine without the embedded GGUF. Reports tokens/s and achieved FLOP/s,
counting 4·N·T per step for a frozen base (forward 2NT + backward through activations 2NT; the
LoRA weights' own FLOPs are negligible) plus the attention score/value matmuls.

usage: python benchmarks/lora_throughput.py [--batch 8] [--seq 128] [--steps 10] [--precision float32]
                                            [--layers 30] [--targets q_proj,v_proj]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from metafit import peft
from metafit.models import LlamaConfig, LlamaForCausalLM
from metafit.models.rope import RopeConfig
from metafit.train import DeviceSampler, TrainConfig, fit
from metafit.train.losses import causal_lm_loss


def smollm2_135m(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                       rope=RopeConfig(theta=100000.0), tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--targets", default="q_proj,v_proj")
    args = parser.parse_args()

    cfg = smollm2_135m(args.layers)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    peft.apply(model, peft.LoraConfig(rank=8, alpha=16.0, targets=tuple(args.targets.split(","))),
               rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)

    def loss_fn(p, batch, key):
        logits = nnx.merge(graphdef, p)(batch, None)
        return causal_lm_loss(logits, batch, jnp.ones_like(batch))[0], {}

    sampler = DeviceSampler(lambda key: jax.random.randint(key, (args.batch, args.seq), 0, cfg.vocab_size))

    def run(steps: int) -> float:
        train = TrainConfig(steps=steps, batch_size=args.batch, lr=1e-4, precision=args.precision,
                            log_every=steps, steps_per_dispatch=steps)
        start = time.perf_counter()
        fit(loss_fn, params, sampler, train, key=jax.random.key(0), trainable=peft.trainable_mask(params),
            progress=False)
        return time.perf_counter() - start

    warm = run(args.steps)  # compiles the fused chunk of `steps` steps (cached afterwards)
    seconds = run(args.steps)
    tokens = args.batch * args.seq * args.steps
    attention = 4 * 2 * args.batch * args.seq**2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    flops = (4 * n_base * args.batch * args.seq + attention) * args.steps
    print(json.dumps({
        "device": str(jax.devices()[0].device_kind), "precision": args.precision, "layers": args.layers,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "base_params": int(n_base),
        "first_call_s": round(warm, 2), "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
        "tflops_per_s": round(flops / seconds / 1e12, 3),
    }))


if __name__ == "__main__":
    main()
