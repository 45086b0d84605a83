"""Forward-only scoring throughput of SmolLM2-135M: metafit (JAX, jit) vs transformers (PyTorch), CPU fp32.

Scoring = per-token log-likelihood of a [batch, seq] block of tokens (full-vocabulary logits,
log-softmax, gather), the work an eval loop does. Both sides use the same weights: the embedded
GGUF dequantised by metafit, saved as an HF folder and loaded by transformers.

    python benchmarks/models_forward.py                      # batch 4 x 128 tokens, 5 timed repeats
    python benchmarks/models_forward.py --batch 8 --seq 256 --no-torch

FLOP count per token: 2 x (matmul parameters incl. the tied LM head) + 4 x layers x seq x hidden
(QK^T and PV), i.e. the dense forward; utilisation is against the peak GFLOP/s given by --peak.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import metafit.models as mm


def forward_flops_per_token(cfg, seq: int) -> float:
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * d * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    per_layer = attn + 3 * h * f
    matmul_params = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size
    attention = 4 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * d
    return 2 * matmul_params + attention


def token_log_likelihood(logits, ids):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def time_calls(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak", type=float, default=160.0, help="peak fp32 GFLOP/s of this CPU (DESIGN.md)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers/PyTorch side")
    args = parser.parse_args()

    model, _ = mm.load("smollm2-135m-instruct")
    cfg = model.config
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq
    flops = forward_flops_per_token(cfg, args.seq) * tokens

    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, ids):
        return token_log_likelihood(nnx.merge(graphdef, state)(ids), ids)

    device_ids = jnp.asarray(ids)
    start = time.perf_counter()
    ours_ll = np.asarray(score(state, device_ids))
    compile_s = time.perf_counter() - start
    ours_s = time_calls(lambda: score(state, device_ids).block_until_ready(), args.repeats)
    rows = [("metafit (jax.jit)", ours_s)]
    print(f"metafit compile+first call: {compile_s:.1f} s")

    if not args.no_torch:
        import torch
        import transformers

        with tempfile.TemporaryDirectory() as folder:
            mm.save(model, folder)
            reference = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        torch_ids = torch.as_tensor(ids, dtype=torch.long)

        def torch_score():
            with torch.inference_mode():
                logits = reference(torch_ids).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                return logp.gather(-1, torch_ids[:, 1:, None])[..., 0]

        theirs_ll = torch_score().numpy()
        print(f"max |log-likelihood difference| metafit vs torch: {np.abs(ours_ll - theirs_ll).max():.2e}")
        rows.append((f"transformers {transformers.__version__} + torch {torch.__version__} ({torch.get_num_threads()} threads)",
                     time_calls(torch_score, args.repeats)))

    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nSmolLM2-135M forward scoring, batch {args.batch} x seq {args.seq} = {tokens} tokens, fp32, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}; median of {args.repeats}")
    print(f"{'implementation':<60} {'s/batch':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8}")
    for name, seconds in rows:
        gflops = flops / seconds / 1e9
        print(f"{name:<60} {seconds:8.3f} {tokens / seconds:9.0f} {gflops:8.1f} {gflops / args.peak:8.0%}")
    if len(rows) == 2:
        print(f"speed ratio metafit / torch: {rows[1][1] / rows[0][1]:.2f}x")
    print(f"peak RSS of this process (both models): {peak_rss_gib:.2f} GiB")


if __name__ == "__main__":
    main()
