"""The batch journal ``OUT/.cervscan/batch.sqlite``: the source of truth of a batch output folder.

SQLite in WAL mode with ``synchronous=FULL``: one row per visit with its patient row, its image rows, its
skipped files and three fingerprints (see :mod:`cervscan.batch.planner`), and one row per run. A visit is
recorded in one transaction, so a run killed at any moment loses at most the visit being screened. The CSVs
are views of it (:mod:`cervscan.batch.tables`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cervscan import files as cio
from cervscan.errors import CervscanError

log = logging.getLogger(__name__)

JOURNAL_NAME = "batch.sqlite"
SCHEMA_VERSION = 1


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
