"""Page layout of the reports: paragraph styles, page size, page footer, the PDF writer and the tables
both reports use (facts, signature box, error lists); the options of one ``cervscan report`` run.

PDFs are written atomically (:func:`cervscan.files.atomic_write_bytes`). The PDF text keeps the exact
characters: the ToUnicode map is in UTF-16 (:func:`_utf16_cmap`), so characters beyond U+FFFF such as
emoji survive search, copy and extraction.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import cv2
import numpy as np
from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4, LETTER
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import ttfonts
from reportlab.pdfgen import canvas
from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Table, TableStyle

from cervscan import __version__
from cervscan.errors import CervscanError
from cervscan.files import atomic_write_bytes
from cervscan.report.filenames import _file_name
from cervscan.report.fonts import FONT, _IdDisplay, _markup

PAGE_SIZES = ("a4", "letter")
_EMBED_MAX_SIDE = 560  # pixels of each image embedded in the PDF (plenty for ~60 mm wide)
_MARGIN_MM = 18.0
_FRAME_PAD = 6.0  # points; reportlab's default Frame padding on each side


def _styles(font: str) -> dict:
    bold = f"{font}-Bold" if font == FONT else "Helvetica-Bold"
    base = ParagraphStyle("base", fontName=font, fontSize=9.5, leading=12.5, textColor=colors.HexColor("#222222"))
    return {
        "base": base,
        "small": ParagraphStyle("small", parent=base, fontSize=8, leading=10),
        "tiny": ParagraphStyle("tiny", parent=base, fontSize=7, leading=8.5, textColor=colors.HexColor("#555555")),
        "clinic": ParagraphStyle("clinic", parent=base, fontName=bold, fontSize=11, leading=14,
                                 textColor=colors.HexColor("#444444")),
        "title": ParagraphStyle("title", parent=base, fontName=bold, fontSize=17, leading=21, spaceAfter=4),
        "h2": ParagraphStyle("h2", parent=base, fontName=bold, fontSize=12, leading=15, spaceBefore=10, spaceAfter=4),
        "label": ParagraphStyle("label", parent=base, fontName=bold, fontSize=8.5, leading=11,
                                textColor=colors.HexColor("#555555")),
        "decision": ParagraphStyle("decision", parent=base, fontName=bold, fontSize=20, leading=24),
        "caption": ParagraphStyle("caption", parent=base, fontSize=8.5, leading=11),
        "colhead": ParagraphStyle("colhead", parent=base, fontName=bold, fontSize=8, leading=10, alignment=1,
                                  textColor=colors.HexColor("#555555")),
        "cell": ParagraphStyle("cell", parent=base, fontSize=8.5, leading=10.5),
        "cellb": ParagraphStyle("cellb", parent=base, fontName=bold, fontSize=8.5, leading=10.5),
        "statement": ParagraphStyle("statement", parent=base, fontSize=9, leading=12,
                                    textColor=colors.HexColor("#333333")),
        "na": ParagraphStyle("na", parent=base, fontSize=8, leading=10, alignment=1,
                             textColor=colors.HexColor("#777777")),
    }


def _page_size(name: str):
    key = (name or "a4").strip().lower()
    if key not in PAGE_SIZES:
        raise CervscanError(f"page size must be one of {', '.join(PAGE_SIZES)}, got {name!r}")
    return A4 if key == "a4" else LETTER


def _canvas_maker(footer_left: str, font: str):
    """A canvas that writes 'page X of Y' and a footer line (``footer_left``: paragraph markup) on every page."""
    footer_style = ParagraphStyle("footer", fontName=font, fontSize=7.5, leading=9,
                                  textColor=colors.HexColor("#555555"))

    class NumberedCanvas(canvas.Canvas):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._pages: list[dict] = []

        def showPage(self):  # noqa: N802 - reportlab API
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self):
            n = len(self._pages)
            for state in self._pages:
                self.__dict__.update(state)
                self._footer(n)
                super().showPage()
            super().save()

        def _footer(self, n: int) -> None:
            w, _h = self._pagesize
            x0, x1 = _MARGIN_MM * mm + _FRAME_PAD, w - _MARGIN_MM * mm - _FRAME_PAD
            self.saveState()
            self.setStrokeColor(colors.HexColor("#bbbbbb"))
            self.setLineWidth(0.5)
            self.line(x0, 13 * mm, x1, 13 * mm)
            self.setFont(font, 7.5)
            self.setFillColor(colors.HexColor("#555555"))
            left = Paragraph(footer_left, footer_style)
            _w, h = left.wrap(x1 - x0 - 70, 20 * mm)
            left.drawOn(self, x0, 9 * mm - 2 - (h - footer_style.leading))  # first line's baseline at 9 mm
            self.drawRightString(x1, 9 * mm, f"Page {self._pageNumber} of {n}")
            self.restoreState()

    return NumberedCanvas


def _text_width(page_size) -> float:
    """Usable width inside the margins and the frame padding, in points."""
    return page_size[0] - 2 * _MARGIN_MM * mm - 2 * _FRAME_PAD


def _utf16_cmap(make):
    """reportlab's ToUnicode CMap maker, with characters above U+FFFF written in UTF-16 as the PDF standard
    wants (reportlab writes their code point, ``<1F600>``, which PDF readers reject: such a character,
    e.g. an emoji in a patient id, would be lost when the text is searched, copied or extracted)."""
    def utf16(m) -> str:
        return m.group(1) + "<" + chr(int(m.group(2), 16)).encode("utf-16-be").hex().upper() + ">"

    def make_cmap(fontname, subset):
        return re.sub(r"^(<[0-9A-F]{2}> )<([0-9A-F]{5,6})>$", utf16, make(fontname, subset), flags=re.M)

    return make_cmap


def _build_pdf(path: Path, story: list, *, page_size, title: str, footer: str, font: str, author: str = "") -> Path:
    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=page_size, leftMargin=_MARGIN_MM * mm, rightMargin=_MARGIN_MM * mm,
                            topMargin=16 * mm,
                            bottomMargin=20 * mm, title=title, author=author or "cervscan",
                            subject="Colposcopy screening (decision support)", creator=f"cervscan {__version__}")
    a85, to_unicode = rl_config.useA85, ttfonts.makeToUnicodeCMap
    rl_config.useA85 = 0  # binary streams: smaller files, and no slow pure-Python ASCII85 of the images
    ttfonts.makeToUnicodeCMap = _utf16_cmap(to_unicode)
    try:
        doc.build(story, canvasmaker=_canvas_maker(footer, font))
    finally:
        rl_config.useA85, ttfonts.makeToUnicodeCMap = a85, to_unicode
    try:
        return atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise CervscanError(f"{path}: cannot write ({e.strerror or e})") from None


# --------------------------------------------------------------------------- building blocks

def _rl_image(rgb: np.ndarray, max_w: float, max_h: float):
    """A reportlab Image of an RGB array, JPEG-encoded at <= _EMBED_MAX_SIDE px, fitted into max_w x max_h."""
    h, w = rgb.shape[:2]
    s = _EMBED_MAX_SIDE / max(h, w)
    small = rgb
    if s < 1:
        small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 82])
    if not ok:
        raise CervscanError("could not encode an image for the report")
    scale = min(max_w / w, max_h / h)
    return Image(io.BytesIO(enc.tobytes()), width=w * scale, height=h * scale)


# --------------------------------------------------------------------------- tables shared by the reports

def _info_table(rows: list[tuple[str, str]], st: dict, width: float):
    data = [[Paragraph(escape(k), st["label"]), Paragraph(v, st["cell"])] for k, v in rows]
    lw = 38 * mm
    t = Table(data, colWidths=[lw, width - lw])
    t.setStyle(TableStyle([
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("TOPPADDING", (0, 0), (-1, -1), 1.5), ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
        ("LEFTPADDING", (0, 0), (-1, -1), 0),
        ("LINEBELOW", (0, -1), (-1, -1), 0.5, colors.HexColor("#bbbbbb")),
    ]))
    return t


def _signature_box(st: dict, width: float):
    data = [
        [Paragraph("Clinician's notes", st["label"]), "", ""],
        ["", "", ""],
        [Paragraph("Clinician (name)", st["label"]), Paragraph("Signature", st["label"]),
         Paragraph("Date", st["label"])],
        ["", "", ""],
    ]
    t = Table(data, colWidths=[width * 0.42, width * 0.38, width * 0.20],
              rowHeights=[6 * mm, 32 * mm, 6 * mm, 12 * mm])
    t.setStyle(TableStyle([
        ("SPAN", (0, 0), (-1, 0)), ("SPAN", (0, 1), (-1, 1)),
        ("BOX", (0, 0), (-1, -1), 0.8, colors.HexColor("#777777")),
        ("LINEABOVE", (0, 2), (-1, 2), 0.5, colors.HexColor("#999999")),
        ("LINEBEFORE", (1, 2), (1, 3), 0.5, colors.HexColor("#999999")),
        ("LINEBEFORE", (2, 2), (2, 3), 0.5, colors.HexColor("#999999")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]))
    return t


class _Markup(str):
    """Text that is paragraph markup already (not escaped again)."""


def _error_table(rows: list[list[str]], header: list[str], widths: list[float], st: dict):
    data = [[Paragraph(escape(h), st["cellb"]) for h in header]]
    data += [[Paragraph(c if isinstance(c, _Markup) else _markup(c, reorder=False), st["cell"]) for c in row]
             for row in rows]
    t = Table(data, colWidths=widths, repeatRows=1)
    t.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
        ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#bbbbbb")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]))
    return t


# --------------------------------------------------------------------------- options of a run

@dataclass
class _Options:
    """What every report of a run shares: clinic, exam date, page size, next steps, report date, how each
    patient id is printed and the file name of each patient's report."""

    clinic: str | None
    exam_date: str | None
    page_size: Any
    next_step: dict[str, str]
    report_date: str
    ids: "_IdDisplay | None" = None  # how each patient id is printed
    names: dict[str, str] = field(default_factory=dict)  # file name of each patient's report

    def id_markup(self, pid: str, **kw) -> str:
        if self.ids is None:
            self.ids = _IdDisplay([pid])
        return self.ids.markup(pid, **kw)

    def file_name(self, pid: str) -> str:
        return self.names.get(pid) or _file_name(pid)
