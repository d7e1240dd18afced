"""Run configuration: frozen dataclasses, JSON/TOML loading, and the type and allowed range of every
setting (:data:`SETTINGS`), checked wherever a value comes in. No torch import."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cervscan.errors import CervscanError
from cervscan.files import MAX_DECODE_MB

log = logging.getLogger(__name__)

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
#: Exam stages (the stage model's classes; ``cervscan.training.stage.STAGES``).
STAGES: tuple[str, ...] = ("acetic", "lugol", "green", "saline", "other")

VARIANT_SETS = {
    "all": VARIANT_NAMES,
    "original": ("original",),
    "original+segmented": ("original", "segmented"),
}
#: Decisions a report's ``next_step`` text can be given for.
DECISIONS: tuple[str, ...] = ("severe", "mildly_normal", "inadequate", "error")


# --------------------------------------------------------------------------- settings: type and range

@dataclass(frozen=True)
class Setting:
    """Type and allowed values of one setting (a config-file key, a command-line option, a value from a
    model checkpoint, a field of the configuration dataclasses).

    ``kind``: "number" (finite, in the range), "int" (whole, in the range), "bool", "choice" (one of
    ``choices``), "str", "weights" (6 finite numbers >= 0, not all 0), "names" (a non-empty list of
    ``choices``) or "table" (``choices`` -> text).
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        """What the setting may be, in words."""
        if self.kind in ("number", "int"):
            rng = (f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                   f"{')' if self.hi_open else ']'}")
            return ("a finite number in " if self.kind == "number" else "a whole number in ") + rng
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "weights":
            return "6 finite numbers >= 0, not all 0 (a list, or comma-separated)"
        if self.kind == "names":
            return f"a non-empty list of {', '.join(self.choices)} (or comma-separated)"
        if self.kind == "table":
            return f"a table of text for {', '.join(self.choices)}"
        return "a string"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else repr(x)


#: Every setting: config-file key -> type and allowed range. Checked when a config file is loaded (the error
#: names the file), for command-line options, for the values a model checkpoint brings (threshold, voting,
#: mask threshold, exam stages) and when the configuration dataclasses are built.
SETTINGS: dict[str, Setting] = {
    # decision
    "threshold": Setting("number", 0, 1, hi_open=True),  # score > 1 never happens: 1 would refer nobody
    "pooling": Setting("choice", choices=("probability", "logit")),
    # variants and voting
    "weights": Setting("weights"),
    "brightness": Setting("number", 0, 4, lo_open=True),
    "brightness_from_flipped": Setting("bool"),
    "variants": Setting("names", choices=VARIANT_NAMES),
    "crop_margin": Setting("number", 0, 1),
    "min_lesion_fraction": Setting("number", 0, 0.5),
    "mask_threshold": Setting("number", 0, 1, lo_open=True, hi_open=True),  # 0: every pixel; >= 1: none
    # crop
    "crop": Setting("choice", choices=CROP_MODES),
    "classify_view": Setting("choice", choices=("crop", "frame")),
    "cervix_margin": Setting("number", 0, 1),
    "cervix_min_fraction": Setting("number", 0, 0.5, lo_open=True),
    "centre_crop": Setting("number", 0.25, 1),
    # decoding
    "max_side": Setting("int", 64, 16384),
    "max_pixels": Setting("int", 1_000_000, 1_000_000_000),
    "min_side": Setting("int", 1, 4096),
    "max_decode_mb": Setting("int", 16, 1_000_000),
    # quality gate
    "quality_gate": Setting("bool"),
    "min_sharpness": Setting("number", 0, 1),
    "min_brightness": Setting("number", 0, 255),
    "max_overexposed": Setting("number", 0, 1),
    "max_glare": Setting("number", 0, 1),
    "min_cervix_px": Setting("number", 0, 16384),
    "decision_stages": Setting("names", choices=STAGES),
    "stage_min_confidence": Setting("number", 0, 1),
    # running
    "device": Setting("str"),
    "batch_images": Setting("int", 1, 1024),
    "classify_batch": Setting("int", 0, 4096),
    "num_workers": Setting("int", 0, 64),
    # report
    "clinic": Setting("str"),
    "next_step": Setting("table", choices=DECISIONS),
}

#: Gate settings at which a check rejects no image (allowed, but said in the log).
_CHECK_OFF = {"min_sharpness": (0, "the blur check"), "min_brightness": (0, "the dark check"),
              "max_overexposed": (1, "the over-exposure check"), "max_glare": (1, "the glare check"),
              "min_cervix_px": (0, "the cervix-size check")}


def _shown(v: Any) -> str:
    """A value as written in a config file (TOML-like), for messages."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return repr(float(v))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_shown(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_shown(x)}" for k, x in v.items()) + "}"
    return repr(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def check_setting(key: str, value: Any, where: str, name: str | None = None) -> Any:
    """``value`` of setting ``key`` checked against :data:`SETTINGS` (type; finite, not nan or inf; range)
    and normalised: a whole float of an "int" setting becomes an int, a comma-separated string of
    ``weights``, ``variants`` or ``decision_stages`` a tuple (lists are returned as given).

    Raises CervscanError ``"<where>: <name> = <value>: must be <what is allowed>"``, e.g.
    ``settings.toml: min_sharpness = nan: must be a finite number in [0, 1]``; ``where`` is the config file,
    "command line" or the checkpoint, ``name`` the key as the user wrote it (default ``key``).
    """
    s = SETTINGS[key]
    name = name or key

    def bad(why: str | None = None) -> CervscanError:
        return CervscanError(f"{where}: {name} = {_shown(value)}: {why or 'must be ' + s.allowed()}")

    if s.kind in ("number", "int"):
        if not _is_number(value):
            raise bad()
        v = float(value)
        if not math.isfinite(v) or (s.kind == "int" and not v.is_integer()):
            raise bad()
        if (v < s.lo or (s.lo_open and v == s.lo)) or (v > s.hi or (s.hi_open and v == s.hi)):
            raise bad()
        return int(v) if s.kind == "int" else value
    if s.kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if s.kind == "choice":
        if not isinstance(value, str) or value not in s.choices:
            raise bad()
        return value
    if s.kind == "str":
        if not isinstance(value, str):
            raise bad()
        return value
    if s.kind == "table":
        if not (isinstance(value, dict) and all(k in s.choices and isinstance(t, str) for k, t in value.items())):
            raise bad()
        return value
    out = value
    if isinstance(value, str):  # written as on the command line
        parse = parse_weights if s.kind == "weights" else parse_variants if key == "variants" else parse_stages
        try:
            out = parse(value)
        except CervscanError as e:
            raise bad(str(e).split(": ", 1)[-1]) from None
    elif not isinstance(value, (list, tuple)):
        raise bad()
    if s.kind == "weights":
        if (len(out) != 6 or not all(_is_number(x) and math.isfinite(float(x)) and x >= 0 for x in out)
                or sum(out) <= 0):
            raise bad()
    elif not out or not all(isinstance(x, str) and x in s.choices for x in out):
        raise bad()
    return out


def check_settings(data: dict[str, Any], where: str, names: dict[str, str] | None = None) -> dict[str, Any]:
    """Every value of ``data`` (key -> value; None: not given, passed through) checked with
    :func:`check_setting`; unknown keys are an error. ``names``: how each key is shown (e.g. the
    command-line option). A gate setting that switches its check off (e.g. ``max_glare = 1``) is logged."""
    names = names or {}
    unknown = sorted(k for k in data if k not in SETTINGS)
    if unknown:
        raise CervscanError(f"{where}: unknown setting(s): {', '.join(unknown)}")
    out = {}
    for k, v in data.items():
        out[k] = v if v is None else check_setting(k, v, where, names.get(k))
        if k in _CHECK_OFF and v is not None and float(v) == _CHECK_OFF[k][0]:
            log.warning("%s: %s = %s: %s rejects no image", where, names.get(k, k), _shown(v), _CHECK_OFF[k][1])
    return out


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
        _check_fields(self, {f.name: f.name for f in dataclasses.fields(self)})

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
    write_heatmaps: bool = False
    backend: str = "torch"

    def __post_init__(self) -> None:
        _check_fields(self, {k: k for k in ("threshold", "device", "batch_images", "classify_batch", "num_workers",
                                            "max_side", "max_pixels", "min_side", "max_decode_mb", "crop",
                                            "classify_view", "cervix_margin", "cervix_min_fraction",
                                            "centre_crop")})

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


# --------------------------------------------------------------------------- resolving: checkpoint < config file < options

#: Where a value that fails its check came from, as the error names it (a config file is named by its path
#: when it is loaded, :func:`cervscan.config.load_config_file`).
WHERE = {"config": "config file", "option": "command line"}


def check_layer(layer: dict, keys, layer_name: str) -> dict:
    """The values of ``layer`` for ``keys`` (None: not given, left out), each checked against
    :data:`cervscan.config.SETTINGS`; options are named as on the command line (``--threshold``)."""

    where = WHERE.get(layer_name, layer_name)
    return {k: check_setting(k, v, where, "--" + k.replace("_", "-") if layer_name == "option" else None)
            for k, v in layer.items() if k in keys and v is not None}


def voting_from(ckpt: dict, file_cfg: dict, overrides: dict, seg_ckpt: dict | None = None) -> tuple[VotingConfig, float, dict]:
    """Checkpoint defaults < config file < explicit options. Returns voting, threshold and provenance.

    Every value is checked (type, finiteness, range: :data:`cervscan.config.SETTINGS`) as it comes in, the
    checkpoints' too; the error names where it came from (the checkpoint, the config file, the command line).
    """
    src: dict[str, str] = {}
    vals: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(VotingConfig)}
    if seg_ckpt and seg_ckpt.get("mask_threshold") is not None:
        vals |= check_layer({"mask_threshold": float(seg_ckpt["mask_threshold"])}, fields, "segmenter checkpoint")
        src["mask_threshold"] = "segmenter checkpoint"
    ck_vote = check_layer(ckpt.get("voting") or {}, ("weights", "brightness", "brightness_from_flipped", "variants",
                                                   "pooling"), "classifier checkpoint")
    vals |= ck_vote
    src |= dict.fromkeys(ck_vote, "checkpoint")
    thr, src["threshold"] = 0.5, "default"
    if ckpt.get("threshold") is not None:
        thr = check_layer({"threshold": float(ckpt["threshold"])}, ("threshold",), "classifier checkpoint")["threshold"]
        src["threshold"] = "checkpoint"
    for layer_name, layer in (("config", file_cfg), ("option", overrides)):
        for k, v in check_layer(layer, fields | {"threshold"}, layer_name).items():
            if k == "threshold":
                thr, src["threshold"] = float(v), layer_name
            else:
                vals[k], src[k] = v, layer_name
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
    for layer_name, layer in (("config", file_cfg), ("option", overrides)):
        for key, v in check_layer(layer, GATE_KEYS, layer_name).items():
            fld = GATE_KEYS[key]
            vals[fld] = tuple(v) if fld == "decision_stages" else v
            provenance[key] = layer_name
    return GateConfig(**vals)
