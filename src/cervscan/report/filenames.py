"""File names of the reports: ``OUT/reports/<name>.pdf`` and ``OUT/heatmaps/<name>/`` of each patient id.

A name is the patient id when it is a portable file name, else a cleaned id with a hash suffix
(:func:`_file_names`), so that it never escapes the folder, never replaces ``summary.pdf`` and never meets
another id's file.
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Iterable

from cervscan.files import clean_text

_RESERVED_STEMS = frozenset({"summary", "con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
                             *(f"lpt{i}" for i in range(10))})
_UNSAFE_CHARS = frozenset('/\\:*?"<>|')


def _safe_stem(name: str) -> str:
    """A name as one file-name component: path separators and NUL replaced, never hidden, '.' or '..'."""
    name = name.replace("/", "_").replace("\\", "_").replace("\0", "_")
    if name in ("", ".", "..") or name.startswith("."):
        return "_" + name
    return name


def _file_name(pid: str) -> str:
    """A patient id as the stem of its report (``OUT/reports/<stem>.pdf``) and heatmap folder: the id
    itself when it is a portable file name; otherwise the id with characters that file systems refuse
    replaced by ``_``, shortened to 180 bytes if need be, and followed by ``~`` and 8 hex digits of a
    hash of the exact id, so that it never escapes OUT/reports, never replaces summary.pdf and never
    meets another id's file."""
    shown = clean_text(pid)  # bytes of a name that is not UTF-8 (lone surrogates) as \xNN
    name = "".join("_" if ch in _UNSAFE_CHARS or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")
                   else ch for ch in shown)
    name = name.rstrip(". ")  # Windows drops trailing dots and spaces
    if name.startswith((".", " ")) or not name:
        name = "_" + name
    raw = name.encode("utf-8")
    reserved = name.split(".")[0].strip().casefold() in _RESERVED_STEMS
    if name == pid and len(raw) <= 200 and not reserved:
        return name
    digest = hashlib.sha256(pid.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return raw[:180].decode("utf-8", "ignore") + "~" + digest


def _file_names(ids: Iterable[str]) -> dict[str, str]:
    """:func:`_file_name` of each id, with the hash suffix also on ids whose names would otherwise be
    the same on a file system that ignores letter case or Unicode normalisation (Windows, macOS)."""
    names = {pid: _file_name(pid) for pid in dict.fromkeys(ids)}
    groups: dict[str, list[str]] = {}
    for pid, name in names.items():
        groups.setdefault(unicodedata.normalize("NFC", name).casefold(), []).append(pid)
    for group in groups.values():
        if len(group) > 1:
            for pid in group:
                if names[pid] == pid:
                    digest = hashlib.sha256(pid.encode("utf-8", "surrogatepass")).hexdigest()[:8]
                    names[pid] = pid.encode("utf-8")[:180].decode("utf-8", "ignore") + "~" + digest
    return names
