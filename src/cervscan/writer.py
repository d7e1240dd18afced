"""The one place screening results are written. Every file is written atomically (temp file + rename).

Per image (as results arrive): ``masks/<patient>/<stem>.png`` (lesion),
``cervix/<patient>/<stem>.png`` (cervix), both binary 0/255 at the decoded
image's size, and ``overlays/<patient>/<stem>.jpg`` (cervix outline and crop
box in blue, lesion in green). At the end: ``patients.csv``, ``images.csv``,
``skipped.csv`` and ``run.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import atomic_write_csv, atomic_write_image, atomic_write_json, output_stems
from .pipeline import IMAGE_COLUMNS, PATIENT_COLUMNS, ImageResult
from .transforms import overlay

SKIPPED_COLUMNS = ["patient_id", "file", "reason"]


class OutputWriter:
    def __init__(self, out: Path, *, masks: bool = True, overlays: bool = True):
        self.out = Path(out)
        self.masks = masks
        self.overlays = overlays
        self._stems: dict[str, dict[str, str]] = {}

    def add_visit(self, patient_id: str, image_names: list[str]) -> None:
        """Register a visit's image names, so that output file stems never collide."""
        self._stems[patient_id] = output_stems(image_names)

    def image(self, res: ImageResult) -> dict:
        """Write the image's masks and overlay; returns its record with the written paths."""
        rec = res.record
        p = res.prepared
        if rec.get("status") != "ok" or p is None:
            return rec
        pid = rec["patient_id"]
        stem = self._stems.get(pid, {}).get(rec["image"]) or Path(rec["image"]).stem
        if self.masks and p.lesion_mask is not None:
            rel = Path("masks") / pid / f"{stem}.png"
            atomic_write_image(self.out / rel, p.lesion_mask * np.uint8(255))
            rec["mask"] = str(rel)
        if self.masks and p.cervix_mask is not None:
            rel = Path("cervix") / pid / f"{stem}.png"
            atomic_write_image(self.out / rel, p.cervix_mask * np.uint8(255))
            rec["cervix_mask"] = str(rel)
        if self.overlays and res.rgb is not None and p.lesion_mask is not None:
            rel = Path("overlays") / pid / f"{stem}.jpg"
            atomic_write_image(self.out / rel, overlay(res.rgb, p.lesion_mask, cervix=p.cervix_mask, box=p.crop_box))
            rec["overlay"] = str(rel)
        return rec

    def finish(self, patients: list[dict], images: list[dict], skipped: list[dict], run: dict) -> None:
        """The tables and run.json; run.json last, so its presence means the run completed."""
        atomic_write_csv(self.out / "images.csv", images, IMAGE_COLUMNS)
        atomic_write_csv(self.out / "patients.csv", patients, PATIENT_COLUMNS)
        atomic_write_csv(self.out / "skipped.csv", skipped, SKIPPED_COLUMNS)
        atomic_write_json(self.out / "run.json", run)
