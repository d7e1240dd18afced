"""Contact sheet of the cervix finder on real colposcopy frames, to look at by eye.

    python scripts/contact_sheet.py ../shared/data/visits --cervix-model weights/cervix.pt \
        -o docs/cervix-contact-sheet.png

Picks 12 IARC and 12 AnnoCerv images (acetic-acid views first, one per patient, fixed seed), runs the
pipeline's cervix step and draws, for each, the frame with the cervix outline and crop box (left) and
the crop the lesion segmenter and classifier see (right). 'NOT FOUND' marks the centre-crop fallback.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import cv2
import numpy as np


def pick(visits: Path, n_per_source: int, seed: int) -> list[Path]:
    with open(visits / "images.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(seed)
    out = []
    for src in ("iarc", "annocerv"):
        by_pid: dict[str, list[dict]] = {}
        for r in rows:
            if r["patient_id"].startswith(src + "-"):
                by_pid.setdefault(r["patient_id"], []).append(r)
        pids = sorted(by_pid)
        rng.shuffle(pids)
        for pid in pids[:n_per_source]:
            rs = sorted(by_pid[pid], key=lambda r: (r["stage"] != "After acetic acid", r["image"]))
            # IARC: every other patient shows a non-acetic view, to see the finder on other stages too
            r = rs[0] if src == "annocerv" or len(out) % 2 == 0 else rs[-1]
            out.append(visits / pid / r["image"])
    return out


def tile(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    im = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    canvas = np.full((side, side, 3), 255, np.uint8)
    y0, x0 = (side - im.shape[0]) // 2, (side - im.shape[1]) // 2
    canvas[y0:y0 + im.shape[0], x0:x0 + im.shape[1]] = im
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("visits", type=Path)
    ap.add_argument("--cervix-model", default=None, help="default: the model screen uses")
    ap.add_argument("-o", "--out", type=Path, default=Path("docs/cervix-contact-sheet.png"))
    ap.add_argument("--per-source", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--side", type=int, default=220)
    a = ap.parse_args()

    from cervscan.config import ScreenConfig
    from cervscan.files import atomic_write_image, read_image
    from cervscan.models.loading import load_model
    from cervscan.pipeline.steps import Pipeline, crop_to_box
    from cervscan.pipeline.transforms import overlay
    from cervscan.models.registry import resolve

    ref = resolve("cervix", a.cervix_model)
    pipe = Pipeline({"cervix": load_model("cervix", ref.path, "cpu", ref)}, ScreenConfig(crop="cervix"))
    cells = []
    for path in pick(a.visits, a.per_source, a.seed):
        rgb = read_image(path).rgb
        mask, box, found, frac = pipe.cervix([rgb])[0]
        left = overlay(rgb, np.zeros(rgb.shape[:2], np.uint8), cervix=mask, box=box)
        left, right = tile(left, a.side), tile(crop_to_box(rgb, box), a.side)
        label = f"{path.parent.name}/{path.name}  {'cervix %.0f%%' % (100 * frac) if found else 'NOT FOUND'}"
        strip = np.full((18, 2 * a.side + 4, 3), 255, np.uint8)
        cv2.putText(strip, label, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0) if found else (200, 0, 0), 1, cv2.LINE_AA)
        cell = np.vstack([strip, np.hstack([left, np.full((a.side, 4, 3), 255, np.uint8), right])])
        cells.append(np.pad(cell, ((3, 3), (3, 3), (0, 0)), constant_values=200))
    cols = 4
    rows = [np.hstack(cells[i:i + cols] + [np.full_like(cells[0], 255)] * (cols - len(cells[i:i + cols])))
            for i in range(0, len(cells), cols)]
    sheet = np.vstack(rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_image(a.out, sheet)
    print(f"{a.out}: {len(cells)} images, model {ref.label}")


if __name__ == "__main__":
    main()
