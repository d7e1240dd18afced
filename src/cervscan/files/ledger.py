"""What cervscan may write in OUT: never an input folder, never a file it did not create (the ledger)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import stat
from pathlib import Path
from typing import Callable, Iterable

from cervscan.errors import CervscanError
from cervscan.files.names import display_id

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
