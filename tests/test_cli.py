"""The command line: help, version, exit codes, JSON output, option wiring, models commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cervscan import __version__
from cervscan.models import registry as W
from cervscan.cli import app

from conftest import read_csv


def flat(text: str) -> str:
    """Rich wraps long lines; compare on single-spaced text."""
    return " ".join(text.split())


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def model_args(tiny_models) -> list[str]:
    return ["--seg-model", str(tiny_models["seg"]), "--cls-model", str(tiny_models["cls"]), "--device", "cpu",
            "--workers", "0"]


# --------------------------------------------------------------------------- help and version

def test_help_lists_commands_and_exit_codes(runner):
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    out = flat(r.output)
    for cmd in ("screen", "evaluate", "report", "models"):
        assert cmd in out
    assert "Exit codes:" in out
    assert "0 all screened" in out and "3 finished but some images or patients failed" in out
    assert "1 error" in out and "2 usage error" in out
    assert "does not diagnose" in out


def test_screen_help_lists_options_and_exit_codes(runner):
    r = runner.invoke(app, ["screen", "--help"])
    assert r.exit_code == 0
    out = flat(r.output)
    for opt in ("--out", "--seg-model", "--cls-model", "--threshold", "--weights", "--variants", "--json",
                "--device", "--config", "--no-masks"):
        assert opt in out, opt
    assert "Exit codes:" in out and "2 usage error" in out


def test_version(runner):
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0
    assert r.stdout.strip() == f"cervscan {__version__}"


def test_python_dash_m_help():
    """(That ``import cervscan.cli`` loads no heavy library: tests/test_architecture.py.)"""
    r = subprocess.run([sys.executable, "-m", "cervscan", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "screen" in r.stdout and "Exit codes" in r.stdout


# --------------------------------------------------------------------------- exit codes

def test_exit_0_when_everything_was_screened(runner, synthetic_batch, tmp_path, model_args):
    out = tmp_path / "out"
    r = runner.invoke(app, ["screen", str(synthetic_batch), "-o", str(out), *model_args])
    assert r.exit_code == 0, r.output
    text = flat(r.stdout)
    for pid in ("P001", "P002", "P003"):
        assert pid in text
    assert "does not diagnose" in text  # the summary table's caption
    assert len(read_csv(out / "patients.csv")) == 3
    assert json.loads((out / "run.json").read_text())["exit_code"] == 0


def test_exit_3_when_some_image_failed(runner, synthetic_batch, tmp_path, model_args):
    (synthetic_batch / "P002" / "broken.jpg").write_bytes(b"")
    out = tmp_path / "out"
    r = runner.invoke(app, ["screen", str(synthetic_batch), "-o", str(out), *model_args])
    assert r.exit_code == 3, r.output
    err = "".join(r.stderr.split())  # the log line may be folded anywhere
    assert "broken.jpg:emptyfile(0bytes)" in err
    assert "1 image(s) failed" in flat(r.stdout)
    pats = {p["patient_id"]: p for p in read_csv(out / "patients.csv")}
    assert pats["P002"]["n_failed"] == "1" and pats["P002"]["decision"] != "error"


def test_exit_3_when_a_patient_has_no_images(runner, synthetic_batch, tmp_path, model_args):
    (synthetic_batch / "P004").mkdir()
    r = runner.invoke(app, ["screen", str(synthetic_batch), "-o", str(tmp_path / "out"), "-q", *model_args])
    assert r.exit_code == 3
    assert r.stdout == ""  # --quiet
    pats = {p["patient_id"]: p for p in read_csv(tmp_path / "out" / "patients.csv")}
    assert pats["P004"]["decision"] == "error"


def test_exit_1_when_no_model_is_found(runner, synthetic_batch, tmp_path, monkeypatch, cervscan_home):
    assert not any(Path(cervscan_home).iterdir())  # empty CERVSCAN_HOME
    monkeypatch.setattr(W, "shipped_dir", lambda: None)
    r = runner.invoke(app, ["screen", str(synthetic_batch), "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert r.exit_code == 1
    err = flat(r.stderr)
    assert "error: no segmenter model found" in err and "--seg-model" in err
    assert "Traceback" not in r.output
    assert not (tmp_path / "out" / "patients.csv").exists()


def test_exit_1_when_output_is_not_writable(runner, synthetic_batch, tmp_path, model_args):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = runner.invoke(app, ["screen", str(synthetic_batch), "-o", str(blocker / "out"), *model_args])
    assert r.exit_code == 1
    assert "output folder is not writable" in flat(r.stderr)


def test_exit_1_on_a_tampered_model(runner, synthetic_batch, tmp_path, tiny_models):
    import shutil

    d = tmp_path / "w"
    shutil.copytree(tiny_models["dir"], d)
    data = bytearray((d / "seg.pt").read_bytes())
    data[-100] ^= 1
    (d / "seg.pt").write_bytes(bytes(data))
    r = runner.invoke(app, ["screen", str(synthetic_batch), "-o", str(tmp_path / "out"), "--seg-model", str(d),
                            "--cls-model", str(d), "--device", "cpu"])
    assert r.exit_code == 1
    assert "sha256 mismatch" in flat(r.stderr)


def test_exit_1_on_a_bad_config_file(runner, synthetic_batch, tmp_path, model_args):
    cfg = tmp_path / "c.toml"
    cfg.write_text("treshold = 0.3\n")
    r = runner.invoke(app, ["screen", str(synthetic_batch), "-o", str(tmp_path / "out"), "--config", str(cfg),
                            *model_args])
    assert r.exit_code == 1
    assert "unknown config key(s): treshold" in flat(r.stderr)


@pytest.mark.parametrize("args", [
    ["screen"],  # missing PATHS
    ["screen", ".", "--threshold", "high"],  # not a number
    ["screen", ".", "--no-such-option"],
    ["screen", ".", "--workers", "two"],
    ["no-such-command"],
])
def test_exit_2_on_usage_errors(runner, args):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Usage" in r.output or "Error" in r.output


# --------------------------------------------------------------------------- JSON output

def test_json_output_parses(runner, synthetic_batch, tmp_path, model_args):
    (synthetic_batch / "P003" / "note.txt").write_text("skip me")
    r = runner.invoke(app, ["screen", str(synthetic_batch), "-o", str(tmp_path / "out"), "--json", *model_args])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)  # stdout holds nothing but the JSON document
    assert s["exit_code"] == 0
    assert s["out"] == str(tmp_path / "out")
    assert [p["patient_id"] for p in s["patients"]] == ["P001", "P002", "P003"]
    assert {p["decision"] for p in s["patients"]} <= {"severe", "mildly_normal"}
    assert s["counts"]["images"] == 6 and s["counts"]["skipped_files"] == 1
    assert set(s["models"]) == {"stage", "segmenter", "classifier"} and s["threshold"] == 0.5
    assert set(s["timings"]) >= {"screen_s", "total_s"}


# --------------------------------------------------------------------------- option wiring

class _FakeResult:
    exit_code = 0

    def summary(self) -> dict:
        return {"exit_code": 0, "patients": []}


def test_screen_options_are_passed_to_the_api(runner, monkeypatch, tmp_path):
    import cervscan.api

    seen = {}

    def fake_screen(paths, out, **kw):
        seen.update(paths=paths, out=out, **kw)
        return _FakeResult()

    monkeypatch.setattr(cervscan.api, "screen", fake_screen)
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    r = runner.invoke(app, [
        "screen", "visits A", "visits B", "-o", "results", "--seg-model", "s.pt", "--cls-model", "c.pt",
        "--device", "cuda:1", "--threshold", "0.3", "--weights", "1,2,3,4,5,6", "--brightness", "1.1",
        "--brightness-from-flipped", "--variants", "original+segmented", "--config", str(cfg), "--workers", "3",
        "--no-masks", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"exit_code": 0, "patients": []}
    assert seen["paths"] == [Path("visits A"), Path("visits B")]
    assert seen["out"] == Path("results")
    assert seen["seg_model"] == "s.pt" and seen["cls_model"] == "c.pt"
    assert seen["device"] == "cuda:1" and seen["num_workers"] == 3
    assert seen["config_file"] == cfg
    assert seen["write_masks"] is False and seen["write_overlays"] is False
    assert seen["overrides"] == {"threshold": 0.3, "weights": (1.0, 2.0, 3.0, 4.0, 5.0, 6.0), "brightness": 1.1,
                                 "brightness_from_flipped": True, "variants": ("original", "segmented")}


def test_defaults_and_environment_are_passed_to_the_api(runner, monkeypatch):
    import cervscan.api

    seen = {}
    monkeypatch.setattr(cervscan.api, "screen", lambda paths, out, **kw: seen.update(out=out, **kw) or _FakeResult())
    monkeypatch.setenv("CERVSCAN_SEG_MODEL", "env-seg.pt")
    monkeypatch.setenv("CERVSCAN_CLS_MODEL", "env-cls.pt")
    monkeypatch.setenv("CERVSCAN_DEVICE", "cpu")
    r = runner.invoke(app, ["screen", "v", "-q"])
    assert r.exit_code == 0, r.output
    assert seen["out"] == Path("cervscan-out")
    assert (seen["seg_model"], seen["cls_model"], seen["device"]) == ("env-seg.pt", "env-cls.pt", "cpu")
    assert seen["overrides"] == {} and seen["num_workers"] is None and seen["config_file"] is None
    assert seen["write_masks"] is True


def test_exit_code_of_the_api_result_is_the_process_exit_code(runner, monkeypatch):
    import cervscan.api

    class Partial(_FakeResult):
        exit_code = 3

    monkeypatch.setattr(cervscan.api, "screen", lambda *a, **k: Partial())
    assert runner.invoke(app, ["screen", "v", "--json"]).exit_code == 3


@pytest.mark.parametrize("opt", [["--variants", "sideways"], ["--weights", "1,2,3"]])
def test_malformed_voting_options_are_usage_errors(runner, monkeypatch, opt):
    import cervscan.api

    monkeypatch.setattr(cervscan.api, "screen", lambda *a, **k: pytest.fail("api.screen must not be called"))
    r = runner.invoke(app, ["screen", "v", *opt])
    assert r.exit_code == 2, r.output
    assert opt[0] in flat(r.stderr) and "Usage" in r.stderr


# --------------------------------------------------------------------------- models commands

def test_models_install_list_verify_rollback(runner, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(W, "shipped_dir", lambda: None)
    # --force: the tiny classifier records no validation (refused without it, see test_safety_training.py)
    r = runner.invoke(app, ["models", "install", str(tiny_models["seg"]), str(tiny_models["cls"]), "--name", "clinic",
                            "--force"])
    assert r.exit_code == 0, r.output
    assert "installed segmenter" in r.stdout and "installed classifier" in r.stdout

    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0, r.output
    out = flat(r.stdout)
    assert "segmenter: installed" in out and "classifier: installed" in out
    assert out.count("yes") == 2  # both installed models are in use

    r = runner.invoke(app, ["models", "verify"])
    assert r.exit_code == 0 and flat(r.stdout).count("ok ") == 2

    tag_dir = next(p for p in (W.user_dir() / "models").iterdir() if (p / "classifier.pt").exists())
    f = tag_dir / "classifier.pt"
    data = bytearray(f.read_bytes())
    data[200] ^= 1
    f.write_bytes(bytes(data))
    r = runner.invoke(app, ["models", "verify"])
    assert r.exit_code == 1
    assert "FAIL" in r.stderr and "sha256 mismatch" in flat(r.stderr)

    r = runner.invoke(app, ["models", "rollback", "--role", "segmenter"])
    assert r.exit_code == 0 and "shipped model(s) for segmenter" in flat(r.stdout)
    r = runner.invoke(app, ["models", "list"])
    assert "segmenter: error: no segmenter model found" in flat(r.stdout)


def test_models_install_of_a_non_model_fails(runner, tmp_path):
    p = tmp_path / "x.pt"
    import torch

    torch.save({"a": 1}, p)
    r = runner.invoke(app, ["models", "install", str(p)])
    assert r.exit_code == 1 and "not a cervscan checkpoint" in flat(r.stderr)


def test_models_rollback_with_a_typo_in_the_role(runner):
    r = runner.invoke(app, ["models", "rollback", "--role", "segmentr"])
    assert r.exit_code == 1
    assert "unknown role 'segmentr'" in flat(r.stderr)
    assert "shipped" not in r.stdout
