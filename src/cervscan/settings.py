"""The schema of cervscan's settings: one table (:data:`SETTINGS`) that says, for every setting, its type
and allowed range, which configuration it belongs to and which field it sets (``VotingConfig``,
``GateConfig``, ``ScreenConfig`` of :mod:`cervscan.config`, or ``report``: read by ``cervscan report``
only), whether a model checkpoint may bring it, and its named command-line option. A setting's default is
its dataclass field's default (:func:`cervscan.config.default_of`), not written here again.

Everything else is derived from the table: the keys a config file accepts and their checks
(:func:`cervscan.config.load_config_file`), the command line's ``--set KEY=VALUE`` (:func:`parse_set`), the
checks of the dataclasses' fields, the resolution checkpoint < config file < options and the provenance that
run.json records (:func:`cervscan.config.voting_from`, :func:`~cervscan.config.gate_from`,
:func:`~cervscan.config.screen_settings`).

Why frozen dataclasses and one table, not pydantic: the checks cervscan needs are few (a kind, a range,
finiteness, a list of choices) and their messages name where a value came from (the file, the checkpoint,
the command line) in the words the README documents; a table of ~35 rows states them and reads top to
bottom, the dataclasses stay plain, hashable and free to import (``cervscan --help`` and the light commands
load them), and no dependency is added to a clinical tool whose inputs are a handful of numbers.
No torch import.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any

from cervscan.errors import CervscanError

log = logging.getLogger("cervscan.config")

#: The six variants of the method, in order (v1..v6).
VARIANT_NAMES: tuple[str, ...] = (
    "original",
    "segmented",
    "original_flip",
    "segmented_flip",
    "original_bright",
    "segmented_bright",
)
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
    #: The configuration the setting belongs to: "VotingConfig", "GateConfig", "ScreenConfig" (its default
    #: is that dataclass's field's, :func:`default_of`) or "report" (read by ``cervscan report`` only).
    owner: str = "ScreenConfig"
    #: The dataclass field it sets, when not named as the setting.
    field: str = ""
    #: Where a model checkpoint may bring the value: "classifier" (a key of the classifier checkpoint),
    #: "classifier voting" (a key of its ``voting``) or "segmenter" (a key of the lesion segmenter's).
    checkpoint: str = ""
    #: The named command-line option that sets it (``--set KEY=VALUE`` sets every screening setting).
    option: str = ""
    #: Quality-gate checks: the value at which the check rejects no image, and the check's name (allowed,
    #: but said in the log).
    off: tuple = ()

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
    "threshold": Setting("number", 0, 1, hi_open=True,  # score > 1 never happens: 1 would refer nobody
                         checkpoint="classifier", option="--threshold"),
    "pooling": Setting("choice", choices=("probability", "logit"), owner="VotingConfig",
                       checkpoint="classifier voting"),
    # variants and voting
    "weights": Setting("weights", owner="VotingConfig", checkpoint="classifier voting", option="--weights"),
    "brightness": Setting("number", 0, 4, lo_open=True, owner="VotingConfig", checkpoint="classifier voting",
                          option="--brightness"),
    "brightness_from_flipped": Setting("bool", owner="VotingConfig", checkpoint="classifier voting",
                                       option="--brightness-from-flipped"),
    "variants": Setting("names", choices=VARIANT_NAMES, owner="VotingConfig", checkpoint="classifier voting",
                        option="--variants"),
    "crop_margin": Setting("number", 0, 1, owner="VotingConfig"),
    "min_lesion_fraction": Setting("number", 0, 0.5, owner="VotingConfig"),
    "mask_threshold": Setting("number", 0, 1, lo_open=True, hi_open=True,  # 0: every pixel; >= 1: none
                              owner="VotingConfig", checkpoint="segmenter"),
    # crop
    "crop": Setting("choice", choices=CROP_MODES, checkpoint="classifier", option="--crop"),
    "classify_view": Setting("choice", choices=("crop", "frame"), checkpoint="classifier"),
    "cervix_margin": Setting("number", 0, 1),
    "cervix_min_fraction": Setting("number", 0, 0.5, lo_open=True),
    "centre_crop": Setting("number", 0.25, 1),
    # decoding
    "max_side": Setting("int", 64, 16384),
    "max_pixels": Setting("int", 1_000_000, 1_000_000_000),
    "min_side": Setting("int", 1, 4096),
    "max_decode_mb": Setting("int", 16, 1_000_000),
    # quality gate
    "quality_gate": Setting("bool", owner="GateConfig", field="enabled", option="--no-quality-gate"),
    "min_sharpness": Setting("number", 0, 1, owner="GateConfig", off=(0, "the blur check")),
    "min_brightness": Setting("number", 0, 255, owner="GateConfig", off=(0, "the dark check")),
    "max_overexposed": Setting("number", 0, 1, owner="GateConfig", off=(1, "the over-exposure check")),
    "max_glare": Setting("number", 0, 1, owner="GateConfig", off=(1, "the glare check")),
    "min_cervix_px": Setting("number", 0, 16384, owner="GateConfig", off=(0, "the cervix-size check")),
    "decision_stages": Setting("names", choices=STAGES, owner="GateConfig", checkpoint="classifier"),
    "stage_min_confidence": Setting("number", 0, 1, owner="GateConfig"),
    # running
    "device": Setting("str", option="--device"),
    "batch_images": Setting("int", 1, 1024),
    "classify_batch": Setting("int", 0, 4096),
    "num_workers": Setting("int", 0, 64, option="--workers"),
    # report
    "clinic": Setting("str", owner="report"),
    "next_step": Setting("table", choices=DECISIONS, owner="report"),
}

#: The configurations a screening setting belongs to (a "report" setting is none of them).
CONFIGS = ("VotingConfig", "GateConfig", "ScreenConfig")


def keys_of(owner: str) -> dict[str, str]:
    """Setting key -> dataclass field, for the settings of ``owner`` (e.g. "GateConfig")."""
    return {k: s.field or k for k, s in SETTINGS.items() if s.owner == owner}


def from_checkpoint(where: str) -> tuple[str, ...]:
    """The settings a model checkpoint may bring from ``where`` ("classifier voting", ...)."""
    return tuple(k for k, s in SETTINGS.items() if s.checkpoint == where)


def option_name(key: str) -> str:
    """How the command line names a setting: its named option, else ``--set KEY``."""
    return SETTINGS[key].option or f"--set {key}"


#: Config-file keys of the gate -> GateConfig field.
GATE_KEYS = keys_of("GateConfig")
#: Gate settings at which a check rejects no image (allowed, but said in the log).
_CHECK_OFF = {k: s.off for k, s in SETTINGS.items() if s.off}


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


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """The command line's ``--set KEY=VALUE`` (repeatable): any screening setting of :data:`SETTINGS`, the
    value read as the setting's kind (a number, true/false, a name, a comma list). Its type and range are
    checked with the other options (:func:`check_layer`, named ``--set KEY``). A malformed item, an unknown
    or report-only key, or a key given twice raises CervscanError."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not eq or not key:
            raise CervscanError(f"--set {item!r}: write KEY=VALUE, e.g. --set min_sharpness=0.4")
        if key not in SETTINGS or SETTINGS[key].owner not in CONFIGS:
            raise CervscanError(f"--set {key}: not a screening setting; one of "
                                + ", ".join(k for k, s in SETTINGS.items() if s.owner in CONFIGS))
        if key in out:
            raise CervscanError(f"--set {key}: given twice")
        out[key] = _typed(SETTINGS[key], text)
    return out


def _typed(s: Setting, text: str) -> Any:
    """``text`` of a ``--set`` as the setting's kind; left as text when it is not one (the check says so)."""
    if s.kind in ("number", "int"):
        for conv in (int, float):
            try:
                return conv(text)
            except ValueError:
                pass
    if s.kind == "bool" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text
