"""One batch run, start to end: ``cervscan batch`` (:func:`run_batch`).

In order: check the inputs (config file, device, ROOT, an OUT that does not overlap ROOT) before anything
is written; lock OUT (:mod:`cervscan.batch.lock`); open the journal (:mod:`cervscan.batch.journal`); sweep
temp files of an interrupted write; plan (:mod:`cervscan.batch.planner`), loading the models only when a
visit is to be screened or the inputs changed; screen and commit visit by visit
(:mod:`cervscan.batch.screener`); write the tables (:mod:`cervscan.batch.tables`), then ``run.json``; mark
the run finished in the journal. Optionally PDF reports of the visits screened, and a log file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from cervscan import files as cio
from cervscan.batch.journal import JOURNAL_NAME, Journal
from cervscan.batch.lock import LOCK_NAME, BatchLock
from cervscan.batch.outdir import STATE_DIR, prepare_out, sweep_temp_files
from cervscan.batch.planner import (
    Plan,
    config_fingerprint,
    discover,
    inputs_key,
    log_plan,
    make_plan,
    models_fingerprint,
)
from cervscan.batch.screener import Screener
from cervscan.batch.tables import write_tables
from cervscan.device import resolve_device
from cervscan.errors import CervscanError, exit_code_of
from cervscan.pipeline.build import config_layers
from cervscan.pipeline.outputs import TABLES, OutputWriter
from cervscan.pipeline.screening import run_record as screen_run_record
from cervscan.pipeline.steps import Pipeline
from cervscan.report import reports  # reports.write_reports: looked up at each call

log = logging.getLogger(__name__)

#: Default number of committed visits between two rewrites of the CSVs during a run.
CSV_EVERY = 20


@dataclass
class BatchResult:
    out: Path
    summary: dict
    run: dict
    exit_code: int
    screened: list[str] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)


def check_inputs(root: Path, config_file, overrides: dict | None, device: str | None,
                  out: Path | None = None, site=None, cls_model: str | None = None) -> None:
    """Fail before anything is written: a bad config file or site (``--site RUN`` without its files, or with
    ``--cls-model``; bad site settings), an unavailable device, a missing ROOT, an OUT that is ROOT, lies
    inside it or holds it."""
    _, _, site_cfg, file_cfg = config_layers(site=site, cls_model=cls_model, config_file=config_file)
    spec = (overrides or {}).get("device") or device or file_cfg.get("device") or site_cfg.get("device") or "auto"
    if str(spec).strip().lower() not in ("auto", "cpu"):  # those two never fail; checking imports torch
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
              report: bool = False, report_options: dict | None = None, csv_every: int = CSV_EVERY,
              log_file: str | Path | None = None, console_level: int = logging.NOTSET,
              site: str | Path | None = None) -> BatchResult:
    """Screen what is new or changed under ``root`` into ``out`` (see :mod:`cervscan.batch`).

    The model and configuration arguments are those of :meth:`cervscan.pipeline.steps.Pipeline.from_config`. ``wait``:
    wait for a run holding OUT's lock (``wait_timeout`` seconds at most, which implies ``wait``).
    ``report``: PDF reports of the new or changed visits (``report_options``: keyword arguments of
    :func:`cervscan.report.reports.write_reports`). ``csv_every``: rewrite the CSVs after that many committed
    visits (0: only at the end). ``log_file``: append a timestamped log of the run (INFO), failures
    included, to that file, while the console handlers keep at least ``console_level``
    (:func:`log_to_file`). Raises :class:`~cervscan.errors.BatchLockedError` when another run holds the
    lock and :class:`~cervscan.errors.CervscanError` (naming the file) on any other failure; every result
    committed before a failure is kept.
    """
    t0 = time.time()
    with log_to_file(log_file, console_level):
        root, out = Path(root), Path(out)
        opts = dict(seg_model=seg_model, cls_model=cls_model, cervix_model=cervix_model, stage_model=stage_model,
                    use_stage=use_stage, config_file=str(config_file) if config_file else None,
                    overrides=dict(overrides or {}), device=device, num_workers=num_workers,
                    batch_images=batch_images, write_masks=write_masks, write_overlays=write_overlays,
                    site=str(site) if site else None)
        check_inputs(root, config_file, overrides, device, out, site, cls_model)
        prepare_out(out)
        with BatchLock(out / STATE_DIR / LOCK_NAME) as lock:
            waited = lock.acquire(wait=wait or wait_timeout is not None, timeout=wait_timeout)
            log.info("batch %s -> %s (pid %d)", cio.display_id(str(root)), cio.display_id(str(out)), os.getpid())
            journal = Journal(out / STATE_DIR / JOURNAL_NAME)
            try:
                ledger = cio.OutputLedger(out, inputs=[root], adopt=journal.referenced_files)
                sweep_temp_files(out, ledger)
                summary, run, screened = Night(root, out, journal, opts, csv_every, t0, waited, ledger).execute()
            finally:
                journal.close()
        pdfs = _write_reports(out, screened, report_options) if report else []
        log.info("done: %s", json.dumps(summary))
    return BatchResult(out, summary, run, summary["exit_code"], screened, pdfs)


class Night:
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
        self.pipe = Pipeline.from_config(**self.opts)
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
        visits, stray = discover(self.root, self.out)
        self.ledger.add_inputs(v.folder for v in visits)
        self.ledger.claim(TABLES)  # a patients.csv cervscan did not write fails here, before any screening
        stored = journal.stored()
        fps = self.fingerprints()
        plan = make_plan(visits, stored, fps["models"], fps["config"])
        if plan.todo and self.pipe is None:
            self.load()
            plan = make_plan(visits, stored, self.fps["models"], self.fps["config"])
        log_plan(plan, stored)
        removed = {pid: stored[pid].folder for pid in plan.removed}
        journal.update_skipped({v.patient_id: [list(s) for s in v.skipped] for v in plan.unchanged
                                if json.loads(stored[v.patient_id].skipped) != [list(s) for s in v.skipped]})
        t_loaded = time.time()
        patients, n_images = [], 0
        if plan.todo:
            cfg = self.pipe.cfg
            writer = OutputWriter(self.out, masks=cfg.write_masks, overlays=cfg.write_overlays, ledger=self.ledger)
            scr = Screener(self.pipe, writer, journal, self.out, run_id, self.csv_every, stray, removed)
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
            run = screen_run_record("screen", self.out, [self.root], self.pipe, self.refs, self.provenance, timings)
        batch = {**summary, "journal": str(self.journal.path), "run_id": run_id, "inputs_key": self.key,
                 "fingerprints": self.fps, "models_loaded": self.pipe is not None}
        run.update(timings=timings, counts=counts, exit_code=summary["exit_code"], batch=batch)
        return run


def _failed(patient: dict) -> bool:
    return patient.get("decision") == "error" or int(patient.get("n_failed") or 0) > 0


def _summary(root: Path, out: Path, plan: Plan, patients: list[dict], n_images: int, counts: dict, t0: float,
             t_loaded: float, t_screened: float, waited: float) -> dict:
    """The night in numbers (``--json``)."""
    failed = [p["patient_id"] for p in patients if _failed(p)]
    inadequate = [p["patient_id"] for p in patients if p.get("decision") == "inadequate"]
    screen_s = max(1e-9, t_screened - t_loaded)
    why = plan.reason_counts()
    return {
        "root": cio.display_id(str(root.resolve())), "out": cio.display_id(str(out.resolve())),
        "new": len(plan.new), "changed": len(plan.changed), "unchanged": len(plan.unchanged),
        "failed": len(failed), "inadequate": len(inadequate),
        "removed": len(plan.removed), "duration_s": round(time.time() - t0, 3), "images": n_images,
        "images_per_s": round(n_images / screen_s, 3) if n_images else 0.0,
        "changed_because": why, "failed_ids": failed, "patients_total": counts["patients"],
        "lock_wait_s": round(waited, 3),
        "exit_code": exit_code_of(len(failed), len(inadequate)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_reports(out: Path, patients: list[str], options: dict | None) -> list[Path]:
    """PDF reports of this run's new or changed visits, plus the summary; nothing when none."""
    if not patients:
        log.info("reports: no new or changed visit, none written")
        return []
    paths = reports.write_reports(out, patients=patients, **(options or {}))
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
        handler.handle(logging.LogRecord(__name__, logging.ERROR, __file__, 0, "%s", (e,), None))
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old[0])
        for h, lvl in zip(root_handlers, old[1]):
            h.setLevel(lvl)
