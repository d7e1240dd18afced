"""Screen images: segment, build the six variants, classify in one batched pass.

``Screener`` holds both models (loaded once) and turns decoded images into
per-image records. Decoding runs in DataLoader workers so it overlaps compute.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .config import VARIANT_NAMES, ScreenConfig, VotingConfig
from .errors import CervscanError, ImageError
from .io import read_image
from .models import model_from_checkpoint, read_checkpoint
from .transforms import image_quality, quality_flags, resize_square, to_tensor_batch
from .variants import decide, make_variants, segment_region, weighted_score
from .weights import ResolvedModel

log = logging.getLogger(__name__)


@dataclass
class LoadedModels:
    seg: torch.nn.Module
    cls: torch.nn.Module
    seg_ckpt: dict
    cls_ckpt: dict
    seg_ref: ResolvedModel | None = None
    cls_ref: ResolvedModel | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def seg_size(self) -> tuple[int, int]:
        return tuple(self.seg_ckpt["input_size"])  # type: ignore[return-value]

    @property
    def cls_size(self) -> tuple[int, int]:
        return tuple(self.cls_ckpt["input_size"])  # type: ignore[return-value]

    @property
    def temperature(self) -> float:
        return float(self.cls_ckpt.get("temperature") or 1.0)


def load_models(seg_ref: ResolvedModel, cls_ref: ResolvedModel, device: torch.device,
                *, deploy: bool = True) -> LoadedModels:
    seg_ck = read_checkpoint(seg_ref.path)
    cls_ck = read_checkpoint(cls_ref.path)
    if seg_ck["kind"] != "segmenter":
        raise CervscanError(f"{seg_ref.path}: is a {seg_ck['kind']} checkpoint, not a segmenter")
    if cls_ck["kind"] != "classifier":
        raise CervscanError(f"{cls_ref.path}: is a {cls_ck['kind']} checkpoint, not a classifier")
    seg = model_from_checkpoint(seg_ck).to(device)
    cls = model_from_checkpoint(cls_ck, deploy=deploy).to(device)
    if device.type == "cpu":
        seg = seg.to(memory_format=torch.channels_last)
    return LoadedModels(seg, cls, seg_ck, cls_ck, seg_ref, cls_ref, device)


# --------------------------------------------------------------------------- data loading

class ImageDataset(torch.utils.data.Dataset):
    """(patient_id, path) -> decoded image or the error, never raises."""

    def __init__(self, items: list[tuple[str, Path]], cfg: ScreenConfig):
        self.items = items
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        pid, path = self.items[i]
        rec = {"index": i, "patient_id": pid, "path": path}
        try:
            d = read_image(path, max_side=self.cfg.max_side, max_pixels=self.cfg.max_pixels,
                           min_side=self.cfg.min_side)
            rec.update(rgb=d.rgb, width=d.width, height=d.height, scale=d.scale)
        except ImageError as e:
            rec["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - never let one file stop the batch
            rec["error"] = f"{path}: unexpected decoding error ({type(e).__name__}: {e})"
        return rec


def _collate(batch):
    return batch


def iter_decoded(items, cfg: ScreenConfig) -> Iterable[dict]:
    """Decoded images in order, decoding ahead of the models.

    ``num_workers == 0`` (default): one background thread decodes up to 8
    images ahead (PIL and OpenCV release the GIL while decoding), with no extra
    process and no second copy of torch in memory. ``num_workers > 0``: a
    ``torch.utils.data.DataLoader`` with that many worker processes (useful
    when a GPU makes the models faster than one decoding thread).
    """
    ds = ImageDataset(items, cfg)
    if not items:
        return iter(())
    if cfg.num_workers > 0 and len(items) > 1:
        dl = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False, num_workers=cfg.num_workers,
                                         collate_fn=_collate, prefetch_factor=4, persistent_workers=False)
        return (b[0] for b in dl)
    return _threaded(ds, lookahead=8)


def _threaded(ds: "ImageDataset", lookahead: int) -> Iterable[dict]:
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cervscan-decode") as ex:
        pending: deque = deque()
        nxt = 0
        while nxt < len(ds) or pending:
            while nxt < len(ds) and len(pending) < lookahead:
                pending.append(ex.submit(ds.__getitem__, nxt))
                nxt += 1
            yield pending.popleft().result()


# --------------------------------------------------------------------------- model steps

@torch.inference_mode()
def segment(models: LoadedModels, images: list[np.ndarray], mask_threshold: float) -> list[np.ndarray]:
    """Binary masks (uint8 0/1) at each image's own size."""
    import cv2

    ck = models.seg_ckpt
    h, w = models.seg_size
    x = to_tensor_batch([resize_square(im, (h, w)) for im in images], ck["mean"], ck["std"]).to(models.device)
    if models.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    prob = torch.sigmoid(models.seg(x)).float().cpu().numpy()[:, 0]
    out = []
    for im, p in zip(images, prob):
        pr = cv2.resize(p, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR)
        out.append((pr > mask_threshold).astype(np.uint8))
    return out


@torch.inference_mode()
def classify(models: LoadedModels, images: list[np.ndarray]) -> np.ndarray:
    """P(severe) for each image, one batched forward pass."""
    ck = models.cls_ckpt
    x = to_tensor_batch([resize_square(im, models.cls_size) for im in images], ck["mean"], ck["std"]).to(models.device)
    logits = models.cls(x).float() / models.temperature
    return torch.softmax(logits, dim=1)[:, 1].cpu().numpy()


# --------------------------------------------------------------------------- per-image records

IMAGE_COLUMNS = ["patient_id", "image", "path", "status", "error", "width", "height", "lesion_fraction", "empty_mask",
                 *[f"p_v{i}" for i in range(1, 7)], "score", "threshold", "decision",
                 "sharpness", "brightness", "quality_flags", "mask", "overlay"]


def screen_images(models: LoadedModels, items: list[tuple[str, Path]], cfg: ScreenConfig, threshold: float,
                  *, on_image: Callable[[dict, dict | None], None] | None = None,
                  progress: Callable[[int], None] | None = None) -> list[dict]:
    """Screen ``items`` = [(patient_id, path)]; returns one record per item, in order.

    ``on_image(record, arrays)`` is called for each image with its arrays
    (``rgb``, ``mask``) so the caller can write masks and overlays.
    """
    vcfg: VotingConfig = cfg.voting
    records: list[dict | None] = [None] * len(items)
    pending: list[dict] = []

    def flush():
        if not pending:
            return
        rgbs = [r["rgb"] for r in pending]
        masks = segment(models, rgbs, vcfg.mask_threshold)
        all_vars, spans = [], []
        regions = []
        for rgb, m in zip(rgbs, masks):
            reg = segment_region(rgb, m, vcfg)
            regions.append(reg)
            vs = make_variants(rgb, reg.image, vcfg)
            spans.append((len(all_vars), list(vs)))
            all_vars.extend(vs.values())
        probs = classify(models, all_vars)
        for r, m, reg, (start, names) in zip(pending, masks, regions, spans):
            p = {n: float(probs[start + k]) for k, n in enumerate(names)}
            score = weighted_score(p, vcfg)
            q = image_quality(r["rgb"])
            rec = {
                "patient_id": r["patient_id"], "image": r["path"].name, "path": str(Path(r["path"]).resolve()), "status": "ok",
                "error": "", "width": r["width"], "height": r["height"],
                "lesion_fraction": reg.lesion_fraction, "empty_mask": reg.empty,
                **{f"p_v{i + 1}": p.get(n) for i, n in enumerate(VARIANT_NAMES)},
                "score": score, "threshold": threshold, "decision": decide(score, threshold),
                "sharpness": q["sharpness"], "brightness": q["brightness"],
                "quality_flags": ";".join(quality_flags(q)),
            }
            if on_image:
                on_image(rec, {"rgb": r["rgb"], "mask": m})
            records[r["index"]] = rec
            if progress:
                progress(1)
        pending.clear()

    for d in iter_decoded(items, cfg):
        if "error" in d:
            rec = {"patient_id": d["patient_id"], "image": Path(d["path"]).name, "path": str(Path(d["path"]).resolve()),
                   "status": "error", "error": d["error"], "threshold": threshold, "decision": "error"}
            records[d["index"]] = rec
            if on_image:
                on_image(rec, None)
            if progress:
                progress(1)
            continue
        pending.append(d)
        if len(pending) >= cfg.batch_images:
            flush()
    flush()
    return [r for r in records if r is not None]
