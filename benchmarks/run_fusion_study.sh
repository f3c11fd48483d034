#!/usr/bin/env bash
# The fusion study (docs/results.md, "The fusion study"): does the default rebalancing still work when the
# model's fusion gives no slice logits, with the estimator fed by online linear probes (docs/algorithm.md §3.8)?
# Three configurations, each one compare of joint and the default (scale@ratio: ratio rule, release at 0.2),
# with MaskedMultiModalSGD at the dataset's lr (training.DATASET_DEFAULTS, as in the release study):
#   concat_slices    --fusion concat    --signal slices   (the release study's default, rerun here)
#   concat_probes    --fusion concat    --signal probes   (the same model, the estimator fed by probes)
#   attention_probes --fusion attention --signal probes   (cross-attention over modality tokens: no slices)
#   attention_probes_modality: the same with --fusion-params modality (each modality's token projection
#                    rebalanced with its encoder instead of shared; the default only, paired with the joint above)
# joint is in each compare so that every Δ is paired within one file; under --signal probes the reported
# per-modality accuracies are the online probes' (at the selected epoch), not the head's slices.
# The release study's held-out protocol: synthetic data draws 2,3 x seeds 0-4; watch 5 folds x seeds 0-4.
# One thread per process. LANE=synthetic or LANE=watch runs one half (two lanes side by side on two cores);
# no LANE runs both. A part whose JSON exists is skipped and a cut part resumes from its journal (--resume).
# Writes benchmarks/results/fusion_study/*.{json,txt,log}; the table: python benchmarks/fusion_study_report.py
#     bash benchmarks/run_fusion_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/fusion_study
PY=${PYTHON:-python}
LANE=${LANE:-all}
mkdir -p "$OUT"
run() {  # dataset, output name, fusion, signal, extra arguments (METHODS overrides the methods)
    local ds=$1 name=$2 fusion=$3 signal=$4
    shift 4
    if [ -s "$OUT/$name.json" ]; then echo "skip $name (done)"; return; fi
    local t0=$SECONDS
    OMP_NUM_THREADS=1 $PY -m masked_optim compare --dataset "$ds" --methods "${METHODS:-joint,scale@ratio}" --fusion "$fusion" \
        --signal "$signal" --out "$OUT" --name "$name" --no-plot --resume "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
    echo "$name: $((SECONDS - t0)) s"
}
CONFIGS="concat:slices concat:probes attention:probes"
if [ "$LANE" != watch ]; then
    for ds in synthetic:xor synthetic:parity3; do
        for c in $CONFIGS; do
            run "$ds" "$(echo "$ds" | sed 's/[^A-Za-z0-9]\+/_/g')_${c%%:*}_${c##*:}" "${c%%:*}" "${c##*:}" --seeds 5 --data-seeds 2,3
        done
    done
fi
if [ "$LANE" != synthetic ]; then
    for c in $CONFIGS; do
        run watch "watch_${c%%:*}_${c##*:}" "${c%%:*}" "${c##*:}" --seeds 0,1,2,3,4
    done
fi
# the attention model's token projections rebalanced with their modality (Balancer(assign=...)): the default only
if [ "$LANE" != watch ]; then
    for ds in synthetic:xor synthetic:parity3; do
        METHODS=scale@ratio run "$ds" "$(echo "$ds" | sed 's/[^A-Za-z0-9]\+/_/g')_attention_probes_modality" attention probes \
            --fusion-params modality --seeds 5 --data-seeds 2,3
    done
fi
if [ "$LANE" != synthetic ]; then
    METHODS=scale@ratio run watch watch_attention_probes_modality attention probes --fusion-params modality --seeds 0,1,2,3,4
fi
