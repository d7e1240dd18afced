"""The batch output folder itself: checked writable before a run, swept of temp files an interrupted
atomic write left, and cleared of mask and overlay files a visit's new result no longer references.

Only files the output ledger (:class:`cervscan.files.OutputLedger`) lists as cervscan's are deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from cervscan import files as cio
from cervscan.errors import CervscanError
from cervscan.pipeline.screening import probe_writable

log = logging.getLogger(__name__)

STATE_DIR = cio.STATE_DIR
#: The folders of per-image output files.
OUTPUT_DIRS = ("masks", "cervix", "overlays")


def prepare_out(out: Path) -> None:
    """Create OUT and its state folder, and check that a file can be written in OUT."""
    try:
        probe_writable(out)
        (out / STATE_DIR).mkdir(exist_ok=True)
    except CervscanError as e:
        raise CervscanError(f"{e}; earlier results are unchanged") from None
    except OSError as e:
        raise CervscanError(f"{cio.display_id(str(out))}: output folder is not writable ({e.strerror}); earlier "
                            "results are unchanged") from None


def sweep_temp_files(out: Path, ledger: cio.OutputLedger | None = None) -> int:
    """Remove temp files an interrupted atomic write left in OUT (call only while holding the lock): in OUT
    and masks/, cervix/, overlays/ only those of files the ledger lists as cervscan's, in reports/ those named
    as the atomic writer names them."""
    ledger = ledger if ledger is not None else cio.OutputLedger(out)
    n = 0
    for top in [out, *(out / d for d in (*OUTPUT_DIRS, "reports"))]:
        if not top.is_dir() or top.is_symlink():
            continue
        walker = [(str(top), [], [e.name for e in os.scandir(top) if e.is_file(follow_symlinks=False)])] \
            if top == out else os.walk(top)
        for folder, _, files in walker:
            for name in files:
                path = os.path.join(folder, name)
                if top == out / "reports":  # the report writer's folder: its temp files by name
                    ours = cio.TEMP_RE.match(name) is not None and not os.path.islink(path)
                else:
                    ours = ledger.owns_temp(os.path.relpath(path, out))
                if ours:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                        n += 1
    if n:
        log.info("removed %d temp file(s) left by an interrupted write in %s", n, out)
    return n


def remove_stale_outputs(out: Path, folder: str, records: list[dict], ledger: cio.OutputLedger) -> None:
    """Delete the files in masks/, cervix/, overlays/ of a visit (``folder``: its folder name there) that its
    new result does not reference; only files the ledger lists as cervscan's are deleted."""
    keep = {os.path.normpath(r[k]) for r in records for k in ("mask", "cervix_mask", "overlay") if r.get(k)}
    for d in OUTPUT_DIRS:
        path = out / d / folder
        if not path.is_dir() or path.is_symlink():
            continue
        for e in os.scandir(path):
            rel = os.path.join(d, folder, e.name)
            if os.path.normpath(rel) not in keep and ledger.may_delete(rel):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
