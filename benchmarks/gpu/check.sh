#!/usr/bin/env bash
# One prepared GPU check (run through the device tool on an H200, one call, < 8 minutes): the trainer
# on a GPU, LoRA throughput and model FLOP utilisation of the SmolLM2-135M architecture (30 layers,
# batch 16 x 512, bf16 compute with fp32 master weights; all-linear and q,v LoRA, plus all-linear in
# fp32), forward scoring, CleaR's epoch overhead and the MAML benchmark. Runs from the source tree
# with the machine's own JAX (no install). Results go to $OUT; each step has its own timeout, and
# the timeouts sum to 440 s.
#   SMOKE=1 bash benchmarks/gpu/check.sh   # tiny shapes on any machine: checks the script, not the GPU
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
S=1  # timeout scale: the smoke run is for slow shared CPUs
if [ "${SMOKE:-0}" = 1 ]; then
  S=10
  LORA="--layers 1 --batch 2 --seq 16 --steps 2 --peak-size 256"; FWD="--batch 1 --seq 16 --repeats 1"
  CLEAR="--train-size 32 --batch-size 8 --max-len 16 --epochs 2 --eval-batch-size 16"; META="--iters 60"
else
  LORA="--layers 30 --batch 16 --seq 512 --steps 10 --peak-size 8192"; FWD="--batch 16 --seq 512 --repeats 5"
  CLEAR="--train-size 1024 --batch-size 32 --max-len 128 --epochs 4 --eval-batch-size 128"; META="--iters 1000"
fi
ALL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
{
  nvidia-smi -L
  $PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1
timeout $((30*S)) $PY -m metafit.cli run configs/quickstart.yaml --workdir "$OUT/qs" > "$OUT/quickstart.txt" 2>&1
cp "$OUT/qs/results.json" "$OUT/quickstart_results.json" 2>/dev/null
rm -rf "$OUT/qs"
for run in "bfloat16 $ALL" "bfloat16 q_proj,v_proj" "float32 $ALL"; do
  set -- $run
  timeout $((70*S)) $PY benchmarks/lora_throughput.py --side metafit --precision "$1" --targets "$2" $LORA \
    2>> "$OUT/lora_err.txt" | tail -1 >> "$OUT/lora.jsonl"
done
timeout $((45*S)) $PY benchmarks/models_forward.py --no-torch $FWD > "$OUT/forward.txt" 2>&1
timeout $((100*S)) $PY benchmarks/clear_overhead.py --family adapter $CLEAR --out "$OUT/clear.json" > "$OUT/clear.txt" 2>&1
timeout $((55*S)) $PY benchmarks/meta_vs_torch.py $META --inner-steps 1 5 --torch-threads 8 \
  --json "$OUT/meta.json" > "$OUT/meta.txt" 2>&1
tail -n 4 "$OUT"/*.txt "$OUT"/*.jsonl
