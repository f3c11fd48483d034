#!/usr/bin/env bash
# Every README result: each dataset x every method x 5 seeds (x 5 subject folds for watch).
# Writes benchmarks/results/compare/<dataset>.{json,png,txt}. Two comparisons run side by side,
# each on one thread (OMP_NUM_THREADS=1), which suits these small models on a 2-core machine:
#     bash benchmarks/run_comparisons.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/compare
METHODS=joint,ogm-ge,uniform,uniform:channel,amss,amss:channel,amss+,amss+:channel,amss+ref
mkdir -p "$OUT"
run() {
    local ds=$1 name=$2
    OMP_NUM_THREADS=1 python -m masked_optim compare --dataset "$ds" --methods "$METHODS" --seeds 5 \
        --out "$OUT" --name "$name" > "$OUT/$name.txt" 2> "$OUT/$name.log"
}
( run watch watch ) &
( for ds in mfeat:fac+zer mfeat:pix+mor mfeat:all synthetic:xor synthetic:parity3; do
      run "$ds" "$(echo "$ds" | tr ':+' '__')"
  done ) &
wait
cat "$OUT"/*.txt
