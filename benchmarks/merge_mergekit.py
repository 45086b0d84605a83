"""metafit vs mergekit: TIES and DARE-TIES merges of three SmolLM2-135M-sized checkpoints.

Builds four random Llama checkpoints with SmolLM2-135M's shapes (30 layers, hidden 576,
MLP 1536, 9 heads / 3 KV heads, vocab 49,152, tied embeddings; 134.5M parameters, float32
safetensors, 538 MB each): a base and three "fine-tunes" (base + N(0, 0.01²) noise). Then
runs each merge in a fresh process per tool and reports wall time (whole process, and the
merge call alone) and peak RSS, and compares the outputs tensor by tensor.

Same parameters on both sides: TIES with density 0.2, weight 1, lambda 1, normalize (disjoint
mean) — identical maths, so outputs must agree to float rounding. DARE-TIES with drop rate 0.9
(density 0.1), sign election and disjoint mean (mergekit: normalize: true): the random masks
differ between the two libraries (and mergekit rescales survivors to keep the L1 norm, metafit by
1/(1−p)), so for DARE-TIES we compare the kept fraction and the norm of the merged task vector.

mergekit is not a metafit dependency. Install it outside the venv, without touching torch:
    pip install --no-deps --target /tmp/mkdeps mergekit==0.1.5 immutables==0.21 accelerate peft sentencepiece
Run:
    /work/venv/bin/python benchmarks/merge_mergekit.py --workdir /tmp/merge_bench --mergekit-path /tmp/mkdeps
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

LAYERS, HIDDEN, MLP, HEADS, KV_HEADS, VOCAB = 30, 576, 1536, 9, 3, 49152
HEAD_DIM = HIDDEN // HEADS


def smollm2_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (MLP, HIDDEN),
            p + "mlp.up_proj.weight": (MLP, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, MLP),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": MLP,
    "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1,
    "eos_token_id": 2,
}


def make_checkpoints(root: Path) -> None:
    from metafit.merge import io

    shapes = smollm2_shapes()
    for name, seed in [("base", None), ("ft0", 1), ("ft1", 2), ("ft2", 3)]:
        folder = root / name
        if (folder / io.WEIGHTS_NAME).exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        noise = np.random.default_rng(seed) if seed is not None else None
        base_rng = np.random.default_rng(0)
        with io.SafetensorsWriter(folder / io.WEIGHTS_NAME, [(n, np.float32, s) for n, s in shapes.items()]) as w:
            for n, s in shapes.items():
                t = base_rng.standard_normal(s, dtype=np.float32) * 0.02
                if noise is not None:
                    t += noise.standard_normal(s, dtype=np.float32) * 0.01
                w.write(n, t)
        (folder / "config.json").write_text(json.dumps(CONFIG))


def recipe_text(tool: str, method: str, root: Path) -> str:
    if tool == "metafit":
        params = "density: 0.2" if method == "ties" else "drop_rate: 0.9"
        return (f"method: {method}\nbase: {root}/base\nmodels: [{root}/ft0, {root}/ft1, {root}/ft2]\n"
                f"parameters: {{{params}, scale: 1.0}}\nseed: 0\n")
    density = 0.2 if method == "ties" else 0.1
    models = "".join(f"  - model: {root}/ft{i}\n    parameters: {{weight: 1.0, density: {density}}}\n" for i in range(3))
    return (f"merge_method: {method}\nbase_model: {root}/base\nmodels:\n{models}"
            "parameters: {normalize: true, lambda: 1.0}\ndtype: float32\nout_dtype: float32\n")


def worker(tool: str, method: str, root: Path, out: Path) -> None:
    """Runs one merge in this process and prints {seconds, merge_seconds, cpu_seconds, peak_rss_mb} as JSON."""
    start = time.perf_counter()
    recipe = root / f"{tool}_{method}.yaml"
    recipe.write_text(recipe_text(tool, method, root))
    if tool == "metafit":
        from metafit.merge.recipe import run_recipe

        merge_start = time.perf_counter()
        run_recipe(recipe, out, progress=False)
    else:
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
        merge_start = time.perf_counter()
        run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                                         random_seed=0, lazy_unpickle=True,
                                                         cuda=os.environ.get("MERGE_BENCH_CUDA") == "1"))
    end = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds are the fairer clock on a shared machine: wall time includes waiting for other jobs.
    print(json.dumps({"seconds": end - start, "merge_seconds": end - merge_start,
                      "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}))


def read_all(folder: Path) -> dict[str, np.ndarray]:
    from metafit.merge import io

    view = io.SafetensorsFolder(folder)
    return {n: view.read(n) for n in view.names()}


def compare(method: str, root: Path, a: Path, b: Path) -> dict:
    from metafit.merge import io

    base, va, vb = io.SafetensorsFolder(root / "base"), io.SafetensorsFolder(a), io.SafetensorsFolder(b)
    names = [n for n in base.names() if n in vb]
    max_diff, norm_a, norm_b, kept_a, kept_b, total, differing = 0.0, 0.0, 0.0, 0, 0, 0, 0
    for n in names:
        x, y, z = va.read(n), vb.read(n), base.read(n)
        max_diff = max(max_diff, float(np.abs(x - y).max()))
        differing += int((np.abs(x - y) > 1e-6).sum())
        da, db = x - z, y - z
        norm_a += float((da.astype(np.float64) ** 2).sum())
        norm_b += float((db.astype(np.float64) ** 2).sum())
        kept_a += int((da != 0).sum())
        kept_b += int((db != 0).sum())
        total += da.size
    return {"tensors_compared": len(names), "missing_in_mergekit": len(base.names()) - len(names),
            "max_abs_diff": max_diff, "entries_differing_over_1e-6": differing, "entries": total,
            "delta_norm_metafit": norm_a ** 0.5, "delta_norm_mergekit": norm_b ** 0.5,
            "nonzero_delta_fraction_metafit": kept_a / total, "nonzero_delta_fraction_mergekit": kept_b / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge_bench"))
    parser.add_argument("--mergekit-path", default="/tmp/mkdeps", help="folder mergekit was pip-installed into")
    parser.add_argument("--methods", default="ties,dare_ties")
    parser.add_argument("--cuda", action="store_true", help="let mergekit use the GPU (metafit uses JAX's default device); not yet run: no GPU time was left")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.workdir
    if args.worker:
        tool, method = args.worker
        worker(tool, method, root, root / f"out_{tool}_{method}")
        return
    if args.cuda:
        os.environ["MERGE_BENCH_CUDA"] = "1"
    make_checkpoints(root)
    report = {"jax_devices": subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"],
                                            capture_output=True, text=True).stdout.strip()}
    for method in args.methods.split(","):
        for tool in ("metafit", "mergekit"):
            env = dict(os.environ)
            if tool == "mergekit":
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.mergekit_path, env.get("PYTHONPATH")]))
            done = subprocess.run([sys.executable, __file__, "--workdir", str(root), "--worker", tool, method],
                                  env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{tool} {method} failed:\n{done.stderr[-4000:]}")
            report[f"{method}/{tool}"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(method, tool, report[f"{method}/{tool}"], flush=True)
        report[f"{method}/agreement"] = compare(method, root, root / f"out_metafit_{method}", root / f"out_mergekit_{method}")
        print(method, "agreement", report[f"{method}/agreement"], flush=True)
    (root / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
