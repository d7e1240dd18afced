"""The method's image variants, weighted voting and per-patient aggregation.

Pure NumPy/OpenCV so that every number here can be checked by hand.

Segmented image ("local" view): pixels outside the lesion mask are set to 0
(black) and the result is cropped to the bounding box of all mask pixels,
enlarged by ``crop_margin`` of the box side on every side (clipped to the
image). When the mask is empty (lesion fraction below ``min_lesion_fraction``)
the segmented image falls back to the whole original image and the image is
flagged ``empty_mask``: variants 2, 4, 6 then repeat the original's view.

Variants (v1..v6): original, segmented, original flipped horizontally,
segmented flipped, original x brightness, segmented x brightness. Variants 5/6
start from the unflipped images unless ``brightness_from_flipped``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cervscan.config import VARIANT_NAMES, VotingConfig


@dataclass
class Region:
    image: np.ndarray  # HxWx3 uint8, the segmented image
    bbox: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (exclusive) or None when empty
    lesion_fraction: float
    empty: bool


def segment_region(image: np.ndarray, mask: np.ndarray, cfg: VotingConfig) -> Region:
    """Build the segmented image from an RGB image and a binary mask of the same size."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
    m = mask > 0
    frac = float(m.mean()) if m.size else 0.0
    if frac < cfg.min_lesion_fraction:
        return Region(image=image, bbox=None, lesion_fraction=frac, empty=True)
    ys, xs = np.nonzero(m)
    y0, y1 = int(ys.min()), int(ys.max()) + 1
    x0, x1 = int(xs.min()), int(xs.max()) + 1
    my = int(round((y1 - y0) * cfg.crop_margin))
    mx = int(round((x1 - x0) * cfg.crop_margin))
    h, w = m.shape
    y0, y1 = max(0, y0 - my), min(h, y1 + my)
    x0, x1 = max(0, x0 - mx), min(w, x1 + mx)
    seg = image * m[..., None].astype(image.dtype)
    return Region(image=np.ascontiguousarray(seg[y0:y1, x0:x1]), bbox=(x0, y0, x1, y1),
                  lesion_fraction=frac, empty=False)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Multiply pixel values by ``factor`` and clip to [0, 255] (uint8 in, uint8 out)."""
    out = image.astype(np.float32) * factor
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_variants(original: np.ndarray, segmented: np.ndarray, cfg: VotingConfig) -> dict[str, np.ndarray]:
    """Return the active variants (name -> uint8 RGB image), in v1..v6 order."""
    wanted = set(cfg.variants)
    out: dict[str, np.ndarray] = {}
    flip = {
        "original": lambda: np.ascontiguousarray(original[:, ::-1]),
        "segmented": lambda: np.ascontiguousarray(segmented[:, ::-1]),
    }
    for name in VARIANT_NAMES:
        if name not in wanted:
            continue
        if name == "original":
            out[name] = original
        elif name == "segmented":
            out[name] = segmented
        elif name == "original_flip":
            out[name] = flip["original"]()
        elif name == "segmented_flip":
            out[name] = flip["segmented"]()
        elif name == "original_bright":
            base = flip["original"]() if cfg.brightness_from_flipped else original
            out[name] = adjust_brightness(base, cfg.brightness)
        elif name == "segmented_bright":
            base = flip["segmented"]() if cfg.brightness_from_flipped else segmented
            out[name] = adjust_brightness(base, cfg.brightness)
    return out


_EPS = 1e-7


def logit(p: float) -> float:
    p = min(max(float(p), _EPS), 1.0 - _EPS)
    return float(np.log(p) - np.log1p(-p))


def sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))


def weighted_score(p_severe: dict[str, float], cfg: VotingConfig) -> float:
    """Sum of (renormalised) weight x P(severe) over the active variants (``cfg.pooling`` "probability",
    the study's vote); with "logit", the same weighted sum of the log-odds, returned as a probability."""
    w = cfg.active_weights()
    missing = set(w) - set(p_severe)
    if missing:
        raise ValueError(f"missing probabilities for variants {sorted(missing)}")
    if cfg.pooling == "logit":
        return sigmoid(sum(w[k] * logit(p_severe[k]) for k in w))
    return float(sum(w[k] * float(p_severe[k]) for k in w))


def decide(score: float, threshold: float) -> str:
    """Severe when the score is strictly above the threshold (as in the study)."""
    return "severe" if score > threshold else "mildly_normal"


def aggregate_patient(image_scores: list[float], threshold: float, pooling: str = "probability") -> tuple[float | None, str]:
    """Patient score = mean of its images' scores; each original image weighs the same. ``pooling``
    "logit": the mean of the images' log-odds, returned as a probability (a linear image model then
    gives exactly its own score of the patient's mean image feature)."""
    vals = [float(s) for s in image_scores if s is not None and np.isfinite(s)]
    if not vals:
        return None, "error"
    if pooling == "logit":
        score = sigmoid(float(np.mean([logit(v) for v in vals])))
    else:
        score = float(np.mean(vals))
    return score, decide(score, threshold)
