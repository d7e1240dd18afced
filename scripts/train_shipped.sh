#!/usr/bin/env bash
# Reproduce the shipped weights and their cross-validated metrics on ../shared/data.
# CPU (2 cores): the two classifier cross-validations run side by side, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data
export GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184

# 1. segmenter: U-Net++ with the ImageNet EfficientNet-Lite0 encoder, AnnoCerv masks (train / val given)
cervscan train-seg $DATA/annocerv-seg -o runs/seg-lite0 --epochs ${SEG_EPOCHS:-25} \
    --model-name cervscan-seg-unetpp-lite0 --model-version 1.0.0
# 1b. the same from scratch, for the comparison (fewer epochs; compare at equal epochs via metrics.json history)
cervscan train-seg $DATA/annocerv-seg -o runs/seg-scratch --no-pretrained --epochs ${SCRATCH_EPOCHS:-8} \
    --compare runs/seg-lite0

# 2. classifier candidates (docs/model-selection.md): 5-fold patient-wise CV on the same folds (stratified by
#    label and source); each also trains its final model on all 203 patients (--full). Two at a time, one
#    thread each (about 1-2 hours per run on this CPU).
CLS="$DATA/visits --labels $DATA/visits/labels.csv --seg-model runs/seg-lite0/model.pt --folds 5 --cache-dir runs/cls-cache"
LITE="--arch tf_efficientnet_lite0 --pretrained --lr 5e-4 --full --model-name cervscan-cls-lite0"
run() { OMP_NUM_THREADS=1 cervscan train-cls $CLS "$@" > "runs/$(basename "${@: -1}").log" 2>&1; }
run --input-size 160 --epochs 6 --arch repvgg_a0 --lr 1e-3 --model-name cervscan-cls-repvgg-a0 -o runs/cls-repvgg &
run --input-size 160 --epochs 6 $LITE -o runs/cls-lite0 &
wait
run --input-size 160 --epochs 12 --eval-epochs 3,6,9 $LITE -o runs/cls-lite0-160e12 &
run --input-size 224 --epochs 6 $LITE -o runs/cls-lite0-224e6 &
wait
run --input-size 160 --epochs 6 --head-std 0.01 --eval-epochs 3 $LITE -o runs/cls-lite0-head
CANDS="runs/cls-repvgg runs/cls-lite0 runs/cls-lite0-160e12 runs/cls-lite0-224e6 runs/cls-lite0-head"
WIN=$(python scripts/select_classifier.py $CANDS | tail -1)

# 3. package, model card, examples' expected outputs, report renders
python scripts/package_weights.py --seg runs/seg-lite0 --seg-compare runs/seg-scratch --seg-version 1.0.0 --cls "$WIN" \
    $(for c in $CANDS; do [ "$c" != "$WIN" ] && echo "--cls-compare $c"; done) --version "${VERSION:-1.1.0}" \
    --why "${WHY:-chosen by scripts/select_classifier.py}"
python scripts/model_card.py
tests/update_golden.sh
scripts/render_report_examples.sh

# 4. the cross-validated numbers again, through the screening path (each patient by its fold's model)
cervscan evaluate $DATA/visits --labels $DATA/visits/labels.csv --seg-model runs/seg-lite0/model.pt \
    --cv-run "$WIN" -o runs/eval-cv
