#!/usr/bin/env bash
# One prepared GPU check (run through the device tool on an H200): the trainer on a GPU, LoRA
# throughput of the SmolLM2-135M architecture in fp32 vs bf16, and the MAML benchmark.
# Runs from the source tree with the machine's own JAX (no install). Results go to $OUT.
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
{
  nvidia-smi -L
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1
timeout 150 python3 -m metafit.cli run configs/quickstart.yaml --workdir "$OUT/qs" > "$OUT/quickstart.txt" 2>&1
cp "$OUT/qs/results.json" "$OUT/quickstart_results.json" 2>/dev/null
rm -rf "$OUT/qs"
for precision in float32 bfloat16; do
  timeout 150 python3 benchmarks/lora_throughput.py --batch 16 --seq 512 --steps 10 --precision "$precision" \
    >> "$OUT/lora.jsonl" 2>> "$OUT/lora_err.txt"
done
timeout 150 python3 benchmarks/meta_vs_torch.py --iters 1000 --inner-steps 1 5 --torch-threads 8 \
  --json "$OUT/meta.json" > "$OUT/meta.txt" 2>&1
tail -3 "$OUT"/*.txt "$OUT"/*.jsonl
