"""Tiny randomly initialised models in the real checkpoint format: fast stand-ins for the shipped weights.

Used by the benchmarks that measure the pipeline's own work rather than the networks' (``batch_rerun.py``)
and by the tests (``tests/helpers.py`` re-exports :func:`make_tiny_models`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def make_tiny_models(folder: Path, *, seg_size: int = 64, cls_size: int = 64, seed: int = 0,
                     threshold: float = 0.5, cls_arch: str = "repvgg_a0") -> dict:
    """Segmenter, classifier, cervix finder and exam-stage model (64 px, random weights) and a manifest in
    ``folder``; returns their paths by key (``seg``, ``cls``, ``cervix``, ``stage``) and ``dir``."""
    # lazy: timm and smp, so that importing this module (every test session does) stays cheap
    from cervscan.models.networks import (IMAGENET_MEAN, IMAGENET_STD, build_classifier, build_segmenter,
                                          make_checkpoint, save_checkpoint, to_deploy)
    from cervscan.models.registry import sha256_file
    from cervscan.training.stage import STAGES

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
    # cervix finder: the same tiny U-Net++, trained to nothing, marked as a cervix segmenter
    cervix = build_segmenter("resnet18", encoder_depth=3, decoder_channels=(32, 16, 8)).eval()
    cervix_ck = make_checkpoint(cervix, kind="segmenter", arch="resnet18",
                                arch_kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 8]}, form="train",
                                input_size=(seg_size, seg_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                name="tiny-cervix", version="test", extra={"target": "cervix",
                                                                           "classes": ["background", "cervix"]})
    stage = build_classifier("repvgg_a0", num_classes=len(STAGES)).eval()
    stage_ck = make_checkpoint(to_deploy(stage), kind="stage", arch="repvgg_a0", arch_kwargs={}, form="deploy",
                               input_size=(cls_size, cls_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                               name="tiny-stage", version="test", extra={"classes": list(STAGES)})
    files = {"seg": "seg.pt", "cls": "cls.pt", "cervix": "cervix.pt", "stage": "stage.pt"}
    for key, ck in (("seg", seg_ck), ("cls", cls_ck), ("cervix", cervix_ck), ("stage", stage_ck)):
        save_checkpoint(ck, folder / files[key])
    roles = {"seg": "segmenter", "cls": "classifier", "cervix": "cervix", "stage": "stage"}
    manifest = {"format": 1, "models": [
        {"role": roles[k], "file": f, "name": f"tiny-{k}", "version": "test", "sha256": sha256_file(folder / f)}
        for k, f in files.items()]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return {**{k: folder / f for k, f in files.items()}, "dir": folder}
