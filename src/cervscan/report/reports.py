"""PDF referral reports from a ``cervscan screen`` output folder: :func:`write_reports`.

``write_reports(OUT)`` writes ``OUT/reports/<patient_id>.pdf`` (one per patient, :mod:`cervscan.report.patient`)
and ``OUT/reports/summary.pdf`` (all patients of the run, severe first; patients without a result with their
reasons, :mod:`cervscan.report.summary`).

The report only reads the screen output (``run.json``, ``patients.csv``, ``images.csv``, ``skipped.csv``,
``overlays/``; :mod:`cervscan.report.tables`) plus the original images and the classifier file named in
``run.json`` (Grad-CAM heatmaps, :mod:`cervscan.report.heatmaps`). Captions and the patient facts give the
exam stage and the cervix status when images.csv has them; every model role of run.json is listed; missing
columns are simply left out (:mod:`cervscan.report.wording`).

Before anything is rendered, the tables are checked to describe one run
(:func:`cervscan.report.tables.check_tables`); a folder the reports cannot be written to is refused with its
name. Patient ids are printed in any script, or with code points (:mod:`cervscan.report.fonts`); report file
names are :func:`cervscan.report.filenames._file_names`'. PDFs are written atomically
(:mod:`cervscan.report.layout`).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from cervscan.config import load_config_file
from cervscan.errors import CervscanError
from cervscan.files import OutputLedger, check_overlap, display_id, from_display_id
from cervscan.pipeline.screening import probe_writable
from cervscan.report.filenames import _file_names
from cervscan.report.fonts import _IdDisplay, _register_fonts
from cervscan.report.heatmaps import HeatmapMaker
from cervscan.report.layout import _Options, _page_size, _styles
from cervscan.report.patient import _patient_report
from cervscan.report.summary import _summary_report
from cervscan.report.tables import ScreenOutput, load_screen_output
from cervscan.report.wording import DEFAULT_NEXT_STEP


def write_reports(out: str | Path, *, patients: list[str] | None = None, clinic: str | None = None,
                  exam_date: str | None = None, page_size: str = "a4", config_file: str | Path | None = None,
                  heatmaps: bool = True) -> list[Path]:
    """Write ``OUT/reports/<patient_id>.pdf`` (all patients, or those in ``patients``) and ``summary.pdf``.

    ``clinic`` and the recommended next steps come from the options, else the
    config file (keys ``clinic``, ``next_step``). ``heatmaps=False`` skips the
    Grad-CAM computation. Returns the written paths, the summary last.

    CervscanError, before anything is written, when the tables do not belong
    together (:func:`cervscan.report.tables.check_tables`) or ``OUT/reports``
    cannot be written. A patient id is printed as written, or with code points
    and a logged warning where no font on this computer has a character
    (:mod:`cervscan.report.fonts`); the report's file name is
    :func:`cervscan.report.filenames._file_names`' (the id, or a cleaned id
    with a hash suffix).
    """
    psize = _page_size(page_size)
    _check_exam_date(exam_date)
    cfg = load_config_file(config_file) if config_file else {}
    so = load_screen_output(out)  # refuses tables that do not belong together
    known = [p.get("patient_id", "") for p in so.patients]
    wanted = _wanted(so, known, patients) if patients else known
    clinic_name = clinic if clinic is not None else cfg.get("clinic")
    if clinic_name is not None and not isinstance(clinic_name, str):
        raise CervscanError("config key 'clinic' must be text")
    names = _file_names(known)
    _claim_outputs(so, [Path("reports") / f"{names[pid]}.pdf" for pid in wanted] + [Path("reports/summary.pdf")])
    font = _register_fonts()
    opts = _Options(clinic=clinic_name or None, exam_date=exam_date or None, page_size=psize,
                    next_step=_next_step(cfg), report_date=_dt.date.today().isoformat(),
                    ids=_IdDisplay(known), names=names)
    st = _styles(font)
    maker = HeatmapMaker(so.run) if heatmaps and any(r.get("status") == "ok" for r in so.images) else None
    by_id = {p.get("patient_id", ""): p for p in so.patients}
    written = [_patient_report(so, by_id[pid], opts, maker, font, st) for pid in wanted]
    written.append(_summary_report(so, opts, font, st))
    return written


def _wanted(so: ScreenOutput, known: list[str], patients: list[str]) -> list[str]:
    """The patients asked for, as the tables name them; CervscanError naming those the run lacks.

    An id given as a folder name on the command line (bytes that are not UTF-8, a backslash) is matched
    as the tables show it (:func:`cervscan.files.display_id`)."""
    known_set = set(known)
    wanted = list(dict.fromkeys(x if x in known_set else display_id(x) for x in patients))
    unknown = [x for x in wanted if x not in known_set]
    if unknown:
        shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
        raise CervscanError(f"unknown patient(s) {', '.join(unknown)} in {so.out} (the run has: {shown or 'none'})")
    return wanted


def _next_step(cfg: dict) -> dict[str, str]:
    """The recommended next step per decision: the defaults, with the config file's ``next_step`` over them."""
    steps = dict(DEFAULT_NEXT_STEP)
    extra = cfg.get("next_step")
    if extra is None:
        return steps
    if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise CervscanError("config key 'next_step' must map decisions (severe, mildly_normal, error, ...) to text")
    steps.update(extra)
    return steps


def _claim_outputs(so: ScreenOutput, rels: list[Path]) -> None:
    """Before any report is written: refuse an OUT that is, holds or lies inside the run's input folders
    (from ``run.json``), refuse an ``OUT/reports`` that cannot be written (naming it), and claim the report
    files in OUT's ledger, so that a file cervscan did not create is never overwritten (CervscanError
    naming it)."""
    inputs = [from_display_id(str(x)) for x in so.run.get("inputs") or [] if isinstance(x, str)]
    inputs = [x for x in inputs if Path(x).exists()]
    check_overlap(inputs, so.out)
    try:
        probe_writable(so.out / "reports")
    except CervscanError as e:
        raise CervscanError(f"{e}: cannot write the reports; make the output folder writable, or copy it to a "
                            "writable place") from None
    try:
        so.ledger = OutputLedger(so.out, inputs=inputs)
        so.ledger.claim(rels)
    except OSError as e:
        raise CervscanError(f"{so.out}: cannot record the reports in the output folder's ledger "
                            f"({e.strerror or e}); make the output folder writable") from None


def _check_exam_date(exam_date: str | None) -> None:
    """An exam date given by hand must be a real calendar date, YYYY-MM-DD (it is printed on every report)."""
    if exam_date is None:
        return
    try:
        _dt.date.fromisoformat(exam_date.strip())
    except ValueError:
        raise CervscanError(f"--exam-date {exam_date!r}: not a date; give it as YYYY-MM-DD, e.g. 2026-12-08") from None
    if len(exam_date.strip()) != 10:
        raise CervscanError(f"--exam-date {exam_date!r}: give it as YYYY-MM-DD, e.g. 2026-12-08")
