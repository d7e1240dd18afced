"""Nightly batch screening: incremental, crash-safe, locked, observable (``cervscan batch``).

A clinic points cron at ROOT, a folder that gains visit folders every day. Each
run screens only what is new or changed and keeps every earlier result, so
``OUT/patients.csv`` and ``OUT/images.csv`` always hold every visit's latest
result exactly once.

How it works, in order:

1. **Lock** ``OUT/.cervscan/batch.lock`` (a POSIX ``lockf`` lock, released by
   the operating system when the process dies, and not inherited by worker
   processes). A second run on the same OUT exits at once with
   :data:`EXIT_LOCKED` (4), or waits with ``wait=True``. The holder's pid,
   host, start time and command are written into the file for the message;
   a file left by a process that is no longer running is taken over (and the
   takeover is logged).
2. **Journal** ``OUT/.cervscan/batch.sqlite`` (SQLite, WAL mode,
   ``synchronous=FULL``): one row per visit with its patient row, its image
   rows, its skipped files and three fingerprints. It is the source of truth;
   the CSVs are views of it.
3. **Plan**: a visit is screened again only when its *files* fingerprint
   (folder, and name, size and mtime_ns of every image; no hashing), its
   *models* fingerprint (sha256 of every model used) or its *config*
   fingerprint (the resolved :class:`~cervscan.config.ScreenConfig` without
   ``device``, ``num_workers``, ``batch_images`` and ``classify_batch``, which
   change speed but not results, plus the cervscan version) differ from the
   journal's. A night with nothing new loads no model at all: when the
   models' files and sha256, the config file and the options are those of the
   last finished run (:func:`inputs_key`), that run's fingerprints are reused.
4. **Screen** the planned visits in one :meth:`Pipeline.run` stream; when a
   visit's last image is done its mask files are already written (atomically),
   then its patient row, image rows and fingerprints are committed in **one
   transaction**. Files of an earlier result that the new one no longer
   references are removed after the commit.
5. **Tables**: ``images.csv``, ``patients.csv`` and ``skipped.csv`` are
   rendered from the journal and written atomically (temp file + rename, and
   only when their content changed) every ``csv_every`` committed visits and
   at the end; ``run.json`` last.

A ``kill -9`` at any moment therefore loses at most the visit being screened
(it is screened again by the next run), and never leaves a half-written CSV or
a visit twice. Temp files of an interrupted atomic write are removed by the
next run, under the lock.

A visit folder that disappeared from ROOT keeps its last result in the CSVs
(its report stays valid; archiving a folder must not erase a clinical result);
its ``reason`` in patients.csv says that the folder is gone (:func:`removed_note`;
a renamed folder is a new visit, and the old id carries the note), and it is
counted as ``removed`` in the summary and logged. When the folder comes back
unchanged it is not screened again and the note goes.

Nothing outside OUT is written: an OUT that is ROOT, lies inside it or holds it
is refused, and only files listed in the output ledger
(:class:`cervscan.files.OutputLedger`) are ever replaced or deleted. A visit whose
output files cannot be written is committed as failed, with the reason, and
screened again by the next run (``changed_because``: ``retry``).

Test hook: the environment variable ``CERVSCAN_BATCH_TEST_DELAY`` (seconds,
default unset) makes the run sleep at each crash-relevant step (after a
visit's files are written, after its commit, between the CSV files) so that
tests can kill it there. It is for the fault-injection tests only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cervscan import __version__
from cervscan import files as cio
from cervscan.errors import CervscanError

log = logging.getLogger(__name__)

#: Exit code of a run refused because another run holds OUT's lock.
EXIT_LOCKED = 4
#: Exit code when some visit screened in this run failed (as ``screen``).
EXIT_FAILED = 3
#: Exit code when no visit screened in this run failed but some came out ``inadequate`` (as ``screen``).
EXIT_INADEQUATE = 5
STATE_DIR = cio.STATE_DIR
JOURNAL_NAME = "batch.sqlite"
LOCK_NAME = "batch.lock"
SCHEMA_VERSION = 1
#: Default number of committed visits between two rewrites of the CSVs during a run.
CSV_EVERY = 20
TEST_DELAY_ENV = "CERVSCAN_BATCH_TEST_DELAY"
#: ScreenConfig fields that change speed, not results: left out of the config fingerprint.
RUNTIME_ONLY = ("device", "num_workers", "batch_images", "classify_batch")
OUTPUT_DIRS = ("masks", "cervix", "overlays")
#: Temp files of :func:`cervscan.files.atomic_write_bytes` (mkstemp: ".<name>.<8 chars>.tmp") and the write probe.
_TEMP_RE = cio.TEMP_RE
#: Start of the files fingerprint of a visit whose output files could not be written: the next run screens
#: it again (``changed_because``: ``retry``).
RETRY = "retry:"


class BatchLockedError(CervscanError):
    """Another run holds OUT's lock (exit code :data:`EXIT_LOCKED`)."""

    exit_code = EXIT_LOCKED


@dataclass
class BatchResult:
    out: Path
    summary: dict
    run: dict
    exit_code: int
    screened: list[str] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- test hook

def _pause(step: str) -> None:
    """Sleep ``$CERVSCAN_BATCH_TEST_DELAY`` seconds (fault-injection tests only; unset: no-op)."""
    raw = os.environ.get(TEST_DELAY_ENV)
    if raw:
        try:
            delay = float(raw)
        except ValueError:
            return
        if delay > 0:
            log.debug("test delay %.2fs at %s", delay, step)
            time.sleep(delay)


# --------------------------------------------------------------------------- lock

_HELD: set[str] = set()  # lock files held by this process (POSIX locks never conflict within one process)
_HELD_GUARD = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class BatchLock:
    """Exclusive lock on ``path`` for one batch run; see the module docstring."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.previous: dict = {}

    def _read(self, fd: int) -> dict:
        try:
            raw = os.pread(fd, 65536, 0)
            info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def _try(self, fd: int) -> bool:
        key = str(self.path.resolve())
        with _HELD_GUARD:
            if key in _HELD:
                return False
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    return False
                raise CervscanError(f"{self.path}: cannot lock ({e.strerror})") from None
            _HELD.add(key)
            return True

    def describe(self, info: dict) -> str:
        if not info:
            return f"another process (lock file {self.path}; it has not written its details yet)"
        return (f"cervscan batch pid {info.get('pid')} on host {info.get('host')} since {info.get('started')} "
                f"(lock file {self.path})")

    def acquire(self, *, wait: bool = False, timeout: float | None = None, poll: float = 0.5) -> float:
        """Take the lock; returns the seconds waited. Raises :class:`BatchLockedError` when it is held
        (at once, or after ``timeout`` seconds with ``wait``)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise CervscanError(f"{self.path}: cannot open the lock file ({e.strerror})") from None
        t0 = time.monotonic()
        try:
            while not self._try(fd):
                holder = self._read(fd)
                waited = time.monotonic() - t0
                if not wait:
                    raise BatchLockedError(f"{self.path.parent.parent}: another batch run is in progress: "
                                           f"{self.describe(holder)}; exiting (code {EXIT_LOCKED}); "
                                           "use --wait to wait for it")
                if timeout is not None and waited >= timeout:
                    raise BatchLockedError(f"{self.path.parent.parent}: still locked after waiting {waited:.0f}s by "
                                           f"{self.describe(holder)}; exiting (code {EXIT_LOCKED})")
                if waited == 0 or int(waited) % 60 == 0:
                    log.info("waiting for the lock held by %s", self.describe(holder))
                time.sleep(poll if timeout is None else max(0.01, min(poll, timeout - waited)))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.previous = self._read(fd)
        self._note_takeover(self.previous)
        self._write_info()
        return time.monotonic() - t0

    def _note_takeover(self, prev: dict) -> None:
        """A lock file that still names a holder was left by a run that died (the OS freed the lock)."""
        if not prev or prev.get("pid") == os.getpid():
            return
        host, pid = prev.get("host"), prev.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            log.warning("took over the lock %s left by pid %s (started %s), which is no longer running; "
                        "its run was interrupted and is continued now", self.path, pid, prev.get("started"))
        else:
            log.warning("took over the lock %s last written by pid %s on host %s (started %s); the lock itself "
                        "was free", self.path, pid, host, prev.get("started"))

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "argv": sys.argv}
        data = (json.dumps(info) + "\n").encode("utf-8")
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
            os.fsync(self.fd)
        except OSError as e:
            self.release()
            raise CervscanError(f"{self.path}: cannot write the lock file ({e.strerror})") from None

    def release(self) -> None:
        """Clear the holder's details and unlock (closing the file also unlocks)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)
        with _HELD_GUARD:
            _HELD.discard(str(self.path.resolve()))

    def __enter__(self) -> "BatchLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- journal

def _json(obj: Any) -> str:
    return cio.clean_text(json.dumps(obj, default=_json_default, ensure_ascii=False, allow_nan=True))


def _json_default(o: Any):
    if hasattr(o, "item") and callable(o.item):  # NumPy scalars
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


@dataclass
class Stored:
    """What the journal knows of one visit, without its rows."""

    folder: str
    files_fp: str
    models_fp: str
    config_fp: str
    skipped: str
    run_id: int


class Journal:
    """The run state in ``OUT/.cervscan/batch.sqlite``: one transaction per visit."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("%s: SQLite WAL mode unavailable on this file system (mode %s)", self.path, mode)
            self.db.execute("PRAGMA synchronous=FULL")
            self._schema()
        except sqlite3.DatabaseError as e:
            raise self._error("cannot open the batch journal", e) from None

    def _error(self, what: str, e: Exception) -> CervscanError:
        hint = ""
        msg = str(e).lower()
        if "not a database" in msg or "malformed" in msg:
            hint = "; the journal is damaged: move it away and run again (every visit is then screened again)"
        elif "full" in msg:
            hint = "; the disk is full: free space and run again"
        elif "readonly" in msg or "read-only" in msg or "unable to open" in msg:
            hint = "; check that the output folder is writable"
        return CervscanError(f"{self.path}: {what} ({e}){hint}")

    def _schema(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row and int(row[0]) != SCHEMA_VERSION:
                raise CervscanError(f"{self.path}: journal schema {row[0]} is not {SCHEMA_VERSION} (written by another "
                                    "cervscan version); use another output folder or move the journal away")
            for stmt in (
                "CREATE TABLE IF NOT EXISTS visits (patient_id TEXT PRIMARY KEY, folder TEXT NOT NULL, "
                "files_fp TEXT NOT NULL, models_fp TEXT NOT NULL, config_fp TEXT NOT NULL, patient TEXT NOT NULL, "
                "skipped TEXT NOT NULL, run_id INTEGER NOT NULL, screened_at TEXT NOT NULL)",
                "CREATE TABLE IF NOT EXISTS images (patient_id TEXT NOT NULL, idx INTEGER NOT NULL, "
                "record TEXT NOT NULL, PRIMARY KEY (patient_id, idx))",
                "CREATE TABLE IF NOT EXISTS runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT NOT NULL, "
                "pid INTEGER, host TEXT, finished TEXT, summary TEXT)",
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '%d')" % SCHEMA_VERSION,
            ):
                self.db.execute(stmt)
            self._commit()
        except BaseException:
            self._rollback()
            raise

    def _commit(self) -> None:
        """The one place a transaction is committed (fault-injection tests replace it)."""
        self.db.execute("COMMIT")

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")

    @contextlib.contextmanager
    def transaction(self, what: str) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; rolled back and turned into a CervscanError on any SQLite error."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            yield
            self._commit()
        except sqlite3.Error as e:
            self._rollback()
            raise self._error(what, e) from None
        except BaseException:
            self._rollback()
            raise

    # ---- runs
    def begin_run(self) -> int:
        with self.transaction("cannot record the start of the run"):
            cur = self.db.execute("INSERT INTO runs (started, pid, host) VALUES (?, ?, ?)",
                                  (time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getpid(), socket.gethostname()))
        return int(cur.lastrowid)

    def unfinished_runs(self, current: int) -> list[tuple[int, str, int, int]]:
        """(run_id, started, pid, visits it committed) of earlier runs that never finished."""
        rows = self.db.execute("SELECT run_id, started, pid FROM runs WHERE finished IS NULL AND run_id < ? "
                               "AND run_id > COALESCE((SELECT MAX(run_id) FROM runs WHERE finished IS NOT NULL), 0)",
                               (current,)).fetchall()
        return [(r, s, p, self.db.execute("SELECT COUNT(*) FROM visits WHERE run_id=?", (r,)).fetchone()[0])
                for r, s, p in rows]

    def finish_run(self, run_id: int, summary: dict, inputs: dict) -> None:
        """Mark the run finished; ``inputs`` (key and fingerprints of its models and configuration) lets the
        next run skip loading the models when nothing they depend on changed."""
        with self.transaction("cannot record the end of the run"):
            self.db.execute("UPDATE runs SET finished=?, summary=? WHERE run_id=?",
                            (time.strftime("%Y-%m-%dT%H:%M:%S%z"), _json(summary), run_id))
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('inputs', ?)", (_json(inputs),))

    def last_inputs(self) -> dict:
        row = self.db.execute("SELECT value FROM meta WHERE key='inputs'").fetchone()
        return json.loads(row[0]) if row else {}

    # ---- visits
    def stored(self) -> dict[str, Stored]:
        return {pid: Stored(*rest) for pid, *rest in self.db.execute(
            "SELECT patient_id, folder, files_fp, models_fp, config_fp, skipped, run_id FROM visits")}

    def save_visit(self, pid: str, folder: str, fps: dict[str, str], patient: dict, images: list[dict],
                   skipped: list, run_id: int) -> None:
        """The visit's patient row, image rows and fingerprints, in one transaction."""
        with self.transaction(f"cannot record visit {pid}; the results recorded before it are intact"):
            self.db.execute("DELETE FROM images WHERE patient_id=?", (pid,))
            self.db.executemany("INSERT INTO images (patient_id, idx, record) VALUES (?, ?, ?)",
                                [(pid, i, _json(r)) for i, r in enumerate(images)])
            self.db.execute(
                "INSERT OR REPLACE INTO visits (patient_id, folder, files_fp, models_fp, config_fp, patient, skipped, "
                "run_id, screened_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pid, folder, fps["files"], fps["models"], fps["config"], _json(patient), _json(skipped), run_id,
                 time.strftime("%Y-%m-%dT%H:%M:%S%z")))

    def update_skipped(self, changes: dict[str, list]) -> None:
        """New skipped-file lists of visits whose images did not change (no re-screen needed)."""
        if changes:
            with self.transaction("cannot update the skipped files"):
                self.db.executemany("UPDATE visits SET skipped=? WHERE patient_id=?",
                                    [(_json(v), pid) for pid, v in changes.items()])

    def tables(self) -> tuple[list[dict], list[dict], list[dict]]:
        """Patient rows, image rows and per-visit skipped rows of every visit, in patient-id order."""
        patients, skipped = {}, {}
        for pid, pat, sk in self.db.execute("SELECT patient_id, patient, skipped FROM visits"):
            patients[pid] = json.loads(pat)
            skipped[pid] = [{"patient_id": pid, "file": n, "reason": why} for n, why in json.loads(sk)]
        images: dict[str, list[tuple[int, dict]]] = {}
        for pid, idx, rec in self.db.execute("SELECT patient_id, idx, record FROM images"):
            images.setdefault(pid, []).append((idx, json.loads(rec)))
        order = sorted(patients)
        return ([patients[p] for p in order],
                [r for p in order for _, r in sorted(images.get(p, []), key=lambda t: t[0])],
                [r for p in order for r in skipped[p]])

    def referenced_files(self) -> list[str]:
        """The mask and overlay files (relative to OUT) that the journal's image rows name."""
        out = []
        for (rec,) in self.db.execute("SELECT record FROM images"):
            r = json.loads(rec)
            out += [r[k] for k in ("mask", "cervix_mask", "overlay") if r.get(k)]
        return out

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()


# --------------------------------------------------------------------------- fingerprints

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def files_fingerprint(visit) -> str:
    """The visit's folder, and name, size and mtime_ns of each image (no content hashing), and its error."""
    items = []
    for p in visit.images:
        try:
            st = p.stat()
            items.append([p.name, st.st_size, st.st_mtime_ns])
        except OSError as e:
            items.append([p.name, None, e.strerror])
    return _digest({"folder": str(Path(visit.folder).resolve()), "images": items, "error": visit.error or ""})


def models_fingerprint(refs: dict, roles) -> str:
    """sha256 of every model the pipeline uses, by role."""
    return _digest({role: refs[role].sha256 for role in sorted(roles)})


def config_fingerprint(cfg) -> str:
    """The resolved screening configuration (without speed-only fields) and the cervscan version."""
    d = cfg.to_dict()
    for k in RUNTIME_ONLY:
        d.pop(k, None)
    return _digest({"config": d, "cervscan": __version__})


def inputs_key(opts: dict) -> str:
    """A key of everything the resolved models and configuration depend on, computed without torch: each
    role's resolved file and sha256 (or why none resolves), the config file's bytes, the options, the
    default screening configuration and the cervscan version. Equal keys mean equal models and
    configuration fingerprints (the converse need not hold)."""
    from cervscan.models.registry import resolve

    models: dict[str, Any] = {}
    roles = {"segmenter": opts.get("seg_model"), "classifier": opts.get("cls_model"),
             "cervix": opts.get("cervix_model")}
    if opts.get("use_stage", True):
        roles["stage"] = opts.get("stage_model")
    for role, explicit in roles.items():
        try:
            r = resolve(role, explicit)
            models[role] = [str(r.path), r.sha256]
        except CervscanError as e:
            models[role] = f"unresolved: {e}"
    cfg_file = opts.get("config_file")
    cfg = None
    if cfg_file:
        try:
            cfg = hashlib.sha256(Path(cfg_file).read_bytes()).hexdigest()
        except OSError as e:
            cfg = f"unreadable: {e.strerror}"
    from cervscan.config import ScreenConfig

    defaults = {k: v for k, v in ScreenConfig().to_dict().items() if k not in RUNTIME_ONLY}  # the code's own
    other = {k: v for k, v in opts.items() if k not in ("device", "num_workers", "batch_images", "config_file")}
    return _digest({"models": models, "config_file": cfg, "options": other, "defaults": defaults,
                    "cervscan": __version__})


# --------------------------------------------------------------------------- plan

@dataclass
class Plan:
    new: list = field(default_factory=list)
    changed: list = field(default_factory=list)
    unchanged: list = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # patient_id -> what changed
    fps: dict[str, dict[str, str]] = field(default_factory=dict)  # patient_id -> fingerprints now

    @property
    def todo(self) -> list:
        """Visits to screen, in discovery (patient-id) order."""
        return sorted(self.new + self.changed, key=lambda v: v.patient_id)


def make_plan(visits: list, stored: dict[str, Stored], models_fp: str, config_fp: str) -> Plan:
    """Split the visits into new, changed (with the reasons) and unchanged; list the removed ones."""
    plan = Plan()
    for v in visits:
        fps = {"files": files_fingerprint(v), "models": models_fp, "config": config_fp}
        plan.fps[v.patient_id] = fps
        old = stored.get(v.patient_id)
        if old is None:
            plan.new.append(v)
            continue
        why = [k for k in ("files", "models", "config") if getattr(old, f"{k}_fp") != fps[k]]
        if old.files_fp == RETRY + fps["files"]:
            why = ["retry" if k == "files" else k for k in why]
        if why:
            plan.changed.append(v)
            plan.reasons[v.patient_id] = why
        else:
            plan.unchanged.append(v)
    present = {v.patient_id for v in visits}
    plan.removed = sorted(pid for pid in stored if pid not in present)
    return plan


# --------------------------------------------------------------------------- output files

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
                    ours = _TEMP_RE.match(name) is not None and not os.path.islink(path)
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


def render_csv(rows: list[dict], columns: list[str]) -> bytes:
    """Exactly what :func:`cervscan.files.atomic_write_csv` writes."""
    import csv
    import io

    from cervscan.files.atomic import _csv_cell

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_cell(r.get(k)) for k in columns})
    return buf.getvalue().encode("utf-8", errors="backslashreplace")


def write_if_changed(path: Path, data: bytes, journal: Path, ledger: cio.OutputLedger | None = None) -> bool:
    """Atomically replace ``path`` with ``data`` unless it already holds exactly that; a file the ledger
    does not list as cervscan's is never replaced (:class:`cervscan.files.OutputConflictError`)."""
    if ledger is not None:
        ledger.claim([os.path.relpath(path, ledger.out)])
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return False
    try:
        cio.atomic_write_bytes(path, data)
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
    from cervscan.pipeline.steps import IMAGE_COLUMNS, PATIENT_COLUMNS
    from cervscan.pipeline.outputs import SKIPPED_COLUMNS

    patients, images, skipped = journal.tables()
    for p in patients:
        if p.get("patient_id") in (removed or {}):
            note = removed_note(removed[p["patient_id"]])
            p["reason"] = note + (f"; {p['reason']}" if p.get("reason") else "")
    log.info("tables: writing %d patient(s), %d image(s)", len(patients), len(images))
    write_if_changed(out / "skipped.csv", render_csv(stray + skipped, SKIPPED_COLUMNS), journal.path, ledger)
    write_if_changed(out / "images.csv", render_csv(images, IMAGE_COLUMNS), journal.path, ledger)
    _pause("tables:images.csv")
    write_if_changed(out / "patients.csv", render_csv(patients, PATIENT_COLUMNS), journal.path, ledger)
    _pause("tables:patients.csv")
    log.info("tables: written")
    return {"patients": len(patients), "images": len(images), "skipped": len(stray) + len(skipped),
            "images_failed": sum(r.get("status") != "ok" for r in images),
            "patients_error": sum(p.get("decision") == "error" for p in patients),
            "severe": sum(p.get("decision") == "severe" for p in patients),
            "mildly_normal": sum(p.get("decision") == "mildly_normal" for p in patients),
            "inadequate": sum(p.get("decision") == "inadequate" for p in patients)}


# --------------------------------------------------------------------------- the run

def _prepare_out(out: Path) -> None:
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / STATE_DIR).mkdir(exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cervscan-write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CervscanError(f"{out}: output folder is not writable ({e.strerror}); earlier results are unchanged") \
            from None


def _discover(root: Path, out: Path | None = None) -> tuple[list, list[dict]]:
    """Visits under ROOT and stray files. An empty ROOT (no visit folder yet) has no visits. A visit folder
    that leads (through a link) into OUT is not screened: it gets decision ``error`` with the reason."""
    from cervscan.pipeline.screening import refuse_overlapping_visits
    from cervscan.files import discover_visits, display_id

    stray: list[tuple[Path, str]] = []
    visits = discover_visits([root], stray)
    if len(visits) == 1 and not visits[0].images and Path(visits[0].folder) == root:
        log.info("%s: no visit folders yet", display_id(str(root)))
        visits = []
    if out is not None:
        refuse_overlapping_visits(visits, out)
    return visits, [{"patient_id": "", "file": display_id(str(p)), "reason": why} for p, why in stray]


def _failed(patient: dict) -> bool:
    return patient.get("decision") == "error" or int(patient.get("n_failed") or 0) > 0


class _Screener:
    """Screens the planned visits and commits each one as soon as its last image is done."""

    def __init__(self, pipe, writer, journal: Journal, out: Path, run_id: int, csv_every: int, stray: list[dict],
                 removed: dict[str, str] | None = None):
        self.pipe, self.writer, self.journal, self.out = pipe, writer, journal, out
        self.run_id, self.csv_every, self.stray, self.removed = run_id, csv_every, stray, removed or {}
        labels = pipe.labels()
        self.model_cols = {"stage_model": labels.get("stage", ""), "cervix_model": labels.get("cervix", ""),
                           "seg_model": labels.get("segmenter", ""), "cls_model": labels.get("classifier", "")}
        self.patients: list[dict] = []
        self.images = 0

    def _write_files(self, res) -> dict:
        try:
            return {**self.writer.image(res), **self.model_cols}
        except OSError as e:
            pid = res.record.get("patient_id")
            raise CervscanError(
                f"{self.out}: cannot write the mask/overlay files of visit {pid} ({e.strerror or e}); the results "
                f"committed before it are kept in {self.journal.path} and the CSVs stay as last written "
                "(complete); fix this and run again") from None

    def run(self, todo: list, plan: Plan) -> None:
        from cervscan.pipeline.screening import decide_patient

        for v in todo:
            self.writer.add_visit(v.patient_id, [cio.display_id(p.name) for p in v.images])
        items = [(v.patient_id, p) for v in todo for p in v.images]
        stream = self.pipe.run(items)
        since_tables = 0
        try:
            for v in todo:
                recs = [self._write_files(next(stream)) for _ in v.images]
                self.images += len(recs)
                _pause("visit:files-written")
                patient = decide_patient(self.pipe, v.patient_id, recs, v.error or "")
                fps = plan.fps[v.patient_id]
                if v.patient_id in self.writer.output_failed:  # screened again by the next run
                    fps = {**fps, "files": RETRY + fps["files"]}
                self.journal.save_visit(v.patient_id, cio.display_id(str(Path(v.folder).resolve())), fps,
                                        patient, recs, v.skipped, self.run_id)
                _pause("visit:committed")
                remove_stale_outputs(self.out, self.writer.folder(v.patient_id), recs, self.writer.ledger)
                self.patients.append(patient)
                self._log_visit(v, patient, plan)
                since_tables += 1
                if self.csv_every and since_tables >= self.csv_every and len(self.patients) < len(todo):
                    write_tables(self.out, self.journal, self.stray, ledger=self.writer.ledger,
                                 removed=self.removed)
                    since_tables = 0
        finally:
            stream.close()

    @staticmethod
    def _log_visit(v, patient: dict, plan: Plan) -> None:
        why = plan.reasons.get(v.patient_id)
        log.info("screened %s (%s): %s, score %s, %d/%d image(s) used%s%s", v.patient_id,
                 "changed: " + "+".join(why) if why else "new", patient["decision"],
                 "n/a" if patient.get("score") is None else f"{patient['score']:.3f}",
                 patient.get("n_eligible", patient["n_used"]), patient["n_images"],
                 f"; {patient['reason']}" if patient.get("reason") else "",
                 f"; error: {patient['error']}" if patient.get("error") else "")


def _check_inputs(root: Path, config_file, overrides: dict | None, device: str | None,
                  out: Path | None = None) -> None:
    """Fail before anything is written: a bad config file, an unavailable device, a missing ROOT, an OUT
    that is ROOT, lies inside it or holds it."""
    from cervscan.config import load_config_file

    file_cfg = load_config_file(config_file) if config_file else {}
    spec = (overrides or {}).get("device") or device or file_cfg.get("device") or "auto"
    if str(spec).strip().lower() not in ("auto", "cpu"):  # those two never fail; checking imports torch
        from cervscan.device import resolve_device

        resolve_device(spec)
    if not root.is_dir():
        raise CervscanError(f"{cio.display_id(str(root))}: "
                            f"{'path does not exist' if not root.exists() else 'not a folder'} "
                            "(give the folder that receives the visit folders)")
    if out is not None:
        cio.check_overlap([root], out)


def run_batch(root: str | Path, out: str | Path, *, seg_model: str | None = None, cls_model: str | None = None,
              cervix_model: str | None = None, stage_model: str | None = None, use_stage: bool = True,
              config_file: str | None = None, overrides: dict | None = None, device: str | None = None,
              num_workers: int | None = None, batch_images: int | None = None, write_masks: bool = True,
              write_overlays: bool = True, wait: bool = False, wait_timeout: float | None = None,
              report: bool = False, report_options: dict | None = None, csv_every: int = CSV_EVERY) -> BatchResult:
    """Screen what is new or changed under ``root`` into ``out`` (see the module docstring).

    The model and configuration arguments are those of :func:`cervscan.pipeline.build.build_pipeline`. ``wait``:
    wait for a run holding OUT's lock (``wait_timeout`` seconds at most, which implies ``wait``).
    ``report``: PDF reports of the new or changed visits (``report_options``: keyword arguments of
    :func:`cervscan.report.reports.write_reports`). ``csv_every``: rewrite the CSVs after that many committed
    visits (0: only at the end). Raises :class:`BatchLockedError` when another run holds the lock and
    :class:`~cervscan.errors.CervscanError` (naming the file) on any other failure; every result
    committed before a failure is kept.
    """
    t0 = time.time()
    root, out = Path(root), Path(out)
    opts = dict(seg_model=seg_model, cls_model=cls_model, cervix_model=cervix_model, stage_model=stage_model,
                use_stage=use_stage, config_file=str(config_file) if config_file else None,
                overrides=dict(overrides or {}), device=device, num_workers=num_workers, batch_images=batch_images,
                write_masks=write_masks, write_overlays=write_overlays)
    _check_inputs(root, config_file, overrides, device, out)
    _prepare_out(out)
    with BatchLock(out / STATE_DIR / LOCK_NAME) as lock:
        waited = lock.acquire(wait=wait or wait_timeout is not None, timeout=wait_timeout)
        log.info("batch %s -> %s (pid %d)", cio.display_id(str(root)), cio.display_id(str(out)), os.getpid())
        journal = Journal(out / STATE_DIR / JOURNAL_NAME)
        try:
            ledger = cio.OutputLedger(out, inputs=[root], adopt=journal.referenced_files)
            sweep_temp_files(out, ledger)
            night = _Night(root, out, journal, opts, csv_every, t0, waited, ledger)
            summary, run, screened = night.execute()
        finally:
            journal.close()
    reports = _reports(out, screened, report_options) if report else []
    log.info("done: %s", json.dumps(summary))
    return BatchResult(out, summary, run, summary["exit_code"], screened, reports)


class _Night:
    """One run: plan, screen, tables, run.json. Loads the models only when it needs them."""

    def __init__(self, root: Path, out: Path, journal: Journal, opts: dict, csv_every: int, t0: float,
                 waited: float, ledger: cio.OutputLedger | None = None):
        self.root, self.out, self.journal, self.opts = root, out, journal, opts
        self.ledger = ledger if ledger is not None else cio.OutputLedger(out, inputs=[root])
        self.csv_every, self.t0, self.waited = csv_every, t0, waited
        self.pipe = self.refs = self.provenance = None
        self.load_s = 0.0
        self.key = ""
        self.fps: dict[str, str] = {}

    def load(self) -> None:
        """Load the pipeline (once) and take the fingerprints of what it really uses."""
        if self.pipe is not None:
            return
        from cervscan.pipeline import steps

        self.pipe = steps.Pipeline.from_config(**self.opts)
        self.refs, self.provenance, self.load_s = self.pipe.refs, self.pipe.provenance, self.pipe.load_seconds
        self.fps = {"models": models_fingerprint(self.refs, self.pipe.models),
                    "config": config_fingerprint(self.pipe.cfg)}

    def fingerprints(self) -> dict[str, str]:
        """Models and configuration fingerprints: those of the last finished run when its inputs key is
        today's (no model is loaded), else from the loaded pipeline."""
        self.key = inputs_key(self.opts)
        last = self.journal.last_inputs()
        if last.get("key") == self.key and last.get("models") and last.get("config"):
            log.info("models and configuration unchanged since the last finished run")
            self.fps = {"models": last["models"], "config": last["config"]}
        else:
            self.load()
        return self.fps

    def execute(self) -> tuple[dict, dict, list[str]]:
        journal = self.journal
        run_id = journal.begin_run()
        for rid, started, pid, n in journal.unfinished_runs(run_id):
            log.warning("run %d (pid %s, started %s) did not finish; it had committed %d visit(s), which are "
                        "kept; the rest is screened now", rid, pid, started, n)
        visits, stray = _discover(self.root, self.out)
        self.ledger.add_inputs(v.folder for v in visits)
        from cervscan.pipeline.outputs import TABLES

        self.ledger.claim(TABLES)  # a patients.csv cervscan did not write fails here, before any screening
        stored = journal.stored()
        fps = self.fingerprints()
        plan = make_plan(visits, stored, fps["models"], fps["config"])
        if plan.todo and self.pipe is None:
            self.load()
            plan = make_plan(visits, stored, self.fps["models"], self.fps["config"])
        _log_plan(plan, stored)
        removed = {pid: stored[pid].folder for pid in plan.removed}
        journal.update_skipped({v.patient_id: [list(s) for s in v.skipped] for v in plan.unchanged
                                if json.loads(stored[v.patient_id].skipped) != [list(s) for s in v.skipped]})
        t_loaded = time.time()
        patients, n_images = [], 0
        if plan.todo:
            from cervscan.pipeline.outputs import OutputWriter

            cfg = self.pipe.cfg
            scr = _Screener(self.pipe, OutputWriter(self.out, masks=cfg.write_masks, overlays=cfg.write_overlays,
                                                    ledger=self.ledger),
                            journal, self.out, run_id, self.csv_every, stray, removed)
            scr.run(plan.todo, plan)
            patients, n_images = scr.patients, scr.images
        t_screened = time.time()
        counts = write_tables(self.out, journal, stray, ledger=self.ledger, removed=removed)
        summary = _summary(self.root, self.out, plan, patients, n_images, counts, self.t0, t_loaded, t_screened,
                           self.waited)
        run = self.run_record(summary, counts, run_id, t_loaded, t_screened)
        try:
            cio.atomic_write_json(self.out / "run.json", run)
        except OSError as e:
            raise CervscanError(f"{self.out / 'run.json'}: cannot write ({e.strerror or e}); the CSVs are complete "
                                f"and every result is kept in {journal.path}") from None
        journal.finish_run(run_id, summary, {"key": self.key, **self.fps})
        return summary, run, [p["patient_id"] for p in patients]

    def run_record(self, summary: dict, counts: dict, run_id: int, t_loaded: float, t_screened: float) -> dict:
        """run.json: as ``screen`` writes it (every model's sha256, the resolved configuration), plus the batch
        summary. Without loaded models: the last run's record (same inputs key) with today's numbers."""
        timings = {"load_models_s": round(self.load_s, 3), "screen_s": round(t_screened - t_loaded, 3),
                   "total_s": round(time.time() - self.t0, 3), "images_per_s": summary["images_per_s"]}
        run = None
        if self.pipe is None:
            try:
                prev = json.loads((self.out / "run.json").read_text(encoding="utf-8"))
                if isinstance(prev, dict) and (prev.get("batch") or {}).get("inputs_key") == self.key:
                    run = {**prev, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "inputs": [cio.display_id(str(self.root.resolve()))]}
            except (OSError, ValueError):
                pass
            if run is None:
                self.load()
        if run is None:
            from cervscan.pipeline.screening import run_record as _run_record

            run = _run_record("screen", self.out, [self.root], self.pipe, self.refs, self.provenance, timings)
        batch = {**summary, "journal": str(self.journal.path), "run_id": run_id, "inputs_key": self.key,
                 "fingerprints": self.fps, "models_loaded": self.pipe is not None}
        run.update(timings=timings, counts=counts, exit_code=summary["exit_code"], batch=batch)
        return run


def _log_plan(plan: Plan, stored: dict[str, Stored]) -> None:
    why: dict[str, int] = {}
    for r in plan.reasons.values():
        for k in r:
            why[k] = why.get(k, 0) + 1
    log.info("plan: %d new, %d changed%s, %d unchanged, %d removed (kept)", len(plan.new), len(plan.changed),
             f" ({', '.join(f'{k} {n}' for k, n in sorted(why.items()))})" if why else "", len(plan.unchanged),
             len(plan.removed))
    for pid in plan.removed:
        log.info("visit %s: folder %s is no longer in ROOT; its last result is kept", pid, stored[pid].folder)


def _summary(root: Path, out: Path, plan: Plan, patients: list[dict], n_images: int, counts: dict, t0: float,
             t_loaded: float, t_screened: float, waited: float) -> dict:
    """The night in numbers (``--json``)."""
    failed = [p["patient_id"] for p in patients if _failed(p)]
    inadequate = [p["patient_id"] for p in patients if p.get("decision") == "inadequate"]
    screen_s = max(1e-9, t_screened - t_loaded)
    why: dict[str, int] = {}
    for r in plan.reasons.values():
        for k in r:
            why[k] = why.get(k, 0) + 1
    return {
        "root": cio.display_id(str(root.resolve())), "out": cio.display_id(str(out.resolve())),
        "new": len(plan.new), "changed": len(plan.changed), "unchanged": len(plan.unchanged),
        "failed": len(failed), "inadequate": len(inadequate),
        "removed": len(plan.removed), "duration_s": round(time.time() - t0, 3), "images": n_images,
        "images_per_s": round(n_images / screen_s, 3) if n_images else 0.0,
        "changed_because": why, "failed_ids": failed, "patients_total": counts["patients"],
        "lock_wait_s": round(waited, 3),
        "exit_code": EXIT_FAILED if failed else (EXIT_INADEQUATE if inadequate else 0),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _reports(out: Path, patients: list[str], options: dict | None) -> list[Path]:
    """PDF reports of this run's new or changed visits, plus the summary; nothing when none."""
    if not patients:
        log.info("reports: no new or changed visit, none written")
        return []
    from cervscan.report.reports import write_reports

    paths = write_reports(out, patients=patients, **(options or {}))
    log.info("reports: %d written", len(paths))
    return paths


# --------------------------------------------------------------------------- logging

@contextlib.contextmanager
def log_to_file(path: str | Path | None, console_level: int) -> Iterator[None]:
    """Send the ``cervscan`` log, with timestamps, to ``path`` (appending) at INFO level; the console
    handlers keep ``console_level``. Restores the previous levels afterwards."""
    if path is None:
        yield
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    except OSError as e:
        raise CervscanError(f"{path}: cannot open the log file ({e.strerror})") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(message)s",
                                           "%Y-%m-%dT%H:%M:%S%z"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("cervscan")
    root_handlers = logging.getLogger().handlers
    old = (logger.level, [h.level for h in root_handlers])
    for h in root_handlers:
        h.setLevel(max(h.level, console_level))
    logger.setLevel(min(logging.INFO, logger.level or logging.INFO))
    logger.addHandler(handler)
    try:
        yield
    except CervscanError as e:  # the console shows it once (the caller prints it); the log file records it too
        handler.handle(logging.LogRecord("cervscan.batch.nightly", logging.ERROR, __file__, 0, "%s", (e,), None))
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old[0])
        for h, lvl in zip(root_handlers, old[1]):
            h.setLevel(lvl)


__all__ = ["run_batch", "BatchResult", "BatchLock", "BatchLockedError", "Journal", "EXIT_LOCKED", "EXIT_FAILED",
           "EXIT_INADEQUATE",
           "log_to_file", "make_plan", "files_fingerprint", "models_fingerprint", "config_fingerprint"]
