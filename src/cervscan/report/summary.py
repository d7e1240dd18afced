"""The run summary, ``OUT/reports/summary.pdf``: all patients of the run, severe first, with their
decision, score and images used; patients without a result and images that could not be used, with the
reasons.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, Spacer, Table, TableStyle

from cervscan import __version__
from cervscan.report.fonts import _markup
from cervscan.report.layout import _build_pdf, _error_table, _info_table, _Markup, _Options, _text_width
from cervscan.report.tables import ScreenOutput, _f, _i
from cervscan.report.wording import (DECISION_ORDER, DECISION_TINTS, STATEMENT, _decision_colour, _decision_words,
                                     _fmt, _model_rows, _n_no_cervix, _quality_words, _short_error, _software_line,
                                     _threshold_meaning, _when)


def _summary_report(so: ScreenOutput, opts: _Options, font: str, st: dict) -> Path:
    """Write the run summary; returns its path."""
    width = _text_width(opts.page_size)
    pats = sorted(so.patients, key=_summary_order)
    story = _summary_head(so, pats, opts, st, width)
    story.append(_patients_table(so, pats, opts, st, width))
    errs = [p for p in pats if (p.get("decision") or "error") == "error"]
    if errs:
        story.append(Paragraph(f"Patients without a result ({len(errs)})", st["h2"]))
        story.append(_error_table([[_Markup(opts.id_markup(p.get("patient_id", ""), note="short")),
                                    p.get("error") or "no reason recorded"] for p in errs],
                                  ["Patient", "Reason"], [width * 0.3, width * 0.7], st))
    failed = [r for r in so.images if r.get("status") != "ok"]
    if failed:
        story.append(Paragraph(f"Images that could not be used ({len(failed)})", st["h2"]))
        story.append(_error_table(
            [[_Markup(opts.id_markup(r.get("patient_id", ""), note="short")), r.get("image", ""),
              _short_error(r.get("error", ""), r.get("path"), r.get("image"))]
             for r in failed], ["Patient", "Image", "Reason"], [width * 0.25, width * 0.2, width * 0.55], st))
    story.append(Spacer(1, 6 * mm))
    story.append(Paragraph(escape(STATEMENT), st["statement"]))
    footer = f"Run summary · cervscan {__version__} · decision support, not a diagnosis"
    return _build_pdf(so.out / "reports" / "summary.pdf", story, page_size=opts.page_size,
                      title="Colposcopy screening – run summary", footer=footer, font=font, author=opts.clinic or "")


def _summary_order(p: dict):
    """Severe first, patients without a usable result last; higher scores first."""
    d = p.get("decision") or "error"
    return (DECISION_ORDER.get(d, 1), -(_f(p.get("score")) or 0.0), p.get("patient_id", ""))


def _summary_head(so: ScreenOutput, pats: list[dict], opts: _Options, st: dict, width: float) -> list:
    """Clinic, title, the run's facts (when, input, software, models, threshold) and the count of each decision."""
    run = so.run
    thr = _f(run.get("threshold"))
    if thr is None and so.patients:
        thr = _f(so.patients[0].get("threshold"))
    counts: dict[str, int] = {}
    for p in pats:
        counts[p.get("decision") or "error"] = counts.get(p.get("decision") or "error", 0) + 1
    n_fail = sum(r.get("status") != "ok" for r in so.images)
    story: list = []
    if opts.clinic:
        story.append(Paragraph(_markup(opts.clinic), st["clinic"]))
    story.append(Paragraph("Colposcopy screening – run summary", st["title"]))
    story.append(_info_table([
        ("Screened", escape(_when(run.get("finished")))),
        ("Report date", escape(opts.report_date)),
        ("Input", escape(", ".join(str(x) for x in run.get("inputs") or []) or "–")),
        ("Software", _software_line(run)),
        *_model_rows(run),
        ("Threshold", (f"{thr:.3f}. " if thr is not None else "") + _threshold_meaning(run, thr)),
    ], st, width))
    story.append(Spacer(1, 4 * mm))
    order = sorted(counts, key=lambda d: DECISION_ORDER.get(d, 1))
    parts = [f"<font color='{_decision_colour(d)}'><b>{counts[d]} {escape(_decision_words(d)[0].lower())}</b></font>"
             for d in order]
    story.append(Paragraph(
        f"<b>{len(pats)} patient(s)</b>: " + ", ".join(parts) + f". {len(so.images)} image(s) screened"
        + (f", <font color='#b35c00'><b>{n_fail} could not be used</b></font>" if n_fail else "") + ".",
        st["base"]))
    story.append(Spacer(1, 3 * mm))
    return story


def _patients_table(so: ScreenOutput, pats: list[dict], opts: _Options, st: dict, width: float):
    """One row per patient: number, id, decision (tinted), score, images used, image quality and notes."""
    header = ["#", "Patient", "Decision", "Score", "Images used", "Image quality / note"]
    data = [[Paragraph(h, st["cellb"]) for h in header]]
    style = [
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
        ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#bbbbbb")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]
    for k, p in enumerate(pats, start=1):
        d = p.get("decision") or "error"
        data.append([
            Paragraph(str(k), st["cell"]),
            Paragraph(opts.id_markup(p.get("patient_id", ""), note="short"), st["cellb"]),
            Paragraph(f"<font color='{_decision_colour(d)}'><b>{escape(_decision_words(d)[0].lower())}</b></font>",
                      st["cell"]),
            Paragraph(_fmt(_f(p.get("score"))), st["cell"]),
            Paragraph(f"{_i(p.get('n_eligible', p.get('n_used')))} of {_i(p.get('n_images'))}", st["cell"]),
            Paragraph(escape("; ".join(_patient_note(so, p))), st["cell"]),
        ])
        if d in DECISION_TINTS:
            style.append(("BACKGROUND", (2, k), (2, k), colors.HexColor(DECISION_TINTS[d])))
    fr = [0.06, 0.27, 0.24, 0.09, 0.12, 0.22]
    t = Table(data, colWidths=[width * f for f in fr], repeatRows=1)
    t.setStyle(TableStyle(style))
    return t


def _patient_note(so: ScreenOutput, p: dict) -> list[str]:
    """A patient's note in the summary: image quality, failed images, cervix not found, reason, error."""
    note = []
    q = _quality_words(p.get("quality") or "")
    if q:
        note.append(q)
    if _i(p.get("n_failed")):
        note.append(f"{_i(p.get('n_failed'))} image(s) failed")
    n_no_cx = _n_no_cervix(p, [r for r in so.images_of(p.get("patient_id", "")) if r.get("status") == "ok"])
    if n_no_cx:
        note.append(f"cervix not found in {n_no_cx} image(s)")
    if p.get("reason"):
        note.append(str(p["reason"]))
    if (p.get("decision") or "error") == "error" and p.get("error"):
        note.append("see below")
    return note
