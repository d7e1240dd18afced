"""Folder discovery, robust image decoding and atomic writers. No torch import.

Visit folders: a folder whose direct children include image files is one
patient's visit (patient id = folder name). A folder with no images but with
sub-folders is a batch: each direct sub-folder is a visit. Sub-folders inside a
visit folder are *not* descended into; they are listed as skipped (a clinic
export that nests another patient inside a visit would otherwise silently mix
two patients). Hidden entries (leading '.'), non-image files and links back to an
enclosing folder are skipped and listed. Names that are not valid UTF-8 are shown
with :func:`display_id`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

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


# --------------------------------------------------------------------------- names that are not valid UTF-8

def _name_bytes(name: str) -> bytes:
    """The bytes of a name as the file system holds them (``os.fsdecode`` gives lone surrogates for
    bytes that are not valid UTF-8)."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no file system decode produces
        return name.encode("utf-8", "surrogatepass")


def display_id(name: str) -> str:
    """A file or folder name (or path) as cervscan shows it in CSVs, run.json, the batch journal, logs
    and the console: valid UTF-8, one line, and lossless (:func:`from_display_id` gives the name back).

    A name that is valid UTF-8 without control characters is shown exactly as written (backslashes
    included). Otherwise each byte that is not valid UTF-8 and each control character is written ``\\xNN``
    (e.g. a Latin-1 folder name ``caf\\xe9``) and, in such a name only, a backslash ``\\\\``; a valid name
    that itself holds ``\\x`` and two hex digits is escaped the same way, so that no two names look alike.
    """
    if not _needs_escape(name):
        return name
    text = _name_bytes(name).decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:  # a byte that is not valid UTF-8
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    return "".join(out)


def _needs_escape(name: str) -> bool:
    return (any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in name)
            or _ESCAPE_RE.search(name) is not None)


_ESCAPE_RE = re.compile(r"\\x[0-9a-fA-F]{2}")


def from_display_id(text: str) -> str:
    """The name :func:`display_id` shows as ``text``, as ``os.fsdecode`` gives it (usable with ``open``)."""
    if not _ESCAPE_RE.search(text):
        return text
    raw, i = bytearray(), 0
    while i < len(text):
        if text.startswith("\\\\", i):
            raw += b"\\"
            i += 2
        elif text.startswith("\\x", i) and len(text) >= i + 4:
            try:
                raw.append(int(text[i + 2:i + 4], 16))
                i += 4
                continue
            except ValueError:
                raw += b"\\"
                i += 1
        else:
            raw += text[i].encode("utf-8", "surrogateescape")
            i += 1
    return os.fsdecode(bytes(raw))


def clean_text(text: str) -> str:
    """Free text (an error message naming a path) as valid UTF-8: each byte of a file name that is not
    valid UTF-8 (a lone surrogate from ``os.fsdecode``) becomes ``\\xNN``; nothing else changes."""
    if text.isascii() or not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return text
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else (f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c) for c in text)


# --------------------------------------------------------------------------- output names

#: Longest file or folder name cervscan derives from an input name, in UTF-8 bytes. File systems allow
#: 255; the atomic writer's temp file adds 14 (".", ".XXXXXXXX.tmp"), and an extension and a "-k"
#: suffix need room too.
MAX_NAME_BYTES = 200


def safe_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """``name`` as one file-name component of at most ``limit`` UTF-8 bytes: unchanged when it fits (and is
    not empty, ``.`` or ``..``), else cut at a character boundary and ended by ``~`` and 8 hex digits of a
    hash of the whole name, so that two long names with the same beginning stay apart."""
    import hashlib

    name = clean_text(name).replace("/", "_").replace("\0", "_")
    if name in ("", ".", ".."):
        name = "_" + name
    raw = name.encode("utf-8", "backslashreplace")
    if len(raw) <= limit:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:8]
    return raw[:limit - 9].decode("utf-8", "ignore") + "~" + digest


def output_stems(names: list[str]) -> dict[str, str]:
    """File stems for one visit's masks, overlays and heatmaps: the image's stem when
    unique in the visit, else its name with dots replaced, then a numeric suffix
    until no two images share one (case-insensitively). A stem longer than
    :data:`MAX_NAME_BYTES` is shortened by :func:`safe_name`."""
    from collections import Counter

    stems = Counter(Path(n).stem for n in names)
    out: dict[str, str] = {}
    used: set[str] = set()
    for n in sorted(names):
        cand = safe_name(Path(n).stem if stems[Path(n).stem] == 1 else n.replace(".", "_"))
        base, k = cand, 1
        while cand.lower() in used:
            k += 1
            cand = f"{base}-{k}"
        used.add(cand.lower())
        out[n] = cand
    return out


# --------------------------------------------------------------------------- what cervscan may write in OUT

#: cervscan's own folder in OUT (the ledger; the batch journal and lock).
STATE_DIR = ".cervscan"
#: The ledger: every file cervscan created in OUT, one JSON string (the path relative to OUT) a line.
LEDGER_NAME = "written.jsonl"
#: Tables cervscan writes in OUT, and the columns that mark one written by any cervscan version.
_TABLE_COLUMNS = {"patients.csv": {"patient_id", "decision", "score", "threshold"},
                  "images.csv": {"patient_id", "image", "path", "status"},
                  "skipped.csv": {"patient_id", "file", "reason"}}


#: Temp files of :func:`atomic_write_bytes` (mkstemp: ".<name>.<8 chars>.tmp") and of the write probe.
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp$|^\.cervscan-write-test(\.[A-Za-z0-9_]{8})?$")


class OutputConflictError(CervscanError):
    """A file in OUT that cervscan did not create, or a path in OUT that leads into an input folder or out
    of OUT: not written, not deleted."""


def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(p))


def _inside(child: Path, parent: Path) -> bool:
    """``child`` is ``parent`` or lies inside it (both real paths)."""
    return child == parent or parent in child.parents


def _shown(p: str | Path) -> str:
    """A path for a message: as given, and its real location when a link leads elsewhere."""
    given, real = os.path.abspath(p), os.path.realpath(p)
    return display_id(str(p)) + (f" (= {display_id(real)})" if real != given else "")


def check_overlap(inputs: Iterable[str | Path], out: str | Path) -> None:
    """Refuse an output folder that is an input folder, lies inside one or holds one (real paths, symbolic
    links resolved): one line naming both. cervscan never writes inside its input, so call this before
    anything is written."""
    out_r = _real(out)
    for p in inputs:
        in_r = _real(p)
        if in_r == out_r:
            what = "is the input folder"
        elif _inside(out_r, in_r):
            what = "lies inside the input folder"
        elif _inside(in_r, out_r):
            what = "holds the input folder"
        else:
            continue
        raise CervscanError(f"output folder {_shown(out)} {what} {_shown(p)}: cervscan never writes inside its "
                            "input; choose an output folder outside the input folders (and none inside it)")


def overlap_note(folder: str | Path, out: str | Path) -> str | None:
    """Why a visit folder (found inside an input folder, possibly through a link) must not be screened into
    ``out``, or None."""
    in_r, out_r = _real(folder), _real(out)
    if _inside(in_r, out_r) or _inside(out_r, in_r):
        return (f"visit folder {_shown(folder)} overlaps the output folder {_shown(out)}: not screened "
                "(cervscan never writes inside its input)")
    return None


class OutputLedger:
    """What cervscan created in OUT (``OUT/.cervscan/written.jsonl``), so that it never overwrites or
    deletes a file it did not create.

    :meth:`claim` is called before a file is written: a path already in the ledger is cervscan's and may
    be replaced; a new path is appended (one write and fsync for all the paths of one call) before the
    file is created, so a crash can leave a listed path without a file but never a file cervscan wrote
    without its line; a path that exists but is not listed raises :class:`OutputConflictError`, and so
    does a path whose folder leads out of OUT or into an input folder (a link). :meth:`may_delete` says
    whether a file may be removed (listed, a plain file, in a folder inside OUT).

    An OUT written before the ledger existed (no ledger file): the tables whose header has cervscan's
    columns (``patients.csv``, ``images.csv``, ``skipped.csv``), a ``run.json`` recording a cervscan
    version, the mask and overlay files that ``images.csv`` names, and the paths passed as ``adopt`` are
    taken as cervscan's; anything else is left alone.
    """

    def __init__(self, out: str | Path, inputs: Iterable[str | Path] = (),
                 adopt: Iterable[str] | Callable[[], Iterable[str]] = ()):
        self.out = Path(out)
        self.out_real = _real(self.out)
        self.path = self.out / STATE_DIR / LEDGER_NAME
        self._owned: set[str] = set()
        self._dirs: dict[str, str | None] = {}
        self.inputs: list[Path] = []
        self.add_inputs(inputs)
        self._newline = False
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            legacy = self._legacy() | {self._key(a) for a in (adopt() if callable(adopt) else adopt)}
            if legacy:
                self._append(sorted(legacy))
            return
        except OSError as e:
            raise CervscanError(f"{self.path}: cannot read ({e.strerror})") from None
        for line in raw.decode("utf-8", "replace").splitlines():
            try:
                key = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            if isinstance(key, str):
                self._owned.add(key)
        self._newline = bool(raw) and not raw.endswith(b"\n")

    @staticmethod
    def _key(rel: str | Path) -> str:
        key = os.path.normpath(str(rel)).replace(os.sep, "/")
        if os.path.isabs(key) or key == ".." or key.startswith("../"):
            raise OutputConflictError(f"{rel}: not a path inside the output folder")
        return key

    def _legacy(self) -> set[str]:
        found: set[str] = set()
        for name, cols in _TABLE_COLUMNS.items():
            p = self.out / name
            try:
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                with open(p, newline="", encoding="utf-8", errors="replace") as fh:
                    header = next(csv.reader([fh.readline(65536)]), [])
            except OSError:
                continue
            if cols <= set(header):
                found.add(name)
        if "images.csv" in found:
            try:
                with open(self.out / "images.csv", newline="", encoding="utf-8", errors="replace") as fh:
                    for r in csv.DictReader(fh):
                        for col in ("mask", "cervix_mask", "overlay"):
                            rel = (r.get(col) or "").strip()
                            if rel and os.path.isfile(self.out / rel):
                                with contextlib.suppress(OutputConflictError):
                                    found.add(self._key(rel))
            except (OSError, csv.Error):
                pass
        run = self.out / "run.json"
        try:
            if os.path.isfile(run) and not os.path.islink(run) and run.stat().st_size < 64 << 20:
                rec = json.loads(run.read_text(encoding="utf-8", errors="replace"))
                if isinstance(rec, dict) and "cervscan_version" in rec:
                    found.add("run.json")
        except (OSError, ValueError):
            pass
        return found

    def _dir_problem(self, key: str) -> str | None:
        parent = os.path.dirname(key)
        if parent not in self._dirs:
            real = _real(self.out / parent) if parent else self.out_real
            problem = None
            if not _inside(real, self.out_real):
                problem = f"its folder leads out of the output folder (to {display_id(str(real))})"
            else:
                for inp in self.inputs:
                    if _inside(real, inp):
                        problem = f"its folder leads into the input folder {display_id(str(inp))}"
                        break
            self._dirs[parent] = problem
        return self._dirs[parent]

    def owns(self, rel: str | Path) -> bool:
        """``rel`` (relative to OUT) is listed as created by cervscan."""
        try:
            return self._key(rel) in self._owned
        except OutputConflictError:
            return False

    def add_inputs(self, paths: Iterable[str | Path]) -> None:
        """More input folders (visit folders reached through links) that no output may lead into; those
        inside an input folder already known add nothing."""
        for p in paths:
            real = _real(p)
            if not any(_inside(real, known) for known in self.inputs):
                self.inputs.append(real)
        self._dirs.clear()

    def owns_temp(self, rel: str | Path) -> bool:
        """``rel`` is a temp file the atomic writer left while writing one of cervscan's files (or the
        write probe in OUT)."""
        m = TEMP_RE.match(os.path.basename(str(rel)))
        if not m:
            return False
        parent = os.path.dirname(str(rel))
        if m.group("target") is None:
            return parent in ("", ".")
        return self.owns(os.path.join(parent, m.group("target"))) and not self._dir_problem(self._key(rel))

    def claim(self, rels: Iterable[str | Path]) -> None:
        """Allow cervscan to write these paths (relative to OUT); raises :class:`OutputConflictError`,
        naming the file, when one may not be written."""
        new: list[str] = []
        for rel in rels:
            key = self._key(rel)
            full = self.out / key
            problem = self._dir_problem(key)
            if problem:
                raise OutputConflictError(f"{display_id(str(full))}: not written: {problem}")
            if key in self._owned or key in new:
                continue
            try:
                os.lstat(full)
            except FileNotFoundError:
                new.append(key)
                continue
            except OSError:
                new.append(key)  # e.g. a file where a folder should be: the write itself will say why
                continue
            raise OutputConflictError(
                f"{display_id(str(full))}: exists and was not written by cervscan (it is not listed in "
                f"{display_id(str(self.path))}); not overwritten: move it away or use another output folder")
        if new:
            self._append(new)

    def may_delete(self, rel: str | Path) -> bool:
        """``rel`` is cervscan's own plain file, in a folder inside OUT that leads into no input."""
        import stat

        try:
            key = self._key(rel)
        except OutputConflictError:
            return False
        if key not in self._owned or self._dir_problem(key):
            return False
        try:
            return stat.S_ISREG(os.lstat(self.out / key).st_mode)
        except OSError:
            return False

    def _append(self, keys: list[str]) -> None:
        data = ("\n" if self._newline else "") + "".join(json.dumps(k) + "\n" for k in keys)
        created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                buf = memoryview(data.encode("utf-8", "surrogateescape"))
                while buf:
                    buf = buf[os.write(fd, buf):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    dfd = os.open(self.path.parent, os.O_RDONLY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
        except OSError as e:
            raise CervscanError(f"{self.path}: cannot record the files cervscan writes ({e.strerror or e})") \
                from None
        self._newline = False
        self._owned.update(keys)


# --------------------------------------------------------------------------- labels

def read_labels(path: str | Path, notes: list[dict] | None = None) -> tuple[list[dict], int]:
    """Read ``patient_id,label[,source]``: rows with label 0/1 (source as given, may be
    empty) and the number of rows with an empty label, which are skipped.

    A patient id listed more than once with the same label is kept once (its first row) and noted; with
    opposite labels it is a :class:`~cervscan.errors.DataError` naming the id and the rows (line numbers of
    the file, the header is line 1). Notes go to ``notes`` when given: ``{"kind": "duplicate",
    "patient_id", "rows", "labels", "sources"}``."""
    from .errors import DataError

    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(r, reader.line_num) for r in reader]
    except OSError as e:
        raise DataError(f"{p}: cannot read labels ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not a readable CSV file ({e})") from None
    if not rows or "patient_id" not in rows[0][0] or "label" not in rows[0][0]:
        raise DataError(f"{p}: needs columns patient_id,label[,source]")
    out, unlabelled = [], 0
    seen: dict[str, list[tuple[int, int, str]]] = {}  # id -> (line, label, source) of each labelled row
    for r, line in rows:
        lab = (r.get("label") or "").strip()
        if lab == "":
            unlabelled += 1
            continue
        pid = (r.get("patient_id") or "").strip()
        if lab not in ("0", "1"):
            raise DataError(f"{p}: patient {pid}: label must be 0 or 1, got {lab!r}")
        if not pid:
            raise DataError(f"{p}: line {line}: a label without a patient_id")
        src = (r.get("source") or "").strip()
        if pid in seen:
            seen[pid].append((line, int(lab), src))
            continue
        seen[pid] = [(line, int(lab), src)]
        out.append({"patient_id": pid, "label": int(lab), "source": src})
    dups = {pid: v for pid, v in seen.items() if len(v) > 1}
    conflicts = {pid: v for pid, v in dups.items() if len({lab for _, lab, _ in v}) > 1}
    if conflicts:
        raise DataError(f"{p}: contradictory labels: " + "; ".join(
            f"patient {pid} is labelled " + " and ".join(f"{lab} (line {line})" for line, lab, _ in v)
            for pid, v in conflicts.items()) + "; correct the labels file")
    if notes is not None:
        notes.extend({"kind": "duplicate", "patient_id": pid, "rows": [line for line, _, _ in v],
                      "labels": [lab for _, lab, _ in v], "sources": [src for _, _, src in v]}
                     for pid, v in dups.items())
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


#: Memory budget of one image decode, in MB (10^6 bytes): an image whose decode would hold more pixel data
#: at once (estimated from its size and colour mode before anything is decoded) is refused. Config
#: ``max_decode_mb``.
MAX_DECODE_MB = 256
#: Decoded pixel data per strip (bytes of full-resolution rows) when a large image is converted and
#: scaled down strip by strip.
_BAND_BYTES = 2 << 20
#: Images of up to this many pixels (as decoded; after a JPEG ``draft``) are converted to a full-size 8-bit
#: RGB array (3 bytes a pixel) and resized at once; larger ones are box-averaged strip by strip first.
_EXACT_PIXELS = 32_000_000


def read_image(path: str | Path, *, max_side: int = 2048, max_pixels: int = 120_000_000,
               min_side: int = 32, max_decode_mb: float = MAX_DECODE_MB) -> DecodedImage:
    """Decode any supported image to upright 8-bit RGB, memory-bounded.

    EXIF orientation is applied; grayscale, palette, RGBA (composited on
    black), CMYK and 16-bit images become 8-bit RGB. Images with more than
    ``max_pixels`` pixels are refused before decoding (decompression bomb),
    and so are images whose decode would hold more than ``max_decode_mb`` MB
    of pixel data at once (:func:`decode_bytes`, estimated from the size and
    colour mode before decoding).

    Large images never become full-size RGB or float arrays: JPEGs larger
    than ``max_side`` are decoded at a reduced DCT scale (``draft``); PNGs
    (not interlaced) are decoded a strip of rows at a time straight from the
    file, so the full image is never held; other formats (TIFF, BMP,
    interlaced PNG) are decoded whole by Pillow, within the budget. Strip by
    strip, the rows are then converted to 8-bit RGB (integer arithmetic) and
    box-averaged by the integer factor ``longer side // max_side``; the result
    is scaled to ``max_side`` with area interpolation. Images of up to 32 MP
    (after a JPEG ``draft``) are not box-averaged: their full-size 8-bit RGB
    array is resized at once, as a full decode would be. Raises ImageError
    naming the file and the reason.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageError(f"{p}: cannot read ({e.strerror})") from None
    if size == 0:
        raise ImageError(f"{p}: empty file (0 bytes)")
    try:
        fh = open(p, "rb")
    except PermissionError:
        raise ImageError(f"{p}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot read ({e.strerror})") from None
    with fh:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                old = Image.MAX_IMAGE_PIXELS
                # we check ourselves below, with our own limit (Pillow checks again when it loads a TIFF)
                Image.MAX_IMAGE_PIXELS = None
                try:
                    im = Image.open(fh)
                    w0, h0 = im.size
                    if w0 * h0 > max_pixels:
                        raise ImageError(f"{p}: image too large ({w0}x{h0} = {w0 * h0 / 1e6:.0f} MP > "
                                         f"{max_pixels / 1e6:.0f} MP decompression-bomb guard)")
                    if min(w0, h0) < min_side:
                        raise ImageError(f"{p}: image too small ({w0}x{h0}; need at least {min_side} px per side)")
                    if im.format == "JPEG" and max(w0, h0) > max_side:
                        im.draft("RGB", (max_side, max_side))
                    need = decode_bytes(im, max_side, (w0, h0))
                    if need > max_decode_mb * 1e6:
                        raise ImageError(
                            f"{p}: image too large to decode within the memory budget ({w0}x{h0} = "
                            f"{w0 * h0 / 1e6:.0f} MP, {im.mode}: about {need / 1e6:.0f} MB > {max_decode_mb:g} MB, "
                            f"setting max_decode_mb)")
                    rgb, orientation = _decode_reduced(im, fh, max_side)
                    im.close()
                finally:
                    Image.MAX_IMAGE_PIXELS = old
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
    scale = rgb.shape[1] / w0
    return DecodedImage(rgb=np.ascontiguousarray(rgb), width=w0, height=h0, scale=float(scale))


def _pixel_bytes(mode: str) -> int:
    """Bytes per pixel of a Pillow image in ``mode`` (1-band 8-bit: 1; 16-bit: 2; the rest: 4)."""
    if mode in ("1", "L", "P") or mode.startswith("L;"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _reduce_factor(size: tuple[int, int], max_side: int) -> int:
    """The integer factor a decoded image is box-averaged by, strip by strip, before its final resize to
    ``max_side``: 1 (no box average: the full-size 8-bit RGB array is resized at once) up to
    ``_EXACT_PIXELS``, else ``longer side // max_side``."""
    if size[0] * size[1] <= _EXACT_PIXELS:
        return 1
    return max(1, max(size) // max(1, max_side))


def decode_bytes(im, max_side: int = 2048, stored_size: tuple[int, int] | None = None) -> int:
    """Estimated bytes of pixel data :func:`read_image` holds at once to decode ``im`` (a Pillow image opened,
    not loaded, after a JPEG ``draft``; ``stored_size``: its size before the draft): the full decode as Pillow
    stores it (1, 2 or 4 bytes a pixel; none for a PNG decoded strip by strip), plus the whole-image
    coefficient buffer (2 bytes a coefficient) that libjpeg keeps for a progressive JPEG whatever the scale;
    one strip of rows and its working copies (8 x); and the 8-bit RGB result before its final resize."""
    w, h = im.size
    k = _reduce_factor(im.size, max_side)
    need = -(-w // k) * -(-h // k) * 3 + 8 * min(h, _band_rows(w, im.mode, k)) * w * _pixel_bytes(im.mode)
    if _png_strip_rawmode(im) is not None:
        return need
    need += w * h * _pixel_bytes(im.mode)
    if im.format == "JPEG" and (im.info.get("progressive") or im.info.get("progression")):
        sw, sh = stored_size or im.size
        layers = getattr(im, "layer", None) or [("", 1, 1, 0)]
        hmax = max(lay[1] for lay in layers) or 1
        vmax = max(lay[2] for lay in layers) or 1
        need += sum(-(-sw * lay[1] // (8 * hmax)) * -(-sh * lay[2] // (8 * vmax)) * 64 * 2 for lay in layers)
    return need


def _band_rows(width: int, mode: str, k: int) -> int:
    """Rows per strip: about ``_BAND_BYTES`` of decoded pixels, a multiple of ``k``."""
    rows = max(1, _BAND_BYTES // max(1, width * _pixel_bytes(mode)))
    return max(k, rows // k * k)


#: PNG colour type -> samples per pixel.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Bytes per pixel of the filtered rows -> (mode, rawmode) decodes that give back the unfiltered row bytes:
#: one identity decode, or for 16-bit colour the high and the low bytes of each sample.
_PNG_UNFILTER = {1: (("L", "L"),), 2: (("LA", "LA"),), 3: (("RGB", "RGB"),), 4: (("RGBA", "RGBA"),),
                 6: (("RGB", "RGB;16B"), ("RGB", "RGB;16L")), 8: (("RGBA", "RGBA;16B"), ("RGBA", "RGBA;16L"))}


def _png_strip_rawmode(im) -> str | None:
    """The rawmode of a PNG that is decoded strip by strip (larger than one strip; not interlaced, not
    animated), else None."""
    if im.format != "PNG" or im.info.get("interlace") or getattr(im, "is_animated", False) or "bbox" in im.info:
        return None
    w, h = im.size
    if w * h * _pixel_bytes(im.mode) <= _BAND_BYTES:
        return None
    if len(im.tile) != 1 or im.tile[0][0] != "zip" or tuple(im.tile[0][1]) != (0, 0, w, h):
        return None
    args = im.tile[0][3]
    return args if isinstance(args, str) else args[0]


def _png_ihdr(fh) -> tuple[int, int, int, int]:
    """Width, height, bit depth and colour type from a PNG's header chunk (the file is left at the chunk
    after it)."""
    import struct

    fh.seek(8)
    head = fh.read(8 + 13 + 4)  # length, type, data, CRC: leaves the file at the next chunk
    if len(head) < 25 or head[4:8] != b"IHDR":
        raise SyntaxError("broken PNG file (no IHDR chunk)")
    w, h, depth, ctype = struct.unpack(">IIBB", head[8:18])
    return w, h, depth, ctype


def _png_bands(im, fh, rawmode: str, rows: int, after: dict):
    """Yield the rows of a PNG (not interlaced) as Pillow images of ``rows`` rows (the last may have fewer),
    read straight from the file a strip at a time, so that the full image is never held.

    The IDAT data is inflated only as far as one strip needs; the strip's filtered rows are unfiltered by
    Pillow's PNG decoder, preceded by the previous strip's last row (unfiltered, filter type 0) so that the
    filters that look at the row above work across strips. Chunks after the image data are read to the
    end, and an ``eXIf`` chunk found there goes to ``after["exif"]``.
    """
    import struct
    import zlib

    from PIL import Image

    w, h, depth, ctype = _png_ihdr(fh)
    if (w, h) != im.size or ctype not in _PNG_CHANNELS:
        raise SyntaxError("broken PNG file (header does not match)")
    bits = depth * _PNG_CHANNELS[ctype]
    rowbytes = (w * bits + 7) // 8
    bpp = max(1, bits // 8)
    unfilter = _PNG_UNFILTER.get(bpp)
    if unfilter is None:
        raise SyntaxError(f"unsupported PNG pixel layout ({depth}-bit, colour type {ctype})")
    stride = rowbytes + 1

    def idat():
        seen = False
        while True:
            head = fh.read(8)
            if len(head) < 8:
                return
            length, cid = struct.unpack(">I4s", head)
            if cid == b"IDAT":
                seen = True
                left = length
                while left:
                    piece = fh.read(min(left, 1 << 20))
                    if not piece:
                        return
                    left -= len(piece)
                    yield piece
                fh.read(4)  # CRC
            elif cid == b"IEND":
                return
            elif seen and cid == b"eXIf":
                after["exif"] = fh.read(length)
                fh.read(4)
            else:
                fh.seek(length + 4, 1)

    def unfiltered(data: bytes, n: int) -> bytes:
        z = zlib.compress(data, 0)
        if bpp <= 4:
            mode, raw = unfilter[0]
            return Image.frombytes(mode, (rowbytes // bpp, n), z, "zip", raw).tobytes("raw", raw)
        hi, lo = (np.frombuffer(Image.frombytes(mode, (w, n), z, "zip", raw).tobytes("raw", mode), np.uint8)
                  for mode, raw in unfilter)
        both = np.empty((hi.size, 2), np.uint8)
        both[:, 0], both[:, 1] = hi, lo
        return both.tobytes()

    src = idat()
    inflate = zlib.decompressobj()
    buf, tail, prev, y = bytearray(), b"", None, 0
    while y < h:
        n = min(rows, h - y)
        want = n * stride
        while len(buf) < want:
            piece = tail or next(src, None)
            if piece is None:
                buf += inflate.flush()
                break
            try:
                buf += inflate.decompress(piece, want - len(buf))
            except zlib.error as e:
                raise OSError(f"broken data stream when reading image file ({e})") from None
            tail = inflate.unconsumed_tail
            if inflate.eof and len(buf) < want:
                break
        if len(buf) < want:
            raise OSError(f"image file is truncated ({y + len(buf) // stride} of {h} rows)")
        data = bytes(buf[:want])
        del buf[:want]
        if prev is not None:
            data = b"\x00" + prev + data
        raw = unfiltered(data, n + (prev is not None))
        prev = raw[-rowbytes:]
        band = Image.frombytes(im.mode, (w, n), raw[rowbytes:] if len(raw) > n * rowbytes else raw, "raw", rawmode)
        if im.mode in ("P", "PA") and im.palette is not None:
            band.palette = im.palette.copy()
        band.info = dict(im.info)
        yield band
        y += n
    for _ in src:  # the chunks after the image data (eXIf)
        pass


def _decode_reduced(im, fh, max_side: int) -> tuple[np.ndarray, int]:
    """Decode ``im`` (opened, not loaded; after a JPEG ``draft``) to upright 8-bit RGB of at most ``max_side``
    px: converted and box-averaged by :func:`_reduce_factor` a strip at a time, then :func:`_scaled_upright`.
    Returns the array and the EXIF orientation."""
    from PIL import Image

    w, h = im.size
    k = _reduce_factor(im.size, max_side)
    rows = _band_rows(w, im.mode, k)
    after: dict = {}
    rawmode = _png_strip_rawmode(im)
    peak = None
    if rawmode is not None:
        bands = _png_bands(im, fh, rawmode, rows, after)  # a PNG never gives modes I or F
    else:
        im.load()

        def crops():
            if rows >= h:
                yield im
                return
            for y in range(0, h, rows):
                yield im.crop((0, y, w, min(h, y + rows)))

        bands = crops()
        if im.mode in ("I", "F"):  # scaled by the largest value of the whole image
            peak = np.max([np.asarray(b).max() for b in crops()])
    out = np.empty((-(-h // k), -(-w // k), 3), np.uint8)
    y = 0
    for band in bands:
        a = _to_rgb8(band, peak)
        if k > 1:
            a = np.asarray(Image.fromarray(a).reduce(k))
        out[y:y + a.shape[0]] = a
        y += a.shape[0]
    if y != out.shape[0]:
        raise OSError(f"image file is truncated ({y} of {out.shape[0]} rows)")
    if rawmode is not None and "exif" not in im.info and "Raw profile type exif" not in im.info:
        im.info["exif"] = after.get("exif", b"")  # read here, so that getexif() does not load the full image
    orientation = im.getexif().get(0x0112, 1)
    return _scaled_upright(out, (w, h), k, max_side, orientation), orientation


def _scaled_upright(rgb: np.ndarray, size: tuple[int, int], k: int, max_side: int, orientation: int) -> np.ndarray:
    """``rgb``, the decoded image of ``size`` (as stored) box-averaged by ``k``, turned upright as its EXIF
    orientation says (as ``PIL.ImageOps.exif_transpose``) and scaled with area interpolation to ``max_side``
    on its longer side when ``size`` is larger."""
    import cv2
    from PIL import Image

    w, h = size
    s = max_side / max(w, h)
    target = (max(1, round(w * s)), max(1, round(h * s)))
    if k > 1:
        # A row's or column's last block may be partial (its mean covers the pixels there are): scale by the
        # exact factor, so that the image's extent maps onto the target, and cut off what lies beyond it.
        a = cv2.resize(rgb, None, fx=target[0] * k / w, fy=target[1] * k / h, interpolation=cv2.INTER_AREA)
        rgb = a[:target[1], :target[0]] if a.shape[1] >= target[0] and a.shape[0] >= target[1] else \
            cv2.resize(rgb, target, interpolation=cv2.INTER_AREA)
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}.get(orientation)
    if method is not None:
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).transpose(method))
    if k == 1 and max(w, h) > max_side:
        if orientation in (5, 6, 7, 8):
            target = target[::-1]
        rgb = cv2.resize(rgb, target, interpolation=cv2.INTER_AREA)
    return rgb


def _to_rgb8(im, peak: float | None = None) -> np.ndarray:
    """8-bit RGB of a Pillow image (or of a strip of one): grey levels repeated, 16-bit scaled by 255/65535,
    alpha composited on black, other modes converted by Pillow. Modes I and F are scaled by their largest
    value: ``peak``, that of the whole image when ``im`` is a strip of it (default: ``im``'s own)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        if a.dtype != np.uint8:
            if mode.startswith("I;16"):
                # round(a / 65535 * 255) = round(a / 257), exactly, in integers
                a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
            else:
                a = a.astype(np.float64)
                hi = 65535.0 if (a.max() if peak is None else peak) > 255 else 255.0
                a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.stack([a, a, a], axis=-1)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 1 if (a.max() if peak is None else peak) <= 1 else 255
        a = (np.clip(a, 0, top) / top * 255).astype(np.uint8)
        return np.stack([a, a, a], axis=-1)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        a = np.asarray(im.convert("RGBA"))
        # composited on black: round(c * alpha / 255), exactly, in integers
        return ((a[..., :3].astype(np.uint16) * a[..., 3:4] + 127) // 255).astype(np.uint8)
    if mode == "RGB":
        arr = np.asarray(im)
        if arr.dtype != np.uint8:  # e.g. 48-bit TIFF read as RGB;16 -> scale
            arr = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
        return arr
    return np.asarray(im.convert("RGB"))
