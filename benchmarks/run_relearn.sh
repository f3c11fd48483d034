#!/usr/bin/env bash
# Diagnosing & Re-learning, alone and with AMSS, on watch and mfeat (fac|zer, pix|mor), 5 seeds
# (x 5 subject folds for watch), then merged into the comparisons of run_comparisons.sh (run that
# first) so the tables of docs/results.md show them next to the other methods, paired with the same joint runs.
#     bash benchmarks/run_relearn.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/compare
METHODS=relearn,relearn+amss
run() {
    local ds=$1 name=$2
    shift 2
    OMP_NUM_THREADS=1 python -m masked_optim compare --dataset "$ds" --methods "$METHODS" --seeds 5 \
        --out "$OUT" --name "$name" --no-plot "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
}
( run watch relearn_watch_partA --folds 0,1,2 ) &
( run mfeat:fac+zer relearn_mfeat_fac_zer
  run mfeat:pix+mor relearn_mfeat_pix_mor
  run watch relearn_watch_partB --folds 3,4 ) &
wait
for name in mfeat_fac_zer mfeat_pix_mor; do
    python -m masked_optim merge "$OUT/$name.json" "$OUT/relearn_$name.json" --out "$OUT/$name.json" > "$OUT/$name.txt"
done
python -m masked_optim merge "$OUT/watch.json" "$OUT/relearn_watch_partA.json" "$OUT/relearn_watch_partB.json" \
    --out "$OUT/watch.json" > "$OUT/watch.txt"
rm -f "$OUT"/relearn_*
cat "$OUT"/mfeat_fac_zer.txt "$OUT"/mfeat_pix_mor.txt "$OUT"/watch.txt
