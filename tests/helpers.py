"""Tiny randomly initialised models in the real checkpoint format, for fast tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def make_tiny_models(folder: Path, *, seg_size: int = 64, cls_size: int = 64, seed: int = 0,
                     threshold: float = 0.5, cls_arch: str = "repvgg_a0") -> dict:
    from cervscan.models.networks import (build_classifier, build_segmenter, make_checkpoint, save_checkpoint, to_deploy,
                                 IMAGENET_MEAN, IMAGENET_STD)
    from cervscan.models.registry import sha256_file

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
    from cervscan.training.stage import STAGES

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


def calibrated_repvgg(seed: int = 0, batches=None) -> torch.nn.Module:
    """RepVGG-A0 (eval mode) with non-trivial BatchNorm statistics and a re-drawn head.

    A freshly initialised RepVGG gives nearly the same output for every input and
    its BatchNorms are identities; calibrating the statistics on ``batches``
    (default: two batches of random 64 px images) makes both matter.
    """
    from cervscan.models.networks import build_classifier

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    m = build_classifier("repvgg_a0")
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
            mod.momentum = None  # cumulative average over the calibration batches
    if batches is None:
        batches = [torch.rand(4, 3, 64, 64, generator=g) for _ in range(2)]
    m.train()
    with torch.no_grad():
        for x in batches:
            m(x)
    torch.nn.init.normal_(m.head.fc.weight, std=0.05, generator=g)
    return m.eval()
