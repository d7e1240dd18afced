"""Screening the planned visits of a batch run, each committed to the journal as soon as it is done.

The planned visits go through one :meth:`~cervscan.pipeline.steps.Pipeline.run` stream. When a visit's last
image is done its mask files are already written (atomically); then its patient row, image rows and
fingerprints are committed in one transaction, and the files of an earlier result that the new one no longer
references are removed. Every ``csv_every`` committed visits the tables are rewritten.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cervscan import files as cio
from cervscan.batch.faults import pause
from cervscan.batch.journal import Journal
from cervscan.batch.outdir import remove_stale_outputs
from cervscan.batch.planner import RETRY, Plan
from cervscan.batch.tables import write_tables
from cervscan.errors import CervscanError
from cervscan.pipeline.screening import decide_patient

log = logging.getLogger(__name__)


class Screener:
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
        for v in todo:
            self.writer.add_visit(v.patient_id, [cio.display_id(p.name) for p in v.images])
        items = [(v.patient_id, p) for v in todo for p in v.images]
        stream = self.pipe.run(items)
        since_tables = 0
        try:
            for v in todo:
                recs = [self._write_files(next(stream)) for _ in v.images]
                self.images += len(recs)
                pause("visit:files-written")
                patient = decide_patient(self.pipe, v.patient_id, recs, v.error or "")
                fps = plan.fps[v.patient_id]
                if v.patient_id in self.writer.output_failed:  # screened again by the next run
                    fps = {**fps, "files": RETRY + fps["files"]}
                self.journal.save_visit(v.patient_id, cio.display_id(str(Path(v.folder).resolve())), fps,
                                        patient, recs, v.skipped, self.run_id)
                pause("visit:committed")
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
