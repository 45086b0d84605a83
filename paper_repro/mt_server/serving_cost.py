"""Serving cost of the multi-task reproduction's deployments, on one seed's trained adapters.

    PYTHONPATH=. python paper_repro/mt_server/serving_cost.py --seed 1
        # reads runs/repro/mt_server/cpu/{single_<task>,naive,three_stage}_s1 (metafit repro mt_server)
        # writes paper_repro/mt_server/results/serving_cost_s1.json
    PYTHONPATH=. python paper_repro/mt_server/serving_cost.py --seed 0 --in-turn --repeats 1 \
        --runs runs/repro/mt_server/smollm2 --out paper_repro/mt_server/results/smollm2/serving_cost_s0.json
        # SmolLM2-135M (metafit repro mt_server --scale smollm2): the eleven processes one after another

The paper's claim is about deployments: eleven task models served by one ("up to 90.9 % less
serving overhead", 11 -> 1). Four deployments of the same eleven tasks, each built the way
``metafit serve`` builds a server (:func:`metafit.serve.server.build_state`, so the adapters go through
the same rank-class slots) and each in its own subprocess, so the memory measured is its own:

* ``eleven_processes`` -- one server per task holding that task's single-task adapter and serving
  only that task's requests; the eleven processes run at once on this machine (each compiles and
  warms up, then all start serving together), and their memory and parameters are summed. With
  ``--in-turn`` (SmolLM2-135M: eleven of its processes do not fit in 24 GB beside anything else) they
  run one after another instead, each measured alone: memory and parameters are still summed (what
  eleven would hold at once), throughput is all requests over the *summed* serving seconds (the same
  CPU time, shared in turn rather than at once), and latencies are each process's own with the CPU to
  itself, so the fleet's p50/p99 are lower bounds of what it would show serving at once;
* ``one_server_eleven_adapters`` -- one server holding the eleven single-task adapters, all traffic
  mixed in its batches (per-row adapter slots);
* ``one_server_three_stage`` -- one server holding the three-stage deployment: the multi-task adapter
  for the tasks stage 1 kept and the single-task adapter of each task it dropped;
* ``one_server_naive`` -- one server holding the naive-mixing adapter (one model for every task).

Traffic: every task's held-out prompts (the grid's exact-match set: ``n_held_out`` per task, chat
template, greedy, ``max_new_tokens``), each ``--repeats`` times, submitted at once in a seeded random order to the engine's
queue (dynamic batching as in ``metafit serve``; HTTP is not included). Measured per deployment:
requests/s and generated tokens/s over the whole traffic, latency from submission to the last token
(p50, p99), resident memory after serving (VmRSS of each process), parameters held (base + adapters),
and the exact match of the served answers per task beside the grid's own scores of the same models
(``tasks_served_differently`` lists any task where they differ: the server should serve exactly the
models the table reports).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RUNS = "runs/repro/mt_server/cpu"
OUT = Path(__file__).resolve().parent / "results"
DEPLOYMENTS = ("eleven_processes", "one_server_eleven_adapters", "one_server_three_stage", "one_server_naive")


def _run_args(runs: str, seed: int) -> dict:
    """The grid's data settings (task sizes, held-out count, generation budget) from the seed's three-stage run.

    Raises:
      SystemExit: the seed's run folders are missing (named, with the command that makes them).
    """
    from metafit.config import load_yaml

    missing = [name for name in (f"three_stage_s{seed}", f"naive_s{seed}") if not (Path(runs) / name / "adapter").is_dir()]
    if missing:
        raise SystemExit(f"{runs} has no finished {', '.join(missing)}; train the seed's adapters first: "
                         f"metafit repro mt_server --run-missing --only '*_s{seed}'")
    config = load_yaml(Path(runs) / f"three_stage_s{seed}" / "config.yaml")
    return dict(config["args"], seed=int(config["seed"]))


def served_adapters(runs: str, seed: int, deployment: str, tasks: list[str]) -> dict[str, str]:
    """``{task: adapter folder}`` of a deployment: every task is served by exactly one adapter."""
    single = {t: str(Path(runs) / f"single_{t}_s{seed}" / "adapter") for t in tasks}
    if deployment in ("eleven_processes", "one_server_eleven_adapters"):
        return single
    if deployment == "one_server_naive":
        return {t: str(Path(runs) / f"naive_s{seed}" / "adapter") for t in tasks}
    stage = Path(runs) / f"three_stage_s{seed}"
    decisions = json.loads((stage / "filtering.json").read_text())["decisions"]
    return {t: str(stage / "adapter") if decisions[t]["kept"] else single[t] for t in tasks}


def traffic(args: dict, tasks: list[str], order_seed: int, repeats: int = 1) -> list[tuple[str, str, str]]:
    """``(task, prompt, expected response)`` of every held-out example ``repeats`` times, in a seeded random order."""
    from metafit.data.task_suite import task_suite

    suite = task_suite(args["sizes"], n_held_out=args["n_held_out"], seed=args["seed"])
    items = [(t, ex.prompt, ex.response) for t in tasks for ex in suite[t].held_out] * repeats
    order = np.random.default_rng(order_seed).permutation(len(items))
    return [items[i] for i in order]


def resident_mb() -> float:
    """This process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def serve_once(model: str, adapters: dict[str, str], requests: list[tuple[str, str, str]], args: dict,
               batch_size: int, ready: Path, go: Path) -> dict:
    """Builds one server holding ``adapters`` (name -> folder), serves ``requests`` to completion, measures it.

    After compiling, it creates ``ready`` and waits for ``go``, so that the processes of one
    deployment start serving together and the timing holds serving only.
    """
    import threading

    import jax
    from flax import nnx

    from metafit.data.instructions import chat_prompt
    from metafit.serve.config import AdapterEntry, ServeConfig
    from metafit.serve.engine import Request
    from metafit.serve.server import build_state

    folders = sorted(set(adapters.values()))
    names = {folder: f"a{i}" for i, folder in enumerate(folders)}
    config = ServeConfig(model=model, name="base", adapters=tuple(AdapterEntry(names[f], f) for f in folders),
                         spare_slots=0, batch_size=batch_size, batch_window_ms=5.0, max_queue=len(requests) + 1,
                         prompt_buckets=(64,), new_token_buckets=(int(args["max_new_tokens"]),), warm_up=True)
    started = time.perf_counter()
    state = build_state(config)
    build_s = time.perf_counter() - started
    engine, tokenizer = state.engine, state.tokenizer
    finished, answers, latencies, tokens = threading.Event(), {}, {}, {}
    pieces: dict[int, list[str]] = {i: [] for i in range(len(requests))}

    def consumer(i: int):
        def emit(kind, value):
            if kind == "text":
                pieces[i].append(value)
                return
            latencies[i] = time.perf_counter() - submitted[i]
            answers[i] = "".join(pieces[i]).strip() if kind == "done" else f"<error: {value}>"
            tokens[i] = value[1] if kind == "done" else 0
            if len(latencies) == len(requests):
                finished.set()
        return emit

    submitted = {}
    engine.start()
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    started = time.perf_counter()
    for i, (task, prompt, _) in enumerate(requests):
        ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        submitted[i] = time.perf_counter()
        engine.submit(Request(ids, int(args["max_new_tokens"]), adapter=names[adapters[task]], emit=consumer(i),
                              task=task))
    finished.wait()
    seconds = time.perf_counter() - started
    engine.stop()
    hits: dict[str, list[bool]] = {}
    for i, (task, _, response) in enumerate(requests):
        hits.setdefault(task, []).append(answers[i] == response)
    base_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(engine.model, nnx.Param)))
    adapter_params = sum(int(np.prod(a.shape)) + int(np.prod(b.shape)) for r in state.adapters.values()
                         if r.info is not None for a, b in r.info.adapter.weights.values())
    return {"requests": len(requests), "seconds": seconds, "build_and_compile_s": build_s,
            "generated_tokens": int(sum(tokens.values())), "latencies_s": [latencies[i] for i in range(len(requests))],
            "resident_mb": resident_mb(), "base_parameters": base_params, "adapter_parameters": adapter_params,
            "adapters_held": len(folders), "exact_match": {t: float(np.mean(h)) for t, h in sorted(hits.items())},
            "load_average": os.getloadavg()[0]}


def summary(parts: list[dict], in_turn: bool = False) -> dict:
    """One deployment's figures from its processes (one, or eleven: served at once, or ``in_turn``)."""
    latencies = np.concatenate([p["latencies_s"] for p in parts])
    # at once: the traffic took as long as the slowest process; in turn: as long as all of them together
    seconds = sum(p["seconds"] for p in parts) if in_turn else max(p["seconds"] for p in parts)
    exact = {t: v for p in parts for t, v in p["exact_match"].items()}
    return {"processes": len(parts), "requests": int(sum(p["requests"] for p in parts)),
            "requests_per_s": sum(p["requests"] for p in parts) / seconds,
            "tokens_per_s": sum(p["generated_tokens"] for p in parts) / seconds,
            "p50_latency_s": float(np.percentile(latencies, 50)), "p99_latency_s": float(np.percentile(latencies, 99)),
            "resident_mb": sum(p["resident_mb"] for p in parts),
            "parameters": sum(p["base_parameters"] + p["adapter_parameters"] for p in parts),
            "adapters_held": sum(p["adapters_held"] for p in parts), "exact_match": exact,
            "mean_exact_match": float(np.mean(list(exact.values()))),
            "build_and_compile_s": sum(p["build_and_compile_s"] for p in parts), "in_turn": in_turn,
            "load_average": [p["load_average"] for p in parts]}


def grid_scores(runs: str, seed: int, deployment: str, tasks: list[str]) -> dict[str, float]:
    """The grid's exact match per task for the models a deployment serves (from the run folders' results)."""
    def em(folder: str, task: str) -> float:
        methods = json.loads((Path(folder).parent / "results.json").read_text())["methods"]
        arm = next(a for a in ("three_stage", "naive", "single") if a in methods)  # three_stage also has "probe"
        return float(methods[arm][f"{task}_em"])

    return {t: em(folder, t) for t, folder in served_adapters(runs, seed, deployment, tasks).items()}


def run_processes(argvs: list[list[str]], timeout_s: float = 1800.0) -> list[dict]:
    """Runs a deployment's serving processes at once: all compile, then all serve from one start signal."""
    import tempfile

    with tempfile.TemporaryDirectory() as sync:
        go = Path(sync) / "go"
        ready = [Path(sync) / f"ready{i}" for i in range(len(argvs))]
        children = [subprocess.Popen([sys.executable, __file__, *argv, "--ready", str(r), "--go", str(go)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for argv, r in zip(argvs, ready)]
        deadline = time.monotonic() + timeout_s
        while not all(r.exists() for r in ready):
            if any(c.poll() not in (None, 0) for c in children) or time.monotonic() > deadline:
                for c in children:
                    c.kill()
                failed = next((c for c in children if c.poll() not in (None, 0)), children[0])
                raise RuntimeError(f"a serving process failed before serving:\n{failed.communicate()[1][-3000:]}")
            time.sleep(0.05)
        go.touch()
        outputs = [c.communicate(timeout=timeout_s) for c in children]
    for child, (out, err) in zip(children, outputs):
        if child.returncode != 0:
            raise RuntimeError(f"a serving process failed:\n{err[-3000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="the grid seed whose adapters are served")
    parser.add_argument("--runs", default=RUNS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4, help="times each held-out prompt is requested")
    parser.add_argument("--out", default=None, help="default: paper_repro/mt_server/results/serving_cost_s<seed>.json")
    parser.add_argument("--in-turn", action="store_true",
                        help="run the eleven single-task processes one after another (each measured alone), "
                             "for models whose eleven processes do not fit in memory at once")
    parser.add_argument("--deployment", choices=DEPLOYMENTS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--task", help=argparse.SUPPRESS)  # child of eleven_processes
    parser.add_argument("--ready", type=Path, help=argparse.SUPPRESS)  # child: created once compiled
    parser.add_argument("--go", type=Path, help=argparse.SUPPRESS)  # child: serve once this exists
    a = parser.parse_args()
    args = _run_args(a.runs, a.seed)
    tasks = sorted(args["sizes"])
    if a.deployment:  # one serving process: print its figures as the last stdout line
        adapters = served_adapters(a.runs, a.seed, a.deployment, tasks)
        requests = traffic(args, tasks, order_seed=a.seed, repeats=a.repeats)
        if a.task:
            adapters, requests = {a.task: adapters[a.task]}, [r for r in requests if r[0] == a.task]
        print(json.dumps(serve_once(args["model"], adapters, requests, args, a.batch_size, a.ready, a.go)))
        return
    common = ["--seed", str(a.seed), "--runs", a.runs, "--batch-size", str(a.batch_size), "--repeats", str(a.repeats)]
    result = {"seed": a.seed, "model": args["model"], "tasks": tasks, "batch_size": a.batch_size, "repeats": a.repeats,
              "n_held_out": args["n_held_out"], "max_new_tokens": args["max_new_tokens"],
              "eleven_processes_in_turn": a.in_turn, "deployments": {}}
    for deployment in DEPLOYMENTS:
        tasks_run = tasks if deployment == "eleven_processes" else [None]
        argvs = [common + ["--deployment", deployment] + (["--task", t] if t else []) for t in tasks_run]
        in_turn = a.in_turn and len(argvs) > 1
        parts = ([part for argv in argvs for part in run_processes([argv])] if in_turn else run_processes(argvs))
        figures = summary(parts, in_turn=in_turn)
        figures["grid_exact_match"] = grid_scores(a.runs, a.seed, deployment, tasks)
        figures["tasks_served_differently"] = [t for t in tasks  # answers of the server vs the grid's own scoring
                                               if abs(figures["exact_match"][t] - figures["grid_exact_match"][t]) > 1e-9]
        result["deployments"][deployment] = figures
        print(deployment, {k: v for k, v in figures.items() if k not in ("exact_match", "load_average")}, flush=True)
    out = Path(a.out or OUT / f"serving_cost_s{a.seed}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
