"""Tokens/s of one server holding 11 LoRA adapters under mixed traffic, against two baselines.

* **mixed**: the :class:`metafit.serve.engine.Engine` with 11 adapters (ranks 8/16/32 over all
  projections) in rank-class slots; requests arrive in a random adapter order and each batch takes
  the next ``batch`` waiting requests whatever their adapters (one forward, per-row slots).
* **one adapter at a time**: the same arrivals served by a server that can apply one adapter per
  forward (a merged model per adapter, as without multi-LoRA batching): of the ``batch`` oldest
  waiting requests, a batch takes those of the oldest one's adapter. To favour the baseline it
  runs the plain base model (no LoRA cost at all) at the smallest batch size 1/2/4/8 holding the
  rows, so only the batching it loses is counted.
* **base alone**: the same number of requests, all for the base model, batches of ``batch`` on the
  plain base model (the ceiling: what LoRA slots cost on top).

The engine's ``run_batch`` is called directly (no HTTP, no arrival gaps), so the numbers are the
generation loop's own throughput. Compilation is done before timing (``warm_up``). The three ways
are timed back to back ``--repeats`` times; each figure is the median over the repeats, and each
ratio the median of the per-repeat ratios (each repeat is in ``per_repeat``).

    python benchmarks/serve_adapters.py --model metafit-small-lm --requests 88 --max-tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from flax import nnx

import metafit.models as mm
import metafit.peft as peft
from metafit.serve.adapters import AdapterBank, default_classes, read_lora_adapter
from metafit.serve.engine import Engine, Request

RANKS = (8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32)  # 11 adapters, three rank classes
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapters(model_name: str, folder: Path, ranks=RANKS) -> list[Path]:
    paths = []
    for i, rank in enumerate(ranks):
        path = folder / f"task{i}-r{rank}"
        if not (path / "adapter_config.json").is_file():
            model, _ = mm.load(model_name, tokenizer=False)
            peft.apply(model, peft.LoraConfig(rank=rank, alpha=rank, targets=TARGETS, init="random"),
                       rngs=nnx.Rngs(i))
            peft.export_hf_peft(model, path, base_model_name_or_path=model_name)
        paths.append(path)
    return paths


def engine(model_name: str, classes, batch: int, args, adapters=()) -> Engine:
    model, tokenizer = mm.load(model_name)
    bank = AdapterBank(model, classes, targets=TARGETS, batch_size=batch)
    served = Engine(model, tokenizer, bank, prompt_buckets=(args.prompt_len,), new_token_buckets=(args.max_tokens,),
                    batch_window_ms=0)
    for adapter in adapters:
        served.load_adapter(adapter)
    served.warm_up()
    return served


def requests(prompts, names, max_tokens):
    return [Request(p, max_tokens, adapter=n) for p, n in zip(prompts, names)]


def timed(run) -> tuple[float, int]:
    tokens = []
    started = time.perf_counter()
    for served, batch in run:
        for r in batch:
            r.emit = lambda kind, value, _t=tokens: _t.append(value[1]) if kind == "done" else None
        served.run_batch(batch)
    return time.perf_counter() - started, int(sum(tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="metafit-small-lm")
    parser.add_argument("--requests", type=int, default=88)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/serve_adapters.json")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="one rank per adapter")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of the three ways; medians reported")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "metafit-serve-adapters"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    _, tokenizer = mm.load(args.model)
    vocab = len(tokenizer)
    prompts = [rng.integers(10, vocab, rng.integers(args.prompt_len // 2, args.prompt_len + 1)).tolist()
               for _ in range(args.requests)]
    ranks = tuple(args.ranks)
    base_model, _ = mm.load(args.model, tokenizer=False)
    paths = make_adapters(args.model, Path(args.work), ranks)
    names = [paths[int(i)].name for i in rng.integers(0, len(ranks), args.requests)]
    adapters = [read_lora_adapter(base_model, p, p.name) for p in paths]

    mixed = engine(args.model, default_classes(ranks, 0), args.batch, args, adapters)
    plain = {b: engine(args.model, {}, b, args) for b in (1, 2, 4, 8) if b <= args.batch}

    def mixed_batches():
        waiting = requests(prompts, names, args.max_tokens)
        return ((mixed, waiting[i:i + args.batch]) for i in range(0, len(waiting), args.batch))

    def base_batches():
        return ((plain[args.batch], requests(prompts[i:i + args.batch], [None] * args.batch,
                                             args.max_tokens)[:len(prompts[i:i + args.batch])])
                for i in range(0, len(prompts), args.batch))

    def one_at_a_time():
        queue = list(zip(prompts, names))
        while queue:
            window = queue[:args.batch]
            adapter = window[0][1]
            rows = [item for item in window if item[1] == adapter]
            for item in rows:
                queue.remove(item)
            size = min(b for b in plain if b >= len(rows))
            yield plain[size], requests([p for p, _ in rows], [None] * len(rows), args.max_tokens)

    # the three ways back to back, ``repeats`` times: on a shared machine the load drifts within
    # seconds, and a ratio of two phases timed minutes apart measures the drift
    repeats = []
    for _ in range(args.repeats):
        runs = {way: timed(batches()) for way, batches in
                (("mixed", mixed_batches), ("one_at_a_time", one_at_a_time), ("base", base_batches))}
        repeats.append({**{f"{way}_tokens_per_s": tokens / seconds for way, (seconds, tokens) in runs.items()},
                        "tokens": {way: tokens for way, (_, tokens) in runs.items()},
                        "load_average": os.getloadavg()[0]})
    median = {key: float(np.median([r[key] for r in repeats]))
              for key in ("mixed_tokens_per_s", "one_at_a_time_tokens_per_s", "base_tokens_per_s")}
    result = {
        "model": args.model, "requests": args.requests, "batch": args.batch, "max_tokens": args.max_tokens,
        "adapters": len(ranks), "ranks": list(ranks), "repeats": args.repeats,
        "load_average": float(np.median([r["load_average"] for r in repeats])),
        "mixed_tokens_per_s": median["mixed_tokens_per_s"],
        "one_adapter_at_a_time_tokens_per_s": median["one_at_a_time_tokens_per_s"],
        "base_alone_tokens_per_s": median["base_tokens_per_s"],
        "tokens": repeats[0]["tokens"],
        "mixed_vs_one_at_a_time": float(np.median([r["mixed_tokens_per_s"] / r["one_at_a_time_tokens_per_s"]
                                                   for r in repeats])),
        "mixed_vs_base": float(np.median([r["mixed_tokens_per_s"] / r["base_tokens_per_s"] for r in repeats])),
        "per_repeat": repeats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
