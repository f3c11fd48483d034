#!/usr/bin/env bash
# Issue 7's study: every mask mode x both rate rules, against joint training and OGM-GE.
#   synthetic:xor and synthetic:parity3 (docs/algorithm.md §8): 2 data draws x 5 seeds
#   mfeat:fac+zer: 5 seeds
#   watch: 5 subject folds x 5 seeds (the runs of joint, ogm-ge and the softmax-rule modes are
#          reused from benchmarks/results/compare/watch.json after reproducing one run of each, see
#          benchmarks/results/rule_study/watch_reproduction.txt; the new methods run here)
# Two processes run side by side, one thread each. Writes benchmarks/results/rule_study/*.{json,png,txt}.
#     bash benchmarks/run_rule_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/rule_study
ALL=joint,ogm-ge,uniform@softmax,uniform@ratio,amss@softmax,amss@ratio,amss+@softmax,amss+@ratio,scale@softmax,scale@ratio
NEW_WATCH=uniform@ratio,amss@ratio,amss+@ratio,scale@softmax,scale@ratio
mkdir -p "$OUT"
run() {  # dataset, output name, methods, extra arguments
    local ds=$1 name=$2 methods=$3
    shift 3
    OMP_NUM_THREADS=1 python -m masked_optim compare --dataset "$ds" --methods "$methods" --seeds 5 \
        --out "$OUT" --name "$name" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
}
( run watch watch_new_A "$NEW_WATCH" --folds 0,1,2 ) &
( run synthetic:xor synthetic_xor "$ALL" --data-seeds 2
  run synthetic:parity3 synthetic_parity3 "$ALL" --data-seeds 2
  run mfeat:fac+zer mfeat_fac_zer "$ALL"
  run watch watch_new_B "$NEW_WATCH" --folds 3,4 ) &
wait
python benchmarks/relabel_softmax_runs.py benchmarks/results/compare/watch.json "$OUT/watch_old.json"
python -m masked_optim merge "$OUT/watch_old.json" "$OUT/watch_new_A.json" "$OUT/watch_new_B.json" \
    --out "$OUT/watch.json" > "$OUT/watch.txt"
cat "$OUT"/synthetic_xor.txt "$OUT"/synthetic_parity3.txt "$OUT"/mfeat_fac_zer.txt "$OUT"/watch.txt
# the cross-dataset table of docs/results.md ("The rule study") and its figure (rule_study.png)
python benchmarks/rule_study_report.py "$OUT"/synthetic_xor.json "$OUT"/synthetic_parity3.json \
    "$OUT"/mfeat_fac_zer.json "$OUT"/watch.json
