"""Configuration: validation, parsing of CLI specs, config files and precedence."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from cervscan.config import voting_from as _voting_from
from cervscan.config import (DEFAULT_THRESHOLD, STUDY_WEIGHTS, VARIANT_NAMES, ScreenConfig, VotingConfig,
                             load_config_file, parse_variants, parse_weights)
from cervscan.errors import CervscanError


def test_defaults_are_the_study_method():
    v = VotingConfig()
    assert v.weights == STUDY_WEIGHTS and sum(STUDY_WEIGHTS) == pytest.approx(1.0)
    assert v.variants == VARIANT_NAMES and len(VARIANT_NAMES) == 6
    assert v.brightness == 1.2 and v.brightness_from_flipped is False
    assert ScreenConfig().threshold == DEFAULT_THRESHOLD == 0.5


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        VotingConfig().brightness = 2.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ScreenConfig().threshold = 0.1  # type: ignore[misc]


@pytest.mark.parametrize("kw, msg", [
    ({"weights": (1, 1, 1)}, "need 6 values"),
    ({"weights": (0.5, -0.1, 0.2, 0.2, 0.1, 0.1)}, "non-negative"),
    ({"weights": (0, 0, 0, 0, 0, 0)}, "not all zero"),
    ({"variants": ("original", "sideways")}, "unknown variant"),
    ({"variants": ()}, "unknown variant"),
    ({"brightness": 0.0}, "brightness"),
    ({"brightness": 5.0}, "brightness"),
    ({"weights": (0, 1, 1, 1, 1, 1), "variants": ("original",)}, "weight 0"),
])
def test_voting_config_rejects_bad_values(kw, msg):
    with pytest.raises(CervscanError, match=msg):
        VotingConfig(**kw)


def test_screen_config_to_dict_is_json_serialisable():
    d = ScreenConfig().to_dict()
    assert d["voting"]["weights"] == STUDY_WEIGHTS
    s = json.dumps(d)
    assert json.loads(s)["max_side"] == 2048


@pytest.mark.parametrize("spec, expected", [
    ("all", VARIANT_NAMES),
    ("original", ("original",)),
    ("original+segmented", ("original", "segmented")),
    (" original_flip , segmented_bright ", ("original_flip", "segmented_bright")),
])
def test_parse_variants(spec, expected):
    assert parse_variants(spec) == expected


@pytest.mark.parametrize("spec", ["", "  ", "orig", "original,flipped", ","])
def test_parse_variants_rejects_unknown_names(spec):
    with pytest.raises(CervscanError, match="--variants"):
        parse_variants(spec)


def test_parse_weights():
    assert parse_weights("0.2,0.25,0.15,0.2,0.11,0.09") == STUDY_WEIGHTS
    assert parse_weights("1,1,1,1,1,1") == (1.0,) * 6
    with pytest.raises(CervscanError, match="expected 6 numbers, got 5"):
        parse_weights("1,1,1,1,1")
    with pytest.raises(CervscanError, match="comma-separated numbers"):
        parse_weights("1,1,1,1,1,x")


# --------------------------------------------------------------------------- files

def test_load_json_config(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"threshold": 0.4, "weights": [1, 1, 1, 1, 1, 1], "max_side": 512}))
    assert load_config_file(p) == {"threshold": 0.4, "weights": [1, 1, 1, 1, 1, 1], "max_side": 512}


def test_load_toml_config(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('threshold = 0.35\nvariants = ["original", "segmented"]\nbrightness = 1.1\nclinic = "Clínica São José"\n',
                 encoding="utf-8")
    d = load_config_file(p)
    assert d == {"threshold": 0.35, "variants": ["original", "segmented"], "brightness": 1.1,
                 "clinic": "Clínica São José"}


@pytest.mark.parametrize("name, text, msg", [
    ("bad.json", "{threshold: 0.3", "not valid JSON"),
    ("bad.toml", "threshold = = 1", "not valid TOML"),
    ("list.json", "[1, 2]", "must be a table/object"),
    ("typo.json", '{"treshold": 0.3, "weights": [1,1,1,1,1,1]}', "unknown config key.*treshold"),
])
def test_bad_config_files_name_the_file_and_reason(tmp_path, name, text, msg):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(CervscanError, match=msg) as ei:
        load_config_file(p)
    assert name in str(ei.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(CervscanError, match="cannot read config file") as ei:
        load_config_file(tmp_path / "nope.toml")
    assert "nope.toml" in str(ei.value)


# --------------------------------------------------------------------------- precedence

CKPT = {"threshold": 0.42, "voting": {"weights": [0.1, 0.1, 0.2, 0.2, 0.2, 0.2], "brightness": 1.3,
                                      "brightness_from_flipped": True}}


def test_checkpoint_values_are_the_defaults():
    v, thr, src = _voting_from(CKPT, {}, {})
    assert thr == 0.42 and src["threshold"] == "checkpoint"
    assert v.weights == (0.1, 0.1, 0.2, 0.2, 0.2, 0.2) and v.brightness == 1.3 and v.brightness_from_flipped
    assert src["weights"] == "checkpoint"


def test_no_checkpoint_values_gives_study_defaults():
    v, thr, src = _voting_from({}, {}, {})
    assert v == VotingConfig() and thr == 0.5 and src == {"threshold": "default"}


def test_config_file_overrides_checkpoint_and_options_override_both():
    v, thr, src = _voting_from(CKPT, {"threshold": 0.3, "brightness": 1.1, "max_side": 256},
                               {"threshold": 0.6, "variants": ("original",), "brightness": None})
    assert thr == 0.6 and src["threshold"] == "option"
    assert v.brightness == 1.1 and src["brightness"] == "config"  # None option does not override
    assert v.variants == ("original",) and src["variants"] == "option"
    assert v.weights == (0.1, 0.1, 0.2, 0.2, 0.2, 0.2) and src["weights"] == "checkpoint"


@pytest.mark.parametrize("thr", [-0.1, 1.5])
def test_threshold_out_of_range(thr):
    with pytest.raises(CervscanError, match="threshold"):
        _voting_from({}, {}, {"threshold": thr})


def test_light_modules_do_not_import_torch():
    """config, io, variants, weights and the CLI must stay importable without torch (fast --help)."""
    code = ("import sys\n"
            "for m in ['cervscan.config', 'cervscan.files', 'cervscan.pipeline.vote', 'cervscan.models.registry', "
            "'cervscan.errors', 'cervscan.cli']:\n"
            "    __import__(m)\n"
            "    if 'torch' in sys.modules:\n"
            "        print('torch imported by', m); break\n"
            "else:\n"
            "    print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


@pytest.mark.parametrize("line, msg", [
    ('threshold = "high"', 'threshold = "high": must be a finite number'),
    ("threshold = true", "threshold = true: must be a finite number"),
    ('brightness = "x"', 'brightness = "x": must be a finite number'),
    ('max_side = "big"', 'max_side = "big": must be a whole number'),
    ("max_side = 10.5", "max_side = 10.5: must be a whole number"),
    ('brightness_from_flipped = "yes"', 'brightness_from_flipped = "yes": must be true or false'),
    ("device = 0", "device = 0: must be a string"),
    ("variants = 3", "variants = 3: must be a non-empty list"),
    ('variants = "sideways"', 'variants = "sideways": unknown'),
    ('weights = "0.2,0.25,x,0.2,0.11,0.09"', "weights = .*6 comma-separated numbers"),
    ('weights = ["a", 1, 1, 1, 1, 1]', r'weights = \["a", 1, 1, 1, 1, 1\]: must be 6 finite numbers'),
    ('pooling = "median"', 'pooling = "median": must be one of "probability", "logit"'),
    ('classify_view = "cervix"', 'classify_view = "cervix": must be one of'),
    ('classify_batch = "six"', 'classify_batch = "six": must be a whole number'),
])
def test_config_values_of_the_wrong_type_name_the_file_and_key(tmp_path, line, msg):
    p = tmp_path / "site.toml"
    p.write_text(line + "\n")
    with pytest.raises(CervscanError, match=msg) as ei:
        load_config_file(p)
    assert str(ei.value).startswith(f"{p}:")


def test_config_variants_and_weights_may_be_written_as_on_the_command_line(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('variants = "original+segmented"\nweights = "1,1,1,1,0,0"\nmax_side = 1024.0\n')
    d = load_config_file(p)
    assert d == {"variants": ("original", "segmented"), "weights": (1.0, 1.0, 1.0, 1.0, 0.0, 0.0), "max_side": 1024}
    v, _, src = _voting_from({}, d, {})
    assert v.variants == ("original", "segmented") and v.active_weights() == {"original": 0.5, "segmented": 0.5}
    assert src["variants"] == src["weights"] == "config"


def test_pooling_and_variants_come_from_the_checkpoint_and_the_config_file_wins(tmp_path):
    ck = {"voting": {"weights": list((0.2, 0.25, 0.15, 0.2, 0.11, 0.09)), "variants": ["original", "segmented"],
                     "pooling": "logit"}}
    v, _, src = _voting_from(ck, {}, {})
    assert v.pooling == "logit" and v.variants == ("original", "segmented") and src["pooling"] == "checkpoint"
    p = tmp_path / "site.toml"
    p.write_text('pooling = "probability"\nclassify_view = "crop"\n')
    cfg = load_config_file(p)
    assert cfg == {"pooling": "probability", "classify_view": "crop"}
    v, _, src = _voting_from(ck, cfg, {})
    assert v.pooling == "probability" and src["pooling"] == "config"


# --------------------------------------------------------------------------- one schema: SETTINGS

#: Dataclass fields that are not settings of a config file: the nested configurations, what the command
#: line's --no-masks sets and the gate's measuring scale.
NOT_SETTINGS = {("ScreenConfig", "voting"), ("ScreenConfig", "gate"), ("ScreenConfig", "write_masks"),
                ("ScreenConfig", "write_overlays"), ("GateConfig", "measure_side")}


def test_every_configuration_field_is_one_setting_of_the_table():
    from cervscan.config import CONFIGS, SETTINGS, GateConfig, keys_of

    classes = {"VotingConfig": VotingConfig, "GateConfig": GateConfig, "ScreenConfig": ScreenConfig}
    assert set(classes) == set(CONFIGS)
    for name, cls in classes.items():
        fields = {f.name for f in dataclasses.fields(cls)} - {f for c, f in NOT_SETTINGS if c == name}
        by_field = keys_of(name)
        assert sorted(by_field.values()) == sorted(fields), name  # each field once, no setting without a field
    assert {s.owner for s in SETTINGS.values()} == set(CONFIGS) | {"report"}


def test_defaults_are_read_from_the_dataclasses():
    from cervscan.config import SETTINGS, GateConfig, default_of

    made = {"VotingConfig": VotingConfig(), "GateConfig": GateConfig(), "ScreenConfig": ScreenConfig()}
    for key, s in SETTINGS.items():
        if s.owner == "report":
            assert default_of(key) is None
        else:
            assert default_of(key) == getattr(made[s.owner], s.field or key), key
    assert default_of("threshold") == DEFAULT_THRESHOLD and default_of("quality_gate") is True


def test_every_screening_setting_at_its_default_is_accepted_by_a_config_file(tmp_path):
    from cervscan.config import CONFIGS, SETTINGS, default_of

    data = {k: (list(v) if isinstance(v, tuple) else v) for k in SETTINGS if SETTINGS[k].owner in CONFIGS
            for v in [default_of(k)]}
    p = tmp_path / "all.json"
    p.write_text(json.dumps(data))
    got = load_config_file(p)
    assert set(got) == set(data)
    for k, v in got.items():
        assert (tuple(v) if isinstance(v, list) else v) == default_of(k), k


@pytest.mark.parametrize("item, key, value", [
    ("min_sharpness=0.4", "min_sharpness", 0.4),
    ("max_side=1024", "max_side", 1024),
    (" quality_gate = false ", "quality_gate", False),
    ("decision_stages=acetic,lugol", "decision_stages", "acetic,lugol"),
    ("crop=cervix", "crop", "cervix"),
    ("min_brightness=abc", "min_brightness", "abc"),  # left as text: the check names it
])
def test_parse_set_reads_each_value_as_its_settings_kind(item, key, value):
    from cervscan.config import parse_set

    assert parse_set([item]) == {key: value}


@pytest.mark.parametrize("items, msg", [
    (["min_sharpness"], "KEY=VALUE"),
    (["=0.4"], "KEY=VALUE"),
    (["sharpness=0.4"], "not a screening setting"),
    (["clinic=Nord"], "not a screening setting"),  # read by reports only
    (["max_glare=0.1", "max_glare=0.2"], "given twice"),
])
def test_parse_set_refuses_what_is_not_a_setting(items, msg):
    from cervscan.config import parse_set

    with pytest.raises(CervscanError, match=msg):
        parse_set(items)


def test_option_values_are_named_as_given_on_the_command_line():
    from cervscan.config import SETTINGS, check_layer

    with pytest.raises(CervscanError, match=r"command line: --set min_sharpness = 2: must be a finite number in \[0, 1\]"):
        check_layer({"min_sharpness": 2}, SETTINGS, "option")
    with pytest.raises(CervscanError, match=r"command line: --threshold = 1.5"):
        check_layer({"threshold": 1.5}, SETTINGS, "option")
    with pytest.raises(CervscanError, match='command line: --set max_side = "abc": must be a whole number'):
        check_layer({"max_side": "abc"}, SETTINGS, "option")


def test_gate_settings_come_from_the_command_line_too():
    from cervscan.config import gate_from

    prov: dict = {}
    g = gate_from({"min_sharpness": 0.3, "max_glare": 0.02}, {"min_sharpness": 0.4, "decision_stages": "acetic,lugol"},
                  prov)
    assert g.min_sharpness == 0.4 and g.max_glare == 0.02 and g.decision_stages == ("acetic", "lugol")
    assert prov == {"min_sharpness": "option", "max_glare": "config", "decision_stages": "option"}


def test_screen_settings_config_file_then_options_with_provenance():
    from cervscan.config import screen_settings

    prov: dict = {}
    got = screen_settings({"max_side": 1024, "centre_crop": 1, "threshold": 0.2}, {"max_side": 512.0, "num_workers": 2},
                          prov)
    assert got == {"max_side": 512, "centre_crop": 1.0, "num_workers": 2}
    assert type(got["max_side"]) is int and type(got["centre_crop"]) is float
    assert prov == {"max_side": "option", "centre_crop": "config", "num_workers": "option"}
    assert ScreenConfig(**got).max_side == 512
