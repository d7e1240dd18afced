"""Image quality and eligibility gate: decide only from images fit to decide from.

Pure NumPy / OpenCV, so every number can be checked by hand. Two parts:

:func:`measure` (the pipeline's ``quality`` step) measures one decoded image
inside its *region*: the cervix (the convex hull of the largest component of the cervix
finder's mask, so that glare spots and bites the finder left out still count), when a
cervix was found, else the crop box the classifier sees (the centre crop, or the whole
frame). The region's bounding box is scaled down (never up) so that its longer side is
``side`` pixels (default 256): sharpness is then measured at a fixed scale of the cervix,
whatever the camera's resolution.

- ``sharpness``: 1 - the re-blur "blur effect" of Crete-Roffet et al. (2007), in the most blurred
  of eight directions (0, 22.5, ..., 157.5 degrees, so that motion blur in any direction counts; with
  four, a blur 22.5 degrees off them could go unseen): the grey
  image is blurred again along the direction (a line of ``REBLUR`` px, the same length in every
  direction) and the share of its gradient along that direction (the directional derivative
  cos * d/dx + sin * d/dy, central differences) that the re-blur removes is the sharpness. 0: nothing
  left to lose (flat or blurred), about 0.6 and more: crisp detail. A ratio, so it does not depend on
  contrast or brightness. Measured inside the region eroded by ``REBLUR // 2 + 1`` px.
- ``brightness``: mean grey level (0-255) inside the region;
- ``overexposed``: fraction of the region's pixels clipped (>= 250) in at least one colour channel;
- ``glare``: fraction of the region's pixels that are specular highlights: clipped (>= 250) in all
  three channels (saturated white);
- ``cervix_px``: the cervix's size in pixels of the decoded image, the square root of the finder's
  mask area (None when no cervix was found or no finder ran).

:func:`gate` turns the measures, the cervix finder's verdict and the exam stage into
``(eligible, reasons)``. Reasons, in the order they are listed (the first is the one a nurse
is told): ``stage:<stage>`` (the stage does not decide under ``decision_stages`` and the stage
model is at least ``stage_min_confidence`` sure), ``dark``, ``overexposed``, ``no_cervix``,
``cervix_too_small``, ``glare``, ``blurred``. The cervix rules apply only when a cervix finder
ran (crop mode ``cervix``), the stage rule only when a stage model ran.

:func:`patient_reason` says what a nurse should do when no image of a patient is eligible.
The thresholds (:class:`cervscan.config.GateConfig`) were chosen by ``benchmarks/quality_gate.py``
on the real images of the development data (``benchmarks/RESULTS.md``) with :func:`choose_thresholds`, the
rule ``cervscan adapt`` applies to a site's own images.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

#: Reasons an image is not eligible, in the order they are listed and reported.
REASON_ORDER = ("stage", "dark", "overexposed", "no_cervix", "cervix_too_small", "glare", "blurred")
#: Measured quality problems (the ``quality_flags`` column), a subset of the reasons.
QUALITY_PROBLEMS = ("dark", "overexposed", "glare", "blurred")
#: A channel at or above this value is clipped (glare: all three channels clipped).
CLIP_LEVEL = 250
#: Length of the re-blur in the sharpness measure, in pixels at the measuring scale.
REBLUR = 11

#: What a nurse should do, per reason (the patient's ``reason`` when no image is eligible).
ACTIONS = {
    "dark": "increase the light or the exposure",
    "overexposed": "reduce the light or the exposure",
    "no_cervix": "centre the cervix in the picture",
    "cervix_too_small": "move closer or zoom in on the cervix",
    "glare": "avoid reflections: angle the light, dab excess fluid off the cervix",
    "blurred": "hold the camera still and focus on the cervix",
}
#: The reasons in words, as counted in a patient's ``reason``.
REASON_WORDS = {
    "dark": "too dark", "overexposed": "overexposed", "no_cervix": "cervix not found",
    "cervix_too_small": "cervix too small", "glare": "strong glare", "blurred": "blurred",
}
STAGE_WORDS = {"acetic": "acetic acid", "lugol": "Lugol's iodine", "green": "green filter", "saline": "saline",
                "other": "other view"}


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a binary mask's pixels, filled (uint8 0/1)."""
    m = (mask > 0).astype(np.uint8)
    cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not cs:
        return m
    out = np.zeros_like(m)
    cv2.fillPoly(out, [cv2.convexHull(np.concatenate(cs))], 1)
    return out | m


#: The directions the sharpness is measured along, in degrees (x to the right, y down).
DIRECTIONS = (0.0, 22.5, 45.0, 67.5, 90.0, 112.5, 135.0, 157.5)


def _line(n: int, angle: float) -> np.ndarray:
    """Re-blur kernel: an anti-aliased line through the centre of an n x n box, ``n`` px long along
    ``angle`` (a box of n px at 0 and 90 degrees; as long, not sqrt(2) longer, on the diagonals), sum 1."""
    k = np.zeros((n, n), np.float32)
    c = (n - 1) / 2
    dx, dy = np.cos(np.radians(angle)) * c, np.sin(np.radians(angle)) * c
    cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1,
             lineType=cv2.LINE_AA)
    return k / k.sum()


def _gradient(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences (f(x+1) - f(x-1), likewise in y), borders reflected."""
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=1, borderType=cv2.BORDER_REFLECT)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=1, borderType=cv2.BORDER_REFLECT)
    return gx, gy


def sharpness(grey: np.ndarray, inside: np.ndarray | None = None, reblur: int = REBLUR) -> float:
    """1 - the Crete-Roffet blur effect of a grey image (float32), in its most blurred of
    :data:`DIRECTIONS`, summed over ``inside`` (bool mask; default everywhere). 0 (flat or blurred) to
    1 (sharp). Along each direction: the directional derivative of the image (d1) and of the image
    re-blurred by a ``reblur`` px line along that direction (d2); sharpness = sum(max(0, |d1| - |d2|)) /
    sum(|d1|)."""
    g = grey.astype(np.float32)
    sel = np.ones(g.shape, bool) if inside is None else inside
    gx, gy = _gradient(g)
    gx, gy = gx[sel], gy[sel]
    worst = 1.0
    for angle in DIRECTIONS:
        c, s = float(np.cos(np.radians(angle))), float(np.sin(np.radians(angle)))
        ax, ay = _gradient(cv2.filter2D(g, -1, _line(reblur, angle), borderType=cv2.BORDER_REFLECT))
        d1 = np.abs(c * gx + s * gy)
        d2 = np.abs(c * ax[sel] + s * ay[sel])
        total = float(d1.sum())
        lost = float(np.maximum(0.0, d1 - d2).sum())
        worst = min(worst, lost / total if total > 0 else 0.0)
    return worst


def measure(rgb: np.ndarray, cervix_mask: np.ndarray | None = None,
            box: tuple[int, int, int, int] | None = None, side: int = 256) -> dict:
    """Quality measures of an RGB uint8 image inside the cervix (``cervix_mask``, H x W, nonzero = cervix),
    else inside ``box`` (x0, y0, x1, y1), else inside the whole frame. See the module docstring."""
    h, w = rgb.shape[:2]
    bb = _bbox(cervix_mask) if cervix_mask is not None else None
    if bb is not None:
        cervix_px = float(np.sqrt(float((cervix_mask > 0).sum())))
        x0, y0, x1, y1 = bb
        region = _hull(cervix_mask[y0:y1, x0:x1])
    else:
        x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
        region = np.ones((max(0, y1 - y0), max(0, x1 - x0)), np.uint8)
        cervix_px = None
    im = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    if im.size == 0:
        im, region = rgb, np.ones((h, w), np.uint8)
    s = min(1.0, float(side) / max(im.shape[:2]))
    if s < 1.0:
        size = (max(1, round(im.shape[1] * s)), max(1, round(im.shape[0] * s)))
        im = cv2.resize(im, size, interpolation=cv2.INTER_AREA)
        region = cv2.resize(region, size, interpolation=cv2.INTER_NEAREST)
    grey = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)
    r = region > 0
    if not r.any():
        r = np.ones_like(r)
    k = REBLUR // 2 + 1
    inner = cv2.erode(r.astype(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8)) > 0
    if inner.sum() < 64:
        inner = r
    px = im[r]
    return {
        "sharpness": sharpness(grey, inner),
        "brightness": float(grey[r].astype(np.float32).mean()),
        "overexposed": float((px.max(1) >= CLIP_LEVEL).mean()),
        "glare": float((px.min(1) >= CLIP_LEVEL).mean()),
        "cervix_px": cervix_px,
    }


def problems(q: dict, cfg) -> list[str]:
    """The measured quality problems of one image (``cfg``: :class:`cervscan.config.GateConfig`), in
    :data:`REASON_ORDER`: dark, overexposed, glare, blurred."""
    out = []
    if q.get("brightness") is not None and q["brightness"] < cfg.min_brightness:
        out.append("dark")
    if q.get("overexposed") is not None and q["overexposed"] > cfg.max_overexposed:
        out.append("overexposed")
    if q.get("glare") is not None and q["glare"] > cfg.max_glare:
        out.append("glare")
    if q.get("sharpness") is not None and q["sharpness"] < cfg.min_sharpness:
        out.append("blurred")
    return out


def gate(q: dict, cfg, *, stage: str = "", stage_confidence: float | None = None,
         cervix_found: bool | None = None) -> list[str]:
    """Reasons why an image is not eligible (empty: eligible), in :data:`REASON_ORDER`.

    ``cervix_found`` None means no cervix finder ran (crop mode ``centre`` or ``frame``): the
    cervix rules (``no_cervix``, ``cervix_too_small``) are then skipped. An empty ``stage`` or a
    ``stage_confidence`` of None means no stage model ran: the stage rule is skipped. ``cfg``:
    :class:`cervscan.config.GateConfig`; when ``cfg.enabled`` is False nothing is ever rejected.
    """
    if not cfg.enabled:
        return []
    reasons: list[str] = []
    if stage and stage_confidence is not None and stage not in cfg.decision_stages \
            and stage_confidence >= cfg.stage_min_confidence:
        reasons.append(f"stage:{stage}")
    found = problems(q, cfg)
    for name in ("dark", "overexposed"):
        if name in found:
            reasons.append(name)
    if cervix_found is False:
        reasons.append("no_cervix")
    elif cervix_found and q.get("cervix_px") is not None and q["cervix_px"] < cfg.min_cervix_px:
        reasons.append("cervix_too_small")
    for name in ("glare", "blurred"):
        if name in found:
            reasons.append(name)
    return reasons


def primary(reason: str) -> str:
    """The first reason of an image's ``reason`` column ('stage:saline;blurred' -> 'stage:saline')."""
    return (reason or "").split(";")[0].strip()


def _stages_words(stages) -> str:
    words = [STAGE_WORDS.get(s, s) for s in stages]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _first_stage(stages) -> str:
    """The stage to repeat the examination at: acetic acid when it decides, else the first deciding stage."""
    order = [s for s in ("acetic", "lugol", "green", "saline", "other") if s in stages]
    return STAGE_WORDS.get(order[0], order[0]) if order else "the deciding stage"


def patient_reason(reasons: list[str], decision_stages) -> str:
    """What to do when none of a patient's images is eligible; ``reasons``: each ineligible image's
    ``reason`` column. One cause: 'retake: all images blurred (hold the camera still ...)'; no image of a
    deciding stage: 'no image after acetic acid: repeat after applying acetic acid'; mixed causes are
    counted, the most frequent one's action first."""
    prim = [primary(r) for r in reasons if primary(r)]
    if not prim:
        return "retake: no usable image"
    n = len(prim)
    stage_only = all(p.startswith("stage:") for p in prim)
    if stage_only:
        seen = sorted({p.split(":", 1)[1] for p in prim})
        return (f"no image after {_stages_words(decision_stages)}: repeat after applying "
                f"{_first_stage(decision_stages)} (images were taken at: {_stages_words(seen)})")
    counts: dict[str, int] = {}
    for p in prim:
        key = "stage" if p.startswith("stage:") else p
        counts[key] = counts.get(key, 0) + 1
    if len(counts) == 1:
        (key, _), = counts.items()
        every = "the image" if n == 1 else f"all {n} images"
        return f"retake: {every} {REASON_WORDS.get(key, key)} ({ACTIONS.get(key, 'retake the images')})"
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], REASON_ORDER.index(kv[0]) if kv[0] in REASON_ORDER else 99))

    def words(key: str, k: int) -> str:
        if key == "stage":
            return f"{k} not after {_stages_words(decision_stages)}"
        return f"{k} {REASON_WORDS.get(key, key)}"

    actions = []
    for key, _ in ranked:
        act = (f"apply {_first_stage(decision_stages)} before the picture" if key == "stage"
               else ACTIONS.get(key, ""))
        if act and act not in actions:
            actions.append(act)
    return (f"retake: no usable image of {n} ({', '.join(words(k, c) for k, c in ranked)}); "
            + "; ".join(actions))


def excluded_note(reasons: list[str]) -> str:
    """A decided patient's note on the images left out: 'not used: 1 blurred, 1 strong glare'."""
    counts: dict[str, int] = {}
    for r in reasons:
        p = primary(r)
        if p:
            key = p if p.startswith("stage:") else p
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return ""

    def words(key: str) -> str:
        if key.startswith("stage:"):
            return "stage " + STAGE_WORDS.get(key.split(":", 1)[1], key.split(":", 1)[1])
        return REASON_WORDS.get(key, key)

    return "not used: " + ", ".join(f"{n} {words(k)}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------- choosing the thresholds

#: False rejects allowed on new original images (images as a clinic takes them), shared by the thresholds.
FALSE_REJECT_BUDGET = 0.05
#: The threshold rules: measure, GateConfig field, direction ('min': reject below, 'max': reject above), reason.
THRESHOLD_RULES = (("sharpness", "min_sharpness", "min", "blurred"), ("brightness", "min_brightness", "min", "dark"),
                   ("overexposed", "max_overexposed", "max", "overexposed"), ("glare", "max_glare", "max", "glare"),
                   ("cervix_px", "min_cervix_px", "min", "cervix_too_small"))


def round_towards_less(v: float, direction: str) -> float:
    """Two significant digits, towards rejecting less ('min' rules: down, 'max' rules: up)."""
    if v <= 0:
        return 0.0
    e = math.floor(math.log10(abs(v))) - 1
    f = 10.0 ** e
    return round(float((math.floor(v / f) if direction == "min" else math.ceil(v / f)) * f), max(0, -e))


def choose_threshold(values: list[float], direction: str, share: float) -> float:
    """The k-th most extreme of the n ``values``, k = floor(share * (n + 1)) (at least 1), rounded towards
    rejecting less ('min': reject v < t, the k-th smallest; 'max': reject v > t, the k-th largest). It
    rejects k - 1 of the values themselves, and a new value exchangeable with them with probability
    k / (n + 1) <= share (the rank argument of split-conformal prediction)."""
    v = np.sort(np.asarray([x for x in values if x is not None], float))
    if direction == "max":
        v = -v[::-1]
    k = max(1, int(math.floor(share * (len(v) + 1) + 1e-9)))
    t = float(v[min(k, len(v)) - 1])
    t = t if direction == "min" else -t
    return round_towards_less(t, direction)


def choose_thresholds(originals: list[dict], budget: float = FALSE_REJECT_BUDGET) -> tuple[dict, dict]:
    """The gate's thresholds from the measures of original images (:func:`measure`'s fields and
    ``cervix_found``): the cervix finder's own verdict (no cervix) uses what it uses on them; the rest of the
    ``budget`` of false rejects is shared equally by the :data:`THRESHOLD_RULES`, each threshold
    :func:`choose_threshold` of its measure (the cervix size over the images with a cervix found). Returns
    the thresholds (GateConfig field -> value) and how they were reached (``n``, ``no_cervix_rate``,
    ``share_per_threshold``, ``budget``)."""
    n = len(originals)
    no_cx = sum(m["cervix_found"] is False for m in originals) / n
    share = max(0.0, budget - no_cx) / len(THRESHOLD_RULES)
    found = [m for m in originals if m["cervix_found"]]
    th = {}
    for measure_, fld, direction, _ in THRESHOLD_RULES:
        vals = [m[measure_] for m in (found if measure_ == "cervix_px" else originals) if m[measure_] is not None]
        if vals:
            th[fld] = choose_threshold(vals, direction, share)
    return th, {"n": n, "no_cervix_rate": no_cx, "share_per_threshold": share, "budget": budget}
