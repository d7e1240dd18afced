"""``evaluate``: screen labelled visits and score the decisions against the labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cervscan import api
from cervscan.cli import app
from cervscan.errors import DataError
from cervscan.metrics import binary_metrics
from cervscan.models.networks import read_checkpoint
from cervscan.models.registry import sha256_file

from conftest import read_csv, read_json, synthetic_image, write_image

N_LABELLED = 8


def write_labels(path: Path, rows: list[dict], columns=("patient_id", "label", "source")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Eight labelled visits (two sources) and one visit whose label is empty."""
    root = tmp_path_factory.mktemp("labelled")
    rows = []
    for i in range(N_LABELLED + 1):
        pid = f"P{i + 1:02d}"
        rng = np.random.default_rng(100 + i)
        for k in range(2):
            write_image(root / "visits" / pid / f"img{k + 1}.jpg", synthetic_image(rng))
        label = "" if i == N_LABELLED else str(i % 2)
        rows.append({"patient_id": pid, "label": label, "source": "A" if i < 4 else "B"})
    write_labels(root / "labels.csv", rows)
    write_labels(root / "labels_nosource.csv", rows, ("patient_id", "label"))
    return root


@pytest.fixture(scope="module")
def evaluated(labelled, varied_models):
    """Evaluated with a threshold in the middle of the patients' scores (taken from a first screening).

    The random test classifier scores every synthetic patient above its checkpoint threshold (0.5); a
    threshold between the 4th and 5th score gives both decisions, so the confusion matrix is not one column.
    """
    kw = dict(seg_model=str(varied_models["seg"]), cls_model=str(varied_models["cls"]), device="cpu", num_workers=0)
    pre = api.screen([labelled / "visits"], labelled / "pre", write_masks=False, write_overlays=False, **kw)
    scores = sorted(p["score"] for p in pre.patients)
    threshold = round((scores[4] + scores[5]) / 2, 6)
    out = labelled / "eval"
    m = api.evaluate([labelled / "visits"], labelled / "labels.csv", out, n_bootstrap=200, seed=0,
                     overrides={"threshold": threshold}, **kw)
    return m, out, threshold


def test_metrics_json(evaluated, varied_models):
    m, out, threshold = evaluated
    saved = read_json(out / "metrics.json")
    assert saved.keys() == m.keys()
    assert saved["auc"] == m["auc"] and saved["confusion"] == m["confusion"]
    for k in ("patients", "severe", "auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "threshold",
              "confusion", "ci95", "by_source"):
        assert k in saved, k
    assert saved["patients"] == N_LABELLED and saved["severe"] == N_LABELLED // 2
    assert saved["threshold"] == threshold
    assert read_json(out / "screen" / "run.json")["provenance"]["threshold"] == "option"
    assert sum(map(sum, saved["confusion"])) == N_LABELLED
    for k in ("auc", "sensitivity", "specificity"):
        ci = saved["ci95"][k]
        if saved[k] is not None and ci is not None:
            assert isinstance(ci, list) and len(ci) == 2 and 0 <= ci[0] <= ci[1] <= 1, (k, ci)
    assert saved["ci95"]["auc"] is not None
    assert set(saved["by_source"]) == {"A", "B"}
    assert saved["by_source"]["A"]["patients"] + saved["by_source"]["B"]["patients"] == N_LABELLED
    # the empty label: skipped and counted, the visit was screened but is not in the metrics
    assert saved["skipped_unlabelled_rows"] == 1 and saved["screened_without_label"] == 1
    assert saved["patients_failed"] == 0 and saved["bootstrap"] == {"n": 200, "seed": 0}
    assert saved["models"]["classifier"]["sha256"] == sha256_file(varied_models["cls"])


def test_outputs_and_predictions_agree_with_the_metrics(evaluated, labelled):
    m, out, _ = evaluated
    for f in ("roc.png", "confusion.png", "predictions.csv", "screen/patients.csv", "screen/run.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rows = read_csv(out / "predictions.csv")
    assert sorted(r["patient_id"] for r in rows) == [f"P{i + 1:02d}" for i in range(N_LABELLED)]
    labels = {r["patient_id"]: r for r in read_csv(labelled / "labels.csv")}
    screened = {r["patient_id"]: r for r in read_csv(out / "screen" / "patients.csv")}
    for r in rows:
        assert r["label"] == labels[r["patient_id"]]["label"] and r["source"] == labels[r["patient_id"]]["source"]
        assert r["decision"] == screened[r["patient_id"]]["decision"]
        assert r["correct"] == str(int((r["decision"] == "severe") == (r["label"] == "1")))
    # the confusion matrix is the one of the screen decisions
    tn = sum(r["label"] == "0" and r["decision"] == "mildly_normal" for r in rows)
    fp = sum(r["label"] == "0" and r["decision"] == "severe" for r in rows)
    fn = sum(r["label"] == "1" and r["decision"] == "mildly_normal" for r in rows)
    tp = sum(r["label"] == "1" and r["decision"] == "severe" for r in rows)
    assert m["confusion"] == [[tn, fp], [fn, tp]]
    assert tp + fp > 0 and tn + fn > 0  # both decisions occur
    assert all((r["decision"] == "severe") == (float(r["score"]) > m["threshold"]) for r in rows)
    assert m["accuracy"] == pytest.approx(sum(r["correct"] == "1" for r in rows) / len(rows))
    again = binary_metrics([int(r["label"]) for r in rows], [float(r["score"]) for r in rows], m["threshold"])
    assert again["auc"] == pytest.approx(m["auc"], abs=1e-9)


def test_cli_evaluate_without_a_source_column(labelled, varied_models, tmp_path):
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", str(labelled / "visits"), "--labels", str(labelled / "labels_nosource.csv"),
                                 "-o", str(out), "--seg-model", str(varied_models["seg"]),
                                 "--cls-model", str(varied_models["cls"]), "--device", "cpu", "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    assert "patient-level metrics" in r.stdout
    m = read_json(out / "metrics.json")
    assert "by_source" not in m and m["patients"] == N_LABELLED and m["bootstrap"]["n"] == 50
    assert m["threshold"] == read_checkpoint(varied_models["cls"])["threshold"]  # no option: the checkpoint's
    assert (out / "roc.png").is_file() and (out / "confusion.png").is_file()


def test_single_class_and_unmatched_labels_are_clear_errors(labelled, varied_models, tmp_path):
    kw = dict(seg_model=str(varied_models["seg"]), cls_model=str(varied_models["cls"]), device="cpu", num_workers=0,
              n_bootstrap=10)
    visits = [labelled / "visits" / "P01", labelled / "visits" / "P03"]  # both labelled 0
    one = write_labels(tmp_path / "one.csv", [{"patient_id": "P01", "label": "0"}, {"patient_id": "P03", "label": "0"}])
    with pytest.raises(DataError, match="single class"):
        api.evaluate(visits, one, tmp_path / "a", **kw)
    other = write_labels(tmp_path / "other.csv", [{"patient_id": "X1", "label": "1"}])
    with pytest.raises(DataError, match="no screened patient has a label"):
        api.evaluate(visits, other, tmp_path / "b", **kw)


def test_bad_labels_files(labelled, tmp_path):
    bad = write_labels(tmp_path / "bad.csv", [{"patient_id": "P01", "label": "yes"}])
    with pytest.raises(DataError, match="label must be 0 or 1"):
        api.evaluate([labelled / "visits"], bad, tmp_path / "out")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("id,y\nP01,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="needs columns patient_id,label"):
        api.evaluate([labelled / "visits"], nocol, tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.json").exists()
