"""Atomic writers: a temp file beside the target, fsync of file and folder, rename. No torch import."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np

from cervscan.errors import CervscanError
from cervscan.files.names import clean_text

# --------------------------------------------------------------------------- atomic writes

_UMASK = os.umask(0)
os.umask(_UMASK)

def atomic_write_with(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """The one atomic writer: ``write(f)`` fills a temp file beside ``path``; the file is fsynced, renamed
    over ``path`` and the folder fsynced, so ``path`` holds either its old bytes or all the new ones, also
    after a crash or a power cut. Every other writer (bytes, text, JSON, CSV, images, NumPy archives,
    checkpoints, figures) goes through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs are shared clinic files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the file system allows a folder to be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write_with(path, lambda f: f.write(data))


def atomic_write_npz(path: Path, **arrays) -> Path:
    """``np.savez`` of ``arrays``, atomically."""
    return atomic_write_with(path, lambda f: np.savez(f, **arrays))


def atomic_write_text(path: Path, text: str) -> Path:
    # A file name that is not valid UTF-8 reaches us as lone surrogates (os.fsdecode); they are
    # written as \xNN (see clean_text) so that the output stays valid UTF-8.
    return atomic_write_bytes(path, clean_text(text).encode("utf-8", errors="backslashreplace"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False) + "\n")


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def atomic_write_csv(path: Path, rows: Iterable[dict], columns: list[str]) -> Path:
    return atomic_write_bytes(path, csv_bytes(rows, columns))


def csv_bytes(rows: Iterable[dict], columns: list[str]) -> bytes:
    """Exactly the bytes :func:`atomic_write_csv` writes (for a writer that compares before it writes)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_cell(r.get(k)) for k in columns})
    return clean_text(buf.getvalue()).encode("utf-8", errors="backslashreplace")


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        if not np.isfinite(v):
            return ""
        return f"{v:.6f}"
    return v


def atomic_write_image(path: Path, image_rgb: np.ndarray, quality: int = 90) -> Path:
    """Write PNG (lossless) or JPEG by suffix, atomically. ``image_rgb`` is RGB or single channel."""
    import cv2  # lazy: keeps cv2 out of --help (cervscan.files is imported by the CLI)

    ext = Path(path).suffix.lower()
    arr = image_rgb
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, enc = cv2.imencode(ext, arr, params)
    if not ok:
        raise CervscanError(f"{path}: could not encode image")
    return atomic_write_bytes(Path(path), enc.tobytes())
