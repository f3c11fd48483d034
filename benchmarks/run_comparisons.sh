#!/usr/bin/env bash
# Every result of docs/results.md ("Results on real and synthetic data"): each dataset x every method x 5 seeds (x 5 subject folds for watch).
# Writes benchmarks/results/compare/<dataset>.{json,png,txt}. Two processes run side by side, each
# on one thread (OMP_NUM_THREADS=1), which suits these small models on a 2-core machine: one runs
# watch folds 0-2; the other runs mfeat and the synthetic benchmark, then watch folds 3-4; the two
# watch parts are merged at the end (masked-optim merge).
#     bash benchmarks/run_comparisons.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/compare
METHODS=joint,ogm-ge,uniform,uniform:channel,amss,amss:channel,amss+,amss+:channel,amss+ref
mkdir -p "$OUT"
run() {  # dataset, output name, extra arguments
    local ds=$1 name=$2
    shift 2
    OMP_NUM_THREADS=1 python -m masked_optim compare --dataset "$ds" --methods "$METHODS" --seeds 5 \
        --out "$OUT" --name "$name" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
}
( run watch watch_partA --folds 0,1,2 ) &
( for ds in mfeat:fac+zer mfeat:pix+mor mfeat:all synthetic:xor synthetic:parity3; do
      run "$ds" "$(echo "$ds" | tr ':+' '__')"
  done
  run watch watch_partB --folds 3,4 ) &
wait
python -m masked_optim merge "$OUT/watch_partA.json" "$OUT/watch_partB.json" --out "$OUT/watch.json" > "$OUT/watch.txt"
cat "$OUT"/*.txt
