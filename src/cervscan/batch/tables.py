"""The batch output's tables: ``skipped.csv``, ``images.csv`` and ``patients.csv``, rendered from the journal.

Each is rendered exactly as ``screen`` writes it (:func:`cervscan.files.csv_bytes`) and replaced
atomically, only when its content changed; a file the output ledger does not list as cervscan's is never
replaced. A visit whose folder is no longer in ROOT keeps its last result, and its ``reason`` says so
(:func:`removed_note`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from cervscan import files as cio
from cervscan.batch.faults import pause
from cervscan.batch.journal import Journal
from cervscan.errors import CervscanError
from cervscan.files import (  # atomic.atomic_write_bytes: looked up at each write
    atomic,
    csv_bytes,
)
from cervscan.pipeline.outputs import SKIPPED_COLUMNS
from cervscan.pipeline.steps import IMAGE_COLUMNS, PATIENT_COLUMNS

log = logging.getLogger(__name__)


def write_if_changed(path: Path, data: bytes, journal: Path, ledger: cio.OutputLedger | None = None) -> bool:
    """Atomically replace ``path`` with ``data`` unless it already holds exactly that; a file the ledger
    does not list as cervscan's is never replaced (:class:`cervscan.files.OutputConflictError`)."""
    if ledger is not None:
        ledger.claim([os.path.relpath(path, ledger.out)])
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return False
    try:
        atomic.atomic_write_bytes(path, data)
    except OSError as e:
        raise CervscanError(f"{path}: cannot write ({e.strerror or e}); the previous {path.name} is unchanged and "
                            f"every committed result is kept in {journal}; fix this and run again") from None
    return True


def removed_note(folder: str) -> str:
    """What ``reason`` of patients.csv says of a visit whose folder is no longer in ROOT."""
    return f"visit folder no longer in ROOT (was {folder}; moved, renamed or archived): last result kept"


def write_tables(out: Path, journal: Journal, stray: list[dict], *, ledger: cio.OutputLedger | None = None,
                 removed: dict[str, str] | None = None) -> dict[str, int]:
    """skipped.csv, images.csv and patients.csv from the journal, each atomically; patients.csv last, so
    that once it exists the other two exist as well. ``removed``: patient id -> former folder of the visits
    no longer in ROOT, whose ``reason`` says so."""
    patients, images, skipped = journal.tables()
    for p in patients:
        if p.get("patient_id") in (removed or {}):
            note = removed_note(removed[p["patient_id"]])
            p["reason"] = note + (f"; {p['reason']}" if p.get("reason") else "")
    log.info("tables: writing %d patient(s), %d image(s)", len(patients), len(images))
    write_if_changed(out / "skipped.csv", csv_bytes(stray + skipped, SKIPPED_COLUMNS), journal.path, ledger)
    write_if_changed(out / "images.csv", csv_bytes(images, IMAGE_COLUMNS), journal.path, ledger)
    pause("tables:images.csv")
    write_if_changed(out / "patients.csv", csv_bytes(patients, PATIENT_COLUMNS), journal.path, ledger)
    pause("tables:patients.csv")
    log.info("tables: written")
    return {"patients": len(patients), "images": len(images), "skipped": len(stray) + len(skipped),
            "images_failed": sum(r.get("status") != "ok" for r in images),
            "patients_error": sum(p.get("decision") == "error" for p in patients),
            "severe": sum(p.get("decision") == "severe" for p in patients),
            "mildly_normal": sum(p.get("decision") == "mildly_normal" for p in patients),
            "inadequate": sum(p.get("decision") == "inadequate" for p in patients)}
