"""Folder discovery, robust image decoding and atomic writers. No torch import.

Visit folders: a folder whose direct children include image files is one
patient's visit (patient id = folder name). A folder with no images but with
sub-folders is a batch: each direct sub-folder is a visit. Sub-folders inside a
visit folder are *not* descended into; they are listed as skipped (a clinic
export that nests another patient inside a visit would otherwise silently mix
two patients). Hidden files (leading '.') and non-image files are skipped and
listed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import CervscanError, ImageError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


# --------------------------------------------------------------------------- atomic writes

_UMASK = os.umask(0)
os.umask(_UMASK)

def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    # A file name that is not valid UTF-8 reaches us as lone surrogates (os.fsdecode); writing them
    # as \udcXX escapes keeps the output valid UTF-8 instead of failing the whole batch at the end.
    return atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


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
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_cell(r.get(k)) for k in columns})
    return atomic_write_text(path, buf.getvalue())


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
    import cv2

    ext = Path(path).suffix.lower()
    arr = image_rgb
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, enc = cv2.imencode(ext, arr, params)
    if not ok:
        raise CervscanError(f"{path}: could not encode image")
    return atomic_write_bytes(Path(path), enc.tobytes())


# --------------------------------------------------------------------------- output names

def output_stems(names: list[str]) -> dict[str, str]:
    """File stems for one visit's masks, overlays and heatmaps: the image's stem when
    unique in the visit, else its name with dots replaced, then a numeric suffix
    until no two images share one (case-insensitively)."""
    from collections import Counter

    stems = Counter(Path(n).stem for n in names)
    out: dict[str, str] = {}
    used: set[str] = set()
    for n in sorted(names):
        cand = Path(n).stem if stems[Path(n).stem] == 1 else n.replace(".", "_")
        base, k = cand, 1
        while cand.lower() in used:
            k += 1
            cand = f"{base}-{k}"
        used.add(cand.lower())
        out[n] = cand
    return out


# --------------------------------------------------------------------------- labels

def read_labels(path: str | Path) -> tuple[list[dict], int]:
    """Read ``patient_id,label[,source]``: rows with label 0/1 (source as given, may be
    empty) and the number of rows with an empty label, which are skipped."""
    from .errors import DataError

    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{p}: cannot read labels ({e.strerror})") from None
    if not rows or "patient_id" not in rows[0] or "label" not in rows[0]:
        raise DataError(f"{p}: needs columns patient_id,label[,source]")
    out, unlabelled = [], 0
    for r in rows:
        lab = (r.get("label") or "").strip()
        if lab == "":
            unlabelled += 1
            continue
        if lab not in ("0", "1"):
            raise DataError(f"{p}: patient {r['patient_id']}: label must be 0 or 1, got {lab!r}")
        out.append({"patient_id": r["patient_id"].strip(), "label": int(lab), "source": (r.get("source") or "").strip()})
    return out, unlabelled


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
    images, subdirs, skipped = [], [], []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except PermissionError:
        raise CervscanError(f"{folder}: permission denied") from None
    except OSError as e:
        raise CervscanError(f"{folder}: cannot list folder ({e.strerror})") from None
    for e in entries:
        p = Path(e.path)
        if e.name.startswith("."):
            skipped.append((e.name, "hidden"))
            continue
        try:
            is_dir = e.is_dir()
            is_file = e.is_file()
        except OSError as err:
            skipped.append((e.name, f"cannot stat ({err.strerror})"))
            continue
        if is_dir:
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


def discover_visits(paths: Iterable[str | Path], stray: list[tuple[Path, str]] | None = None) -> list[Visit]:
    """Expand each PATH into visits. Missing paths raise; empty visits carry an error.

    Files lying in a folder of visit folders, outside any visit, are not screened; when ``stray`` is a
    list, each of them is appended to it as (path, reason). Hidden ones (``.name``) are left out.
    """
    visits: list[Visit] = []
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CervscanError(f"{path}: path does not exist")
        if not path.is_dir():
            raise CervscanError(f"{path}: not a folder (give a visit folder or a folder of visit folders)")
        images, subdirs, skipped = _scan(path)
        if images or not subdirs:
            v = Visit(patient_id=path.resolve().name, folder=path, images=images, skipped=skipped)
            v.skipped += [(d.name + "/", "sub-folder inside a visit folder (not descended into)") for d in subdirs]
            if not images:
                v.error = "no image files in visit folder"
            cand = [v]
        else:
            cand = []
            if stray is not None:
                stray += [(path / name, f"{why}; outside any visit folder (not screened)")
                          for name, why in skipped if not name.startswith(".")]
            for d in subdirs:
                try:
                    imgs, sub2, sk = _scan(d)
                except CervscanError as e:
                    cand.append(Visit(patient_id=d.name, folder=d, error=str(e)))
                    continue
                v = Visit(patient_id=d.name, folder=d, images=imgs, skipped=sk)
                v.skipped += [(s.name + "/", "sub-folder inside a visit folder (not descended into)") for s in sub2]
                if not imgs:
                    v.error = "no image files in visit folder"
                cand.append(v)
        for v in cand:
            if v.patient_id in seen:
                raise CervscanError(f"{v.folder}: patient id '{v.patient_id}' given twice")
            seen.add(v.patient_id)
            visits.append(v)
    return visits


def cache_root(cache_dir: str | Path | None) -> Path:
    """Where training caches live: ``cache_dir`` when given, else the user's cache folder for cervscan."""
    if cache_dir:
        return Path(cache_dir)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cervscan", appauthor=False))


def file_key(path: Path) -> str:
    """Short cache key of a file as it is now (resolved path, size, modification time)."""
    import hashlib

    st = Path(path).stat()
    return hashlib.sha1(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- decoding

@dataclass
class DecodedImage:
    rgb: np.ndarray  # HxWx3 uint8, upright, possibly scaled down to max_side
    width: int  # original (upright) size
    height: int
    scale: float  # working size / original size


def read_image(path: str | Path, *, max_side: int = 2048, max_pixels: int = 120_000_000,
               min_side: int = 32) -> DecodedImage:
    """Decode any supported image to upright 8-bit RGB, memory-bounded.

    EXIF orientation is applied; grayscale, palette, RGBA (composited on
    black), CMYK and 16-bit images become 8-bit RGB. JPEGs larger than
    ``max_side`` are decoded at a reduced DCT scale (``draft``), so an
    8000x6000 photo never materialises at full size. Images with more than
    ``max_pixels`` pixels are refused before decoding (decompression bomb).
    Raises ImageError naming the file and the reason.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageError(f"{p}: cannot read ({e.strerror})") from None
    if size == 0:
        raise ImageError(f"{p}: empty file (0 bytes)")
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except PermissionError:
        raise ImageError(f"{p}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot read ({e.strerror})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # we check ourselves below, with our own limit
            try:
                im = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = old
            w0, h0 = im.size
            if w0 * h0 > max_pixels:
                raise ImageError(f"{p}: image too large ({w0}x{h0} = {w0 * h0 / 1e6:.0f} MP > "
                                 f"{max_pixels / 1e6:.0f} MP decompression-bomb guard)")
            if min(w0, h0) < min_side:
                raise ImageError(f"{p}: image too small ({w0}x{h0}; need at least {min_side} px per side)")
            if im.format == "JPEG" and max(w0, h0) > max_side:
                im.draft("RGB", (max_side, max_side))
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb8(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            raise ImageError(f"{p}: truncated or corrupt image data ({msg})") from None
        raise ImageError(f"{p}: cannot decode image ({msg})") from None
    except MemoryError:
        raise ImageError(f"{p}: not enough memory to decode") from None
    # original (upright) size
    if orientation in (5, 6, 7, 8):
        w0, h0 = h0, w0
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        import cv2

        s = max_side / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    scale = rgb.shape[1] / w0
    return DecodedImage(rgb=np.ascontiguousarray(rgb), width=w0, height=h0, scale=float(scale))


def _to_rgb8(im) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        if a.dtype != np.uint8:
            a = a.astype(np.float64)
            hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
            a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.stack([a, a, a], axis=-1)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(a, 0, 1 if a.max() <= 1 else 255)
        a = (a / (1 if a.max() <= 1 else 255) * 255).astype(np.uint8)
        return np.stack([a, a, a], axis=-1)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        a = np.asarray(im).astype(np.float32)
        rgb = a[..., :3] * (a[..., 3:4] / 255.0)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if mode == "RGB":
        arr = np.asarray(im)
        if arr.dtype != np.uint8:  # e.g. 48-bit TIFF read as RGB;16 -> scale
            arr = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
        return arr
    return np.asarray(im.convert("RGB"))
