"""One patient's report, ``OUT/reports/<name>.pdf``: decision, score, what the threshold means, the
recommended next step, every image with its lesion overlay and a Grad-CAM heatmap, failed images, files
that were not screened, the statement and the signature box.
"""

from __future__ import annotations

import logging
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np
from reportlab.lib import colors
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.platypus import CondPageBreak, KeepTogether, Paragraph, Spacer, Table, TableStyle

from cervscan import __version__
from cervscan.errors import CervscanError
from cervscan.pipeline.steps import is_eligible
from cervscan.report.fonts import _markup
from cervscan.report.heatmaps import (HeatmapMaker, _exam_date_from_files, _keep_heatmap, _original_path, _read_rgb,
                                      _row_box, _stems)
from cervscan.report.layout import (_build_pdf, _error_table, _info_table, _Options, _rl_image, _signature_box,
                                    _text_width)
from cervscan.report.filenames import _safe_stem
from cervscan.report.tables import ScreenOutput, _f, _i, _true
from cervscan.report.wording import (DECISION_TINTS, STATEMENT, _caption, _classify_view, _crop_mode,
                                     _decision_colour, _decision_words, _model_rows, _n_no_cervix, _pooling,
                                     _quality_words, _score_digits, _short_error, _software_line, _stage_summary,
                                     _threshold_meaning)

log = logging.getLogger(__name__)


def _patient_report(so: ScreenOutput, p: dict, opts: _Options, maker: HeatmapMaker | None, font: str,
                    st: dict) -> Path:
    """Write one patient's report; returns its path."""
    pid = p["patient_id"]
    rows = so.images_of(pid)
    width = _text_width(opts.page_size)
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    story = _head(so, p, rows, opts, st, width)
    story += [Spacer(1, 3 * mm), _facts(p, rows, ok_rows, failed, st)]
    if ok_rows:
        story += _images(so, pid, ok_rows, opts, maker, st, width)
    story += _unused_files(so, pid, failed, st, width)
    story.append(Spacer(1, 5 * mm))
    story.append(KeepTogether([Paragraph(escape(STATEMENT), st["statement"]), Spacer(1, 3 * mm),
                               _signature_box(st, width)]))
    footer = (f"Patient {opts.id_markup(pid, note='inline')} · cervscan {__version__} · decision support, "
              "not a diagnosis")
    return _build_pdf(so.out / "reports" / f"{opts.file_name(pid)}.pdf", story, page_size=opts.page_size,
                      title=f"Colposcopy screening report – {pid}", footer=footer, font=font,
                      author=opts.clinic or "")


def _head(so: ScreenOutput, p: dict, rows: list[dict], opts: _Options, st: dict, width: float) -> list:
    """Clinic, title, what to do when the images were inadequate, the patient's facts and the decision box."""
    pid = p["patient_id"]
    paths = [_original_path(r) for r in rows]
    exam = opts.exam_date or _exam_date_from_files(x for x in paths if x is not None) or "not recorded"
    story: list = []
    if opts.clinic:
        story.append(Paragraph(_markup(opts.clinic), st["clinic"]))
    story.append(Paragraph("Colposcopy screening report", st["title"]))
    if p.get("decision") == "inadequate":  # what to do, before anything else
        story.append(Paragraph(f"<font color='{_decision_colour('inadequate')}'><b>No result – "
                               f"{escape(str(p.get('reason') or 'retake: no usable image'))}</b></font>", st["base"]))
        story.append(Spacer(1, 2 * mm))
    story.append(_info_table([
        ("Patient ID", opts.id_markup(pid, bold=True)),
        ("Exam date", escape(exam)),
        ("Report date", escape(opts.report_date)),
        ("Software", _software_line(so.run, p)),
        *_model_rows(so.run),
    ], st, width))
    story.append(Spacer(1, 5 * mm))
    story.append(_decision_box(p, so.run, st, width, opts.next_step))
    return story


def _facts(p: dict, rows: list[dict], ok_rows: list[dict], failed: list[dict], st: dict):
    """One paragraph: images used, not fit, failed, without lesion, exam stages, cervix not found, quality."""
    n_img = _i(p.get("n_images"), len(rows))
    not_eligible = [r for r in ok_rows if not is_eligible(r)]
    facts = [f"{len(ok_rows) - len(not_eligible)} of {n_img} image(s) used"]
    if not_eligible:
        facts.append(f"<font color='#b35c00'><b>{len(not_eligible)} image(s) not fit to decide from</b></font> "
                     "(shown greyed, with the reason)")
    if failed:
        facts.append(f"<font color='#b35c00'><b>{len(failed)} image(s) could not be used</b></font> (listed below)")
    n_empty = sum(_true(r.get("empty_mask")) for r in ok_rows)
    if n_empty:
        facts.append(f"no lesion segmented in {n_empty} image(s)")
    stages = _stage_summary(p, ok_rows)
    if stages:
        facts.append("exam stage: " + escape(stages))
    n_no_cx = _n_no_cervix(p, ok_rows)
    if n_no_cx:
        facts.append(f"<font color='#b35c00'><b>cervix not found in {n_no_cx} image(s)</b></font>: "
                     "the centre of the image was used instead")
    q = _quality_words(p.get("quality") or "")
    if q:
        facts.append("image quality: " + escape(q))
    return Paragraph(". ".join(facts[:1]) + ("; " + "; ".join(facts[1:]) if len(facts) > 1 else "") + ".", st["base"])


def _images(so: ScreenOutput, pid: str, ok_rows: list[dict], opts: _Options, maker: HeatmapMaker | None,
            st: dict, width: float) -> list:
    """The 'Images' section: the legend, then one row per image (original, lesion overlay, heatmap and
    caption, never split), the column heads repeated on every page."""
    run = so.run
    crop_mode = _crop_mode(run)
    boxed = crop_mode in ("cervix", "centre") and any(_row_box(r) for r in ok_rows)
    heads = Table([[Paragraph("Original", st["colhead"]), Paragraph("Lesion overlay", st["colhead"]),
                    Paragraph("Grad-CAM heatmap", st["colhead"])]], colWidths=[width / 3] * 3)
    heads.setStyle(TableStyle([("TOPPADDING", (0, 0), (-1, -1), 1), ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
                               ("LEFTPADDING", (0, 0), (-1, -1), 0), ("RIGHTPADDING", (0, 0), (-1, -1), 0)]))
    blocks = [[heads]]
    stems = _stems(so.images_of(pid))
    max_side = int((run.get("config") or {}).get("max_side") or 2048)
    for r in ok_rows:
        pics = _pictures(so, pid, r, stems[r.get("image", "")], opts.file_name(pid), maker, max_side)
        blocks.append([_image_block(r, *pics, st, width, crop_mode)])
    grid = Table(blocks, colWidths=[width], repeatRows=1)
    grid.setStyle(TableStyle([("LEFTPADDING", (0, 0), (-1, -1), 0), ("RIGHTPADDING", (0, 0), (-1, -1), 0),
                              ("TOPPADDING", (0, 0), (-1, -1), 0), ("BOTTOMPADDING", (0, 0), (-1, -1), 0)]))
    return [CondPageBreak(70 * mm), Paragraph("Images", st["h2"]),
            Paragraph(_legend(run, maker, boxed), st["small"]), Spacer(1, 2 * mm), grid]


def _legend(run: dict, maker: HeatmapMaker | None, boxed: bool) -> str:
    """What the three pictures of each image show (paragraph markup)."""
    frame_view = _classify_view(run) == "frame"
    cropped = boxed and not frame_view
    if maker is None:
        heat_note = "Heatmaps were not requested."
    elif maker.available:
        where = ("on the crop it classified, shown in place in the whole image: the white frame marks the "
                 "crop, the greyed area outside it was not seen by the classifier" if cropped
                 else "on the whole image, its original view" if frame_view else "on the original image")
        heat_note = (f"<b>Heatmap</b> (Grad-CAM of the classifier {where}): red marks the regions "
                     "that most raised the 'severe' score, blue regions had little influence. It shows where "
                     "the model looked, not a diagnosis.")
    else:
        heat_note = f"<b>Heatmaps unavailable:</b> {escape(maker.reason or '')}."
    legend = ("<b>green</b> = lesion: contour and translucent fill mark the area the lesion segmenter "
              "delineated as lesion")
    if boxed:
        legend += ("; <b>blue</b> = cervix outline and crop: the cervix as the cervix finder outlined it, and "
                   "the square crop box (the part of the image that was segmented"
                   + (": the classifier saw the whole image and the segmented lesion region)" if frame_view
                      else " and classified)"))
    return "Left: the original image. Middle: <b>lesion overlay</b> — " + legend + ". Right: " + heat_note


def _pictures(so: ScreenOutput, pid: str, r: dict, stem: str, folder: str, maker: HeatmapMaker | None,
              max_side: int) -> tuple:
    """(original, why not, lesion overlay, why not, heatmap, why not) of one screened image; an image that
    was not used for the decision is shown greyed, without a heatmap."""
    name = r.get("image", "")
    path = _original_path(r)
    orig, why = _read_rgb(path, max_side)
    if path is None:
        why = "original image not found"
    ovl, ovl_why = None, "not written (screen ran with --no-masks)"
    if r.get("overlay"):
        ovl, ovl_why = _read_rgb(so.out / r["overlay"], max_side)
    if not is_eligible(r):
        return (_grey_out(orig), why, _grey_out(ovl), ovl_why or "", None,
                "not classified: the image was not used for the decision")
    heat, heat_why = None, "not computed"
    if maker is not None and maker.available and orig is not None:
        try:
            heat = maker.overlay(orig, _row_box(r))
            _keep_heatmap(so, folder, stem, heat)
        except CervscanError as e:
            log.warning("%s/%s: heatmap not computed: %s", pid, name, e)
            heat, heat_why = None, str(e)
        except Exception as e:  # noqa: BLE001 - one image must not stop the report
            log.warning("%s/%s: heatmap failed: %s", pid, name, e)
            heat, heat_why = None, f"failed: {type(e).__name__}"
    elif maker is not None:
        hpath = so.out / "heatmaps" / folder / f"{_safe_stem(stem)}.jpg"
        if hpath.is_file():  # made earlier for this output folder
            heat, heat_why = _read_rgb(hpath, max_side)
        else:
            heat_why = "classifier unavailable" if not maker.available else "original image not found"
    return orig, why, ovl, ovl_why or "", heat, heat_why or ""


def _unused_files(so: ScreenOutput, pid: str, failed: list[dict], st: dict, width: float) -> list:
    """The images that could not be used, and the files of the visit folder that were not screened."""
    story: list = []
    if failed:
        story.append(CondPageBreak(30 * mm))
        story.append(Paragraph(f"Images that could not be used ({len(failed)})", st["h2"]))
        story.append(_error_table(
            [[r.get("image", ""), _short_error(r.get("error", ""), r.get("path"), r.get("image"))] for r in failed],
            ["Image", "Reason"], [width * 0.3, width * 0.7], st))
    sk = so.skipped_of(pid)
    if sk:
        story.append(Paragraph(f"Files in the visit folder that were not screened ({len(sk)})", st["h2"]))
        story.append(_error_table([[r.get("file", ""), r.get("reason", "")] for r in sk], ["File", "Reason"],
                                  [width * 0.3, width * 0.7], st))
    return story


def _decision_box(p: dict, run: dict, st: dict, width: float, next_step: dict[str, str]):
    decision = p.get("decision") or "error"
    colour = _decision_colour(decision)
    head, expl = _decision_words(decision)
    score, thr = _f(p.get("score")), _f(p.get("threshold"))
    dstyle = ParagraphStyle("d", parent=st["decision"], textColor=colors.HexColor(colour))
    rows = [[Paragraph(escape(head), dstyle)]]
    if decision == "inadequate" and p.get("reason"):  # the retake instruction first
        rows.append([Paragraph(f"<b>What to do: {escape(str(p['reason']))}</b>", st["base"])])
    if expl:
        rows.append([Paragraph(escape(expl), st["base"])])
    if score is not None:
        rel = "above" if thr is not None and score > thr else "at or below"
        nd = _score_digits(score, thr)
        thr_s = f"{thr:.{nd}f}" if thr is not None else "–"
        rows.append([Paragraph(
            f"<b>Score {score:.{nd}f}</b> (from 0 to 1; higher means a severe lesion is more likely); "
            f"threshold <b>{thr_s}</b>. "
            f"The score is {rel} the threshold; a patient is called severe when the score is above it. "
            + ("The score is the mean of the image scores, taken on the log-odds scale"
               if _pooling(run) == "logit" else "The score is the mean of the image scores")
            + f" ({_i(p.get('n_eligible', p.get('n_used')))} image(s) used"
            + (f"; {escape(str(p['reason']))}" if p.get("reason") else "") + ").", st["base"])])
    elif decision == "inadequate":
        rows.append([Paragraph("No score: no image of this patient was fit to decide from (blurred, badly exposed, "
                               "cervix not in view or not a deciding exam stage); the images are shown greyed "
                               "below with the reason.", st["base"])])
    else:
        rows.append([Paragraph("No score: no image of this patient could be assessed.", st["base"])])
    if p.get("error"):
        rows.append([Paragraph(f"<b>Reason:</b> {escape(str(p['error']))}", st["base"])])
    if score is not None:
        rows.append([Paragraph(_threshold_meaning(run, thr), st["small"])])
    step = next_step.get(decision) or next_step.get("error", "")
    rows.append([Paragraph(f"<b>Recommended next step:</b> {escape(step)}", st["base"])])
    t = Table(rows, colWidths=[width])
    t.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor(DECISION_TINTS.get(decision, "#fff4e0"))),
        ("LINEBEFORE", (0, 0), (0, -1), 5, colors.HexColor(colour)),
        ("BOX", (0, 0), (-1, -1), 0.6, colors.HexColor(colour)),
        ("LEFTPADDING", (0, 0), (-1, -1), 10), ("RIGHTPADDING", (0, 0), (-1, -1), 8),
        ("TOPPADDING", (0, 0), (-1, -1), 2.5), ("BOTTOMPADDING", (0, 0), (-1, -1), 2.5),
        ("TOPPADDING", (0, 0), (-1, 0), 7), ("BOTTOMPADDING", (0, -1), (-1, -1), 7),
    ]))
    return t


def _grey_out(rgb: np.ndarray | None) -> np.ndarray | None:
    """An image shown greyed (an image that was not used for the decision)."""
    if rgb is None:
        return None
    grey = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(grey, 0.5, np.full_like(rgb, 225), 0.5, 0)


def _image_block(r: dict, orig: np.ndarray | None, orig_why: str | None, ovl: np.ndarray | None, ovl_why: str,
                 heat: np.ndarray | None, heat_why: str, st: dict, width: float, crop: str | None = None):
    cw = width / 3
    iw, ih = cw - 4, 58 * mm

    def cell(img, why):
        if img is None:
            return Paragraph(f"not available<br/>({escape(why)})", st["na"])
        return _rl_image(img, iw, ih)

    data = [
        [cell(orig, orig_why or "not found"), cell(ovl, ovl_why), cell(heat, heat_why)],
        [Paragraph(_caption(r, crop), st["caption"]), "", ""],
    ]
    t = Table(data, colWidths=[cw] * 3)
    t.setStyle(TableStyle([
        ("SPAN", (0, 1), (-1, 1)),
        ("ALIGN", (0, 0), (-1, 0), "CENTER"), ("VALIGN", (0, 0), (-1, 0), "MIDDLE"),
        ("LEFTPADDING", (0, 0), (-1, -1), 2), ("RIGHTPADDING", (0, 0), (-1, -1), 2),
        ("TOPPADDING", (0, 0), (-1, 0), 3), ("BOTTOMPADDING", (0, 1), (-1, 1), 5),
        ("LINEBELOW", (0, 1), (-1, 1), 0.4, colors.HexColor("#cccccc")),
    ]))
    return t
