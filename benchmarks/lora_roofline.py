"""How fast can a LoRA training step of the SmolLM2 architecture be on this machine? A matmul roofline.

Lists every matrix product of one training step (frozen base, LoRA r on the given targets, batch x seq
tokens, full-vocabulary loss): the base projections forward and their input gradients backward, the
attention score/value products and their four gradients, the tied LM head forward and backward, and
each adapter's six small products. Each distinct product is timed alone, compiled by XLA
(``jax.jit``, fp32) and by ``torch.mm`` / ``torch.bmm`` (``--torch-threads``), alternating shape by
shape so both sides see the same machine. The sum over the step, times how often each product
occurs, is the step time if everything but the matmuls were free and every matmul ran as fast as it
does alone: a lower bound on the step time for each library's matmul kernels. A product contracting
the token axis (a LoRA weight gradient) is timed in two forms, as written and with its small factor
transposed and materialised first (``metafit.peft.lora``'s custom VJPs), and counts at the faster. Dividing a measured
step time (``benchmarks/lora_throughput.py``) by it gives that library's distance from its own
matmul roofline.

    PYTHONPATH=. python benchmarks/lora_roofline.py --layers 12 \\
        --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj

Input gradients of layer 0's q/k/v projections are left out (the frozen embedding needs none, and
both libraries skip them); weight gradients exist only for the adapters.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear projection of a Llama block."""
    h, f, d = cfg["hidden"], cfg["mlp"], cfg["head_dim"]
    q, kv = cfg["heads"] * d, cfg["kv_heads"] * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def step_products(cfg, tokens: int, targets: list[str], rank: int, forward_only: bool = False) -> collections.Counter:
    """Counter of (kind, batch, m, k, n) -> occurrences in one training step (or one scoring forward).

    kind "nn": [m, k] @ [k, n]; kind "tn": [k, m]ᵀ @ [k, n] (a contraction over the token axis, as in a
    weight gradient); batch > 1 for attention's per-head products.
    """
    products: collections.Counter = collections.Counter()
    layers, seq = cfg["layers"], cfg["seq"]
    for layer in range(layers):
        for name, (fan_in, fan_out) in projection_shapes(cfg).items():
            needs_input_grad = not (layer == 0 and name in ("q_proj", "k_proj", "v_proj"))
            products[("nn", 1, tokens, fan_in, fan_out)] += 1                      # forward
            if forward_only:
                continue
            if needs_input_grad:
                products[("nn", 1, tokens, fan_out, fan_in)] += 1                  # dx = dy Wᵀ
            if name in targets:
                products[("nn", 1, tokens, fan_in, rank)] += 1                     # x A
                products[("nn", 1, tokens, rank, fan_out)] += 1                    # (x A) B
                products[("tn", 1, rank, tokens, fan_out)] += 1                    # dB = (x A)ᵀ dy
                products[("nn", 1, tokens, fan_out, rank)] += 1                    # d(x A) = dy Bᵀ
                products[("tn", 1, fan_in, tokens, rank)] += 1                     # dA = xᵀ d(x A)
                if needs_input_grad:
                    products[("nn", 1, tokens, rank, fan_in)] += 1                 # dx += d(x A) Aᵀ
        heads = (tokens // seq) * cfg["heads"]
        d = cfg["head_dim"]
        if forward_only:
            products[("nn", heads, seq, d, seq)] += 1  # scores Q Kᵀ
            products[("nn", heads, seq, seq, d)] += 1  # output P V
        else:
            products[("nn", heads, seq, d, seq)] += 2  # scores Q Kᵀ and its gradient dP = dO Vᵀ
            products[("nn", heads, seq, seq, d)] += 4  # output P V and dQ = dS K, dV = Pᵀ dO, dK = dSᵀ Q
    products[("nn", 1, tokens, cfg["hidden"], cfg["vocab"])] += 1                 # logits
    if not forward_only:
        products[("nn", 1, tokens, cfg["vocab"], cfg["hidden"])] += 1             # dL/dh = dL/dlogits E
    return products


def flops(product) -> int:
    _, batch, m, k, n = product
    return 2 * batch * m * k * n


def _best_seconds(call, min_total: float = 0.05, rounds: int = 5) -> float:
    call()
    reps = 1
    while True:  # enough calls per round that a round lasts >= min_total (small products take microseconds)
        start = time.perf_counter()
        for _ in range(reps):
            call()
        if time.perf_counter() - start >= min_total or reps >= 4096:
            break
        reps *= 4
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            call()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def time_jax(product) -> float:
    import jax
    import jax.numpy as jnp

    kind, batch, m, k, n = product
    lhs_shape = (k, m) if kind == "tn" else (m, k)
    a = jax.random.normal(jax.random.key(0), ((batch,) if batch > 1 else ()) + lhs_shape)
    b = jax.random.normal(jax.random.key(1), ((batch,) if batch > 1 else ()) + (k, n))
    if kind == "tn":  # the faster of the plain contraction and metafit.peft.lora's backward form
        from metafit.peft.lora import _small_transpose

        def lora_form(x, y):  # the [tokens, r] factor transposed and materialised, then one GEMM
            if n < m:  # dA = xᵀ dh as (dhᵀ x)ᵀ
                return jax.lax.optimization_barrier(_small_transpose(y) @ x).T
            return _small_transpose(x) @ y  # dB = hᵀ dy
        forms = [jax.jit(lambda x, y: jnp.einsum("km,kn->mn", x, y)), jax.jit(lora_form)]
    else:
        forms = [jax.jit(lambda x, y: x @ y)]
    return min(_best_seconds(lambda: f(a, b).block_until_ready()) for f in forms)


def time_torch(product) -> float:
    import torch

    kind, batch, m, k, n = product
    lhs_shape = (k, m) if kind == "tn" else (m, k)
    a = torch.randn(*(((batch,) if batch > 1 else ()) + lhs_shape))
    b = torch.randn(*(((batch,) if batch > 1 else ()) + (k, n)))
    if kind == "tn":
        return min(_best_seconds(lambda: a.t() @ b), _best_seconds(lambda: (b.t() @ a).t().contiguous()))
    return _best_seconds(lambda: torch.bmm(a, b) if batch > 1 else a @ b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=ALL_LINEAR)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--scoring", action="store_true", help="forward products only (benchmarks/models_forward.py)")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul timed as the peak")
    parser.add_argument("--out", default=None, help="write the JSON here as well as printing it")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.torch_threads)
    from lora_throughput import smollm2_135m  # the shapes lora_throughput.py trains

    model = smollm2_135m(args.layers)
    cfg = dict(layers=args.layers, seq=args.seq, hidden=model.hidden_size, mlp=model.intermediate_size,
               heads=model.num_attention_heads, kv_heads=model.num_key_value_heads, head_dim=model.head_dim,
               vocab=model.vocab_size)
    tokens = args.batch * args.seq
    products = step_products(cfg, tokens, args.targets.split(","), args.rank, forward_only=args.scoring)
    load_before = os.getloadavg()[0]
    square = ("nn", 1, args.peak_size, args.peak_size, args.peak_size)
    peak = {"jax": flops(square) / time_jax(square), "torch": flops(square) / time_torch(square)}
    rows = []
    for product, count in sorted(products.items(), key=lambda kv: -flops(kv[0]) * kv[1]):
        jax_s, torch_s = time_jax(product), time_torch(product)
        rows.append(dict(product=list(product), count=count, gflop=flops(product) * count / 1e9,
                         jax_ms=round(jax_s * count * 1e3, 2), torch_ms=round(torch_s * count * 1e3, 2),
                         jax_gflops=round(flops(product) / jax_s / 1e9, 1),
                         torch_gflops=round(flops(product) / torch_s / 1e9, 1)))
        print(json.dumps(rows[-1]), flush=True)
    total = {side: sum(r[f"{side}_ms"] for r in rows) / 1e3 for side in ("jax", "torch")}
    step_gflop = sum(r["gflop"] for r in rows)
    base = [r for r in rows if r["product"][2] != args.rank and r["product"][3] != args.rank
            and r["product"][4] != args.rank]
    summary = dict(
        layers=args.layers, targets="scoring (forward only)" if args.scoring else args.targets, tokens=tokens,
        rank=args.rank, step_gflop=round(step_gflop, 1),
        roofline_step_s={k: round(v, 3) for k, v in total.items()},
        roofline_tokens_per_s={k: round(tokens / v, 1) for k, v in total.items()},
        peak_gflops_per_s={k: round(v / 1e9, 1) for k, v in peak.items()},
        roofline_of_peak={k: round(step_gflop * 1e9 / total[k] / peak[k], 3) for k in total},
        adapter_share={side: round(1 - sum(r[f"{side}_ms"] for r in base) / 1e3 / total[side], 3)
                       for side in ("jax", "torch")},
        load_average=[round(load_before, 1), round(os.getloadavg()[0], 1)], rows=rows)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
