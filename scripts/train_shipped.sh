#!/usr/bin/env bash
# Reproduce the shipped weights and their cross-validated metrics on ../shared/data.
# CPU (2 cores): two training processes side by side, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data
VERSION=${VERSION:-2.0.0}
export GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184
export OMP_NUM_THREADS=1
mkdir -p runs

# 1. exam-stage model (frozen ImageNet EfficientNet-Lite0 features + logistic regression; seconds once cached)
cervscan train-stage $DATA/visits -o runs/stage --cache-dir runs/cache --threads 1 --model-version "$VERSION"

# 2. cervix finder: U-Net++ (ImageNet Lite0 encoder) on the 107 flash-card cervix polygons, 192 px
cervscan train-seg $DATA/cervix-seg -o runs/cervix-192 --target cervix --input-size 192 --epochs 30 --threads 1 \
    --model-name cervscan-cervix-unetpp-lite0 --model-version "$VERSION" > runs/cervix-192.log 2>&1

# 3. lesion segmenter on the cervix crops (filled masks of lesion-seg; AnnoCerv train/val as given), two input
#    sizes side by side; the larger one only ships if it wins (docs/model-selection.md)
for S in 256 320; do
  cervscan train-seg $DATA/lesion-seg -o runs/lesion-$S --crop-cervix runs/cervix-192/model.pt --input-size $S \
      --epochs 24 --threads 1 --model-name cervscan-lesion-unetpp-lite0 --model-version "$VERSION" \
      > runs/lesion-$S.log 2>&1 &
done
wait
LESION=${LESION:-runs/lesion-256}
python scripts/compare_lesion_seg.py $DATA/lesion-seg --val $LESION/val_iou.csv \
    --model "new=$LESION/model.pt:cervix=runs/cervix-192/model.pt" --model "old=${OLD_SEG:-runs/seg-1.0.0.pt}" \
    -o docs/training-runs/lesion-comparison.json

# 4. the patient decision (classifier 2.0.0): every candidate of benchmarks/decision.py on the same 5 x 3
#    repeated patient-wise folds (crops, masks and frozen features cached under runs/decision-cache), the
#    choice by the rule of docs/model-selection.md, then the chosen candidate through train-cls (its default recipe), which
#    writes the all-patient model, the fold models of repeat 0 (for evaluate --cv-run) and the calibration
#    (the harness screens with the default stage, cervix and lesion models of weights/: when those were
#    retrained above, package them first: package_weights.py --stage ... --cervix ... --seg ... --cls <current>)
python benchmarks/decision.py all
cervscan train-cls $DATA/visits --labels $DATA/visits/labels.csv -o runs/decision-2.0.0 \
    --seg-model "$LESION/model.pt" --cervix-model runs/cervix-192/model.pt \
    --backbone lite0 --input-size 384 --classify-view frame --variants original+segmented --stages acetic \
    --C 0.01 --folds 5 --repeats 3 --threads 1 --cache-dir runs/decision-train-cache \
    --model-name cervscan-decision-lite0 --model-version "$VERSION"
# the same recipe without the quality gate (every image decides), for the gate's effect in the model card
cervscan train-cls $DATA/visits --labels $DATA/visits/labels.csv -o runs/decision-nogate \
    --seg-model "$LESION/model.pt" --cervix-model runs/cervix-192/model.pt \
    --backbone lite0 --input-size 384 --classify-view frame --variants original+segmented --stages acetic \
    --no-quality-gate --C 0.01 --folds 5 --repeats 3 --threads 1 --cache-dir runs/decision-train-cache

# 5. package, model card, examples' expected outputs, report renders, contact sheet
python scripts/package_weights.py --stage runs/stage --cervix runs/cervix-192 --seg "$LESION" --cls runs/decision-2.0.0 \
    --seg-comparison docs/training-runs/lesion-comparison.json --version "$VERSION" \
    --why "${WHY:-the candidate chosen by the rule of docs/model-selection.md among those of benchmarks/decision.py}"
python scripts/model_card.py
python scripts/contact_sheet.py $DATA/visits -o docs/cervix-contact-sheet.png
tests/update_golden.sh
scripts/render_report_examples.sh

# 6. the cross-validated numbers again, through the screening path (each patient by its fold's model)
cervscan evaluate $DATA/visits --labels $DATA/visits/labels.csv --seg-model "$LESION/model.pt" \
    --cervix-model runs/cervix-192/model.pt --cv-run runs/decision-2.0.0 -o runs/eval-cv
