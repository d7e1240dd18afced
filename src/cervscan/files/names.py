"""Names as cervscan shows and derives them: ids that are not valid UTF-8 (lossless, readable), output
file names bounded in length and unique. No torch import."""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path

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
