"""Run configuration: frozen dataclasses, JSON/TOML loading. No torch import."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CervscanError

#: The six variants of the method, in order (v1..v6).
VARIANT_NAMES: tuple[str, ...] = (
    "original",
    "segmented",
    "original_flip",
    "segmented_flip",
    "original_bright",
    "segmented_bright",
)
#: The study's hand-tuned voting weights (METHOD.md, step 4).
STUDY_WEIGHTS: tuple[float, ...] = (0.20, 0.25, 0.15, 0.20, 0.11, 0.09)
#: Brightness factor of variants 5 and 6 (pixel values multiplied, clipped to 255).
DEFAULT_BRIGHTNESS = 1.2
DEFAULT_THRESHOLD = 0.5

#: What the lesion segmenter and the classifier look at (see ScreenConfig.crop).
CROP_MODES = ("cervix", "centre", "frame")
#: Exam stages (the stage model's classes; ``cervscan.stage_training.STAGES``).
STAGES: tuple[str, ...] = ("acetic", "lugol", "green", "saline", "other")

VARIANT_SETS = {
    "all": VARIANT_NAMES,
    "original": ("original",),
    "original+segmented": ("original", "segmented"),
}


@dataclass(frozen=True)
class VotingConfig:
    """How the six variants are built and combined.

    ``weights`` are renormalised over the variants in use, so that
    ``--variants original`` gives score = P(severe | original).
    Variants 5 and 6 are built from the *unflipped* original / segmented image
    unless ``brightness_from_flipped`` is set.
    """

    weights: tuple[float, ...] = STUDY_WEIGHTS
    brightness: float = DEFAULT_BRIGHTNESS
    brightness_from_flipped: bool = False
    variants: tuple[str, ...] = VARIANT_NAMES
    #: Margin around the lesion bounding box, as a fraction of the box side.
    crop_margin: float = 0.10
    #: Masks covering less than this fraction of the image count as empty.
    min_lesion_fraction: float = 0.002
    #: Threshold on the segmenter's sigmoid output.
    mask_threshold: float = 0.5
    #: How variant probabilities are combined into the image score and image scores into the patient's:
    #: "probability" (the study: weighted sum and mean of probabilities) or "logit" (the same sums over
    #: log-odds; a classifier checkpoint fitted that way says so in its ``voting``).
    pooling: str = "probability"

    def __post_init__(self) -> None:
        if len(self.weights) != 6:
            raise CervscanError(f"voting weights: need 6 values, got {len(self.weights)}")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise CervscanError("voting weights must be non-negative and not all zero")
        bad = [v for v in self.variants if v not in VARIANT_NAMES]
        if bad or not self.variants:
            raise CervscanError(
                f"unknown variant(s) {bad}; choose from {', '.join(VARIANT_NAMES)}"
            )
        if self.pooling not in ("probability", "logit"):
            raise CervscanError(f"pooling must be 'probability' or 'logit', not {self.pooling!r}")
        if not 0 < self.brightness <= 4:
            raise CervscanError(f"brightness factor must be in (0, 4], got {self.brightness}")
        w = sum(self.weights[VARIANT_NAMES.index(v)] for v in self.variants)
        if w <= 0:
            raise CervscanError("the selected variants all have weight 0")

    def active_weights(self) -> dict[str, float]:
        """Weights of the variants in use, renormalised to sum to 1."""
        raw = {v: self.weights[VARIANT_NAMES.index(v)] for v in self.variants}
        total = sum(raw.values())
        return {k: v / total for k, v in raw.items()}


@dataclass(frozen=True)
class GateConfig:
    """The image quality and eligibility gate (:mod:`cervscan.quality`).

    Thresholds chosen by ``benchmarks/quality_gate.py`` on the development data's 447 real
    acetic-acid images only (``benchmarks/RESULTS.md``, block ``quality_gate``; the degraded
    copies only check them): each is the k-th most extreme value of the n originals,
    k = floor(1 % x (n + 1)), rounded to two significant digits towards rejecting less, so that
    each is expected to reject at most 1 % of new original images and the five together at most
    5 % (2.7 % of the originals in-sample, 3.8 % in a patient-wise 5-fold cross-check).
    """

    #: False (``--no-quality-gate``, config ``quality_gate = false``): every image decides (research).
    enabled: bool = True
    #: Sharpness (0-1, :func:`cervscan.quality.sharpness`) inside the cervix at a fixed scale (its longer
    #: side ``measure_side`` px).
    min_sharpness: float = 0.46
    #: Mean grey level inside the cervix, 0-255.
    min_brightness: float = 74.0
    #: Fraction of the cervix clipped (>= 250) in at least one colour channel.
    max_overexposed: float = 0.52
    #: Fraction of the cervix covered by specular highlights (clipped in all three channels).
    max_glare: float = 0.016
    #: Cervix size, sqrt of its area, in pixels of the decoded image.
    min_cervix_px: float = 250.0
    #: Exam stages whose images decide; an image of another stage is not eligible (reason
    #: ``stage:<stage>``) when the stage model is at least ``stage_min_confidence`` sure of it (0.80:
    #: the stage model's cross-validated predictions put at most 2 % of the deciding stages' images at
    #: that confidence on another stage, for both the acetic and the acetic + Lugol policy).
    decision_stages: tuple[str, ...] = STAGES
    stage_min_confidence: float = 0.8
    #: The cervix's bounding box is scaled down to this longer side before measuring sharpness.
    measure_side: int = 256

    def __post_init__(self) -> None:
        bad = [s for s in self.decision_stages if s not in STAGES]
        if bad or not self.decision_stages:
            raise CervscanError(f"decision_stages: unknown {bad or 'empty list'}; choose from {', '.join(STAGES)}")
        if not 0.0 <= self.stage_min_confidence <= 1.0:
            raise CervscanError(f"stage_min_confidence must be within [0, 1], got {self.stage_min_confidence}")
        for k in ("max_overexposed", "max_glare"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise CervscanError(f"{k} must be a fraction within [0, 1], got {getattr(self, k)}")
        if self.measure_side < 16:
            raise CervscanError(f"measure_side must be at least 16, got {self.measure_side}")


#: Config-file keys of the gate -> GateConfig field.
GATE_KEYS = {"quality_gate": "enabled", "min_sharpness": "min_sharpness", "min_brightness": "min_brightness",
             "max_overexposed": "max_overexposed", "max_glare": "max_glare", "min_cervix_px": "min_cervix_px",
             "decision_stages": "decision_stages", "stage_min_confidence": "stage_min_confidence"}


@dataclass(frozen=True)
class ScreenConfig:
    voting: VotingConfig = field(default_factory=VotingConfig)
    #: The image quality and eligibility gate.
    gate: GateConfig = field(default_factory=GateConfig)
    threshold: float = DEFAULT_THRESHOLD
    device: str = "auto"
    batch_images: int = 4
    #: Classifier inputs per forward pass on a CPU, to bound peak memory (on a GPU all inputs of a batch go
    #: at once). 0 (default): as many as hold 6 x 160 x 160 pixels (six at 160 px, one at 384 px).
    classify_batch: int = 0
    #: 0 = decode in a background thread; N > 0 = DataLoader with N worker processes.
    num_workers: int = 0
    #: Longest side an image is decoded to (bigger images are scaled down on read).
    max_side: int = 2048
    #: Decompression-bomb guard: images with more pixels are refused.
    max_pixels: int = 120_000_000
    #: Images smaller than this on their shorter side are refused.
    min_side: int = 32
    #: What the lesion segmenter and classifier see: "cervix" (crop found by the cervix finder,
    #: centre crop when none is found), "centre" (always the centre crop) or "frame" (whole image).
    crop: str = "frame"
    #: What the classifier's original views (variants 1, 3, 5) show: "crop" (the crop above, as the
    #: segmented views) or "frame" (the whole image; the segmented views still come from the crop).
    classify_view: str = "crop"
    #: Margin around the cervix box, as a fraction of its longer side (the crop is square).
    cervix_margin: float = 0.10
    #: A cervix covering less of the frame than this counts as not found.
    cervix_min_fraction: float = 0.03
    #: Fallback crop when no cervix is found: centred square, this fraction of the shorter side.
    centre_crop: float = 0.80
    write_masks: bool = True
    write_overlays: bool = True
    write_heatmaps: bool = False
    backend: str = "torch"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a flat dict of overrides."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as e:
        raise CervscanError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text.decode("utf-8"))
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CervscanError(f"{p}: not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(data, dict):
        raise CervscanError(f"{p}: config must be a table/object")
    known = {
        "weights", "brightness", "brightness_from_flipped", "variants", "crop_margin",
        "min_lesion_fraction", "mask_threshold", "threshold", "device", "batch_images",
        "num_workers", "max_side", "max_pixels", "min_side", "clinic", "next_step",
        "cervix_margin", "cervix_min_fraction", "centre_crop", "crop", "pooling", "classify_view", "classify_batch",
        *GATE_KEYS,
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise CervscanError(f"{p}: unknown config key(s): {', '.join(unknown)}")
    return _check_types(p, data)


_FLOAT_KEYS = {"brightness", "crop_margin", "min_lesion_fraction", "mask_threshold", "threshold",
               "cervix_margin", "cervix_min_fraction", "centre_crop", "min_sharpness", "min_brightness",
               "max_overexposed", "max_glare", "min_cervix_px", "stage_min_confidence"}
_INT_KEYS = {"batch_images", "num_workers", "max_side", "max_pixels", "min_side", "classify_batch"}


def _check_types(p: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Check value types, so a bad file gives a message naming it (not a traceback after loading models).

    ``variants`` and ``weights`` may also be written as on the command line
    (``"original+segmented"``, ``"0.2,0.25,0.15,0.2,0.11,0.09"``).
    """
    out = dict(data)
    for k, v in data.items():
        if k in _FLOAT_KEYS:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise CervscanError(f"{p}: '{k}' must be a number, got {v!r}")
        elif k in _INT_KEYS:
            if isinstance(v, float) and v.is_integer():
                out[k] = v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise CervscanError(f"{p}: '{k}' must be a whole number, got {v!r}")
        elif k in ("brightness_from_flipped", "quality_gate"):
            if not isinstance(v, bool):
                raise CervscanError(f"{p}: '{k}' must be true or false, got {v!r}")
        elif k == "classify_view":
            if v not in ("crop", "frame"):
                raise CervscanError(f"{p}: 'classify_view' must be \"crop\" or \"frame\", got {v!r}")
        elif k == "pooling":
            if v not in ("probability", "logit"):
                raise CervscanError(f"{p}: 'pooling' must be \"probability\" or \"logit\", got {v!r}")
        elif k == "crop":
            if v not in CROP_MODES:
                raise CervscanError(f"{p}: 'crop' must be one of {', '.join(CROP_MODES)}, got {v!r}")
        elif k == "device":
            if not isinstance(v, str):
                raise CervscanError(f"{p}: 'device' must be a string such as \"cpu\", got {v!r}")
        elif k in _LIST_KEYS:
            parse, item_ok, what = _LIST_KEYS[k]
            if isinstance(v, str):  # written as on the command line
                try:
                    out[k] = parse(v)
                except CervscanError as e:
                    raise CervscanError(f"{p}: '{k}': {e}") from None
            elif not (isinstance(v, list) and all(item_ok(x) for x in v)):
                raise CervscanError(f"{p}: '{k}' must be {what}, got {v!r}")
    return out


def parse_variants(spec: str) -> tuple[str, ...]:
    spec = spec.strip()
    if spec in VARIANT_SETS:
        return VARIANT_SETS[spec]
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [n for n in names if n not in VARIANT_NAMES]
    if bad or not names:
        raise CervscanError(
            f"--variants: unknown {bad or spec!r}; use all, original, original+segmented "
            f"or a comma list of {', '.join(VARIANT_NAMES)}"
        )
    return names


def parse_weights(spec: str) -> tuple[float, ...]:
    try:
        w = tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise CervscanError(f"--weights: expected 6 comma-separated numbers, got {spec!r}") from None
    if len(w) != 6:
        raise CervscanError(f"--weights: expected 6 numbers, got {len(w)}")
    return w


def parse_stages(spec: str) -> tuple[str, ...]:
    """'acetic,lugol' -> ('acetic', 'lugol'); 'all' -> every stage."""
    spec = spec.strip()
    if spec == "all":
        return STAGES
    names = tuple(s.strip() for s in spec.replace("+", ",").split(",") if s.strip())
    bad = [n for n in names if n not in STAGES]
    if bad or not names:
        raise CervscanError(f"decision_stages: unknown {bad or spec!r}; use all or a comma list of {', '.join(STAGES)}")
    return names


#: List-valued config keys: (parser for the command-line string form, item check, description).
_LIST_KEYS = {
    "decision_stages": (parse_stages, lambda x: isinstance(x, str) and x in STAGES,
                        f"a list of exam stages ({', '.join(STAGES)})"),
    "variants": (parse_variants, lambda x: isinstance(x, str), "a list of variant names"),
    "weights": (parse_weights, lambda x: isinstance(x, (int, float)) and not isinstance(x, bool), "a list of 6 numbers"),
}
