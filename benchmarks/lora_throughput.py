"""LoRA fine-tuning throughput of the SmolLM2-135M architecture: metafit vs transformers + peft.

Random weights and random tokens (the architecture is what costs time, not the values), so it runs
anywhere, including a GPU machine without the embedded GGUF. One process per side and placement, so
that the peak RSS printed is that side's own.

* ``--side metafit``: :func:`metafit.train.fit` with :func:`metafit.train.losses.next_token_loss`
  (chunked vocabulary loss), LoRA from :func:`metafit.peft.apply`, AdamW, all ``--steps`` steps
  fused into one dispatch. The first call (compilation + the steps) is reported as ``first_call_s``
  and the same call repeated (compiled step cached) is the timed one.
* ``--side torch``: ``transformers.LlamaForCausalLM`` + ``peft.get_peft_model`` (same LoRA rank,
  alpha, targets, no dropout), ``torch.optim.AdamW``, ``--torch-threads`` intra-op threads; one
  warm-up step, then ``--steps`` timed steps.

FLOPs per step: 4·N·T for a frozen base of N parameters over T tokens (forward 2NT + backward through
the activations 2NT; the LoRA weights' own FLOPs are negligible) plus the attention score/value
matmuls; ``of_peak`` divides the achieved rate by a square matmul (in ``--precision``) timed in the same process
just before (``--peak-size``), so it is a fraction of what this machine gives right now.

usage: python benchmarks/lora_throughput.py [--side metafit|torch] [--batch 8] [--seq 128] [--steps 10]
           [--precision float32] [--layers 30] [--targets q_proj,v_proj] [--remat none]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time


def smollm2_135m(layers: int, dtype: str = "float32"):
    from metafit.models import LlamaConfig
    from metafit.models.rope import RopeConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                       rope=RopeConfig(theta=100000.0), tie_word_embeddings=True, dtype=dtype)


def flops_per_step(cfg, n_base: int, batch: int, seq: int) -> float:
    attention = 4 * 2 * batch * seq**2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return 4 * n_base * batch * seq + attention


def jax_matmul_peak(size: int, dtype: str) -> float:
    """FLOP/s of ``x @ x`` for a square ``[size, size]`` matrix of ``dtype`` (best of 3 x 4 calls)."""
    import jax

    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: [f(a) for _ in range(4)][-1].block_until_ready()) for _ in range(3)) / 4
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_metafit(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from metafit import peft
    from metafit.models import LlamaForCausalLM
    from metafit.train import DeviceSampler, TrainConfig, fit
    from metafit.train.losses import next_token_loss

    peak = jax_matmul_peak(args.peak_size, args.precision)
    cfg = smollm2_135m(args.layers)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    peft.apply(model, peft.LoraConfig(rank=8, alpha=16.0, targets=tuple(args.targets.split(","))),
               rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    loss_fn = next_token_loss(graphdef)

    def sample(key):
        ids = jax.random.randint(key, (args.batch, args.seq), 0, cfg.vocab_size)
        return {"input_ids": ids, "loss_mask": jnp.ones_like(ids)}

    sampler = DeviceSampler(sample)

    def run(steps: int) -> float:
        train = TrainConfig(steps=steps, batch_size=args.batch, lr=1e-4, precision=args.precision,
                            log_every=steps, steps_per_dispatch=steps, remat=args.remat)
        return _timed(lambda: fit(loss_fn, params, sampler, train, key=jax.random.key(0),
                                  trainable=peft.trainable_mask(params), progress=False))

    first = run(args.steps)  # compiles the fused chunk of `steps` steps (cached afterwards)
    seconds = run(args.steps)
    return dict(side="metafit", jax=jax.__version__, device=str(jax.devices()[0].device_kind), n_base=n_base,
                first_call_s=round(first, 1), seconds=seconds, peak=peak, cfg=cfg)


def run_torch(args) -> dict:
    import peft as hf_peft
    import torch
    import transformers

    from metafit.models.llama import config_to_hf

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    a = torch.randn(args.peak_size, args.peak_size)
    torch.mm(a, a)
    peak = 2 * args.peak_size**3 / min(_timed(lambda: torch.mm(a, a)) for _ in range(3))
    del a
    cfg = smollm2_135m(args.layers)
    model = transformers.LlamaForCausalLM(config_to_hf(cfg))
    n_base = sum(p.numel() for p in model.parameters())
    model = hf_peft.get_peft_model(model, hf_peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                             target_modules=args.targets.split(",")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first = _timed(step)
    seconds = _timed(lambda: [step() for _ in range(args.steps)])
    return dict(side=f"torch {torch.__version__} ({torch.get_num_threads()} threads) + transformers "
                     f"{transformers.__version__} + peft {hf_peft.__version__}",
                n_base=n_base, first_call_s=round(first, 1), seconds=seconds, peak=peak, cfg=cfg)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", default="metafit", choices=["metafit", "torch"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none", choices=["none", "block", "dots_saveable"])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul timed as the peak")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    result = run_metafit(args) if args.side == "metafit" else run_torch(args)
    cfg, seconds, peak = result.pop("cfg"), result.pop("seconds"), result.pop("peak")
    tokens = args.batch * args.seq * args.steps
    achieved = flops_per_step(cfg, result["n_base"], args.batch, args.seq) * args.steps / seconds
    print(json.dumps({
        **result, "precision": args.precision, "remat": args.remat, "layers": args.layers, "targets": args.targets,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1), "gflops_per_s": round(achieved / 1e9, 1),
        "peak_gflops_per_s": round(peak / 1e9, 1), "of_peak": round(achieved / peak, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }))


if __name__ == "__main__":
    main()
