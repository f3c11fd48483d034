#!/usr/bin/env bash
# The release study (docs/results.md, "The release study"): the ratio rule with release
# (ModalSignificance(release_at=0.2), the default) against joint training and OGM-GE.
#   development runs, the rule study's seeds and draws (benchmarks/run_rule_study.sh):
#     synthetic:xor / synthetic:parity3, 2 data draws x 5 seeds; mfeat:fac+zer, 5 seeds;
#     every ratio-rule mode with the default release, joint and OGM-GE again (a reproduction check);
#     scale@ratio with release_at 0.1 and 0.3 (the sensitivity of the choice 0.2)
#   held-out runs, never looked at while choosing: data draws 2,3 of both synthetic settings and
#     mfeat seeds 5-9; joint, OGM-GE, scale@ratio with the default release and without (release_at inf)
#   watch, 5 subject folds x 5 seeds: scale@ratio with the default release (joint and OGM-GE: the
#     rule study's runs, benchmarks/results/rule_study/watch.json)
# Two processes side by side, one thread each (about 30 min on a 2-core VM). Writes
# benchmarks/results/release_study/*.{json,txt,log} and the summary release_study.txt.
#     bash benchmarks/run_release_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/release_study
RATIO=joint,ogm-ge,uniform@ratio,amss@ratio,amss+@ratio,scale@ratio
mkdir -p "$OUT"
run() {  # dataset, output name, methods, extra arguments
    local ds=$1 name=$2 methods=$3
    shift 3
    OMP_NUM_THREADS=1 python -m masked_optim compare --dataset "$ds" --methods "$methods" --out "$OUT" \
        --name "$name" --no-plot "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
}
( run synthetic:xor synthetic_xor "$RATIO" --seeds 5 --data-seeds 0,1
  run mfeat:fac+zer mfeat_fac_zer "$RATIO" --seeds 5
  for t in 0.1 0.3; do
      run synthetic:xor synthetic_xor_release$t scale@ratio --seeds 5 --data-seeds 0,1 --release-at $t
      run mfeat:fac+zer mfeat_fac_zer_release$t scale@ratio --seeds 5 --release-at $t
  done
  run synthetic:xor synthetic_xor_heldout joint,ogm-ge,scale@ratio --seeds 5 --data-seeds 2,3
  run synthetic:xor synthetic_xor_heldout_norelease scale@ratio --seeds 5 --data-seeds 2,3 --release-at inf
  run mfeat:fac+zer mfeat_fac_zer_heldout joint,ogm-ge,scale@ratio --seeds 5,6,7,8,9
  run mfeat:fac+zer mfeat_fac_zer_heldout_norelease scale@ratio --seeds 5,6,7,8,9 --release-at inf ) &
( run watch watch_scale scale@ratio --seeds 5
  run synthetic:parity3 synthetic_parity3 "$RATIO" --seeds 5 --data-seeds 0,1
  for t in 0.1 0.3; do
      run synthetic:parity3 synthetic_parity3_release$t scale@ratio --seeds 5 --data-seeds 0,1 --release-at $t
  done
  run synthetic:parity3 synthetic_parity3_heldout joint,ogm-ge,scale@ratio --seeds 5 --data-seeds 2,3
  run synthetic:parity3 synthetic_parity3_heldout_norelease scale@ratio --seeds 5 --data-seeds 2,3 --release-at inf ) &
wait
python benchmarks/release_study_report.py "$OUT" benchmarks/results/rule_study | tee "$OUT/release_study.txt"
