#!/usr/bin/env bash
# Runs the context-awareness reproduction one job at a time; rerunning resumes (finished arms are skipped).
# Usage: bash paper_repro/context/run.sh [SEEDS...]   (default seed 0 for the SFT comparison)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=paper_repro/context/runs
python=${PYTHON:-python}
$python -m metafit.cli run configs/context/nih_smollm2.yaml --workdir $OUT/nih_smollm2
for seed in "${@:-0}"; do
  $python -m metafit.cli run configs/context/sft_small.yaml --set seed=$seed --workdir $OUT/sft_small_seed$seed
done
$python paper_repro/context/make_table.py
