"""A site's adapted decision in use: ``--site RUN`` for screen, evaluate and batch, and ``models install RUN`` /
``models rollback`` of an adapt run (its classifier and its site settings, together).

The RUN folders are made as ``cervscan adapt`` writes them (``model.pt``: a classifier recording its validation
and its ``site``; ``site.toml``: the gate thresholds, decision stages and threshold) around the tiny classifier, so
that screening takes a second; the last test writes one with ``cervscan adapt`` itself (the synthetic site of
``tests/test_adapt.py``), installs it and screens with it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import read_csv, read_json
from test_adapt import fake_extraction, installed_checkpoint, make_site, run_kwargs
from typer.testing import CliRunner

from cervscan import api
from cervscan.cli import app
from cervscan.config import load_config_file
from cervscan.models import registry as W
from cervscan.models.networks import read_checkpoint, save_checkpoint
from cervscan.pipeline.build import config_layers
from cervscan.training.validation import classifier_validation

#: What an adapt run's site.toml sets (training/sitecard.py): the five gate thresholds, the stages, the threshold.
SITE = {"min_sharpness": 0.05, "min_brightness": 20.0, "max_overexposed": 0.9, "max_glare": 0.25,
        "min_cervix_px": 8.0, "decision_stages": ["acetic"], "threshold": 0.4321}
SITE_KEYS = tuple(SITE)
WHY = "worse than the installed decision on the same patients (test)"


def flat(text: str) -> str:
    return " ".join(text.split())


def make_run(folder: Path, cls: Path, *, installable: bool = True, settings: dict | None = None) -> Path:
    """An adapt RUN folder around the classifier checkpoint ``cls``: model.pt (a passed validation, ``site``) and
    site.toml."""
    folder.mkdir(parents=True)
    y = np.repeat([0, 1], 10)
    ck = read_checkpoint(cls)
    ck |= {"validation": classifier_validation(y, y + np.linspace(0, 0.5, 20), method="test"),
           "threshold": SITE["threshold"], "decision_stages": SITE["decision_stages"],
           "site": {"visits": "/clinic/visits", "labels": "/clinic/labels.csv", "fitted_on": "local",
                    "installable": installable, "not_installable_because": [] if installable else [WHY],
                    "adapted_at": "2025-01-01T00:00:00+0000"}}
    save_checkpoint(ck, folder / "model.pt")
    lines = ["# cervscan site settings, written by 'cervscan adapt'"]
    lines += [f"{k} = {v!r}" if not isinstance(v, list) else f'{k} = ["{v[0]}"]' for k, v in (settings or SITE).items()]
    (folder / "site.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_config_file(folder / "site.toml") == (settings or SITE)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models) -> dict:
    root = tmp_path_factory.mktemp("adapt-runs")
    return {"ok": make_run(root / "ok", tiny_models["cls"]),
            "bad": make_run(root / "bad", tiny_models["cls"], installable=False), "why": WHY}


@pytest.fixture
def visits(tmp_path, make_visit) -> Path:
    root = tmp_path / "visits"
    make_visit(root / "P1", 2, seed=1)
    make_visit(root / "P2", 1, seed=2)
    return root


@pytest.fixture
def tiny(tiny_models) -> list[str]:
    """The other roles' tiny models (the classifier comes from the site)."""
    return ["--seg-model", str(tiny_models["seg"]), "--cervix-model", str(tiny_models["cervix"]), "--device", "cpu"]


def _from_site(run: dict, run_dir: Path, source: str = "option") -> None:
    """run.json says the site settings screened (file, sha256, name), and that their values came from them."""
    s = run["site"]
    toml = Path(s["settings"])
    assert s["source"] == source and s["sha256"] == W.sha256_file(toml) and s["installable"] is True
    assert s["name"] == run_dir.name and toml.read_bytes() == (run_dir / "site.toml").read_bytes()
    settings = load_config_file(toml)
    assert sorted(s["keys"]) == sorted(settings) and "threshold" in settings and "max_glare" in settings
    for key in settings:
        assert run["provenance"][key] == "site", key
    assert run["threshold"] == pytest.approx(settings["threshold"])
    gate = run["config"]["gate"]
    assert gate["max_glare"] == pytest.approx(settings["max_glare"]) and gate["max_glare"] != 0.016
    assert gate["decision_stages"] == list(settings["decision_stages"])


# --------------------------------------------------------------------------- --site

def test_screen_with_site_uses_its_classifier_and_settings(runs, visits, tiny, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["screen", str(visits), "-o", str(out), "--site", str(runs["ok"]), *tiny, "-q"])
    assert r.exit_code in (0, 5), r.output
    run = read_json(out / "run.json")
    _from_site(run, runs["ok"])
    assert run["site"]["visits"] == "/clinic/visits"
    cls = run["models"]["classifier"]
    assert Path(cls["path"]) == runs["ok"] / "model.pt" and cls["source"] == "option"
    # the CSVs name it as any classifier: its name@version and the first 12 hex digits of its sha256
    assert {row["cls_model"] for row in read_csv(out / "images.csv")} == {f"tiny-cls@test:{cls['sha256'][:12]}"}


def test_evaluate_with_site_and_the_layers_over_it(runs, visits, tiny, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nP1,1\nP2,0\n", encoding="utf-8")
    cfg = tmp_path / "more.toml"
    cfg.write_text("max_glare = 0.3\n", encoding="utf-8")
    r = CliRunner().invoke(app, ["evaluate", str(visits), "--labels", str(labels), "-o", str(tmp_path / "eval"),
                                 "--site", str(runs["ok"]), "--config", str(cfg), "--set", "min_sharpness=0.2",
                                 "--bootstrap", "50", *tiny, "-q"])
    assert r.exit_code == 0, r.output
    metrics = read_json(tmp_path / "eval" / "metrics.json")
    assert Path(metrics["models"]["classifier"]["path"]) == runs["ok"] / "model.pt"
    assert metrics["site"]["settings"] == str(runs["ok"] / "site.toml")
    run = read_json(tmp_path / "eval" / "screen" / "run.json")
    assert run["site"]["settings"] == str(runs["ok"] / "site.toml") and run["site"]["overridden_by_config"] == ["max_glare"]
    # site settings < --config < options: each value from where it was given last
    p = run["provenance"]
    assert (p["threshold"], p["max_glare"], p["min_sharpness"]) == ("site", "config", "option")
    assert run["config"]["gate"]["max_glare"] == 0.3 and run["config"]["gate"]["min_sharpness"] == 0.2


def test_batch_with_site_screens_again_when_the_site_changes(runs, visits, tiny, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(runs["ok"], site)
    out = tmp_path / "batch"
    args = ["batch", str(visits), "-o", str(out), "--site", str(site), *tiny, "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code in (0, 5), r.output
    run = read_json(out / "run.json")
    _from_site(run, site)
    assert run["batch"]["new"] == 2
    r = CliRunner().invoke(app, args)
    assert read_json(out / "run.json")["batch"]["unchanged"] == 2  # same site: nothing to screen again
    text = (site / "site.toml").read_text(encoding="utf-8")
    (site / "site.toml").write_text(text.replace("max_glare = ", "max_glare = 0.2 # was ", 1), encoding="utf-8")
    r = CliRunner().invoke(app, args)
    assert r.exit_code in (0, 5), r.output
    run = read_json(out / "run.json")
    assert run["batch"]["changed"] == 2 and run["config"]["gate"]["max_glare"] == 0.2


@pytest.mark.parametrize("command", ["screen", "evaluate", "batch"])
def test_site_with_cls_model_is_a_usage_error(command, runs, visits, tiny_models, tmp_path):
    extra = ["--labels", str(tmp_path / "labels.csv")] if command == "evaluate" else []
    r = CliRunner().invoke(app, [command, str(visits), "-o", str(tmp_path / "out"), *extra, "--site", str(runs["ok"]),
                                 "--cls-model", str(tiny_models["cls"])])
    assert r.exit_code == 2, r.output
    assert "--site" in flat(r.output) and "--cls-model" in flat(r.output) and "give one" in flat(r.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["screen", "evaluate", "batch"])
@pytest.mark.parametrize("missing", ["model.pt", "site.toml"])
def test_site_without_its_files_is_one_line_naming_the_file(command, missing, runs, visits, tiny_models, tmp_path,
                                                            monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(runs["ok"], run)
    (run / missing).unlink()
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nP1,1\nP2,0\n", encoding="utf-8")
    extra = ["--labels", str(labels)] if command == "evaluate" else []
    # --site, an option, wins over $CERVSCAN_CLS_MODEL (no usage error): the missing file is what is said
    monkeypatch.setenv("CERVSCAN_CLS_MODEL", str(tiny_models["cls"]))
    r = CliRunner().invoke(app, [command, str(visits), "-o", str(tmp_path / "out"), *extra, "--site", str(run)])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and flat(f"{run / missing}: not found") in flat(r.stderr), r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_site_marked_not_installable_screens_with_a_warning(runs, visits, tiny_models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cervscan"):
        res = api.screen([visits], tmp_path / "out", site=runs["bad"], seg_model=str(tiny_models["seg"]),
                         cervix_model=str(tiny_models["cervix"]), device="cpu")
    assert res.run["site"]["installable"] is False and res.run["site"]["not_installable_because"] == [runs["why"]]
    assert "marked not installable" in caplog.text and runs["why"] in caplog.text


# --------------------------------------------------------------------------- models install / rollback

def test_install_an_adapt_run_then_screen_uses_classifier_and_settings(runs, visits, tiny, tmp_path):
    cli = CliRunner()
    r = cli.invoke(app, ["models", "install", str(runs["ok"]), "--name", "site"])
    assert r.exit_code == 0, r.output
    assert "installed classifier" in r.stdout and "installed site settings" in r.stdout
    ref = W.resolve("classifier")
    assert ref.source == "installed" and W.installed_settings().path == ref.path.parent / "site.toml"
    entry = {e["role"]: e for e in W.read_manifest(ref.path.parent)["models"]}["settings"]
    assert entry["sha256"] == W.sha256_file(runs["ok"] / "site.toml") and entry["name"] == "ok"

    listing = flat(cli.invoke(app, ["models", "list"]).stdout)
    assert "settings: installed" in listing and "classifier: installed" in listing
    rows = [r for r in api.models_list()["rows"] if r["source"] == "installed"]
    assert sorted((r["role"], r["in_use"]) for r in rows) == [("classifier", True), ("settings", True)]
    assert cli.invoke(app, ["models", "verify"]).exit_code == 0  # the settings' sha256 too

    out = tmp_path / "out"  # no --cls-model, no --config, no --site: this machine's default
    r = cli.invoke(app, ["screen", str(visits), "-o", str(out), *tiny, "-q"])
    assert r.exit_code in (0, 5), r.output
    run = read_json(out / "run.json")
    _from_site(run, runs["ok"], source="installed")
    assert run["models"]["classifier"]["source"] == "installed"
    # training never takes the installed site's settings
    assert config_layers(site=False)[1] is None and config_layers()[1] is not None

    # rollback of the classifier takes its settings along: the shipped classifier and no site settings
    r = cli.invoke(app, ["models", "rollback", "--role", "classifier"])
    assert r.exit_code == 0 and "no site settings" in flat(r.stdout)
    assert W.resolve("classifier").source == "shipped" and W.installed_settings() is None
    listing = flat(cli.invoke(app, ["models", "list"]).stdout)
    assert "settings: none" in listing and "classifier: shipped" in listing
    # 'use' brings both back, and a plain rollback drops both again
    assert cli.invoke(app, ["models", "use", "classifier", ref.path.parent.name]).exit_code == 0
    assert W.installed_settings() is not None
    assert cli.invoke(app, ["models", "rollback"]).exit_code == 0
    assert W.resolve("classifier").source == "shipped" and W.installed_settings() is None and W.installed_current() == {}


def test_install_refuses_a_run_recorded_not_installable_unless_forced(runs, tmp_path):
    r = CliRunner().invoke(app, ["models", "install", str(runs["bad"])])
    assert r.exit_code == 1, r.output
    assert "installable: false" in flat(r.stderr) and flat(runs["why"]) in flat(r.stderr) and "--force" in r.stderr
    assert W.installed_current() == {}
    r = CliRunner().invoke(app, ["models", "install", str(runs["bad"]), "--force"])
    assert r.exit_code == 0, r.output
    assert "installable: false" in flat(r.stderr)  # the red warning
    ref = W.resolve("classifier")
    assert runs["why"] in ref.entry["installed_with_force"] and W.installed_settings() is not None


def test_install_of_an_adapt_run_needs_its_settings_and_checks_them(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["ok"], run)
    (run / "site.toml").unlink()
    with pytest.raises(W.ModelNotFoundError, match=r"site\.toml: not found.*installs together"):
        W.install([run])
    (run / "site.toml").write_text("max_glare = 7\n", encoding="utf-8")
    with pytest.raises(Exception, match=r"site\.toml.*max_glare"):
        W.install([run])
    assert W.installed_current() == {}
    # an installed settings file that was changed is refused when screening would read it
    W.install([runs["ok"]])
    f = W.installed_settings().path
    f.write_text(f.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    with pytest.raises(W.ChecksumError, match="site.toml: sha256 mismatch"):
        config_layers()


def test_adapt_run_installed_then_screened(tmp_path, visits, tiny, monkeypatch):
    """``cervscan adapt`` -> ``models install RUN`` -> ``screen`` with no options: the adapted classifier and the
    site.toml adapt wrote, with run.json naming them."""
    site = make_site(tmp_path / "site")
    with monkeypatch.context() as mp:
        fake_extraction(mp, site, glare_every=7)
        inst = installed_checkpoint(tmp_path / "installed.pt", site["u"], input_size=64)
        api.adapt(**run_kwargs(site, tmp_path / "RUN", inst, decision_stages=("acetic",), input_size=64))
    assert api.models_install([tmp_path / "RUN"])["settings"]["sha256"] == W.sha256_file(tmp_path / "RUN" / "site.toml")
    r = CliRunner().invoke(app, ["screen", str(visits), "-o", str(tmp_path / "out"), *tiny, "-q"])
    assert r.exit_code in (0, 5), r.output
    run = read_json(tmp_path / "out" / "run.json")
    _from_site(run, tmp_path / "RUN", source="installed")
    assert run["models"]["classifier"]["sha256"] == W.sha256_file(tmp_path / "RUN" / "model.pt")


def test_evaluate_with_a_malformed_option_is_a_usage_error(visits, tmp_path):
    r = CliRunner().invoke(app, ["evaluate", str(visits), "--labels", str(tmp_path / "l.csv"), "-o",
                                 str(tmp_path / "out"), "--weights", "1,2"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output


def test_help_shows_site(tmp_path):
    for command in ("screen", "evaluate", "batch"):
        r = CliRunner().invoke(app, [command, "--help"])
        assert r.exit_code == 0 and "--site" in r.output


def test_site_settings_of_another_run_are_refused():
    from types import SimpleNamespace

    from cervscan.errors import CervscanError
    from cervscan.pipeline.build import _site_belongs

    ref, cls = SimpleNamespace(path="RUN/site.toml"), SimpleNamespace(path="RUN/model.pt")
    _site_belongs(ref, {"threshold": 0.28}, cls, {"threshold": 0.28})
    _site_belongs(None, {}, cls, {"threshold": 0.28})
    with pytest.raises(CervscanError, match="belong to another adapt run"):
        _site_belongs(ref, {"threshold": 0.357}, cls, {"threshold": 0.28})
