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
:meth:`cervscan.pipeline.steps.Pipeline.prepare`; the heatmap is pasted back into
the frame at the box (outside greyed, the box framed in white) so that it lines
up with the original and the lesion overlay. Rows without ``crop_box`` (older
outputs) get the heatmap of the whole frame. Captions and the patient facts
give the exam stage and the cervix status when images.csv has them; every
model role of run.json (exam stage, cervix finder, lesion segmenter,
classifier) is listed. Missing columns are simply left out.

Before anything is rendered, :func:`check_tables` makes sure that patients.csv,
images.csv and run.json describe the same run (each patient's image count,
screened/failed/deciding counts, models, threshold and score against its rows
of images.csv); tables of different runs, or of a batch run that is still
writing or was interrupted, are refused with the first mismatch. A folder the
reports cannot be written to is refused with its name.

Text uses an embedded TrueType font (DejaVu Sans from matplotlib, else
Bitstream Vera from reportlab: Latin, Greek, Cyrillic, Arabic, Hebrew, many
symbols and the emoticons). A character it lacks (CJK, Devanagari, ...) is set
in the first TrueType font of this machine that has it (fontconfig's list, the
usual font folders; fonts with PostScript outlines, such as the OpenType Noto
CJK, or bitmap-only colour emoji cannot be embedded by reportlab and are
skipped). A patient id with a character no font has, or an invisible one
(zero-width, no-break space, control), is printed with code point escapes as
Python writes them (``pac \\U0001f600 ñ``, ``\\u674e\\u5a1c``; a backslash as
``\\\\``) and a note, and a warning is logged; ids that would still print alike
(composed/decomposed accents) are followed by their exact code points. Right-to-left
ids are put in display order; letters are not shaped (Arabic is printed with
unjoined letters, Indic vowel signs are not reordered). The PDF text keeps the
exact characters (ToUnicode in UTF-16, so characters beyond U+FFFF such as
emoji survive search, copy and extraction). Report file names are the patient
id when it is a portable file name, else a cleaned id with a hash suffix
(:func:`_file_names`). PDFs are written atomically.
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

from cervscan import __version__
from cervscan.errors import CervscanError

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
    ledger: Any = None  # cervscan.files.OutputLedger when reports are written: what cervscan may overwrite

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
    so = ScreenOutput(out, run, patients, images, skipped)
    check_tables(so)
    return so


def check_tables(so: ScreenOutput) -> None:
    """CervscanError unless patients.csv, images.csv (and the counts in run.json) describe the same run.

    Each patient must appear once in patients.csv, and images.csv must hold exactly its images: as many
    as ``n_images``, with ``n_used`` screened, ``n_failed`` failed and ``n_eligible`` deciding, the same
    models and threshold, and a score that is the mean of its deciding images' scores. Every image row
    must belong to a patient of patients.csv, once. A report must never print one run's decision beside
    another run's images. Columns an older output lacks are not checked."""
    pat_file, img_file = so.out / "patients.csv", so.out / "images.csv"
    is_batch = bool(so.run.get("batch")) or (so.out / ".cervscan" / "batch.sqlite").is_file()

    def refuse(what: str) -> None:
        if is_batch:
            advice = ("this is a 'cervscan batch' output folder: a batch run may be writing it or was interrupted; "
                      "run the batch again (or wait for it to finish), then the report")
        else:
            advice = ("the tables come from different runs; screen again ('cervscan screen VISITS -o OUT') "
                      "instead of mixing tables of different output folders")
        raise CervscanError(f"{pat_file} and {img_file} do not belong together: {what}; {advice}")

    if so.images and not {"patient_id", "status"} <= set(so.images[0]):
        raise CervscanError(f"{img_file}: lacks the columns patient_id and status")
    by_pid: dict[str, list[dict]] = {}
    for p in so.patients:
        pid = p.get("patient_id", "")
        if pid in by_pid:
            refuse(f"patient {pid!r} appears more than once in patients.csv")
        by_pid[pid] = []
    seen: set[tuple[str, str]] = set()
    for r in so.images:
        pid, name = r.get("patient_id", ""), r.get("image", "")
        if pid not in by_pid:
            refuse(f"images.csv has image {name!r} of patient {pid!r}, who is not in patients.csv")
        if name and (pid, name) in seen:
            refuse(f"image {name!r} of patient {pid!r} appears more than once in images.csv")
        seen.add((pid, name))
        by_pid[pid].append(r)

    for p in so.patients:
        pid = p.get("patient_id", "")
        rows = by_pid[pid]
        ok = [r for r in rows if r.get("status") == "ok"]
        eligible = [r for r in ok if _eligible(r)]
        who = f"patient {pid!r}"
        decision = (p.get("decision") or "").strip()
        counts = [("n_images", len(rows), "image(s)")]
        if decision != "error":  # a visit that could not be decided keeps its images but counts none as used
            counts += [("n_used", len(ok), "screened image(s)"), ("n_failed", len(rows) - len(ok), "failed image(s)"),
                       ("n_eligible", len(eligible), "image(s) used for the decision")]
        for col, have, words in counts:
            want = p.get(col)
            if want not in (None, "") and _i(want, -1) != have:
                refuse(f"{who}: patients.csv counts {want} {words} ({col}), images.csv has {have}")
        for col in ("stage_model", "cervix_model", "seg_model", "cls_model"):
            want = (p.get(col) or "").strip()
            for r in rows:
                got = (r.get(col) or "").strip()
                if want and got and got != want:
                    refuse(f"{who}: patients.csv has {col} {want}, images.csv has {got} (image {r.get('image', '')!r})")
        thr = _f(p.get("threshold"))
        for r in rows:
            t = _f(r.get("threshold"))
            if thr is not None and t is not None and abs(t - thr) > 1e-6:
                refuse(f"{who}: patients.csv has threshold {thr:g}, images.csv has {t:g} "
                       f"(image {r.get('image', '')!r})")
        score = _f(p.get("score"))
        if decision in ("severe", "mildly_normal") and score is None:
            refuse(f"{who}: patients.csv has decision {decision} but no score")
        if score is not None and decision != "error":
            image_scores = [_f(r.get("score")) for r in eligible]
            if not image_scores or any(s is None for s in image_scores):
                refuse(f"{who}: patients.csv has score {score:.6f}, images.csv has no score for "
                       f"{sum(s is None for s in image_scores) or 'any'} of the images used")
            if not _score_matches(score, [s for s in image_scores if s is not None]):
                mean = float(np.mean([s for s in image_scores if s is not None]))
                refuse(f"{who}: patients.csv has score {score:.6f}, the mean of its {len(image_scores)} image "
                       f"score(s) in images.csv is {mean:.6f}")

    counts = so.run.get("counts")
    if not is_batch and isinstance(counts, dict):  # a batch rewrites its tables before run.json
        for key, have, name in (("patients", len(so.patients), "patients.csv"),
                                ("images", len(so.images), "images.csv")):
            want = counts.get(key)
            if isinstance(want, int) and want != have:
                raise CervscanError(f"{so.out / 'run.json'} and {so.out / name} do not belong together: run.json "
                                    f"counts {want} {key}, {name} has {have}; screen again ('cervscan screen "
                                    "VISITS -o OUT') instead of mixing files of different output folders")


def _score_matches(score: float, image_scores: list[float]) -> bool:
    """Whether a patient score is the mean of its image scores, of the probabilities or of their log-odds
    (either pooling; the tables keep 6 decimals)."""
    from cervscan.pipeline.vote import aggregate_patient

    for pooling in ("probability", "logit"):
        s, _ = aggregate_patient(image_scores, 0.5, pooling)
        if s is not None and abs(s - score) <= 1e-3:
            return True
    # log-odds of scores rounded to 0 or 1 are not known to 1e-3: those cannot be checked
    return any(s < 1e-4 or s > 1 - 1e-4 for s in image_scores)


def _check_writable(folder: Path) -> None:
    """CervscanError, naming the folder, unless the reports can be written into it."""
    import os
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cervscan-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CervscanError(f"{folder}: cannot write the reports ({e.strerror or e}); make the output folder "
                            "writable, or copy it to a writable place") from None


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
    the same naming rule (``cervscan.files.output_stems``) when masks were not written."""
    from cervscan.files import output_stems

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
                from cervscan.models.registry import sha256_file

                got = sha256_file(p)
                if got != want:
                    raise CervscanError(f"classifier file {p} has changed since the screen "
                                        f"(sha256 {got[:12]}, run used {want[:12]})")
            from cervscan.models.networks import model_from_checkpoint, read_checkpoint

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
        """The classifier's input for an image, built as in :meth:`cervscan.pipeline.steps.Pipeline.prepare`:
        the crop (``box``, in the decoded image's pixels; the whole frame when None) squashed to the
        classifier's input size and normalised with the checkpoint's mean and std."""
        from cervscan.pipeline.steps import crop_to_box, resize_square
        from cervscan.pipeline.transforms import to_tensor_batch

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
        from cervscan.report.gradcam import grad_cam

        assert self.model is not None
        return grad_cam(self.model, self.input_tensor(rgb, box), class_idx=1)

    def overlay(self, rgb: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """The heatmap blended onto what the classifier saw, at the frame's size.

        Without ``box`` (older outputs) the heatmap covers the whole frame. With a crop box it covers
        the crop, pasted back into the frame at the box, so that it lines up with the original and
        the lesion overlay; outside the crop (never seen by the classifier) the frame is greyed and the
        crop is framed in white."""
        import cv2

        from cervscan.report.gradcam import heatmap_overlay
        from cervscan.pipeline.steps import crop_to_box

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
    from cervscan.pipeline.steps import parse_box

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
    from cervscan.files import read_image

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
    names = _file_names(p.get("patient_id", "") for p in so.patients)
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
            try:
                result[key] = _save_heatmap(so, names[pid], stems[key[1]], blended)
            except (OSError, CervscanError) as e:
                result[key] = f"not saved: {e.strerror or e}"
    return result


def _keep_heatmap(so: "ScreenOutput", folder: str, stem: str, blended: np.ndarray) -> None:
    """Save a heatmap that a report shows; when its file cannot be written (or a file cervscan did not
    create is in its place) the report still shows it."""
    try:
        _save_heatmap(so, folder, stem, blended)
    except (OSError, CervscanError) as e:
        log.warning("%s: heatmap file not saved (%s); the report shows the heatmap",
                    so.out / "heatmaps" / folder / f"{_safe_stem(stem)}.jpg", getattr(e, "strerror", None) or e)


def _save_heatmap(so: "ScreenOutput", folder: str, stem: str, blended: np.ndarray) -> Path:
    """Write ``OUT/heatmaps/<folder>/<stem>.jpg`` (``folder``: the patient's :func:`_file_names` name),
    claimed in the output ledger first, so that a file cervscan did not create is never replaced."""
    from cervscan.files import atomic_write_image

    rel = Path("heatmaps") / folder / f"{_safe_stem(stem)}.jpg"
    if so.ledger is not None:
        so.ledger.claim([rel])
    return atomic_write_image(so.out / rel, blended)


# --------------------------------------------------------------------------- fonts and styles

def _font_files() -> dict[str, Path] | None:
    """Regular/bold/italic/bold-italic TTFs shipped with a dependency (or with cervscan)."""
    import importlib.util

    cands: list[tuple[Path, tuple[str, str, str, str]]] = []
    dejavu = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf")
    cands.append((Path(__file__).resolve().parents[1] / "fonts", dejavu))
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


# --------------------------------------------------------------------------- text in any script

def _font_dirs() -> list[Path]:
    """Font folders searched for fallback fonts (besides what fontconfig's ``fc-list`` lists)."""
    import os
    import sys

    home = Path.home()
    dirs = [home / ".fonts", home / ".local" / "share" / "fonts", Path("/usr/share/fonts"),
            Path("/usr/local/share/fonts")]
    if os.environ.get("XDG_DATA_HOME"):
        dirs.insert(0, Path(os.environ["XDG_DATA_HOME"]) / "fonts")
    if sys.platform == "darwin":
        dirs += [home / "Library" / "Fonts", Path("/Library/Fonts"), Path("/System/Library/Fonts"),
                 Path("/System/Library/Fonts/Supplemental")]
    if os.name == "nt":
        dirs += [Path(os.environ.get("WINDIR", r"C:\Windows")) / "Fonts"]
        if os.environ.get("LOCALAPPDATA"):
            dirs.append(Path(os.environ["LOCALAPPDATA"]) / "Microsoft" / "Windows" / "Fonts")
    return dirs


@dataclass
class _FontCandidate:
    """A font file (and face, in a .ttc collection) that may hold characters the base font lacks."""
    path: Path
    index: int = 0
    ranges: list[tuple[int, int]] | None = None  # code point ranges, as fontconfig lists them
    _cmap: set[int] | None = None

    def covers(self, cp: int) -> bool:
        if self.ranges is not None:
            import bisect

            k = bisect.bisect_right(self.ranges, (cp, 0x7FFFFFFF)) - 1
            return k >= 0 and self.ranges[k][0] <= cp <= self.ranges[k][1]
        if self._cmap is None:
            self._cmap = _read_cmap(self.path, self.index)
        return cp in self._cmap


def _read_cmap(path: Path, index: int) -> set[int]:
    """Code points of a TrueType-outline font (empty for PostScript/CFF outlines and bitmap-only fonts,
    which reportlab cannot embed, and for files that cannot be read)."""
    try:
        from fontTools.ttLib import TTFont as FTFont  # a dependency of matplotlib

        with FTFont(str(path), fontNumber=index, lazy=True) as f:
            return set(f.getBestCmap() or ()) if "glyf" in f else set()
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - a broken font file is just not used
        return set()
    try:
        from reportlab.pdfbase.ttfonts import TTFontFile

        return set(TTFontFile(str(path), subfontIndex=index).charToGlyph)
    except Exception:  # noqa: BLE001
        return set()


def _fontconfig_candidates() -> list[_FontCandidate]:
    """TrueType fonts fontconfig knows, with their character ranges (none when fc-list is not installed)."""
    import shutil
    import subprocess

    exe = shutil.which("fc-list")
    if not exe:
        return []
    try:
        res = subprocess.run([exe, "--format", "%{file}\t%{index}\t%{fontformat}\t%{charset}\n"],
                             capture_output=True, text=True, timeout=30, errors="replace")
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("fc-list failed: %s", e)
        return []
    out = []
    for line in res.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) != 4 or parts[2].strip() != "TrueType":
            continue
        ranges = []
        for item in parts[3].split():
            lo, _, hi = item.partition("-")
            try:
                ranges.append((int(lo, 16), int(hi or lo, 16)))
            except ValueError:
                continue
        try:
            index = int(parts[1]) & 0xFFFF  # named instances of variable fonts: face in the low 16 bits
        except ValueError:
            index = 0
        out.append(_FontCandidate(Path(parts[0]), index, sorted(ranges)))
    return out


def _folder_candidates() -> list[_FontCandidate]:
    """Font files in the usual font folders and matplotlib's DejaVu and STIX fonts (cmaps read when needed)."""
    import importlib.util

    files: list[Path] = []
    for d in _font_dirs():
        if d.is_dir():
            try:
                files += sorted(p for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".ttc", ".otf"))
            except OSError:
                continue
    spec = importlib.util.find_spec("matplotlib")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        ttf = Path(loc) / "mpl-data" / "fonts" / "ttf"
        if ttf.is_dir():
            files += sorted(p for p in ttf.glob("*.ttf") if p.name.startswith(("DejaVu", "STIX")))
    out = []
    for p in files:
        n = 1
        if p.suffix.lower() == ".ttc":
            try:
                with open(p, "rb") as f:
                    head = f.read(12)
                n = int.from_bytes(head[8:12], "big") if head[:4] == b"ttcf" else 0
            except OSError:
                n = 0
        out += [_FontCandidate(p, i) for i in range(min(n, 64))]
    return out


def _font_candidates() -> list[_FontCandidate]:
    """Fallback font candidates on this machine, regular sans-serif faces first. Fonts whose glyphs are
    placeholders for whole Unicode blocks (Last Resort) are left out: they would print two different
    ids alike."""
    seen: set[tuple[str, int]] = set()
    out = []
    for c in [*_fontconfig_candidates(), *_folder_candidates()]:
        key = (str(c.path), c.index)
        if key in seen or "lastresort" in c.path.name.lower():
            continue
        seen.add(key)
        out.append(c)

    def rank(c: _FontCandidate):
        n = c.path.name.lower()
        styled = any(w in n for w in ("bold", "italic", "oblique", "light", "thin", "black", "mono", "condensed"))
        return ("sans" not in n, styled, str(c.path), c.index)

    return sorted(out, key=rank)


#: Characters never printed as they are, but as code points: controls, format characters (zero width,
#: direction overrides), private-use, unassigned and surrogate code points, and spaces other than
#: U+0020 (invisible, or looking like other characters).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cn", "Cs", "Zl", "Zp", "Zs"})


def _hidden(ch: str) -> bool:
    import unicodedata

    return ch != " " and unicodedata.category(ch) in _HIDDEN_CATEGORIES


def _code_point(ch: str) -> str:
    """One character as a code point escape, as Python writes it: ``\\xe9``, ``\\u674e``, ``\\U0001f600``
    (a backslash as ``\\\\``)."""
    o = ord(ch)
    if ch == "\\":
        return "\\\\"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _char_name(ch: str) -> str:
    import unicodedata

    return f"U+{ord(ch):04X} {unicodedata.name(ch, '')}".strip()


class _FontChain:
    """The report font and, for characters it lacks, TrueType fonts found on this machine (fontconfig,
    the usual font folders, matplotlib's fonts). ``font_for(ch)`` names the first font that has the
    character, registered with reportlab (embedded as a subset when used), or None."""

    def __init__(self, base: str):
        from reportlab.pdfbase import pdfmetrics

        self.base = base
        if base == _FONT:
            faces = [pdfmetrics.getFont(n).face for n in (_FONT, f"{_FONT}-Bold")]
            self.base_cover = set(faces[0].charToGlyph) & set(faces[1].charToGlyph)
        else:  # a standard PDF font: Latin-1
            self.base_cover = set(range(0x20, 0x7F)) | set(range(0xA0, 0x100))
        self._candidates: list[_FontCandidate] | None = None
        self._registered: dict[tuple[str, int], str | None] = {}
        self._by_char: dict[str, str | None] = {}

    def font_for(self, ch: str) -> str | None:
        if ord(ch) in self.base_cover:
            return self.base
        if ch not in self._by_char:
            self._by_char[ch] = self._find(ord(ch))
        return self._by_char[ch]

    def _find(self, cp: int) -> str | None:
        if self._candidates is None:
            self._candidates = _font_candidates()
        for c in self._candidates:
            if c.covers(cp):
                name = self._register(c)
                if name and self._has(name, cp):
                    return name
        return None

    @staticmethod
    def _has(name: str, cp: int) -> bool:
        from reportlab.pdfbase import pdfmetrics

        return cp in pdfmetrics.getFont(name).face.charToGlyph

    def _register(self, c: _FontCandidate) -> str | None:
        import hashlib

        from reportlab.pdfbase import pdfmetrics
        from reportlab.pdfbase.ttfonts import TTFont

        key = (str(c.path), c.index)
        if key not in self._registered:
            # named after the file, so that a name always means the same font in this process
            digest = hashlib.sha1(f"{c.path}:{c.index}".encode("utf-8", "surrogateescape")).hexdigest()
            name = f"{_FONT}-F{digest[:10]}"
            try:
                if name not in pdfmetrics.getRegisteredFontNames():
                    pdfmetrics.registerFont(TTFont(name, str(c.path), subfontIndex=c.index))
                    pdfmetrics.registerFontFamily(name, normal=name, bold=name, italic=name, boldItalic=name)
                log.debug("fallback font %s: %s (face %d)", name, c.path, c.index)
            except Exception as e:  # noqa: BLE001 - PostScript outlines, bitmap-only or broken: not usable
                log.debug("font %s (face %d) not usable: %s", c.path, c.index, e)
                name = None
            self._registered[key] = name
        return self._registered[key]

    def missing(self, text: str) -> list[str]:
        """The characters of ``text`` that are printed as code points (no font has them, or hidden)."""
        return list(dict.fromkeys(ch for ch in text if _hidden(ch) or self.font_for(ch) is None))

    def markup(self, text: str, *, reorder: bool = True) -> tuple[str, str, list[str]]:
        """Paragraph markup of a name or id: (markup, the text as printed, characters printed as code points).

        Each character is set in the first font that has it; when a character is in no font (or is
        hidden), every such character and every backslash is written as a code point escape
        (:func:`_code_point`), so that the printed text still tells the id apart from every other.
        Right-to-left letters are put in display order (:func:`_visual_order`). ``reorder=False``: free
        text (a message), kept in its order, with line breaks and other spaces as plain spaces."""
        if not reorder:
            import unicodedata

            text = "".join(" " if unicodedata.category(ch) in ("Cc", "Zs", "Zl", "Zp") else ch for ch in text)
        missing = self.missing(text)
        shown = "".join(_code_point(ch) if ch in missing or (missing and ch == "\\") else ch for ch in text)
        if reorder:
            shown = _visual_order(shown)
        out, run, run_font = [], [], self.base
        for ch in shown:
            f = self.font_for(ch) or self.base
            if f != run_font and run:
                out.append(_in_font("".join(run), run_font, self.base))
                run = []
            run_font = f
            run.append(ch)
        if run:
            out.append(_in_font("".join(run), run_font, self.base))
        return "".join(out), shown, missing


def _in_font(text: str, font: str, base: str) -> str:
    return escape(text) if font == base else f"<font face='{font}'>{escape(text)}</font>"


_CHAIN: _FontChain | None = None


def _font_chain() -> _FontChain:
    """The process's font chain (the report font registered first)."""
    global _CHAIN
    base = _register_fonts()
    if _CHAIN is None or _CHAIN.base != base:
        _CHAIN = _FontChain(base)
    return _CHAIN


def _markup(text: str, *, reorder: bool = True) -> str:
    """Paragraph markup of a name (an image or file name, a clinic; ``reorder=False``: free text such as an
    error message): every character in a font that has it, or as a code point escape."""
    return _font_chain().markup(str(text), reorder=reorder)[0]


#: Paired brackets (Unicode BidiBrackets, the common ones) and their mirror images.
_BRACKETS = {"(": ")", "[": "]", "{": "}", "«": "»", "‹": "›"}
_MIRROR = {**_BRACKETS, **{c: o for o, c in _BRACKETS.items()}, "<": ">", ">": "<"}


def _visual_order(text: str) -> str:
    """A one-line text in display order, left to right (the Unicode bidirectional algorithm for a
    left-to-right line without embeddings: rules W1-W7, N0 (simplified), N1-N2, I1, L1, L2, L4): runs
    of right-to-left letters (Hebrew, Arabic) are reversed, numbers inside them keep their order,
    brackets inside them are mirrored, and combining marks stay after their base letter. PDF text is
    in display order; PDF readers and text extraction give the logical order back. Text without
    right-to-left letters is returned unchanged."""
    import unicodedata

    types = [unicodedata.bidirectional(c) or "L" for c in text]
    if not any(t in ("R", "AL") for t in types):
        return text
    n = len(text)
    for i, t in enumerate(types):  # W1
        if t == "NSM":
            types[i] = types[i - 1] if i else "L"
    last = "L"
    for i, t in enumerate(types):  # W2, W3
        if t in ("L", "R", "AL"):
            last = t
        elif t == "EN" and last == "AL":
            types[i] = "AN"
    types = ["R" if t == "AL" else t for t in types]
    for i in range(1, n - 1):  # W4
        if types[i] == "ES" and types[i - 1] == types[i + 1] == "EN":
            types[i] = "EN"
        elif types[i] == "CS" and types[i - 1] == types[i + 1] and types[i - 1] in ("EN", "AN"):
            types[i] = types[i - 1]
    i = 0
    while i < n:  # W5
        j = i
        while j < n and types[j] == "ET":
            j += 1
        if j > i and ((i > 0 and types[i - 1] == "EN") or (j < n and types[j] == "EN")):
            types[i:j] = ["EN"] * (j - i)
        i = max(j, i + 1)
    types = ["ON" if t in ("ES", "ET", "CS") else t for t in types]  # W6
    last = "L"
    for i, t in enumerate(types):  # W7
        if t in ("L", "R"):
            last = t
        elif t == "EN" and last == "L":
            types[i] = "L"

    def strong(t: str) -> str | None:
        return "L" if t == "L" else "R" if t in ("R", "EN", "AN") else None

    stack: list[tuple[str, int]] = []
    for i, ch in enumerate(text):  # N0: a bracket pair takes the direction of what it encloses, in context
        if types[i] != "ON":
            continue
        if ch in _BRACKETS:
            stack.append((_BRACKETS[ch], i))
        elif ch in _MIRROR and any(c == ch for c, _ in stack):
            while stack[-1][0] != ch:
                stack.pop()
            o = stack.pop()[1]
            inside = {strong(t) for t in types[o + 1:i]}
            if "L" in inside:
                types[o] = types[i] = "L"
            elif "R" in inside:
                before = next((strong(t) for t in reversed(types[:o]) if strong(t)), "L")
                types[o] = types[i] = before
    i = 0
    while i < n:  # N1, N2
        if strong(types[i]) is None:
            j = i
            while j < n and strong(types[j]) is None:
                j += 1
            before = strong(types[i - 1]) if i > 0 else "L"
            after = strong(types[j]) if j < n else "L"
            types[i:j] = [before if before == after else "L"] * (j - i)
            i = j
        else:
            i += 1
    levels = [0 if t == "L" else 1 if t == "R" else 2 for t in types]  # I1
    k = n
    while k > 0 and unicodedata.bidirectional(text[k - 1]) in ("WS", "S", "B"):  # L1
        k -= 1
        levels[k] = 0
    clusters: list[tuple[int, str]] = []  # a letter with its combining marks
    for i, ch in enumerate(text):
        if levels[i] % 2:  # L4: a bracket in a right-to-left run is drawn mirrored
            ch = _MIRROR.get(ch, ch)
        if clusters and unicodedata.category(ch).startswith("M"):
            clusters[-1] = (clusters[-1][0], clusters[-1][1] + ch)
        else:
            clusters.append((levels[i], ch))
    for lv in range(max(lv for lv, _ in clusters), 0, -1):  # L2
        i = 0
        while i < len(clusters):
            if clusters[i][0] >= lv:
                j = i
                while j < len(clusters) and clusters[j][0] >= lv:
                    j += 1
                clusters[i:j] = clusters[i:j][::-1]
                i = j
            else:
                i += 1
    return "".join(s for _, s in clusters)


#: Scripts whose letters change shape or order when set (Arabic joining, Indic vowel signs and
#: conjuncts, ...): reportlab sets them letter by letter.
_SHAPED_SCRIPTS = ((0x0600, 0x08FF, "Arabic"), (0x0700, 0x074F, "Syriac"), (0x0900, 0x0DFF, "Indic"),
                   (0x0F00, 0x0FFF, "Tibetan"), (0x1000, 0x109F, "Myanmar"), (0x1780, 0x17FF, "Khmer"),
                   (0x1800, 0x18AF, "Mongolian"), (0xFB50, 0xFDFF, "Arabic"), (0xFE70, 0xFEFF, "Arabic"))


def _unshaped_scripts(text: str) -> list[str]:
    out = []
    for ch in text:
        for lo, hi, name in _SHAPED_SCRIPTS:
            if lo <= ord(ch) <= hi and name not in out:
                out.append(name)
    return out


@dataclass
class _IdText:
    markup: str  # the id as printed (paragraph markup)
    shown: str  # the id as printed (plain text, display order)
    missing: list[str]  # characters printed as code points
    exact: str = ""  # the exact id as code points, when another id of the run would print alike


class _IdDisplay:
    """How each patient id of a run is printed: as written, every character in a font that has it; where
    no font on this machine has a character, with code point escapes and a note; and where two ids would
    still look alike (Unicode normalisation, display order), each followed by its exact code points."""

    def __init__(self, ids: Iterable[str]):
        import unicodedata

        chain = _font_chain()
        self._ids: dict[str, _IdText] = {}
        seen: dict[str, list[str]] = {}
        unshaped: dict[str, int] = {}
        for pid in dict.fromkeys(ids):
            markup, shown, missing = chain.markup(pid)
            self._ids[pid] = _IdText(markup, shown, missing)
            seen.setdefault(unicodedata.normalize("NFKC", shown), []).append(pid)
            if missing:
                log.warning("patient id %r: %s; the reports print it with code points as %s", pid,
                            _why_code_points(missing, hint=True), shown)
            for script in _unshaped_scripts(pid) if not missing else ():
                unshaped[script] = unshaped.get(script, 0) + 1
        for script, n in unshaped.items():
            log.info("%d patient id(s) in %s script: printed letter by letter, without text shaping (letters "
                     "unjoined, vowel signs not reordered); the characters themselves are exact", n, script)
        for group in seen.values():
            if len(group) > 1:
                for pid in group:
                    self._ids[pid].exact = pid.encode("unicode_escape").decode("ascii")
                log.warning("patient ids %s would print alike; the reports add their exact code points",
                            ", ".join(self._ids[p].exact for p in group))

    def get(self, pid: str) -> _IdText:
        if pid not in self._ids:
            markup, shown, missing = _font_chain().markup(pid)
            self._ids[pid] = _IdText(markup, shown, missing)
        return self._ids[pid]

    def markup(self, pid: str, *, bold: bool = False, note: str = "full") -> str:
        """The id as paragraph markup, followed (smaller, on a new line) by why it has code points and by
        its exact code points when another id would print alike. ``note``: "full"; "short" (only that
        it has code points); "inline" (one line: only the exact code points, in brackets)."""
        t = self.get(pid)
        out = f"<b>{t.markup}</b>" if bold else t.markup
        if note == "inline":
            return out + (f" (exact id: {escape(t.exact)})" if t.exact else "")
        if t.missing:
            why = "written with code points" + ("" if note == "short" else ": " + _why_code_points(t.missing))
            out += f"<br/><font size='7'>{escape(why)}</font>"
        if t.exact:
            out += f"<br/><font size='7'>exact id: {escape(t.exact)}</font>"
        return out


def _why_code_points(chars: list[str], hint: bool = False) -> str:
    """Why these characters of an id are printed as code points, naming them (``hint``: and what to do)."""
    hidden = [c for c in chars if _hidden(c)]
    absent = [c for c in chars if not _hidden(c)]
    parts = []
    if absent:
        parts.append("no font on this computer has " + ", ".join(_char_name(c) for c in absent)
                     + (" (install a TrueType font that has it to print the id as written)" if hint else ""))
    if hidden:
        parts.append("invisible or look-alike " + ", ".join(_char_name(c) for c in hidden))
    return "; ".join(parts)


# --------------------------------------------------------------------------- file names

#: Stems no report may have: the run summary, and names Windows reserves for devices.
_RESERVED_STEMS = frozenset({"summary", "con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
                             *(f"lpt{i}" for i in range(10))})
_UNSAFE_CHARS = frozenset('/\\:*?"<>|')


def _safe_stem(name: str) -> str:
    """A name as one file-name component: path separators and NUL replaced, never hidden, '.' or '..'."""
    name = name.replace("/", "_").replace("\\", "_").replace("\0", "_")
    if name in ("", ".", "..") or name.startswith("."):
        return "_" + name
    return name


def _file_name(pid: str) -> str:
    """A patient id as the stem of its report (``OUT/reports/<stem>.pdf``) and heatmap folder: the id
    itself when it is a portable file name; otherwise the id with characters that file systems refuse
    replaced by ``_``, shortened to 180 bytes if need be, and followed by ``~`` and 8 hex digits of a
    hash of the exact id, so that it never escapes OUT/reports, never replaces summary.pdf and never
    meets another id's file."""
    import hashlib
    import unicodedata

    from cervscan.files import clean_text

    shown = clean_text(pid)  # bytes of a name that is not UTF-8 (lone surrogates) as \xNN
    name = "".join("_" if ch in _UNSAFE_CHARS or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")
                   else ch for ch in shown)
    name = name.rstrip(". ")  # Windows drops trailing dots and spaces
    if name.startswith((".", " ")) or not name:
        name = "_" + name
    raw = name.encode("utf-8")
    reserved = name.split(".")[0].strip().casefold() in _RESERVED_STEMS
    if name == pid and len(raw) <= 200 and not reserved:
        return name
    digest = hashlib.sha256(pid.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return raw[:180].decode("utf-8", "ignore") + "~" + digest


def _file_names(ids: Iterable[str]) -> dict[str, str]:
    """:func:`_file_name` of each id, with the hash suffix also on ids whose names would otherwise be
    the same on a file system that ignores letter case or Unicode normalisation (Windows, macOS)."""
    import hashlib
    import unicodedata

    names = {pid: _file_name(pid) for pid in dict.fromkeys(ids)}
    groups: dict[str, list[str]] = {}
    for pid, name in names.items():
        groups.setdefault(unicodedata.normalize("NFC", name).casefold(), []).append(pid)
    for group in groups.values():
        if len(group) > 1:
            for pid in group:
                if names[pid] == pid:
                    digest = hashlib.sha256(pid.encode("utf-8", "surrogatepass")).hexdigest()[:8]
                    names[pid] = pid.encode("utf-8")[:180].decode("utf-8", "ignore") + "~" + digest
    return names


# --------------------------------------------------------------------------- styles

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
    """A canvas that writes 'page X of Y' and a footer line (``footer_left``: paragraph markup) on every page."""
    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.pdfgen import canvas
    from reportlab.platypus import Paragraph

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


_MARGIN_MM = 18.0
_FRAME_PAD = 6.0  # points; reportlab's default Frame padding on each side


def _text_width(page_size) -> float:
    """Usable width inside the margins and the frame padding, in points."""
    from reportlab.lib.units import mm

    return page_size[0] - 2 * _MARGIN_MM * mm - 2 * _FRAME_PAD


def _utf16_cmap(make):
    """reportlab's ToUnicode CMap maker, with characters above U+FFFF written in UTF-16 as the PDF standard
    wants (reportlab writes their code point, ``<1F600>``, which PDF readers reject: such a character,
    e.g. an emoji in a patient id, would be lost when the text is searched, copied or extracted)."""
    import re

    def utf16(m) -> str:
        return m.group(1) + "<" + chr(int(m.group(2), 16)).encode("utf-16-be").hex().upper() + ">"

    def make_cmap(fontname, subset):
        return re.sub(r"^(<[0-9A-F]{2}> )<([0-9A-F]{5,6})>$", utf16, make(fontname, subset), flags=re.M)

    return make_cmap


def _build_pdf(path: Path, story: list, *, page_size, title: str, footer: str, font: str, author: str = "") -> Path:
    from reportlab.lib.units import mm
    from reportlab.platypus import SimpleDocTemplate

    from cervscan.files import atomic_write_bytes

    from reportlab import rl_config

    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=page_size, leftMargin=_MARGIN_MM * mm, rightMargin=_MARGIN_MM * mm,
                            topMargin=16 * mm,
                            bottomMargin=20 * mm, title=title, author=author or "cervscan",
                            subject="Colposcopy screening (decision support)", creator=f"cervscan {__version__}")
    from reportlab.pdfbase import ttfonts

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
    parts = [f"<b>{_markup(r.get('image', ''))}</b>"]
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


class _Markup(str):
    """Text that is paragraph markup already (not escaped again)."""


def _error_table(rows: list[list[str]], header: list[str], widths: list[float], st: dict):
    from reportlab.lib import colors
    from reportlab.platypus import Paragraph, Table, TableStyle

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


# --------------------------------------------------------------------------- per-patient report

@dataclass
class _Options:
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

    fname = opts.file_name(pid)
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
            hpath = so.out / "heatmaps" / fname / f"{_safe_stem(stem)}.jpg"
            if not used:
                heat_why = "not classified: the image was not used for the decision"
            elif maker is not None and maker.available and orig is not None:
                try:
                    heat = maker.overlay(orig, _row_box(r))
                    _keep_heatmap(so, fname, stem, heat)
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
    footer = (f"Patient {opts.id_markup(pid, note='inline')} · cervscan {__version__} · decision support, "
              "not a diagnosis")
    return _build_pdf(so.out / "reports" / f"{fname}.pdf", story, page_size=opts.page_size,
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
            Paragraph(opts.id_markup(p.get("patient_id", ""), note="short"), st["cellb"]),
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


def _claim_outputs(so: "ScreenOutput", rels: list[Path]) -> None:
    """Before any report is written: refuse an OUT that is, holds or lies inside the run's input folders
    (from ``run.json``), and claim the report files in OUT's ledger, so that a file cervscan did not
    create is never overwritten (CervscanError naming it)."""
    from cervscan.files import OutputLedger, check_overlap, from_display_id

    inputs = [from_display_id(str(x)) for x in so.run.get("inputs") or [] if isinstance(x, str)]
    inputs = [x for x in inputs if Path(x).exists()]
    check_overlap(inputs, so.out)
    _check_writable(so.out / "reports")
    try:
        so.ledger = OutputLedger(so.out, inputs=inputs)
        so.ledger.claim(rels)
    except OSError as e:
        raise CervscanError(f"{so.out}: cannot record the reports in the output folder's ledger "
                            f"({e.strerror or e}); make the output folder writable") from None


def write_reports(out: str | Path, *, patients: list[str] | None = None, clinic: str | None = None,
                  exam_date: str | None = None, page_size: str = "a4", config_file: str | Path | None = None,
                  heatmaps: bool = True) -> list[Path]:
    """Write ``OUT/reports/<patient_id>.pdf`` (all patients, or those in ``patients``) and ``summary.pdf``.

    ``clinic`` and the recommended next steps come from the options, else the
    config file (keys ``clinic``, ``next_step``). ``heatmaps=False`` skips the
    Grad-CAM computation. Returns the written paths, the summary last.

    CervscanError, before anything is written, when the tables do not belong
    together (:func:`check_tables`) or ``OUT/reports`` cannot be written. A
    patient id is printed as written, or with code points and a logged warning
    where no font on this computer has a character (module docstring); the
    report's file name is :func:`_file_names`' (the id, or a cleaned id with a
    hash suffix).
    """
    from cervscan.config import load_config_file
    from cervscan.files import display_id

    psize = _page_size(page_size)
    cfg = load_config_file(config_file) if config_file else {}
    so = load_screen_output(out)  # refuses tables that do not belong together
    known = [p.get("patient_id", "") for p in so.patients]
    if patients:
        # an id given as a folder name on the command line (bytes that are not UTF-8, a backslash) is
        # matched as the tables show it (cervscan.files.display_id)
        known_set = set(known)
        wanted = list(dict.fromkeys(x if x in known_set else display_id(x) for x in patients))
        unknown = [x for x in wanted if x not in known_set]
        if unknown:
            shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
            raise CervscanError(f"unknown patient(s) {', '.join(unknown)} in {so.out} (the run has: {shown or 'none'})")
    else:
        wanted = known
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
    originals = _Originals(so)
    by_id = {p.get("patient_id", ""): p for p in so.patients}
    written = []
    for pid in wanted:
        written.append(_patient_report(so, by_id[pid], opts, maker, originals, font, st))
    written.append(_summary_report(so, opts, font, st))
    return written
