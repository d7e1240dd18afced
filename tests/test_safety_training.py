"""A classifier no better than chance must never become the screening default.

Calibration that cannot reverse a ranking, the validation every classifier training records and enforces
(train-decision, train-cls), ``models install`` loading a checkpoint fully and refusing one without a passed
validation, a pickle payload refused in cervscan's words, ``evaluate --cv-run`` saying what was fitted on its
own scores, and the labels checked against the visit folders.

The training runs here are fast: train-decision's image features are replaced by synthetic ones (the
pipeline and the feature extraction are tested in test_decision.py), train-cls runs one step on 64 px images.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cervscan import api
from cervscan.errors import EXIT_NOT_VALIDATED

from cervscan.training import finetune as cls_training

from cervscan.training import classifier as decision_training
from cervscan.models import registry as W
from cervscan.cli import app
from cervscan.errors import CheckpointError, DataError, ModelNotFoundError
from cervscan.files import read_labels
from cervscan.metrics import platt_scaling
from cervscan.models.networks import read_checkpoint, save_checkpoint
from cervscan.training.validation import ValidationFailed, classifier_validation, install_problem

from conftest import read_json, synthetic_image, write_image


def flat(text: str) -> str:
    """Rich wraps (and may fold a long path) at any width: compare without whitespace."""
    return "".join(text.split())


def write_labels(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label", "source"])
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------- calibration

def test_platt_scaling_never_reverses_the_ranking():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    inverted = -(2 * y - 1) * 1.5 + rng.normal(0, 0.5, y.size)  # severe patients score lowest
    p = platt_scaling(inverted, y)
    assert p["applied"] is False and p["a"] > 0 and p["fitted_a"] < 0 and "reverse" in p["note"]
    cal = 1 / (1 + np.exp(-(p["a"] * inverted + p["c"])))
    assert np.array_equal(np.argsort(cal, kind="stable"), np.argsort(inverted, kind="stable"))
    # a ranking in the right direction is calibrated with its fitted (positive) slope
    right = platt_scaling(-inverted, y)
    assert right["applied"] is True and right["a"] > 0


def test_validation_rule():
    y = np.repeat([0, 1], 20)
    good = classifier_validation(y, y + np.linspace(0, 0.5, 40), method="test")
    assert good["passed"] and good["ci_low"] > 0.5 and not good["forced"] and good["n_severe"] == 20
    chance = classifier_validation(y, np.zeros(40), method="test", force=True)
    assert chance["auc"] == 0.5 and not chance["passed"] and chance["forced"]
    below = classifier_validation(y, -y.astype(float), method="test")
    assert below["auc"] == 0.0 and below["ci_high"] < 0.5 and not below["passed"]
    # repeats x patients: the mean AUC of the repeats
    two = classifier_validation(y, np.stack([y, -y]).astype(float), method="test")
    assert two["auc"] == pytest.approx(0.5) and not two["passed"]


# --------------------------------------------------------------------------- train-decision (synthetic features)

def decision_bank(root: Path, n: int = 12) -> tuple[Path, Path, dict]:
    """``n`` visit folders with one small image each, labels alternating 0/1, sources A (first half) / B."""
    visits = root / "visits"
    meta = {}
    for i in range(n):
        pid = f"D{i:02d}"
        write_image(visits / pid / "img1.jpg", np.full((40, 40, 3), 120, np.uint8))
        meta[pid] = (i % 2, "A" if i < n // 2 else "B")
    labels = write_labels(root / "labels.csv", [(p, y, s) for p, (y, s) in meta.items()])
    return visits, labels, meta


def fake_features(monkeypatch, meta: dict, *, inverted: bool, folds: int = 2, seed: int = 0) -> None:
    """Replace the pipeline and the image features of train-decision by one informative feature per patient.

    ``inverted``: the feature's sign flips between the two cross-validation folds, so each fold model learns
    the opposite of what holds for its held-out patients: out-of-fold AUC 0 (a classifier worse than chance).
    """
    import timm
    from cervscan.config import VotingConfig
    from cervscan.training.splits import fold_index, strata

    allp = sorted(meta)
    idx = fold_index(strata([meta[p][0] for p in allp], [meta[p][1] for p in allp]), folds, seed)
    fold = dict(zip(allp, idx.tolist()))
    rng = np.random.default_rng(1)
    value = {}
    for p in allp:
        sign = 2 * meta[p][0] - 1
        value[p] = sign * (1 if fold[p] == 0 else -1) if inverted else sign + rng.normal(0, 0.1)
    voting = VotingConfig(variants=("original", "segmented"), pooling="logit")
    pipe = SimpleNamespace(cfg=SimpleNamespace(voting=voting))
    monkeypatch.setattr(decision_training, "_pipeline", lambda cfg: (pipe, {}))
    monkeypatch.setattr(decision_training, "backbone",
                        lambda name: timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).eval())

    def extract(cfg, pipe, refs, items, model, progress=None):
        out = []
        for pid, _ in items:
            f = np.zeros(1280)
            f[0] = value[pid]
            out.append({"eligible": True, "reason": "", "feats": {v: f for v in cfg.variants}})
        return out

    monkeypatch.setattr(decision_training, "extract", extract)


def decision_kwargs(visits, labels, out, **kw) -> dict:
    return dict(visits=str(visits), labels=str(labels), out=str(out), input_size=64, folds=2, repeats=1, C=1.0,
                variants=("original", "segmented"), n_bootstrap=500, **kw)


def test_train_decision_of_an_inverted_classifier_writes_no_model_and_its_numbers_agree(tmp_path, monkeypatch):
    visits, labels, meta = decision_bank(tmp_path)
    fake_features(monkeypatch, meta, inverted=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pt").write_bytes(b"an earlier run's model")
    with pytest.raises(ValidationFailed) as ei:
        api.train_decision(**decision_kwargs(visits, labels, out))
    msg = str(ei.value)
    assert "AUC 0.000" in msg and "BELOW CHANCE" in msg and "--force" in msg and str(out / "model.pt") in msg
    assert not (out / "model.pt").exists()  # no installable model, not even an earlier run's
    m = read_json(out / "metrics.json")
    v = m["validation"]
    assert v["passed"] is False and v["forced"] is False and v["auc"] == 0.0 and v["n_patients"] == 12
    assert m["checkpoint"] is None
    # the calibration keeps the ranking, so metrics.json agrees with itself
    assert m["platt"]["a"] > 0 and m["platt"]["applied"] is False
    assert m["auc_repeats"][0] == pytest.approx(m["repeat0"]["auc"]) == 0.0
    assert read_json(out / "run.json")["validation"] == v
    # the fold models (for evaluate --cv-run) record the failed validation; install refuses them
    fold1 = read_checkpoint(out / "fold1.pt")
    assert fold1["validation"] == v
    with pytest.raises(CheckpointError, match="its recorded validation failed"):
        W.install([out / "fold1.pt"])
    with pytest.raises(ModelNotFoundError, match="no model.pt to install.*failed its validation"):
        W.install([out])
    assert W.installed_current() == {}


def test_train_decision_forced_records_it_and_keeps_the_ranking(tmp_path, monkeypatch):
    visits, labels, meta = decision_bank(tmp_path)
    fake_features(monkeypatch, meta, inverted=True)
    out = tmp_path / "run"
    m = api.train_decision(**decision_kwargs(visits, labels, out, force=True))
    ck = read_checkpoint(out / "model.pt")
    assert ck["validation"]["passed"] is False and ck["validation"]["forced"] is True
    assert m["validation"] == ck["validation"] and m["checkpoint"] == str(out / "model.pt")
    # the folded head (regression x calibration slope) ranks as the regression: positive slope, no inversion
    assert m["platt"]["a"] > 0
    assert install_problem(ck) is not None


def test_train_decision_of_a_good_classifier_installs(tmp_path, monkeypatch):
    visits, labels, meta = decision_bank(tmp_path)
    fake_features(monkeypatch, meta, inverted=False)
    out = tmp_path / "run"
    m = api.train_decision(**decision_kwargs(visits, labels, out))
    v = m["validation"]
    assert v["passed"] is True and v["ci_low"] > 0.5 and v["forced"] is False
    assert m["platt"]["applied"] is True and m["auc_repeats"][0] == pytest.approx(m["repeat0"]["auc"])
    assert read_checkpoint(out / "model.pt")["validation"] == v
    res = W.install([out])
    assert "forced" not in res["classifier"]
    assert W.resolve("classifier").entry["validation"]["passed"] is True


@pytest.mark.parametrize("command", ["train-cls", "train-decision"])
def test_cli_train_frozen_exit_code_and_force(command, tmp_path, monkeypatch):
    """train-cls's default recipe, and train-decision, its deprecated alias (which says so)."""
    visits, labels, meta = decision_bank(tmp_path)
    fake_features(monkeypatch, meta, inverted=True)
    out = tmp_path / "run"
    args = [command, str(visits), "--labels", str(labels), "-o", str(out), "--input-size", "64",
            "--folds", "2", "--repeats", "1", "--C", "1", "--variants", "original+segmented"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == EXIT_NOT_VALIDATED == 6, r.output
    assert ("'train-decision' is deprecated" in r.output) == (command == "train-decision")
    assert read_json(out / "run.json")["recipe"] == "frozen"
    assert "AUC0.000" in flat(r.output) and "BELOWCHANCE" in flat(r.output) and "Traceback" not in r.output
    assert not (out / "model.pt").exists()
    r = CliRunner().invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert "validationFAILED,modelkeptbecauseof--force" in flat(r.output)
    assert read_checkpoint(out / "model.pt")["validation"]["forced"] is True
    # models install refuses it, then installs it with --force and says so
    r = CliRunner().invoke(app, ["models", "install", str(out)])
    assert r.exit_code == 1 and "itsrecordedvalidationfailed" in flat(r.output), r.output
    assert W.installed_current() == {}
    r = CliRunner().invoke(app, ["models", "install", str(out), "--force"])
    assert r.exit_code == 0 and "installedbecauseof--force" in flat(r.output), r.output
    assert W.resolve("classifier").source == "installed"


# --------------------------------------------------------------------------- train-cls

def cls_bank(root: Path, n: int = 10) -> tuple[Path, Path]:
    visits = root / "visits"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pid = f"C{i:02d}"
        write_image(visits / pid / "img1.jpg", synthetic_image(rng, 64, 64))
        rows.append((pid, i % 2, "A"))
    return visits, write_labels(root / "labels.csv", rows)


def inverted_logits(monkeypatch) -> None:
    """The classifier scores every held-out severe image lowest: held-out patient AUC 0."""
    def logits(model, samples, cfg, dev, batch=8):
        z = np.array([-(2.0 * s.label - 1) for s in samples])
        return np.stack([np.zeros((len(samples), 6)), np.tile(z[:, None], (1, 6))], -1)

    monkeypatch.setattr(cls_training, "variant_logits", logits)


def cls_kwargs(visits, labels, out, tiny_models, tmp_path, **kw) -> dict:
    return dict(visits=str(visits), labels=str(labels), out=str(out), seg_model=str(tiny_models["seg"]),
                cervix_model=str(tiny_models["cervix"]), arch="repvgg_a0", input_size=64, epochs=1, batch_size=4,
                max_steps_per_epoch=1, val_fraction=0.4, cache_dir=str(tmp_path / "cache"), device="cpu", **kw)


def test_train_cls_below_chance_writes_no_model_unless_forced(tmp_path, monkeypatch, tiny_models):
    visits, labels = cls_bank(tmp_path)
    with open(labels, "a", newline="") as f:
        f.write("GONE,1,A\n")
    write_image(visits / "STRAY" / "img1.jpg", synthetic_image(np.random.default_rng(5), 64, 64))
    inverted_logits(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(ValidationFailed, match="BELOW CHANCE"):
        api.train_cls("finetune", **cls_kwargs(visits, labels, out, tiny_models, tmp_path))
    assert not (out / "model.pt").exists()
    m = read_json(out / "metrics.json")
    assert m["validation"]["passed"] is False and m["validation"]["auc"] == 0.0 and m["checkpoint"] is None
    for rec in (m["labels_check"], read_json(out / "run.json")["labels_check"]):
        assert rec["labelled_without_folder"] == ["GONE"] and rec["folders_without_label"] == ["STRAY"]
    m = api.train_cls("finetune", **cls_kwargs(visits, labels, out, tiny_models, tmp_path, force=True))
    ck = read_checkpoint(out / "model.pt")
    assert ck["validation"]["forced"] is True and ck["validation"] == m["validation"]
    with pytest.raises(CheckpointError, match="its recorded validation failed"):
        W.install([out])


def test_cli_train_cls_exit_code(tmp_path, monkeypatch, tiny_models):
    visits, labels = cls_bank(tmp_path)
    inverted_logits(monkeypatch)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train-cls", str(visits), "--labels", str(labels), "-o", str(out), "--recipe", "finetune",
                                 "--seg-model", str(tiny_models["seg"]), "--cervix-model", str(tiny_models["cervix"]),
                                 "--input-size", "64", "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.4",
                                 "--max-steps", "1", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert r.exit_code == 6, r.output
    assert "faileditsvalidation" in flat(r.output) and "AUC0.000" in flat(r.output)
    assert not (out / "model.pt").exists()


# --------------------------------------------------------------------------- models install

def _tiny_cls(tiny_models) -> dict:
    return torch.load(tiny_models["cls"], weights_only=True)


@pytest.mark.parametrize("make, reason", [
    (lambda ck: {"kind": "classifier"}, "format 1 dict expected"),
    (lambda ck: {**ck, "state_dict": {}}, "holds no weights"),
    (lambda ck: {**ck, "state_dict": dict(list(ck["state_dict"].items())[:-2])}, "weights do not fit"),
    (lambda ck: {**ck, "voting": {**ck["voting"], "pooling": "median"}}, "pooling"),
], ids=["kind-only", "empty-weights", "missing-weights", "bad-voting"])
def test_install_loads_the_checkpoint_fully_first(make, reason, tiny_models, tmp_path):
    f = tmp_path / "run" / "model.pt"
    f.parent.mkdir()
    save_checkpoint(make(_tiny_cls(tiny_models)), f)
    r = CliRunner().invoke(app, ["models", "install", str(f.parent), "--force"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    assert flat(f"{f}:") in flat(r.output) and flat(reason) in flat(r.output), r.output
    assert W.installed_current() == {}  # the default is untouched: screening still has a working classifier


def test_install_of_a_classifier_without_a_passed_validation_needs_force(tiny_models, tmp_path):
    ck = _tiny_cls(tiny_models)
    assert "validation" not in ck
    with pytest.raises(CheckpointError, match="records no validation.*--force"):
        W.install([tiny_models["cls"]])
    assert W.installed_current() == {}
    passed = {**ck, "validation": classifier_validation(np.repeat([0, 1], 10), np.arange(20.0), method="test")}
    f = save_checkpoint(passed, tmp_path / "ok.pt")
    assert "forced" not in W.install([f])["classifier"]
    res = W.install([tiny_models["cls"]], force=True)
    assert "records no validation" in res["classifier"]["forced"]
    assert W.resolve("classifier").entry["installed_with_force"] == res["classifier"]["forced"]


class _Payload:
    """Unpickling this object would create a file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_payload_is_refused_in_cervscans_words(tmp_path):
    marker = tmp_path / "payload-ran"
    f = tmp_path / "run" / "model.pt"
    f.parent.mkdir()
    torch.save({"format": 1, "kind": "classifier", "extra": _Payload(marker)}, f)
    r = CliRunner().invoke(app, ["models", "install", str(f)])
    assert r.exit_code == 1, r.output
    out = flat(r.output)
    assert flat(f"{f}: not a safe cervscan checkpoint") in out and "mustnotbeloaded" in out
    for advice in ("weights_only", "Re-running", "canstillbeloaded", "trustthesource", "safe_globals"):
        assert advice not in out, r.output
    with pytest.raises(CheckpointError) as ei:  # screening reads checkpoints the same way
        read_checkpoint(f)
    assert "not a safe cervscan checkpoint" in str(ei.value) and "weights_only" not in str(ei.value)
    assert not marker.exists() and W.installed_current() == {}


# --------------------------------------------------------------------------- labels

def test_read_labels_duplicates(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("patient_id,label,source\nP1,1,A\nP2,0,A\nP1,1,A\n", encoding="utf-8")
    notes: list[dict] = []
    rows, _ = read_labels(p, notes)
    assert [r["patient_id"] for r in rows] == ["P1", "P2"]  # kept once
    assert notes == [{"kind": "duplicate", "patient_id": "P1", "rows": [2, 4], "labels": [1, 1], "sources": ["A", "A"]}]
    p.write_text("patient_id,label\nP1,1\nP2,0\nP3,0\nP2,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"contradictory labels: patient P2 is labelled 0 \(line 3\) and 1 \(line 5\)"):
        read_labels(p)


@pytest.fixture
def labelled_visits(tmp_path):
    root = tmp_path / "data"
    rows = []
    for i in range(6):
        pid = f"P{i + 1:02d}"
        rng = np.random.default_rng(10 + i)
        write_image(root / "visits" / pid / "img1.jpg", synthetic_image(rng))
        rows.append((pid, i % 2, "A"))
    write_image(root / "visits" / "NOLABEL" / "img1.jpg", synthetic_image(np.random.default_rng(99)))
    return root, rows


def test_evaluate_names_label_problems(labelled_visits, varied_models, tmp_path):
    root, rows = labelled_visits
    labels = write_labels(root / "labels.csv", [*rows, ("GHOST", 1, "A"), ("P01", 0, "A")])
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", str(root / "visits"), "--labels", str(labels), "-o", str(out),
                                 "--seg-model", str(varied_models["seg"]), "--cls-model", str(varied_models["cls"]),
                                 "--device", "cpu", "--bootstrap", "20"])
    assert r.exit_code == 0, r.output
    o = flat(r.output)
    assert "GHOST" in o and "NOLABEL" in o and "P01(lines2,9)" in o
    chk = read_json(out / "metrics.json")["labels_check"]
    assert chk["labelled_without_folder"] == ["GHOST"] and chk["folders_without_label"] == ["NOLABEL"]
    assert [d["patient_id"] for d in chk["duplicates"]] == ["P01"]
    # opposite labels for one patient: an error naming it and its lines, before anything is screened
    bad = write_labels(root / "bad.csv", [*rows, ("P02", 0, "A")])
    r = CliRunner().invoke(app, ["evaluate", str(root / "visits"), "--labels", str(bad), "-o", str(tmp_path / "e2"),
                                 "--seg-model", str(varied_models["seg"]), "--cls-model", str(varied_models["cls"])])
    assert r.exit_code == 1 and "patientP02islabelled1(line3)and0(line8)" in flat(r.output), r.output
    assert not (tmp_path / "e2" / "metrics.json").exists()


def test_train_decision_records_label_problems(tmp_path, monkeypatch):
    visits, labels, meta = decision_bank(tmp_path)
    fake_features(monkeypatch, meta, inverted=False)
    write_image(visits / "STRAY" / "img1.jpg", np.full((40, 40, 3), 90, np.uint8))
    write_labels(labels, [*((p, y, s) for p, (y, s) in meta.items()), ("GONE", 1, "A"), ("D03", 1, "A")])
    out = tmp_path / "run"
    api.train_decision(**decision_kwargs(visits, labels, out))
    for rec in (read_json(out / "metrics.json")["labels_check"], read_json(out / "run.json")["labels_check"]):
        assert rec["labelled_without_folder"] == ["GONE"] and rec["folders_without_label"] == ["STRAY"]
        assert rec["duplicates"][0]["patient_id"] == "D03" and rec["duplicates"][0]["rows"] == [5, 15]


# --------------------------------------------------------------------------- evaluate --cv-run

def test_evaluate_cv_run_labels_what_was_fitted_on_its_scores(labelled_visits, varied_models, tmp_path):
    import shutil

    root, rows = labelled_visits
    labels = write_labels(root / "labels.csv", rows)
    cv = tmp_path / "cvrun"
    cv.mkdir()
    for k in (1, 2):
        shutil.copy(varied_models["cls"], cv / f"fold{k}.pt")
    with open(cv / "folds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "fold", "label", "source"])
        w.writerows((pid, 1 + i % 2, y, s) for i, (pid, y, s) in enumerate(rows))
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", str(root / "visits"), "--labels", str(labels), "-o", str(out),
                                 "--seg-model", str(varied_models["seg"]), "--cv-run", str(cv), "--device", "cpu",
                                 "--bootstrap", "20"])
    assert r.exit_code == 0, r.output
    m = read_json(out / "metrics.json")
    assert m["in_sample"]["calibration"] is True and m["in_sample"]["threshold"] is True
    assert "in-sample (optimistic)" in m["in_sample"]["note"]
    assert "in-sample:" in r.output and m["not_in_cv_run"] == ["NOLABEL"]
    # a threshold given on the command line was not fitted on these scores
    m2 = api.evaluate([root / "visits"], labels, tmp_path / "eval2", seg_model=str(varied_models["seg"]),
                      cv_run=cv, device="cpu", n_bootstrap=20, overrides={"threshold": 0.5})
    assert m2["in_sample"]["threshold"] is False and m2["in_sample"]["calibration"] is True
    assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["in_sample"] == m2["in_sample"]


def test_a_classifier_without_validation_screens_with_a_warning_unless_shipped(caplog):
    from types import SimpleNamespace

    from cervscan.pipeline.build import _warn_unvalidated

    with caplog.at_level("WARNING", logger="cervscan"):
        _warn_unvalidated(SimpleNamespace(path="w/classifier.pt", source="shipped"), {})
        assert not caplog.records
        _warn_unvalidated(SimpleNamespace(path="m/forced.pt", source="installed"), {})
        assert "records no validation" in caplog.text and "m/forced.pt" in caplog.text
        caplog.clear()
        failed = {"passed": False, "auc": 0.5, "ci_low": 0.3, "ci_high": 0.7}
        _warn_unvalidated(SimpleNamespace(path="m/failed.pt", source="installed"), {"validation": failed})
        assert "failed its validation" in caplog.text


def test_train_decision_says_it_is_deprecated():
    from typer.testing import CliRunner

    from cervscan.cli import app

    res = CliRunner().invoke(app, ["train-decision", "--help"])
    assert res.exit_code == 0 and "Deprecated" in res.output and "train-cls" in res.output
    res = CliRunner().invoke(app, ["train-cls", "--help"])
    assert "Long:" not in res.output
