"""Run configuration: the frozen dataclasses VotingConfig, GateConfig and ScreenConfig, config-file loading,
and the resolution checkpoint < config file < options, every value checked against the one table of settings
(:data:`cervscan.settings.SETTINGS`, re-exported here; see that module for the schema and why it is a table
and dataclasses, not pydantic). No torch import."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from cervscan.errors import CervscanError
from cervscan.files import MAX_DECODE_MB
from cervscan.settings import (  # noqa: F401 - the schema, re-exported
    _CHECK_OFF,
    CONFIGS,
    CROP_MODES,
    DECISIONS,
    GATE_KEYS,
    SETTINGS,
    STAGES,
    VARIANT_NAMES,
    VARIANT_SETS,
    Setting,
    check_setting,
    check_settings,
    from_checkpoint,
    keys_of,
    option_name,
    parse_set,
    parse_stages,
    parse_variants,
    parse_weights,
)

log = logging.getLogger(__name__)

#: The study's hand-tuned voting weights (METHOD.md, step 4).
STUDY_WEIGHTS: tuple[float, ...] = (0.20, 0.25, 0.15, 0.20, 0.11, 0.09)
#: Brightness factor of variants 5 and 6 (pixel values multiplied, clipped to 255).
DEFAULT_BRIGHTNESS = 1.2
#: The decision threshold when the classifier checkpoint records none (ScreenConfig.threshold's default).
DEFAULT_THRESHOLD = 0.5


def default_of(key: str) -> Any:
    """The default of a screening setting: its dataclass field's default (None for a report setting)."""
    s = SETTINGS[key]
    if s.owner not in CONFIGS:
        return None
    fld = next(f for f in dataclasses.fields(globals()[s.owner]) if f.name == (s.field or key))
    return fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()  # type: ignore[misc]


def _check_fields(obj: Any, keys: dict[str, str]) -> None:
    """Check the fields of a configuration dataclass (field -> setting key) against :data:`SETTINGS`."""
    for fld, key in keys.items():
        check_setting(key, getattr(obj, fld), type(obj).__name__, fld)


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
        _check_fields(self, {fld: key for key, fld in keys_of("VotingConfig").items()})

    def active_weights(self) -> dict[str, float]:
        """Weights of the variants in use, renormalised to sum to 1."""
        raw = {v: self.weights[VARIANT_NAMES.index(v)] for v in self.variants}
        total = sum(raw.values())
        return {k: v / total for k, v in raw.items()}


@dataclass(frozen=True)
class GateConfig:
    """The image quality and eligibility gate (:mod:`cervscan.pipeline.quality`).

    Thresholds chosen by ``benchmarks/quality_gate.py`` on the development data's 447 real
    acetic-acid images only (``benchmarks/RESULTS.md``, block ``quality_gate``; the degraded
    copies only check them): each is the k-th most extreme value of the n originals,
    k = floor(1 % x (n + 1)), rounded to two significant digits towards rejecting less, so that
    each is expected to reject at most 1 % of new original images and the five together at most
    5 % (2.7 % of the originals in-sample, 3.8 % in a patient-wise 5-fold cross-check).
    """

    #: False (``--no-quality-gate``, config ``quality_gate = false``): every image decides (research).
    enabled: bool = True
    #: Sharpness (0-1, :func:`cervscan.pipeline.quality.sharpness`) inside the cervix at a fixed scale (its longer
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
        _check_fields(self, {fld: key for key, fld in GATE_KEYS.items()})


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
    #: Memory budget of one image decode, MB: an image whose decode would hold more pixel data at once
    #: (estimated from its size and colour mode before decoding, :func:`cervscan.files.decode_bytes`) is refused.
    max_decode_mb: int = MAX_DECODE_MB
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

    def __post_init__(self) -> None:
        _check_fields(self, {fld: key for key, fld in keys_of("ScreenConfig").items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a flat dict of overrides, every value checked against
    :data:`SETTINGS` (type, finiteness, range; the error names the file, the key, the value and what is
    allowed). An empty file (no settings) is an error."""
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
    if not data:
        raise CervscanError(f"{p}: config file sets nothing (it is empty); write the settings in it, or "
                            "leave out --config to use the defaults")
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise CervscanError(f"{p}: unknown config key(s): {', '.join(unknown)}")
    return check_settings(data, str(p))


# --------------------------------------------------------------------------- resolving: checkpoint < config file < options

#: Where a value that fails its check came from, as the error names it (a config file is named by its path
#: when it is loaded, :func:`cervscan.config.load_config_file`).
WHERE = {"config": "config file", "option": "command line"}


def check_layer(layer: dict, keys, layer_name: str) -> dict:
    """The values of ``layer`` for ``keys`` (None: not given, left out), each checked against
    :data:`cervscan.config.SETTINGS`; options are named as on the command line (``--threshold``,
    ``--set min_sharpness``)."""

    where = WHERE.get(layer_name, layer_name)
    return {k: check_setting(k, v, where, option_name(k) if layer_name == "option" else None)
            for k, v in layer.items() if k in keys and v is not None}


def _layers(keys, file_cfg: dict, overrides: dict, vals: dict, provenance: dict) -> None:
    """Config file < options for ``keys``: each value given, checked, into ``vals``, where it came from into
    ``provenance``."""
    for layer_name, layer in (("config", file_cfg), ("option", overrides)):
        for k, v in check_layer(layer, keys, layer_name).items():
            vals[k], provenance[k] = v, layer_name


def voting_from(ckpt: dict, file_cfg: dict, overrides: dict, seg_ckpt: dict | None = None) -> tuple[VotingConfig, float, dict]:
    """Checkpoint defaults < config file < explicit options. Returns voting, threshold and provenance.

    Every value is checked (type, finiteness, range: :data:`cervscan.config.SETTINGS`) as it comes in, the
    checkpoints' too; the error names where it came from (the checkpoint, the config file, the command line).
    """
    src: dict[str, str] = {}
    vals: dict[str, Any] = {}
    fields = keys_of("VotingConfig")  # every key is its field's name
    for key in from_checkpoint("segmenter"):
        if seg_ckpt and seg_ckpt.get(key) is not None:
            vals |= check_layer({key: float(seg_ckpt[key])}, fields, "segmenter checkpoint")
            src[key] = "segmenter checkpoint"
    ck_vote = check_layer(ckpt.get("voting") or {}, from_checkpoint("classifier voting"), "classifier checkpoint")
    vals |= ck_vote
    src |= dict.fromkeys(ck_vote, "checkpoint")
    thr, src["threshold"] = default_of("threshold"), "default"
    if ckpt.get("threshold") is not None:
        thr = check_layer({"threshold": float(ckpt["threshold"])}, ("threshold",), "classifier checkpoint")["threshold"]
        src["threshold"] = "checkpoint"
    _layers(fields.keys() | {"threshold"}, file_cfg, overrides, vals, src)
    if "threshold" in vals:
        thr = float(vals.pop("threshold"))
    if "weights" in vals:
        vals["weights"] = tuple(float(x) for x in vals["weights"])
    if "variants" in vals:
        vals["variants"] = tuple(vals["variants"])
    return VotingConfig(**vals), thr, src


def resolve_choice(key: str, choices: tuple[str, ...], default: str, cls_ckpt: dict, file_cfg: dict,
                    overrides: dict, provenance: dict) -> str:
    """A setting the classifier checkpoint records (``crop``, ``classify_view``): option > config file >
    the classifier checkpoint > ``default``; where it came from goes to ``provenance``."""
    val, src = default, "default"
    for layer_name, layer in (("classifier checkpoint", cls_ckpt), ("config", file_cfg), ("option", overrides)):
        if layer.get(key):
            val, src = str(layer[key]), layer_name
    if val not in choices:
        raise CervscanError(f"{key} must be one of {', '.join(choices)}, not {val!r}")
    provenance[key] = src
    return val


def gate_from(file_cfg: dict, overrides: dict, provenance: dict, cls_ckpt: dict | None = None):
    """The quality gate: defaults (``GateConfig``) < the classifier checkpoint's ``decision_stages`` (the
    stages its model was fitted and chosen on) < config file < options (``quality_gate`` False for
    ``--no-quality-gate``). Records where each changed value came from in ``provenance``."""

    vals: dict[str, Any] = {}
    if cls_ckpt and cls_ckpt.get("decision_stages"):
        stages = check_layer({"decision_stages": cls_ckpt["decision_stages"]}, GATE_KEYS, "classifier checkpoint")
        vals["decision_stages"] = tuple(stages["decision_stages"])
        provenance["decision_stages"] = "classifier checkpoint"
    _layers(GATE_KEYS, file_cfg, overrides, vals, provenance)
    return GateConfig(**{GATE_KEYS[k]: tuple(v) if k == "decision_stages" else v for k, v in vals.items()})


#: ScreenConfig settings resolved on their own: the threshold with the voting (:func:`voting_from`), the
#: choices a classifier checkpoint records (:func:`resolve_choice`), the device (:mod:`cervscan.device`).
_RESOLVED_APART = ("threshold", "crop", "classify_view", "device")


def screen_settings(file_cfg: dict, overrides: dict, provenance: dict) -> dict[str, Any]:
    """The other ScreenConfig settings (decoding, cropping, batching, workers): defaults < config file <
    options, as ScreenConfig field -> value of the field's type; where each given value came from goes to
    ``provenance``."""
    keys = {k: f for k, f in keys_of("ScreenConfig").items() if k not in _RESOLVED_APART}
    vals: dict[str, Any] = {}
    _layers(keys, file_cfg, overrides, vals, provenance)
    return {keys[k]: type(default_of(k))(v) for k, v in vals.items()}
