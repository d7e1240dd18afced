#!/usr/bin/env bash
# Reproduce the shipped weights and their cross-validated metrics on ../shared/data.
# CPU (2 cores): two training processes side by side, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data
VERSION=${VERSION:-1.2.0}
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

# 4. classifier, the 1.1.0 recipe on the cervix crops: 5 patient-wise folds (stratified by label and source)
#    and the all-patient model, in two processes; then one --resume run collects the folds and writes the metrics
CLS="$DATA/visits --labels $DATA/visits/labels.csv --seg-model $LESION/model.pt --cervix-model runs/cervix-192/model.pt
     --folds 5 --full --cache-dir runs/cls-cache --arch tf_efficientnet_lite0 --pretrained --lr 5e-4 --input-size 160
     --epochs 12 --threads 1 --model-name cervscan-cls-lite0 --model-version $VERSION -o runs/cls-crop"
cervscan train-cls $CLS --only-folds 1,2,3 > runs/cls-crop-a.log 2>&1 &
sleep 300  # let the first process fill the cache of cervix crops and segmented images
cervscan train-cls $CLS --only-folds 4,5,0 > runs/cls-crop-b.log 2>&1 &
wait
cervscan train-cls $CLS --resume > runs/cls-crop.log 2>&1

# 5. package, model card, examples' expected outputs, report renders, contact sheet
python scripts/package_weights.py --stage runs/stage --cervix runs/cervix-192 --seg "$LESION" --cls runs/cls-crop \
    --seg-comparison docs/training-runs/lesion-comparison.json --cls-compare docs/training-runs/cls-lite0-160e12 \
    --version "$VERSION" --why "${WHY:-the 1.1.0 classifier recipe retrained on the cervix crops of this pipeline}"
python scripts/model_card.py
python scripts/contact_sheet.py $DATA/visits -o docs/cervix-contact-sheet.png
tests/update_golden.sh
scripts/render_report_examples.sh

# 6. the cross-validated numbers again, through the screening path (each patient by its fold's model)
cervscan evaluate $DATA/visits --labels $DATA/visits/labels.csv --seg-model "$LESION/model.pt" \
    --cervix-model runs/cervix-192/model.pt --cv-run runs/cls-crop -o runs/eval-cv
