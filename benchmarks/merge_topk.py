"""Top-k magnitude mask of one embedding-sized tensor (49,152 x 576 float32, keep 20%):
metafit's bisection on float bit patterns (jitted) vs `torch.argsort`, as mergekit does it.

    /work/venv/bin/python benchmarks/merge_topk.py
"""
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metafit.merge.parts import keep_count, magnitude_mask  # noqa: E402


def main() -> None:
    x = np.random.default_rng(0).standard_normal(49152 * 576).astype(np.float32)
    k = keep_count(0.2, x.size)
    mask_fn = jax.jit(magnitude_mask)
    xj = jnp.asarray(x)
    mask_fn(xj, k).block_until_ready()  # compile
    start = time.perf_counter()
    mask = mask_fn(xj, k).block_until_ready()
    metafit_s = time.perf_counter() - start
    xt = torch.from_numpy(x)
    start = time.perf_counter()
    order = torch.argsort(xt.abs(), descending=True)[:k]
    torch_s = time.perf_counter() - start
    assert int(mask.sum()) == k == order.numel()
    print(f"metafit bisection mask: {metafit_s:.2f} s   torch.argsort: {torch_s:.2f} s   (k = {k:,})")


if __name__ == "__main__":
    main()
