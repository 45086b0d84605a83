"""A bounded load test of `metafit serve` on loopback: throughput and p50/p99 latency at several concurrencies.

Starts the server in this process (a background thread, free loopback port) from a serve config,
then for each concurrency runs a fixed number of requests through an httpx asyncio client:
valid completions and chat requests spread over the base model and its loaded adapters, mixed
with malformed ones (bad JSON, unknown model, unsupported field, over-long prompt). It checks that
every request is answered, that no answer is a 5xx, and that each malformed request gets a 4xx;
429s (full queue) are counted and retried after their Retry-After, so every request ends answered.

    python benchmarks/serve_load.py --model metafit-small-lm --requests 120 --concurrency 1 8 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from metafit.serve.config import AdapterEntry, ServeConfig
from metafit.serve.server import BackgroundServer, build_state

MALFORMED = [
    (b"{not json", 400),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
    (json.dumps({"model": "base", "prompt": "x", "logprobs": 3}).encode(), 400),
    (json.dumps({"model": "base", "prompt": "x " * 2000}).encode(), 400),
]


def bodies(count: int, models: list[str], max_tokens: int, malformed_every: int, seed: int):
    rng = np.random.default_rng(seed)
    words = "the a cat dog sat on mat red blue quick slow fox jumps over lazy".split()
    out = []
    for i in range(count):
        if malformed_every and i % malformed_every == malformed_every - 1:
            out.append(MALFORMED[(i // malformed_every) % len(MALFORMED)])
            continue
        text = " ".join(rng.choice(words, rng.integers(3, 12)))
        model = models[i % len(models)]
        if i % 2:
            body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                    "temperature": 0}
        else:
            body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.9}
        out.append((json.dumps(body).encode(), 200))
    return out


async def one(client, body, expected, latencies, statuses):
    path = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
    started = time.perf_counter()
    while True:
        response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
        statuses.append(response.status_code)
        if response.status_code != 429:
            break
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
    latencies.append(time.perf_counter() - started)
    return response.status_code, expected


async def run_level(url, work, concurrency):
    latencies, statuses = [], []
    limit = asyncio.Semaphore(concurrency)

    async def bounded(client, body, expected):
        async with limit:
            return await one(client, body, expected, latencies, statuses)

    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(client, b, e) for b, e in work))
        seconds = time.perf_counter() - started
    final = [status for status, _ in results]
    wrong = [(s, e) for s, e in results if (e == 200 and s != 200) or (e != 200 and not 400 <= s < 500)]
    return {
        "concurrency": concurrency, "requests": len(work), "answered": len(final), "seconds": seconds,
        "requests_per_s": len(work) / seconds, "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)), "status_5xx": sum(s >= 500 for s in statuses),
        "status_429_retried": statuses.count(429), "malformed": sum(e != 200 for _, e in results),
        "unexpected": len(wrong),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="metafit-small-lm")
    parser.add_argument("--adapters", type=int, default=3, help="random LoRA adapters to serve beside the base")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()
    from serve_adapters import make_adapters  # the same random adapters (benchmarks/ is on sys.path)

    work_dir = Path(tempfile.gettempdir()) / "metafit-serve-adapters"
    paths = make_adapters(args.model, work_dir)[:args.adapters]
    config = ServeConfig(model=args.model, name="base", batch_size=8, max_queue=args.max_queue,
                         prompt_buckets=(64,), new_token_buckets=(args.max_tokens,),
                         adapters=tuple(AdapterEntry(p.name, str(p)) for p in paths),
                         targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    state = build_state(config)
    models = ["base"] + [f"base:{p.name}" for p in paths]
    levels = []
    with BackgroundServer(state) as server:
        for concurrency in args.concurrency:
            work = bodies(args.requests, models, args.max_tokens, malformed_every=5, seed=concurrency)
            levels.append(asyncio.run(run_level(server.url, work, concurrency)))
            print(json.dumps(levels[-1]), flush=True)
    result = {"model": args.model, "adapters": len(paths), "max_tokens": args.max_tokens,
              "load_average": os.getloadavg()[0], "levels": levels}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    bad = [lv for lv in levels if lv["status_5xx"] or lv["unexpected"] or lv["answered"] != lv["requests"]]
    if bad:
        raise SystemExit(f"FAILED: 5xx, unexpected status or unanswered requests at {bad}")


if __name__ == "__main__":
    main()
