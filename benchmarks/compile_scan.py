"""First-call compilation of the LoRA training step with and without the layer scan (``train.scan_layers``).

Compiles ``value_and_grad`` of :func:`metafit.train.losses.next_token_loss` over the LoRA weights of
the SmolLM2-135M architecture (random weights) at ``--layers`` layers, once with the blocks unrolled
and once as a ``lax.scan`` over their stacked states, and prints the seconds each compilation took
(lowering + XLA compilation; nothing is executed).

usage: python benchmarks/compile_scan.py [--layers 30] [--targets q_proj,v_proj]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from metafit import peft
from metafit.models import LlamaForCausalLM
from metafit.models.remat import remat_policy
from metafit.train.losses import next_token_loss

from lora_throughput import smollm2_135m


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    model = LlamaForCausalLM(smollm2_135m(args.layers), rngs=nnx.Rngs(0))
    peft.apply(model, peft.LoraConfig(rank=8, alpha=16.0, targets=tuple(args.targets.split(","))), rngs=nnx.Rngs(1))
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    ids = jnp.zeros((args.batch, args.seq), jnp.int32)
    batch = {"input_ids": ids, "loss_mask": jnp.ones_like(ids)}
    loss = next_token_loss(graphdef)
    for scan in (False, True):
        def step(lora_params, rest_params):
            with remat_policy("none", scan_layers=scan):
                return jax.value_and_grad(lambda p: loss(nnx.merge_state(p, rest_params), batch, None)[0])(lora_params)

        start = time.perf_counter()
        jax.jit(step).lower(lora, rest).compile()
        print(json.dumps({"layers": args.layers, "targets": args.targets, "scan_layers": scan,
                          "compile_s": round(time.perf_counter() - start, 1),
                          "load_average": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
