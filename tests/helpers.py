"""Tiny randomly initialised models in the real checkpoint format, for fast tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def make_tiny_models(folder: Path, *, seg_size: int = 64, cls_size: int = 64, seed: int = 0,
                     threshold: float = 0.5, cls_arch: str = "repvgg_a0") -> dict:
    from cervscan.models import (build_classifier, build_segmenter, make_checkpoint, save_checkpoint, to_deploy,
                                 IMAGENET_MEAN, IMAGENET_STD)
    from cervscan.weights import sha256_file

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    seg = build_segmenter("resnet18", encoder_depth=3, decoder_channels=(32, 16, 8)).eval()
    seg_ck = make_checkpoint(seg, kind="segmenter", arch="resnet18",
                             arch_kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 8]}, form="train",
                             input_size=(seg_size, seg_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             name="tiny-seg", version="test")
    cls = build_classifier(cls_arch).eval()
    cls_ck = make_checkpoint(to_deploy(cls), kind="classifier", arch=cls_arch, arch_kwargs={}, form="deploy",
                             input_size=(cls_size, cls_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             name="tiny-cls", version="test",
                             extra={"threshold": threshold, "temperature": 1.0,
                                    "operating_point": {"threshold": threshold, "sensitivity": 0.9, "specificity": 0.5},
                                    "voting": {"weights": [0.2, 0.25, 0.15, 0.2, 0.11, 0.09], "brightness": 1.2,
                                               "brightness_from_flipped": False}})
    save_checkpoint(seg_ck, folder / "seg.pt")
    save_checkpoint(cls_ck, folder / "cls.pt")
    manifest = {"format": 1, "models": [
        {"role": "segmenter", "file": "seg.pt", "name": "tiny-seg", "version": "test", "sha256": sha256_file(folder / "seg.pt")},
        {"role": "classifier", "file": "cls.pt", "name": "tiny-cls", "version": "test", "sha256": sha256_file(folder / "cls.pt")},
    ]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return {"seg": folder / "seg.pt", "cls": folder / "cls.pt", "dir": folder}
