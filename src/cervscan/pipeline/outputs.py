"""The one place screening results are written. Every file is written atomically (temp file + rename).

Per image (as results arrive): ``masks/<patient>/<stem>.png`` (lesion),
``cervix/<patient>/<stem>.png`` (cervix), both binary 0/255 at the decoded
image's size, and ``overlays/<patient>/<stem>.jpg`` (cervix outline and crop
box in blue, lesion in green). At the end: ``patients.csv``, ``images.csv``,
``skipped.csv`` and ``run.json``.

``<patient>`` and ``<stem>`` come from the folder and image names, kept under
:data:`cervscan.files.MAX_NAME_BYTES` bytes and unique (:func:`cervscan.files.safe_name`,
:func:`cervscan.files.output_stems`). Every path is claimed in the output ledger
(:class:`cervscan.files.OutputLedger`) before it is written, so a file cervscan
did not create is never replaced. An image whose files cannot be written is
recorded as failed, with the reason; the run goes on. Only a full or read-only
disk (:data:`STOP_ERRNOS`) stops it.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np

from cervscan.files import OutputLedger, atomic_write_csv, atomic_write_image, atomic_write_json, clean_text, display_id, output_stems, safe_name
from cervscan.pipeline.steps import IMAGE_COLUMNS, PATIENT_COLUMNS, ImageResult
from cervscan.pipeline.transforms import overlay

SKIPPED_COLUMNS = ["patient_id", "file", "reason"]
#: The tables and run.json, in the order :meth:`OutputWriter.finish` writes them.
TABLES = ("images.csv", "patients.csv", "skipped.csv", "run.json")
#: Write errors that concern the whole output folder (disk full, quota, read-only, I/O): they stop the run
#: instead of failing one image after another.
STOP_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EIO) if e)


def clean_record(rec: dict) -> dict:
    """A result record as it is written: ``image`` and ``path`` shown with :func:`cervscan.files.display_id`,
    any other text with :func:`cervscan.files.clean_text` (valid UTF-8 whatever the file names)."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, str):
            v = display_id(v) if k in ("image", "path") else clean_text(v)
        out[k] = v
    return out


def failed_record(rec: dict, error: str) -> dict:
    """The record of an image that cannot be used: only its identity, the threshold and why."""
    return {**{k: rec.get(k) for k in ("patient_id", "image", "path", "threshold")},
            "status": "error", "error": error, "decision": "error"}


class OutputWriter:
    def __init__(self, out: Path, *, masks: bool = True, overlays: bool = True, ledger: OutputLedger | None = None):
        self.out = Path(out)
        self.masks = masks
        self.overlays = overlays
        self.ledger = ledger if ledger is not None else OutputLedger(self.out)
        self._stems: dict[str, dict[str, str]] = {}
        self._dirs: dict[str, str] = {}
        #: patient ids with an image whose files could not be written (the batch screens them again)
        self.output_failed: set[str] = set()

    def add_visit(self, patient_id: str, image_names: list[str]) -> None:
        """Register a visit's image names (as :func:`cervscan.files.display_id` shows them), so that output file
        stems never collide."""
        self._stems[patient_id] = output_stems(image_names)
        self._dirs[patient_id] = safe_name(patient_id)

    def folder(self, patient_id: str) -> str:
        """The patient's folder name under masks/, cervix/ and overlays/."""
        return self._dirs.get(patient_id) or safe_name(patient_id)

    def image(self, res: ImageResult) -> dict:
        """Write the image's masks and overlay; returns its record with the written paths, or a failed record
        naming the file that could not be written. Raises ``OSError`` only for :data:`STOP_ERRNOS`."""
        rec = clean_record(res.record)
        p = res.prepared
        if rec.get("status") != "ok" or p is None:
            return rec
        target = None
        try:
            pid = rec["patient_id"]
            folder = self.folder(pid)
            stem = self._stems.get(pid, {}).get(rec["image"]) or safe_name(Path(rec["image"]).stem)
            todo = []
            if self.masks and p.lesion_mask is not None:
                todo.append(("mask", Path("masks") / folder / f"{stem}.png", lambda: p.lesion_mask * np.uint8(255)))
            if self.masks and p.cervix_mask is not None:
                todo.append(("cervix_mask", Path("cervix") / folder / f"{stem}.png",
                             lambda: p.cervix_mask * np.uint8(255)))
            if self.overlays and res.rgb is not None and p.lesion_mask is not None:
                todo.append(("overlay", Path("overlays") / folder / f"{stem}.jpg",
                             lambda: overlay(res.rgb, p.lesion_mask, cervix=p.cervix_mask, box=p.crop_box)))
            self.ledger.claim([rel for _, rel, _ in todo])
            for col, rel, make in todo:
                target = rel
                atomic_write_image(self.out / rel, make())
                rec[col] = str(rel)
            return rec
        except OSError as e:
            if e.errno in STOP_ERRNOS:
                raise
            where = display_id(str(self.out / target)) if target is not None else display_id(str(self.out))
            err = f"{rec.get('path') or rec.get('image')}: cannot write {where} ({e.strerror or e})"
        except Exception as e:  # noqa: BLE001 - one image's files must not stop the run
            err = f"{rec.get('path') or rec.get('image')}: output files not written: {clean_text(str(e))}"
        self.output_failed.add(rec.get("patient_id"))
        return failed_record(rec, err)

    def claim_tables(self) -> None:
        """Check, before screening, that the tables and run.json may be written (cervscan's own or absent)."""
        self.ledger.claim(TABLES)

    def finish(self, patients: list[dict], images: list[dict], skipped: list[dict], run: dict) -> None:
        """The tables and run.json; run.json last, so its presence means the run completed."""
        self.claim_tables()
        atomic_write_csv(self.out / "images.csv", images, IMAGE_COLUMNS)
        atomic_write_csv(self.out / "patients.csv", patients, PATIENT_COLUMNS)
        atomic_write_csv(self.out / "skipped.csv", skipped, SKIPPED_COLUMNS)
        atomic_write_json(self.out / "run.json", run)
