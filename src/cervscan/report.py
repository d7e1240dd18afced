"""PDF referral reports from a ``cervscan screen`` output folder.

``write_reports(OUT)`` writes ``OUT/reports/<patient_id>.pdf`` (one per
patient: decision, score, what the threshold means, recommended next step,
every image with its lesion overlay and a Grad-CAM heatmap, failed images,
notes and signature box) and ``OUT/reports/summary.pdf`` (all patients of the
run, severe first; patients without a result with their reasons).

The report only reads the screen output (``run.json``, ``patients.csv``,
``images.csv``, ``skipped.csv``, ``overlays/``) plus the original images and
the classifier file named in ``run.json``. Heatmaps are computed here (CPU)
and saved as ``OUT/heatmaps/<patient>/<stem>.jpg``; if the classifier file is
gone or changed, the report still builds and says heatmaps are unavailable.

Grad-CAM explains what the classifier saw: when the image row has a
``crop_box`` (the cervix crop, or the centre crop when no cervix was found),
the classifier input is the crop squashed to its input size, exactly as in
:meth:`cervscan.pipeline.Pipeline.prepare`; the heatmap is pasted back into
the frame at the box (outside greyed, the box framed in white) so that it lines
up with the original and the lesion overlay. Rows without ``crop_box`` (older
outputs) get the heatmap of the whole frame. Captions and the patient facts
give the exam stage and the cervix status when images.csv has them; every
model role of run.json (exam stage, cervix finder, lesion segmenter,
classifier) is listed. Missing columns are simply left out.

Text uses an embedded TrueType font (DejaVu Sans from matplotlib, else
Bitstream Vera from reportlab), so non-ASCII patient ids and clinic names
render and can be searched/extracted. PDFs are written atomically.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from xml.sax.saxutils import escape

import numpy as np

from . import __version__
from .errors import CervscanError

log = logging.getLogger(__name__)

#: What each decision means, in words: (headline, explanation).
DECISION_WORDS: dict[str, tuple[str, str]] = {
    "severe": ("SEVERE", "The model scored these images like those of patients who needed referral or "
                         "treatment (high-grade lesion suspected)."),
    "mildly_normal": ("MILDLY NORMAL", "The model scored these images like those of patients who needed no further "
                                       "treatment (normal or at most mildly abnormal). A low score does not rule "
                                       "out disease."),
    "inadequate": ("INADEQUATE", "The images are not adequate for an automated assessment."),
    "error": ("NO RESULT", "The screening could not be completed for this patient."),
}
#: Recommended next step per decision; override with the config key ``next_step``.
DEFAULT_NEXT_STEP: dict[str, str] = {
    "severe": "Refer for colposcopically directed biopsy and/or treatment according to the local protocol.",
    "mildly_normal": "Routine follow-up at the interval of the local screening programme, "
                     "unless the clinical findings indicate otherwise.",
    "inadequate": "Repeat the examination with adequate images (transformation zone visible, in focus, "
                  "no glare), or assess the patient clinically.",
    "error": "No automated result: review the images yourself and repeat the examination or the screening "
             "as needed.",
}
DECISION_COLOURS = {"severe": "#c62828", "mildly_normal": "#2e7d32", "error": "#d98b00", "inadequate": "#d98b00"}
DECISION_TINTS = {"severe": "#fdecea", "mildly_normal": "#e8f5e9", "error": "#fff4e0", "inadequate": "#fff4e0"}
#: Order in the summary: severe first, patients without a usable result last.
DECISION_ORDER = {"severe": 0, "inadequate": 1, "mildly_normal": 2, "error": 3}
QUALITY_WORDS = {"blurry": "blurry (low sharpness)", "blurred": "blurred (low sharpness)",
                 "dark": "dark (underexposed)", "overexposed": "overexposed (clipped colours)",
                 "glare": "strong glare (specular highlights)"}
#: Why an image was not eligible (images.csv ``reason``), in words.
REASON_WORDS = {"blurred": "blurred", "dark": "too dark", "overexposed": "overexposed", "glare": "strong glare",
                "no_cervix": "cervix not found", "cervix_too_small": "cervix too small in the picture"}
#: Exam stages (the ``stage`` model's classes) in words.
STAGE_WORDS = {"acetic": "acetic acid", "lugol": "Lugol's iodine", "green": "green filter", "saline": "saline",
               "other": "other view"}
#: Model roles of run.json, in the pipeline's order, with their label in the reports.
MODEL_ROLES = (("stage", "Exam-stage model"), ("cervix", "Cervix finder"), ("segmenter", "Lesion segmenter"),
               ("classifier", "Classifier"))
STATEMENT = ("This result was produced by cervscan, a decision-support tool. It supports and does not replace "
             "the clinician's judgement; the examining clinician makes and is responsible for the final decision.")
PAGE_SIZES = ("a4", "letter")

_FONT = "CervscanSans"
_EMBED_MAX_SIDE = 560  # pixels of each image embedded in the PDF (plenty for ~60 mm wide)


# --------------------------------------------------------------------------- reading the screen output

@dataclass
class ScreenOutput:
    out: Path
    run: dict
    patients: list[dict]
    images: list[dict]
    skipped: list[dict] = field(default_factory=list)

    def images_of(self, pid: str) -> list[dict]:
        return [r for r in self.images if r.get("patient_id") == pid]

    def skipped_of(self, pid: str) -> list[dict]:
        return [r for r in self.skipped if r.get("patient_id") == pid]


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CervscanError(f"{path}: cannot read ({e})") from None


def load_screen_output(out: str | Path) -> ScreenOutput:
    """Read a ``cervscan screen`` output folder; CervscanError if it is not one."""
    import json

    out = Path(out)
    if not out.is_dir():
        raise CervscanError(f"{out}: not a folder (give the output folder of 'cervscan screen')")
    missing = [n for n in ("run.json", "patients.csv", "images.csv") if not (out / n).is_file()]
    if missing:
        raise CervscanError(f"{out}: not a cervscan screen output folder (missing {', '.join(missing)}); "
                            "run 'cervscan screen VISITS -o OUT' first")
    try:
        run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CervscanError(f"{out / 'run.json'}: cannot read ({e})") from None
    if not isinstance(run, dict) or run.get("command", "screen") != "screen" or "models" not in run:
        raise CervscanError(f"{out / 'run.json'}: not the record of a 'cervscan screen' run")
    patients = _read_csv(out / "patients.csv")
    if patients and not {"patient_id", "decision"} <= set(patients[0]):
        raise CervscanError(f"{out / 'patients.csv'}: lacks the columns patient_id and decision")
    images = _read_csv(out / "images.csv")
    skipped = _read_csv(out / "skipped.csv") if (out / "skipped.csv").is_file() else []
    return ScreenOutput(out, run, patients, images, skipped)


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def _i(v: Any, default: int = 0) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return default


def _true(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")


def _fmt(x: float | None, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _score_digits(score: float, thr: float | None) -> int:
    """Decimals that show a score and its threshold apart (3, more only when they would print alike)."""
    nd = 3
    while thr is not None and score != thr and nd < 6 and f"{score:.{nd}f}" == f"{thr:.{nd}f}":
        nd += 1
    return nd


def _pct(x: Any) -> str:
    v = _f(x)
    return "–" if v is None else f"{100 * v:.0f}%"


def _when(stamp: Any) -> str:
    """'2026-11-27T01:48:17+0000' -> '2026-11-27 01:48 (UTC+00:00)'; other text unchanged."""
    if not stamp:
        return "–"
    try:
        t = _dt.datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return str(stamp)
    off = t.strftime("%z")
    return t.strftime("%Y-%m-%d %H:%M") + (f" (UTC{off[:3]}:{off[3:]})" if off else "")


def _short_error(err: str, path: str | None, name: str | None = None) -> str:
    """Error text without the long folder prefix of the file it names (the file name stays)."""
    err = err or ""
    if path and err.startswith(path):
        return Path(path).name + err[len(path):]
    if name:
        k = err.find(f"{name}: ")
        if k > 0 and err[k - 1] in "/\\":
            return err[k:]
    return err


# --------------------------------------------------------------------------- original images

class _Originals:
    """Finds each screened image on disk from the ``path`` column of images.csv."""

    def __init__(self, so: ScreenOutput):
        self.so = so

    @staticmethod
    def path(row: dict) -> Path | None:
        p = (row.get("path") or "").strip()
        return Path(p) if p and Path(p).is_file() else None


def _stems(rows: list[dict]) -> dict[str, str]:
    """File stem of each image's mask/overlay/heatmap: the one ``screen`` wrote, else
    the same naming rule (``cervscan.io.output_stems``) when masks were not written."""
    from .io import output_stems

    fallback = output_stems([r.get("image", "") for r in rows])
    out = {}
    for r in rows:
        rel = r.get("overlay") or r.get("mask")
        out[r.get("image", "")] = Path(rel).stem if rel else fallback[r.get("image", "")]
    return out


def _exam_date_from_files(paths: Iterable[Path]) -> str | None:
    days = set()
    for p in paths:
        try:
            days.add(_dt.date.fromtimestamp(p.stat().st_mtime))
        except OSError:
            continue
    if not days:
        return None
    lo, hi = min(days), max(days)
    s = lo.isoformat() if lo == hi else f"{lo.isoformat()} – {hi.isoformat()}"
    return f"{s} (image file date)"


# --------------------------------------------------------------------------- heatmaps

class HeatmapMaker:
    """Grad-CAM of the run's classifier on CPU, loaded once; ``reason`` says why not when unavailable."""

    def __init__(self, run: dict):
        self.model = None
        self.ckpt: dict | None = None
        self.reason: str | None = None
        info = (run.get("models") or {}).get("classifier") or {}
        path = info.get("path")
        try:
            if not path:
                raise CervscanError("run.json does not name the classifier file")
            p = Path(path)
            if not p.is_file():
                raise CervscanError(f"classifier file {p} not found")
            want = info.get("sha256")
            if want:
                from .weights import sha256_file

                got = sha256_file(p)
                if got != want:
                    raise CervscanError(f"classifier file {p} has changed since the screen "
                                        f"(sha256 {got[:12]}, run used {want[:12]})")
            from .models import model_from_checkpoint, read_checkpoint

            ck = read_checkpoint(p)
            if ck.get("kind") != "classifier":
                raise CervscanError(f"{p} is not a classifier checkpoint")
            self.model = model_from_checkpoint(ck).to("cpu").eval()
            self.ckpt = ck
        except CervscanError as e:
            self.reason = str(e)
        except Exception as e:  # noqa: BLE001 - a report must still build without heatmaps
            self.reason = f"classifier could not be loaded ({type(e).__name__}: {e})"
        if self.reason:
            log.warning("heatmaps unavailable: %s", self.reason)

    @property
    def available(self) -> bool:
        return self.model is not None

    @property
    def frame_view(self) -> bool:
        """The classifier's original view is the whole image (its checkpoint's ``classify_view``)."""
        return bool(self.ckpt) and self.ckpt.get("classify_view") == "frame"

    def input_tensor(self, rgb: np.ndarray, box: tuple[int, int, int, int] | None = None):
        """The classifier's input for an image, built as in :meth:`cervscan.pipeline.Pipeline.prepare`:
        the crop (``box``, in the decoded image's pixels; the whole frame when None) squashed to the
        classifier's input size and normalised with the checkpoint's mean and std."""
        from .pipeline import crop_to_box, resize_square
        from .transforms import to_tensor_batch

        ck = self.ckpt
        assert ck is not None
        size = tuple(int(s) for s in ck["input_size"])
        if self.frame_view:  # the classifier's original view is the whole image (classify_view "frame")
            box = None
        crop = rgb if box is None else crop_to_box(rgb, _check_box(box, rgb))
        original = resize_square(crop, size[0])  # Prepared.original: the crop at the classifier's size
        return to_tensor_batch([resize_square(original, size)], ck["mean"], ck["std"])

    def cam(self, rgb: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Grad-CAM (class 'severe') of the classifier's input (the crop ``box`` of ``rgb``, else the
        whole frame), at the classifier's input size, values in [0, 1]."""
        from .gradcam import grad_cam

        assert self.model is not None
        return grad_cam(self.model, self.input_tensor(rgb, box), class_idx=1)

    def overlay(self, rgb: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """The heatmap blended onto what the classifier saw, at the frame's size.

        Without ``box`` (older outputs) the heatmap covers the whole frame. With a crop box it covers
        the crop, pasted back into the frame at the box, so that it lines up with the original and
        the lesion overlay; outside the crop (never seen by the classifier) the frame is greyed and the
        crop is framed in white."""
        import cv2

        from .gradcam import heatmap_overlay
        from .pipeline import crop_to_box

        cam = self.cam(rgb, box)
        if box is None or self.frame_view:
            return heatmap_overlay(rgb, cam)
        x0, y0, x1, y1 = _check_box(box, rgb)
        h, w = rgb.shape[:2]
        blended = heatmap_overlay(crop_to_box(rgb, (x0, y0, x1, y1)), cam)
        if (x0, y0, x1, y1) == (0, 0, w, h):
            return blended
        grey = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        out = cv2.addWeighted(grey, 0.45, np.full_like(rgb, 200), 0.55, 0)
        out[y0:y1, x0:x1] = blended
        t = max(1, round(max(h, w) / 300))
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (255, 255, 255), t, lineType=cv2.LINE_4)
        return out


def _row_box(r: dict) -> tuple[int, int, int, int] | None:
    """The crop box of an images.csv row (None for older outputs without the column, or an empty value)."""
    from .pipeline import parse_box

    return parse_box(r.get("crop_box"))


def _check_box(box: tuple[int, int, int, int], rgb: np.ndarray) -> tuple[int, int, int, int]:
    """The box when it lies inside the decoded image; CervscanError otherwise (image changed since the screen)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise CervscanError(f"crop box {x0} {y0} {x1} {y1} does not fit the {w}x{h} image "
                            "(image changed since the screen?)")
    return x0, y0, x1, y1


def _read_rgb(path: Path | None, max_side: int = 2048) -> tuple[np.ndarray | None, str | None]:
    if path is None:
        return None, "not found"
    from .io import read_image

    try:
        return read_image(path, max_side=max_side).rgb, None
    except CervscanError as e:
        return None, _short_error(str(e), str(path))
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def write_heatmaps(out: str | Path, patients: list[str] | None = None) -> dict[tuple[str, str], Path | str]:
    """Compute Grad-CAM heatmaps for the screened images of an output folder.

    Writes ``OUT/heatmaps/<patient>/<stem>.jpg`` and returns, per
    (patient_id, image), the written path or the reason none was made. This
    is the hook for a ``--heatmaps`` option of ``screen``; reports call it
    implicitly.
    """
    so = load_screen_output(out)
    wanted = set(patients) if patients else None
    maker = HeatmapMaker(so.run)
    originals = _Originals(so)
    max_side = int((so.run.get("config") or {}).get("max_side") or 2048)
    result: dict[tuple[str, str], Path | str] = {}
    by_pid: dict[str, list[dict]] = {}
    for r in so.images:
        by_pid.setdefault(r.get("patient_id", ""), []).append(r)
    for pid, rows in by_pid.items():
        if wanted is not None and pid not in wanted:
            continue
        stems = _stems(rows)
        for r in rows:
            key = (pid, r.get("image", ""))
            if r.get("status") != "ok":
                result[key] = "image could not be used"
                continue
            if not maker.available:
                result[key] = f"unavailable: {maker.reason}"
                continue
            rgb, why = _read_rgb(originals.path(r), max_side)
            if rgb is None:
                result[key] = f"original image {why}"
                continue
            try:
                blended = maker.overlay(rgb, _row_box(r))
            except CervscanError as e:
                result[key] = f"not computed: {e}"
                continue
            result[key] = _save_heatmap(so.out, pid, stems[key[1]], blended)
    return result


def _save_heatmap(out: Path, pid: str, stem: str, blended: np.ndarray) -> Path:
    from .io import atomic_write_image

    return atomic_write_image(out / "heatmaps" / _file_name(pid) / f"{_file_name(stem)}.jpg", blended)


# --------------------------------------------------------------------------- fonts and styles

def _font_files() -> dict[str, Path] | None:
    """Regular/bold/italic/bold-italic TTFs shipped with a dependency (or with cervscan)."""
    import importlib.util

    cands: list[tuple[Path, tuple[str, str, str, str]]] = []
    dejavu = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf")
    cands.append((Path(__file__).resolve().parent / "fonts", dejavu))
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append((Path(loc) / "mpl-data" / "fonts" / "ttf", dejavu))
    spec = importlib.util.find_spec("reportlab")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append((Path(loc) / "fonts", ("Vera.ttf", "VeraBd.ttf", "VeraIt.ttf", "VeraBI.ttf")))
    for folder, names in cands:
        files = [folder / n for n in names]
        if all(f.is_file() for f in files):
            return dict(zip(("normal", "bold", "italic", "boldItalic"), files))
    return None


def _register_fonts() -> str:
    """Register the embedded font family once; returns its name (Helvetica if no TTF is found)."""
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    if _FONT in pdfmetrics.getRegisteredFontNames():
        return _FONT
    files = _font_files()
    if not files:
        log.warning("no TrueType font found; non-ASCII text may not render")
        return "Helvetica"
    names = {"normal": _FONT, "bold": f"{_FONT}-Bold", "italic": f"{_FONT}-Italic",
             "boldItalic": f"{_FONT}-BoldItalic"}
    for k, f in files.items():
        pdfmetrics.registerFont(TTFont(names[k], str(f)))
    pdfmetrics.registerFontFamily(_FONT, **names)
    return _FONT


def _styles(font: str) -> dict:
    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle

    bold = f"{font}-Bold" if font == _FONT else "Helvetica-Bold"
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
    from reportlab.lib.pagesizes import A4, LETTER

    key = (name or "a4").strip().lower()
    if key not in PAGE_SIZES:
        raise CervscanError(f"page size must be one of {', '.join(PAGE_SIZES)}, got {name!r}")
    return A4 if key == "a4" else LETTER


def _canvas_maker(footer_left: str, font: str):
    """A canvas that writes 'page X of Y' and a footer line on every page."""
    from reportlab.lib import colors
    from reportlab.lib.units import mm
    from reportlab.pdfgen import canvas

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
            self.drawString(x0, 9 * mm, footer_left)
            self.drawRightString(x1, 9 * mm, f"Page {self._pageNumber} of {n}")
            self.restoreState()

    return NumberedCanvas


_MARGIN_MM = 18.0
_FRAME_PAD = 6.0  # points; reportlab's default Frame padding on each side


def _text_width(page_size) -> float:
    """Usable width inside the margins and the frame padding, in points."""
    from reportlab.lib.units import mm

    return page_size[0] - 2 * _MARGIN_MM * mm - 2 * _FRAME_PAD


def _build_pdf(path: Path, story: list, *, page_size, title: str, footer: str, font: str, author: str = "") -> Path:
    from reportlab.lib.units import mm
    from reportlab.platypus import SimpleDocTemplate

    from .io import atomic_write_bytes

    from reportlab import rl_config

    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=page_size, leftMargin=_MARGIN_MM * mm, rightMargin=_MARGIN_MM * mm,
                            topMargin=16 * mm,
                            bottomMargin=20 * mm, title=title, author=author or "cervscan",
                            subject="Colposcopy screening (decision support)", creator=f"cervscan {__version__}")
    a85 = rl_config.useA85
    rl_config.useA85 = 0  # binary streams: smaller files, and no slow pure-Python ASCII85 of the images
    try:
        doc.build(story, canvasmaker=_canvas_maker(footer, font))
    finally:
        rl_config.useA85 = a85
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- building blocks

def _rl_image(rgb: np.ndarray, max_w: float, max_h: float):
    """A reportlab Image of an RGB array, JPEG-encoded at <= _EMBED_MAX_SIDE px, fitted into max_w x max_h."""
    import cv2
    from reportlab.platypus import Image

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


def _decision_colour(decision: str) -> str:
    return DECISION_COLOURS.get(decision, "#d98b00")


def _decision_words(decision: str) -> tuple[str, str]:
    return DECISION_WORDS.get(decision, (decision.replace("_", " ").upper() or "UNKNOWN", ""))


def _software_line(run: dict, p: dict | None = None) -> str:
    ver = str(run.get("cervscan_version") or (p or {}).get("cervscan_version") or __version__)
    if ver == __version__:
        return f"cervscan {escape(ver)}"
    return f"screened with cervscan {escape(ver)}; report written by cervscan {__version__}"


def _file_name(pid: str) -> str:
    """A patient id as a file name: ids come from folder names, but never let one escape OUT/reports
    or overwrite summary.pdf."""
    name = pid.replace("/", "_").replace("\\", "_").replace("\0", "_")
    if name in ("", ".", "..") or name.startswith("."):
        return "_" + name
    return name + "_patient" if name.lower() == "summary" else name  # summary.pdf is the run summary


def _model_line(info: dict) -> str:
    name = info.get("name") or Path(str(info.get("path", "?"))).stem
    ver = info.get("version")
    sha = (info.get("sha256") or "")[:12]
    arch = info.get("arch")
    parts = [f"{escape(str(name))}{'@' + escape(str(ver)) if ver else ''}"]
    if arch:
        parts.append(escape(str(arch)))
    if sha:
        parts.append(f"sha256 {sha}")
    return " · ".join(parts)


def _model_rows(run: dict) -> list[tuple[str, str]]:
    """(label, model line) of every model role in run.json, in the pipeline's order. The lesion
    segmenter and the classifier are always listed (older outputs have only those two)."""
    models = run.get("models") or {}
    rows = [(label, _model_line(models.get(role) or {})) for role, label in MODEL_ROLES
            if role in ("segmenter", "classifier") or isinstance(models.get(role), dict)]
    known = {role for role, _ in MODEL_ROLES}
    rows += [(str(role).capitalize(), _model_line(info)) for role, info in models.items()
             if role not in known and isinstance(info, dict)]
    return rows


def _classify_view(run: dict) -> str:
    """What the classifier's original views showed: 'crop' or 'frame' (older outputs: 'crop')."""
    return str((run.get("config") or {}).get("classify_view") or "crop")


def _pooling(run: dict) -> str:
    """How image scores were combined: 'probability' (mean) or 'logit' (mean of log-odds)."""
    return str(((run.get("config") or {}).get("voting") or {}).get("pooling") or "probability")


def _crop_mode(run: dict) -> str:
    """What the classifier saw: 'cervix', 'centre' or 'frame' (older outputs: 'frame')."""
    return str((run.get("config") or {}).get("crop") or "frame")


def _stage_words(stage: str) -> str:
    return STAGE_WORDS.get(stage, stage.replace("_", " "))


def _stage_counts(p: dict, ok_rows: list[dict]) -> list[tuple[str, int]]:
    """Exam stages of the images used, from patients.csv ('acetic:3;lugol:1'), else counted from the rows."""
    out: list[tuple[str, int]] = []
    for item in (p.get("stages") or "").split(";"):
        name, _, n = item.partition(":")
        if name.strip() and _i(n, 0) > 0:
            out.append((name.strip(), _i(n)))
    if not out:
        counts: dict[str, int] = {}
        for r in ok_rows:
            if (r.get("stage") or "").strip():
                counts[r["stage"].strip()] = counts.get(r["stage"].strip(), 0) + 1
        out = sorted(counts.items())
    return sorted(out, key=lambda kv: (-kv[1], kv[0]))


def _stage_summary(p: dict, ok_rows: list[dict]) -> str:
    """'acetic:3;lugol:1' -> '3 acetic acid, 1 Lugol's iodine' (plain text; '' when no stage is recorded)."""
    return ", ".join(f"{n} {_stage_words(s)}" for s, n in _stage_counts(p, ok_rows))


def _n_no_cervix(p: dict, ok_rows: list[dict]) -> int:
    v = p.get("n_no_cervix")
    if v not in (None, ""):
        return _i(v)
    return sum(str(r.get("cervix_found", "")).strip().lower() == "false" for r in ok_rows)


def _threshold_meaning(run: dict, threshold: float | None) -> str:
    """What the threshold means, from the classifier's validated operating point."""
    cls = (run.get("models") or {}).get("classifier") or {}
    op = cls.get("operating_point")
    if not isinstance(op, dict) or _f(op.get("sensitivity")) is None or _f(op.get("specificity")) is None:
        return ("Sensitivity and specificity at this threshold in validation: <b>not available</b> "
                "(the classifier file records no validated operating point).")
    op_thr = _f(op.get("threshold"))
    if threshold is not None and op_thr is not None and abs(op_thr - threshold) > 1e-6:
        return (f"The threshold used ({threshold:.3f}) is not the classifier's validated operating point "
                f"({op_thr:.3f}); sensitivity and specificity at this threshold are <b>not available</b>. "
                f"At the validated point they were {_pct(op['sensitivity'])} and {_pct(op['specificity'])}.")
    sens, spec = _f(op["sensitivity"]), _f(op["specificity"])

    def ci(key: str) -> str:
        v = op.get(key)
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(_f(x) is not None for x in v):
            return f" (95% CI {_pct(v[0])}–{_pct(v[1])})"
        return ""

    where = []
    if op.get("evaluated_on"):
        where.append(escape(str(op["evaluated_on"])))
    if _i(op.get("patients"), 0):
        where.append(f"{_i(op['patients'])} patients")
    where_s = f" ({', '.join(where)})" if where else ""
    return (f"In validation{where_s}, this threshold gave <b>sensitivity {_pct(sens)}</b>{ci('sensitivity_ci95')} and "
            f"<b>specificity {_pct(spec)}</b>{ci('specificity_ci95')}: about {round(100 * sens)} of 100 patients "
            f"with a severe lesion were flagged severe, and about {round(100 * spec)} of 100 patients without one "
            f"were correctly not flagged.")


def _info_table(rows: list[tuple[str, str]], st: dict, width: float):
    from reportlab.lib import colors
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, Table, TableStyle

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
    from reportlab.lib import colors
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, Table, TableStyle

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


def _decision_box(p: dict, run: dict, st: dict, width: float, next_step: dict[str, str]):
    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.platypus import Paragraph, Table, TableStyle

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


def _eligible(r: dict) -> bool:
    """Whether the image counted towards the decision (older outputs, without the column: yes)."""
    return str(r.get("eligible", "")).strip().lower() not in ("false", "0")


def _reason_words(reason: str) -> str:
    """'stage:saline;blurred' -> 'saline stage, blurred'."""
    out = []
    for item in (reason or "").split(";"):
        item = item.strip()
        if item.startswith("stage:"):
            out.append(f"{_stage_words(item.split(':', 1)[1])} stage (not a deciding stage)")
        elif item:
            out.append(REASON_WORDS.get(item, item.replace("_", " ")))
    return ", ".join(out)


def _grey_out(rgb: np.ndarray | None) -> np.ndarray | None:
    """An image shown greyed (an image that was not used for the decision)."""
    if rgb is None:
        return None
    import cv2

    grey = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(grey, 0.5, np.full_like(rgb, 225), 0.5, 0)


def _quality_words(q: str) -> str:
    """'glare:1/4;dark:2/4' -> 'glare (overexposed areas) in 1 of 4 images; dark (underexposed) in 2 of 4 images'."""
    if not q or q == "ok":
        return ""
    out = []
    for item in q.split(";"):
        name, _, frac = item.partition(":")
        words = QUALITY_WORDS.get(name, name)
        out.append(f"{words} in {frac.replace('/', ' of ')} images" if frac else words)
    return "; ".join(out)


def _caption(r: dict, crop: str | None = None) -> str:
    """One image's caption. ``crop``: the run's crop mode (run.json config 'crop'; None for older outputs)."""
    parts = [f"<b>{escape(r.get('image', ''))}</b>"]
    if not _eligible(r):
        parts.append("<font color='#b35c00'><b>not used for the decision: "
                     + escape(_reason_words(r.get("reason") or "") or "not eligible") + "</b></font>")
    stage = (r.get("stage") or "").strip()
    if stage:
        conf = _f(r.get("stage_confidence"))
        parts.append(escape(_stage_words(stage)) + (f" ({conf:.2f})" if conf is not None else ""))
    found = str(r.get("cervix_found", "")).strip().lower()
    if found == "false":
        parts.append("<font color='#b35c00'>cervix not found: centre crop used</font>")
        of = "of the centre crop"
    elif found == "true":
        cf = _f(r.get("cervix_fraction"))
        parts.append("cervix found" + (f" ({100 * cf:.0f}% of the image)" if cf is not None else ""))
        of = "of the cervix"
    elif crop == "centre":
        parts.append("centre crop (no cervix finder)")
        of = "of the centre crop"
    else:
        of = "of the image"
    lf = _f(r.get("lesion_fraction"))
    if _true(r.get("empty_mask")):
        parts.append("no lesion segmented" + (f" ({100 * lf:.1f}% {of})" if lf else ""))
    elif lf is not None:
        parts.append(f"lesion area {100 * lf:.1f}% {of}")
    score, dec = _f(r.get("score")), r.get("decision") or ""
    if score is not None:
        colour = _decision_colour(dec)
        words = _decision_words(dec)[0].lower()
        thr = _f(r.get("threshold"))
        nd = _score_digits(score, thr)
        near = f" (threshold {thr:.{nd}f})" if nd > 3 else ""
        parts.append(f"image score {score:.{nd}f}{near} → <font color='{colour}'><b>{escape(words)}</b></font>")
    flags = [f for f in (r.get("quality_flags") or "").split(";") if f]
    if flags:
        parts.append("<font color='#b35c00'>quality: " + ", ".join(escape(QUALITY_WORDS.get(f, f)) for f in flags)
                     + "</font>")
    return " · ".join(parts)


def _image_block(r: dict, orig: np.ndarray | None, orig_why: str | None, ovl: np.ndarray | None, ovl_why: str,
                 heat: np.ndarray | None, heat_why: str, st: dict, width: float, crop: str | None = None):
    from reportlab.lib import colors
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, Table, TableStyle

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


def _error_table(rows: list[list[str]], header: list[str], widths: list[float], st: dict):
    from reportlab.lib import colors
    from reportlab.platypus import Paragraph, Table, TableStyle

    data = [[Paragraph(escape(h), st["cellb"]) for h in header]]
    data += [[Paragraph(escape(c), st["cell"]) for c in row] for row in rows]
    t = Table(data, colWidths=widths, repeatRows=1)
    t.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
        ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#bbbbbb")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]))
    return t


# --------------------------------------------------------------------------- per-patient report

@dataclass
class _Options:
    clinic: str | None
    exam_date: str | None
    page_size: Any
    next_step: dict[str, str]
    report_date: str


def _patient_report(so: ScreenOutput, p: dict, opts: _Options, maker: HeatmapMaker | None,
                    originals: _Originals, font: str, st: dict) -> Path:
    from reportlab.lib.units import mm
    from reportlab.platypus import CondPageBreak, KeepTogether, Paragraph, Spacer

    pid = p["patient_id"]
    run = so.run
    rows = so.images_of(pid)
    stems = _stems(rows)
    width = _text_width(opts.page_size)
    max_side = int((run.get("config") or {}).get("max_side") or 2048)
    crop_mode = _crop_mode(run)

    # originals (decoded once: shown, and used for the heatmap)
    paths = {r.get("image", ""): originals.path(r) for r in rows}
    exam = opts.exam_date or _exam_date_from_files(p_ for p_ in paths.values() if p_ is not None) or "not recorded"

    story: list = []
    if opts.clinic:
        story.append(Paragraph(escape(opts.clinic), st["clinic"]))
    story.append(Paragraph("Colposcopy screening report", st["title"]))
    if p.get("decision") == "inadequate":  # what to do, before anything else
        story.append(Paragraph(f"<font color='{_decision_colour('inadequate')}'><b>No result – "
                               f"{escape(str(p.get('reason') or 'retake: no usable image'))}</b></font>", st["base"]))
        story.append(Spacer(1, 2 * mm))
    story.append(_info_table([
        ("Patient ID", f"<b>{escape(pid)}</b>"),
        ("Exam date", escape(exam)),
        ("Report date", escape(opts.report_date)),
        ("Software", _software_line(run, p)),
        *_model_rows(run),
    ], st, width))
    story.append(Spacer(1, 5 * mm))
    story.append(_decision_box(p, run, st, width, opts.next_step))

    ok_rows = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    n_img = _i(p.get("n_images"), len(rows))
    not_eligible = [r for r in ok_rows if not _eligible(r)]
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
    story.append(Spacer(1, 3 * mm))
    story.append(Paragraph(". ".join(facts[:1]) + ("; " + "; ".join(facts[1:]) if len(facts) > 1 else "") + ".",
                           st["base"]))

    if ok_rows:
        story.append(CondPageBreak(70 * mm))
        story.append(Paragraph("Images", st["h2"]))
        boxed = crop_mode in ("cervix", "centre") and any(_row_box(r) for r in ok_rows)
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
        story.append(Paragraph(
            "Left: the original image. Middle: <b>lesion overlay</b> — " + legend + ". Right: " + heat_note,
            st["small"]))
        story.append(Spacer(1, 2 * mm))
        from reportlab.platypus import Table, TableStyle

        heads = Table([[Paragraph("Original", st["colhead"]), Paragraph("Lesion overlay", st["colhead"]),
                        Paragraph("Grad-CAM heatmap", st["colhead"])]], colWidths=[width / 3] * 3)
        heads.setStyle(TableStyle([("TOPPADDING", (0, 0), (-1, -1), 1), ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
                                   ("LEFTPADDING", (0, 0), (-1, -1), 0), ("RIGHTPADDING", (0, 0), (-1, -1), 0)]))
        blocks = [[heads]]
        for r in ok_rows:
            name = r.get("image", "")
            stem = stems[name]
            used = _eligible(r)
            orig, why = _read_rgb(paths.get(name), max_side)
            if paths.get(name) is None:
                why = "original image not found"
            ovl, ovl_why = None, "not written (screen ran with --no-masks)"
            if r.get("overlay"):
                ovl, ovl_why = _read_rgb(so.out / r["overlay"], max_side)
            heat, heat_why = None, "not computed"
            hpath = so.out / "heatmaps" / _file_name(pid) / f"{_file_name(stem)}.jpg"
            if not used:
                heat_why = "not classified: the image was not used for the decision"
            elif maker is not None and maker.available and orig is not None:
                try:
                    heat = maker.overlay(orig, _row_box(r))
                    _save_heatmap(so.out, pid, stem, heat)
                except CervscanError as e:
                    log.warning("%s/%s: heatmap not computed: %s", pid, name, e)
                    heat, heat_why = None, str(e)
                except Exception as e:  # noqa: BLE001 - one image must not stop the report
                    log.warning("%s/%s: heatmap failed: %s", pid, name, e)
                    heat, heat_why = None, f"failed: {type(e).__name__}"
            elif maker is not None:
                if hpath.is_file():  # made earlier for this output folder
                    heat, heat_why = _read_rgb(hpath, max_side)
                else:
                    heat_why = "classifier unavailable" if not maker.available else "original image not found"
            if not used:
                orig, ovl, heat = _grey_out(orig), _grey_out(ovl), None
            blocks.append([_image_block(r, orig, why, ovl, ovl_why or "", heat, heat_why or "", st, width,
                                        crop_mode)])
        # One row per image (image triple + caption never split), column heads repeated on every page.
        grid = Table(blocks, colWidths=[width], repeatRows=1)
        grid.setStyle(TableStyle([("LEFTPADDING", (0, 0), (-1, -1), 0), ("RIGHTPADDING", (0, 0), (-1, -1), 0),
                                  ("TOPPADDING", (0, 0), (-1, -1), 0), ("BOTTOMPADDING", (0, 0), (-1, -1), 0)]))
        story.append(grid)

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

    story.append(Spacer(1, 5 * mm))
    story.append(KeepTogether([Paragraph(escape(STATEMENT), st["statement"]), Spacer(1, 3 * mm),
                               _signature_box(st, width)]))
    footer = f"Patient {pid} · cervscan {__version__} · decision support, not a diagnosis"
    return _build_pdf(so.out / "reports" / f"{_file_name(pid)}.pdf", story, page_size=opts.page_size,
                      title=f"Colposcopy screening report – {pid}", footer=footer, font=font,
                      author=opts.clinic or "")


# --------------------------------------------------------------------------- summary

def _summary_report(so: ScreenOutput, opts: _Options, font: str, st: dict) -> Path:
    from reportlab.lib import colors
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, Spacer, Table, TableStyle

    run = so.run
    width = _text_width(opts.page_size)
    thr = _f(run.get("threshold"))
    if thr is None and so.patients:
        thr = _f(so.patients[0].get("threshold"))

    def key(p: dict):
        d = p.get("decision") or "error"
        return (DECISION_ORDER.get(d, 1), -(_f(p.get("score")) or 0.0), p.get("patient_id", ""))

    pats = sorted(so.patients, key=key)
    counts: dict[str, int] = {}
    for p in pats:
        counts[p.get("decision") or "error"] = counts.get(p.get("decision") or "error", 0) + 1
    n_img = len(so.images)
    n_fail = sum(r.get("status") != "ok" for r in so.images)

    story: list = []
    if opts.clinic:
        story.append(Paragraph(escape(opts.clinic), st["clinic"]))
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
        f"<b>{len(pats)} patient(s)</b>: " + ", ".join(parts) + f". {n_img} image(s) screened"
        + (f", <font color='#b35c00'><b>{n_fail} could not be used</b></font>" if n_fail else "") + ".",
        st["base"]))
    story.append(Spacer(1, 3 * mm))

    header = ["#", "Patient", "Decision", "Score", "Images used", "Image quality / note"]
    data = [[Paragraph(h, st["cellb"]) for h in header]]
    style = [
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
        ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#bbbbbb")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]
    for k, p in enumerate(pats, start=1):
        d = p.get("decision") or "error"
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
        if d == "error" and p.get("error"):
            note.append("see below")
        data.append([
            Paragraph(str(k), st["cell"]),
            Paragraph(escape(p.get("patient_id", "")), st["cellb"]),
            Paragraph(f"<font color='{_decision_colour(d)}'><b>{escape(_decision_words(d)[0].lower())}</b></font>",
                      st["cell"]),
            Paragraph(_fmt(_f(p.get("score"))), st["cell"]),
            Paragraph(f"{_i(p.get('n_eligible', p.get('n_used')))} of {_i(p.get('n_images'))}", st["cell"]),
            Paragraph(escape("; ".join(note)), st["cell"]),
        ])
        if d in DECISION_TINTS:
            style.append(("BACKGROUND", (2, k), (2, k), colors.HexColor(DECISION_TINTS[d])))
    fr = [0.06, 0.27, 0.24, 0.09, 0.12, 0.22]
    t = Table(data, colWidths=[width * f for f in fr], repeatRows=1)
    t.setStyle(TableStyle(style))
    story.append(t)

    errs = [p for p in pats if (p.get("decision") or "error") == "error"]
    if errs:
        story.append(Paragraph(f"Patients without a result ({len(errs)})", st["h2"]))
        story.append(_error_table([[p.get("patient_id", ""), p.get("error") or "no reason recorded"] for p in errs],
                                  ["Patient", "Reason"], [width * 0.3, width * 0.7], st))
    failed = [r for r in so.images if r.get("status") != "ok"]
    if failed:
        story.append(Paragraph(f"Images that could not be used ({len(failed)})", st["h2"]))
        story.append(_error_table(
            [[r.get("patient_id", ""), r.get("image", ""), _short_error(r.get("error", ""), r.get("path"), r.get("image"))]
             for r in failed], ["Patient", "Image", "Reason"], [width * 0.25, width * 0.2, width * 0.55], st))
    story.append(Spacer(1, 6 * mm))
    story.append(Paragraph(escape(STATEMENT), st["statement"]))
    footer = f"Run summary · cervscan {__version__} · decision support, not a diagnosis"
    return _build_pdf(so.out / "reports" / "summary.pdf", story, page_size=opts.page_size,
                      title="Colposcopy screening – run summary", footer=footer, font=font, author=opts.clinic or "")


# --------------------------------------------------------------------------- entry point

def _next_step(cfg: dict) -> dict[str, str]:
    steps = dict(DEFAULT_NEXT_STEP)
    extra = cfg.get("next_step")
    if extra is None:
        return steps
    if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise CervscanError("config key 'next_step' must map decisions (severe, mildly_normal, error, ...) to text")
    steps.update(extra)
    return steps


def write_reports(out: str | Path, *, patients: list[str] | None = None, clinic: str | None = None,
                  exam_date: str | None = None, page_size: str = "a4", config_file: str | Path | None = None,
                  heatmaps: bool = True) -> list[Path]:
    """Write ``OUT/reports/<patient_id>.pdf`` (all patients, or those in ``patients``) and ``summary.pdf``.

    ``clinic`` and the recommended next steps come from the options, else the
    config file (keys ``clinic``, ``next_step``). ``heatmaps=False`` skips the
    Grad-CAM computation. Returns the written paths, the summary last.
    """
    from .config import load_config_file

    psize = _page_size(page_size)
    cfg = load_config_file(config_file) if config_file else {}
    so = load_screen_output(out)
    known = [p.get("patient_id", "") for p in so.patients]
    if patients:
        wanted = list(dict.fromkeys(patients))
        unknown = [x for x in wanted if x not in known]
        if unknown:
            shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
            raise CervscanError(f"unknown patient(s) {', '.join(unknown)} in {so.out} (the run has: {shown or 'none'})")
    else:
        wanted = known
    clinic_name = clinic if clinic is not None else cfg.get("clinic")
    if clinic_name is not None and not isinstance(clinic_name, str):
        raise CervscanError("config key 'clinic' must be text")
    opts = _Options(clinic=clinic_name or None, exam_date=exam_date or None, page_size=psize,
                    next_step=_next_step(cfg), report_date=_dt.date.today().isoformat())
    font = _register_fonts()
    st = _styles(font)
    maker = HeatmapMaker(so.run) if heatmaps and any(r.get("status") == "ok" for r in so.images) else None
    originals = _Originals(so)
    by_id = {p.get("patient_id", ""): p for p in so.patients}
    written = []
    for pid in wanted:
        written.append(_patient_report(so, by_id[pid], opts, maker, originals, font, st))
    written.append(_summary_report(so, opts, font, st))
    return written
