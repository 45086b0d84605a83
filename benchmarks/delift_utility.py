"""DELIFT utility kernel throughput: metafit (shared-prefix KV reuse, jitted tiles) vs a transformers loop.

Both sides score the same pairs with the same model (metafit-small-lm, saved as an HF folder and
loaded by transformers' PyTorch Llama) and the same token ids (the prompt pieces of
:func:`metafit.select.utility.encode`), and must give the same utilities to 1e-4.

* metafit reuse: ``pair_distances`` (each example's KV cache reused for all queries of a tile);
* metafit no reuse: ``reuse_prefix=False`` (each joined prompt a padded row);
* torch loop: one pair per forward, as DELIFT's reference code runs;
* torch batched: ``--torch-batch`` right-padded pairs per forward.

Compilation is excluded on the metafit side (one warm-up call on the same shapes first).

    python benchmarks/delift_utility.py --n 32 --json benchmarks/delift_utility.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def torch_distances(model, rows, batch: int):
    """(L2, KL) per joined prompt ``(ids, start, length)``, ``batch`` prompts per forward."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            chunk = rows[s:s + batch]
            width = max(len(r[0]) for r in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (row, _, _) in enumerate(chunk):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for r, (row, start, length) in enumerate(chunk):
                pos = torch.arange(start - 1, start - 1 + length)
                picked = logp[r, pos, torch.tensor(row[start:start + length])]
                out.append((float(torch.sqrt(((1 - picked.exp()) ** 2).mean())), float(-picked.mean())))
    return np.array(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32, help="queries = examples = n (n^2 pairs)")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--torch-batch", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads (2 threads were far slower than 1 on the loaded 2-core CPU)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from metafit.data.instructions import make_instructions
    from metafit.models import load, save
    from metafit.select import utility

    torch.set_num_threads(args.torch_threads)
    model, tokenizer = load("metafit-small-lm")
    pairs = make_instructions(args.n, seed=0)
    results = {"n_pairs": args.n * args.n, "load_average": os.getloadavg()[0]}

    distances = {}
    for name, reuse in [("metafit_reuse", True), ("metafit_no_reuse", False)]:
        run = lambda: utility.pair_distances(model, tokenizer, pairs, pairs, block=args.block,  # noqa: E731
                                             batch_pairs=args.block * 8, reuse_prefix=reuse)
        run()  # compile
        start = time.perf_counter()
        distances[name] = run()
        results[f"{name}_pairs_per_s"] = args.n * args.n / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as folder:
        save(model, folder, tokenizer)
        reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    enc = utility.encode(tokenizer, pairs, pairs)
    rows = [(head + enc.queries[i], len(head) + enc.response_start[i], enc.response_len[i])
            for i in range(args.n) for head in enc.heads]
    bare_rows = [(enc.bare_head + enc.queries[i], len(enc.bare_head) + enc.response_start[i], enc.response_len[i])
                 for i in range(args.n)]
    bare = torch_distances(reference, bare_rows, args.torch_batch).T  # the no-example pass, computed once
    for name, batch in [("torch_loop", 1), ("torch_batched", args.torch_batch)]:
        start = time.perf_counter()
        joined = torch_distances(reference, rows, batch).T.reshape(2, args.n, args.n)
        results[f"{name}_pairs_per_s"] = args.n * args.n / (time.perf_counter() - start)
    torch_utility = bare[0][:, None] - joined[0]
    for name, (b, j) in distances.items():
        results[f"{name}_max_abs_utility_diff"] = float(np.abs((b[0][:, None] - j[0]) - torch_utility).max())
    results["speedup_reuse_vs_torch_loop"] = results["metafit_reuse_pairs_per_s"] / results["torch_loop_pairs_per_s"]
    results["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    assert max(v for k, v in results.items() if k.endswith("utility_diff")) < 1e-4, "utilities differ"


if __name__ == "__main__":
    main()
