"""What the reports say, in words: decisions, next steps, scores and thresholds, models, exam stages,
image quality and each image's caption (paragraph markup).

The words for exam stages and for the reasons an image was not used are the quality gate's
(:data:`cervscan.pipeline.quality.STAGE_WORDS`, :data:`cervscan.pipeline.quality.REASON_WORDS`), so that
the reports and ``patients.csv`` say the same.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from cervscan import __version__
from cervscan.pipeline.quality import REASON_WORDS, STAGE_WORDS
from cervscan.pipeline.steps import is_eligible
from cervscan.report.fonts import _markup
from cervscan.report.tables import _f, _i, _true

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
#: Model roles of run.json, in the pipeline's order, with their label in the reports.
MODEL_ROLES = (("stage", "Exam-stage model"), ("cervix", "Cervix finder"), ("segmenter", "Lesion segmenter"),
               ("classifier", "Classifier"))
STATEMENT = ("This result was produced by cervscan, a decision-support tool. It supports and does not replace "
             "the clinician's judgement; the examining clinician makes and is responsible for the final decision.")


# --------------------------------------------------------------------------- numbers and times

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


# --------------------------------------------------------------------------- run, models, decision

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


# --------------------------------------------------------------------------- one image

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
    if not is_eligible(r):
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
