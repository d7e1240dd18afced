"""Visit folders: a folder whose direct children include image files is one
patient's visit (patient id = folder name). A folder with no images but with
sub-folders is a batch: each direct sub-folder is a visit. Sub-folders inside a
visit folder are *not* descended into; they are listed as skipped (a clinic
export that nests another patient inside a visit would otherwise silently mix
two patients). Hidden entries (leading '.'), non-image files and links back to an
enclosing folder are skipped and listed. Names that are not valid UTF-8 are shown
with :func:`cervscan.files.names.display_id`. No torch import."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from cervscan.errors import CervscanError
from cervscan.files.ledger import _inside, _real
from cervscan.files.names import display_id

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}

# --------------------------------------------------------------------------- discovery

@dataclass
class Visit:
    patient_id: str
    folder: Path
    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    error: str | None = None


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS


def _scan(folder: Path) -> tuple[list[Path], list[Path], list[tuple[str, str]]]:
    """A folder's images, sub-folders and skipped entries (name as on disk, reason). Hidden entries
    (leading '.') and links to this folder or to a folder holding it are skipped."""
    images, subdirs, skipped = [], [], []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except PermissionError:
        raise CervscanError(f"{display_id(str(folder))}: permission denied") from None
    except OSError as e:
        raise CervscanError(f"{display_id(str(folder))}: cannot list folder ({e.strerror})") from None
    here: Path | None = None
    for e in entries:
        p = Path(e.path)
        if e.name.startswith("."):
            try:
                hidden_dir = e.is_dir()
            except OSError:
                hidden_dir = False
            skipped.append((e.name + ("/" if hidden_dir else ""), "hidden"))
            continue
        try:
            is_dir = e.is_dir()
            is_file = e.is_file()
        except OSError as err:
            skipped.append((e.name, f"cannot stat ({err.strerror})"))
            continue
        if is_dir:
            if e.is_symlink():
                here = here or _real(folder)
                target = _real(p)
                if _inside(here, target):
                    skipped.append((e.name + "/", f"link to {display_id(str(target))}, a folder that holds this "
                                                  "one (not followed)"))
                    continue
            subdirs.append(p)
        elif is_file and _is_image(p):
            images.append(p)
        elif is_file:
            skipped.append((e.name, "not an image file"))
        else:
            # broken symlink, symlink loop, socket, ...
            try:
                p.stat()
                reason = "not a regular file"
            except OSError as err:
                reason = f"unreadable link ({err.strerror})"
            skipped.append((e.name, reason))
    return images, subdirs, skipped


def _listed(skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(display_id(name), why) for name, why in skipped]


def discover_visits(paths: Iterable[str | Path], stray: list[tuple[Path, str]] | None = None) -> list[Visit]:
    """Expand each PATH into visits. Missing paths raise; empty visits carry an error.

    Patient ids, skipped names and error messages are shown with :func:`display_id` (valid UTF-8, lossless);
    ``Visit.folder`` and ``Visit.images`` are the paths on disk. Entries lying in a folder of visit
    folders, outside any visit (files, hidden entries, links back to an enclosing folder), are not
    screened; when ``stray`` is a list, each of them is appended to it as (path, reason).
    """
    visits: list[Visit] = []
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CervscanError(f"{display_id(str(path))}: path does not exist")
        if not path.is_dir():
            raise CervscanError(f"{display_id(str(path))}: not a folder (give a visit folder or a folder of "
                                "visit folders)")
        images, subdirs, skipped = _scan(path)
        if images or not subdirs:
            v = Visit(patient_id=display_id(path.resolve().name), folder=path, images=images,
                      skipped=_listed(skipped))
            v.skipped += [(display_id(d.name) + "/", "sub-folder inside a visit folder (not descended into)")
                          for d in subdirs]
            if not images:
                v.error = "no image files in visit folder"
            cand = [v]
        else:
            cand = []
            if stray is not None:
                stray += [(path / name, f"{why}; outside any visit folder (not screened)") for name, why in skipped]
            for d in subdirs:
                pid = display_id(d.name)
                try:
                    imgs, sub2, sk = _scan(d)
                except CervscanError as e:
                    cand.append(Visit(patient_id=pid, folder=d, error=str(e)))
                    continue
                v = Visit(patient_id=pid, folder=d, images=imgs, skipped=_listed(sk))
                v.skipped += [(display_id(s.name) + "/", "sub-folder inside a visit folder (not descended into)")
                              for s in sub2]
                if not imgs:
                    v.error = "no image files in visit folder"
                cand.append(v)
        for v in cand:
            if v.patient_id in seen:
                raise CervscanError(f"{display_id(str(v.folder))}: patient id '{v.patient_id}' given twice")
            seen.add(v.patient_id)
            visits.append(v)
    return visits
