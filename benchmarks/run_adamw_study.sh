#!/usr/bin/env bash
# The AdamW study (docs/results.md, "The AdamW study"): does rebalancing help under AdamW?
# Everything runs with --optimizer adamw at the dataset's lr_adamw (training.DATASET_DEFAULTS, chosen for joint
# on the validation split by benchmarks/lr_sweep.py --optimizer adamw: benchmarks/results/adamw_study/lr_sweep_adamw.json).
# The held-out protocol of the release study (benchmarks/run_release_study.sh): seeds and draws not used to
# choose anything (the lr sweep used synthetic draws 0,1 and seeds 0,1 on validation only):
#   synthetic:xor / synthetic:parity3: data draws 2,3 x seeds 0-4; mfeat:fac+zer: seeds 5-9; watch: 5 folds x seeds 0-4
#   methods: joint, ogm-ge, scale@ratio (the default: ratio rule, release_at 0.2) and scale@ratio --release-at inf
#   synthetic only: the masked modes amss@ratio, amss+@ratio, uniform@ratio (the rate acts through the unit mask),
#   and joint / scale@ratio at lr 1e-3 (a third of the chosen lr: does rebalancing help a less-converged joint?)
# One process at a time, one thread (OMP_NUM_THREADS=1). Each part is its own JSON; a part whose JSON exists
# is skipped, so a run that dies loses nothing finished and a rerun continues. watch runs seeds 0,1 first and
# seeds 2-4 last (<name>_more.json), so a study cut short still has every method on every fold.
# Writes benchmarks/results/adamw_study/*.{json,txt,log} and adamw_study.txt.
#     bash benchmarks/run_adamw_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/adamw_study
PY=${PYTHON:-python}
mkdir -p "$OUT"
run() {  # dataset, output name, methods, extra arguments
    local ds=$1 name=$2 methods=$3
    shift 3
    if [ -s "$OUT/$name.json" ]; then echo "skip $name (done)"; return; fi
    local t0=$SECONDS
    OMP_NUM_THREADS=1 $PY -m masked_optim compare --optimizer adamw --dataset "$ds" --methods "$methods" --out "$OUT" \
        --name "$name" --no-plot "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
    echo "$name: $((SECONDS - t0)) s"
}
SYN="--seeds 5 --data-seeds 2,3"
MFEAT="--seeds 5,6,7,8,9"
WATCH="--seeds 0,1"
# joint and OGM-GE (mask none: plain AdamW, OGM-GE modulating its gradients)
run synthetic:xor synthetic_xor_base joint,ogm-ge $SYN
run synthetic:parity3 synthetic_parity3_base joint,ogm-ge $SYN
run mfeat:fac+zer mfeat_fac_zer_base joint,ogm-ge $MFEAT
# the default rebalancing, with and without release
for ds in synthetic:xor synthetic:parity3 mfeat:fac+zer; do
    name=$(echo "$ds" | sed 's/[^A-Za-z0-9]\+/_/g')
    case $ds in synthetic*) seeds=$SYN ;; *) seeds=$MFEAT ;; esac
    run "$ds" "${name}_scale" scale@ratio $seeds
    run "$ds" "${name}_norelease" scale@ratio $seeds --release-at inf
done
run watch watch_base joint,ogm-ge $WATCH
run watch watch_scale scale@ratio $WATCH
run watch watch_norelease scale@ratio $WATCH --release-at inf
# the masked modes on the synthetic settings
run synthetic:xor synthetic_xor_masked amss@ratio,amss+@ratio,uniform@ratio $SYN
run synthetic:parity3 synthetic_parity3_masked amss@ratio,amss+@ratio,uniform@ratio $SYN
# watch, seeds 2-4
run watch watch_base_more joint,ogm-ge --seeds 2,3,4
run watch watch_scale_more scale@ratio --seeds 2,3,4
run watch watch_norelease_more scale@ratio --seeds 2,3,4 --release-at inf
# sensitivity: joint and the default at a third of the chosen lr (1e-3), where joint is further from converged
run synthetic:xor synthetic_xor_lr0.001 joint,scale@ratio $SYN --lr 0.001
run synthetic:parity3 synthetic_parity3_lr0.001 joint,scale@ratio $SYN --lr 0.001
$PY benchmarks/adamw_study_report.py "$OUT" | tee "$OUT/adamw_study.txt"
