#!/usr/bin/env bash
# A follow-up to run_comparisons.sh, chosen after reading its results: the estimator without the
# feature-entropy denominator (--no-estimator-features: r_m = I_m + c). With it, the default rates
# on watch were ~0.5 / 0.5 (both encoders' feature entropies are ~log 64, which flattens r / T).
# Writes benchmarks/results/compare/<dataset>_nofeat.{json,png,txt}; watch folds 0-2 and 3-4 run side by side.
#     bash benchmarks/run_estimator_variant.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/compare
METHODS=joint,uniform:channel,amss,amss:channel
run() {
    local ds=$1 name=$2
    shift 2
    OMP_NUM_THREADS=1 python -m masked_optim compare --dataset "$ds" --methods "$METHODS" --seeds 5 \
        --no-estimator-features --out "$OUT" --name "$name" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
}
( run watch watch_nofeat_partA --folds 0,1,2 ) &
( run mfeat:fac+zer mfeat_fac_zer_nofeat
  run watch watch_nofeat_partB --folds 3,4 ) &
wait
python -m masked_optim merge "$OUT/watch_nofeat_partA.json" "$OUT/watch_nofeat_partB.json" --out "$OUT/watch_nofeat.json" > "$OUT/watch_nofeat.txt"
rm "$OUT"/watch_nofeat_part?.*
cat "$OUT"/*_nofeat.txt
