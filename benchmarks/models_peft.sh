#!/usr/bin/env bash
# The "Models and PEFT" table of benchmarks/README.md: metafit vs transformers + peft, interleaved in
# one sitting (each placement/depth runs metafit then torch back to back). Resumable: a finished
# measurement (its JSON file exists) is skipped. usage: bash benchmarks/models_peft.sh [python]
set -u
PY=${1:-python}
OUT=benchmarks/results/models_peft
mkdir -p "$OUT"
export PYTHONPATH=$PWD
for layers in 12 30; do
  steps=$([ "$layers" = 12 ] && echo 4 || echo 3)
  for placement in qv all; do
    targets=$([ "$placement" = qv ] && echo q_proj,v_proj || echo q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)
    for side in metafit torch; do
      file="$OUT/lora_${side}_${placement}_${layers}.json"
      [ -s "$file" ] && continue
      "$PY" benchmarks/lora_throughput.py --side "$side" --layers "$layers" --steps "$steps" --targets "$targets" \
        2>>"$OUT/stderr.txt" | tail -1 > "$file.tmp" && mv "$file.tmp" "$file"
      cat "$file"
    done
  done
done
file="$OUT/forward_scoring.txt"
[ -s "$file" ] || { (uptime; "$PY" benchmarks/models_forward.py --batch 4 --seq 128 --repeats 3; uptime) > "$file.tmp" 2>>"$OUT/stderr.txt" && mv "$file.tmp" "$file"; }
cat "$file"
