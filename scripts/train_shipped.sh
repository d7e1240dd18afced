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

# 2. classifiers: 5-fold patient-wise CV (stratified by label and source); the pretrained one also trains
#    the final model on all 203 patients (--full)
CLS="$DATA/visits --labels $DATA/visits/labels.csv --seg-model runs/seg-lite0/model.pt --folds 5 --input-size 160 --epochs 6"
OMP_NUM_THREADS=1 cervscan train-cls $CLS -o runs/cls-lite0 --arch tf_efficientnet_lite0 --pretrained --lr 5e-4 --full \
    --model-name cervscan-cls-lite0 --model-version 1.0.0 &
sleep 240  # let the first run fill the segmentation cache
OMP_NUM_THREADS=1 cervscan train-cls $CLS -o runs/cls-repvgg --arch repvgg_a0 --lr 1e-3 \
    --model-name cervscan-cls-repvgg-a0 --model-version 1.0.0 &
wait

# 3. package and check
python scripts/package_weights.py --seg runs/seg-lite0 --seg-compare runs/seg-scratch --cls runs/cls-lite0 \
    --cls-compare runs/cls-repvgg --fp16
