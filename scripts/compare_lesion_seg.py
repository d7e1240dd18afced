"""Lesion segmenters compared on the same held-out images, in the coordinates of the whole frame.

    python scripts/compare_lesion_seg.py ../shared/data/lesion-seg \
        --val runs/lesion-256/val_iou.csv \
        --model new=runs/lesion-256/model.pt:cervix=runs/cervix-192/model.pt \
        --model old=runs/seg-1.0.0.pt \
        -o docs/training-runs/lesion-comparison.json

Each ``--model NAME=SEGMENTER[:cervix=CERVIX]`` is run through the screening pipeline (with a cervix
finder: cervix crop, lesion on the crop, mask pasted back into the frame; without: the whole frame).
Reported per source and for images with / without a marked lesion: mean per-image IoU and Dice
(an empty prediction on an empty mask scores 1), pooled IoU (all pixels of the group), and the
mean predicted lesion area on images without a marked lesion (false-positive area).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np


def scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, int, int]:
    p, g = pred > 0, gt > 0
    inter, union = int((p & g).sum()), int((p | g).sum())
    s = int(p.sum()) + int(g.sum())
    return (inter / union if union else 1.0), (2 * inter / s if s else 1.0), inter, union


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="lesion-seg folder (images/, masks/, images.csv)")
    ap.add_argument("--val", type=Path, required=True, help="val_iou.csv of the new run: its 'image' column names the held-out images")
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()

    from dataclasses import replace

    from cervscan.config import ScreenConfig, VotingConfig
    from cervscan.files import atomic_write_json, read_image
    from cervscan.models.loading import load_model
    from cervscan.pipeline.steps import Pipeline

    with open(a.data / "images.csv", newline="", encoding="utf-8") as f:
        meta = {Path(r["image"]).stem: r for r in csv.DictReader(f)}
    with open(a.val, newline="", encoding="utf-8") as f:
        names = [r["image"] for r in csv.DictReader(f)]
    result: dict = {"images": len(names), "data": str(a.data), "val": str(a.val), "models": {}}
    for spec in a.model:
        name, _, rest = spec.partition("=")
        parts = rest.split(":")
        seg_path, cervix_path = parts[0], None
        for p in parts[1:]:
            if p.startswith("cervix="):
                cervix_path = p[len("cervix="):]
        models = {"segmenter": load_model("segmenter", seg_path, "cpu")}
        if cervix_path:
            models["cervix"] = load_model("cervix", cervix_path, "cpu")
        thr = float(models["segmenter"].ckpt.get("mask_threshold") or 0.5)
        cfg = replace(ScreenConfig(), crop="cervix" if cervix_path else "frame", voting=VotingConfig(mask_threshold=thr))
        pipe = Pipeline(models, cfg)
        rows = []
        for stem in names:
            ip = next((a.data / "images").glob(stem + ".*"))
            rgb = read_image(ip).rgb
            gt = cv2.imread(str(a.data / "masks" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
            gt = cv2.resize(gt, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
            pr = pipe.prepare([rgb], size=32)[0]
            iou, dice, inter, union = scores(pr.lesion_mask, gt)
            src = meta.get(stem, {}).get("source", "?")
            rows.append({"image": stem, "source": src, "lesion": bool((gt > 0).any()), "iou": iou, "dice": dice,
                         "inter": inter, "union": union, "pred_area": float(pr.lesion_mask.mean()),
                         "cervix_found": pr.cervix_found})
        groups: dict[str, dict] = {}
        for src in ["all", *sorted({r["source"] for r in rows})]:
            for les in (None, True, False):
                sel = [r for r in rows if (src == "all" or r["source"] == src) and (les is None or r["lesion"] == les)]
                if not sel:
                    continue
                key = f"{src}/{'all' if les is None else 'lesion' if les else 'no_lesion'}"
                inter, union = sum(r["inter"] for r in sel), sum(r["union"] for r in sel)
                groups[key] = {"n": len(sel), "mean_iou": float(np.mean([r["iou"] for r in sel])),
                               "mean_dice": float(np.mean([r["dice"] for r in sel])),
                               "pooled_iou": inter / union if union else 1.0,
                               "mean_pred_area": float(np.mean([r["pred_area"] for r in sel]))}
        result["models"][name] = {"segmenter": seg_path, "cervix": cervix_path, "mask_threshold": thr,
                                  "groups": groups, "per_image": rows}
        print(f"{name}:")
        for k, g in groups.items():
            print(f"  {k:28s} n={g['n']:3d} IoU {g['mean_iou']:.3f} Dice {g['mean_dice']:.3f} "
                  f"pooled IoU {g['pooled_iou']:.3f} predicted area {g['mean_pred_area']:.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()
