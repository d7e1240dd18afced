"""The 2.0.0 patient decision: log-odds pooling, and train-decision's out-of-fold scores reproduced
through the screening path (the fold model that did not train on a patient, screening its visit folder,
gives the score train-decision recorded for it)."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from cervscan.config import VotingConfig
from cervscan.pipeline.vote import aggregate_patient, logit, sigmoid, weighted_score

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "visits"
P = {"original": 0.9, "segmented": 0.2, "original_flip": 0.8, "segmented_flip": 0.3, "original_bright": 0.7,
     "segmented_bright": 0.4}


def test_logit_pooling_of_variants_is_the_weighted_log_odds():
    cfg = VotingConfig(pooling="logit")
    w = cfg.active_weights()
    z = sum(w[k] * math.log(P[k] / (1 - P[k])) for k in w)
    assert weighted_score(P, cfg) == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-12)
    two = VotingConfig(pooling="logit", variants=("original", "segmented"), weights=(0.5, 0.5, 0, 0, 0, 0))
    # 0.9 and 0.2: log-odds 2.197 and -1.386, mean 0.405 -> 0.6
    assert weighted_score(P, two) == pytest.approx(0.6, abs=1e-9)
    assert weighted_score(P, VotingConfig()) == pytest.approx(sum(VotingConfig().active_weights()[k] * P[k] for k in P))


def test_logit_pooling_of_patients_and_saturation():
    s, d = aggregate_patient([0.9, 0.2], 0.5, "logit")
    assert s == pytest.approx(0.6, abs=1e-9) and d == "severe"
    s, d = aggregate_patient([0.9, 0.2], 0.61, "logit")
    assert d == "mildly_normal"
    assert aggregate_patient([0.9, 0.2], 0.5)[0] == pytest.approx(0.55)  # the study's mean of probabilities
    assert math.isfinite(logit(1.0)) and math.isfinite(logit(0.0))
    assert sigmoid(logit(0.3)) == pytest.approx(0.3, abs=1e-12)
    assert aggregate_patient([], 0.5, "logit") == (None, "error")


def test_pooling_must_be_known():
    from cervscan.errors import CervscanError

    with pytest.raises(CervscanError, match="pooling"):
        VotingConfig(pooling="median")


def _small_bank(tmp_path: Path, n_per_class: int = 4, images: int = 2) -> tuple[Path, Path]:
    """A few real patients of each class and source, two acetic-acid images each."""
    with open(DATA / "labels.csv", newline="") as f:
        labels = list(csv.DictReader(f))
    with open(DATA / "images.csv", newline="") as f:
        stages = list(csv.DictReader(f))
    picked = []
    for src in ("iarc-colpo-bank", "annocerv"):
        for y in ("0", "1"):
            rows = [r for r in labels if r["source"] == src and r["label"] == y][: n_per_class // 2]
            picked += rows
    visits = tmp_path / "visits"
    for r in picked:
        ims = [s["image"] for s in stages if s["patient_id"] == r["patient_id"] and "acetic" in s["stage"].lower()]
        (visits / r["patient_id"]).mkdir(parents=True)
        for im in ims[:images]:
            shutil.copy(DATA / r["patient_id"] / im, visits / r["patient_id"] / im)
    lab = tmp_path / "labels.csv"
    with open(lab, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label", "source"])
        for r in picked:
            w.writerow([r["patient_id"], r["label"], r["source"]])
    return visits, lab


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_train_decision_scores_are_what_screening_gives(tmp_path):
    from cervscan import api
    from cervscan.models.networks import read_checkpoint

    visits, lab = _small_bank(tmp_path)
    out = tmp_path / "run"
    m = api.train_decision(visits=str(visits), labels=str(lab), out=str(out), input_size=128, folds=2, repeats=1,
                           variants=("original", "segmented", "original_flip", "segmented_flip", "original_bright",
                                     "segmented_bright"),
                           decision_stages=("acetic", "lugol", "green", "saline", "other"), C=0.1,
                           cache_dir=str(tmp_path / "cache"), threads=2, force=True)  # 8 patients cannot pass validation
    assert m["patients"] == 8 and len(m["auc_repeats"]) == 1
    ck = read_checkpoint(out / "model.pt")
    assert ck["kind"] == "classifier" and ck["voting"]["pooling"] == "logit" and ck["input_size"] == [128, 128]
    assert ck["decision_stages"] and 0.0 <= ck["threshold"] <= 1.0
    with open(out / "oof.csv", newline="") as f:
        oof = {r["patient_id"]: r for r in csv.DictReader(f)}
    # each fold model screens its held-out patients from the image files
    for k in (1, 2):
        pids = [p for p, r in oof.items() if r["fold"] == str(k)]
        res = api.screen([visits / p for p in pids], tmp_path / f"screen{k}", cls_model=str(out / f"fold{k}.pt"),
                         overrides={"decision_stages": list(ck["decision_stages"])},
                         write_masks=False, write_overlays=False)
        got = {p["patient_id"]: p["score"] for p in res.patients}
        for p in pids:
            assert got[p] == pytest.approx(float(oof[p]["score_r0"]), abs=2e-4), p
    # a second run reads every feature from the cache and gives the same model
    m2 = api.train_decision(visits=str(visits), labels=str(lab), out=str(tmp_path / "run2"), input_size=128, folds=2,
                            repeats=1, variants=("original", "segmented", "original_flip", "segmented_flip",
                                                 "original_bright", "segmented_bright"),
                            decision_stages=("acetic", "lugol", "green", "saline", "other"), C=0.1,
                            cache_dir=str(tmp_path / "cache"), threads=2, force=True)
    assert m2["auc_repeats"] == m["auc_repeats"]
    assert np.isclose(m2["operating_point"]["threshold"], m["operating_point"]["threshold"])


def _row(name, auc, folds, cost, *, iarc=0.7, anno=0.7, ips=4.0, recorded=False):
    return {"name": name, "auc": auc, "fold_auc": folds, "cost_ms_1thread": cost, "fit_seconds": 1.0,
            "auc_iarc": iarc, "auc_annocerv": anno, "est_img_s": ips, "recorded_stage": recorded}


def test_decision_rule_keeps_the_cheaper_candidate_within_noise():
    from cervscan.training import selection as H

    rng = np.random.default_rng(0)
    base = list(0.70 + 0.05 * rng.standard_normal(15))
    noisy = [a + 0.02 + 0.10 * e for a, e in zip(base, rng.standard_normal(15))]  # +0.02 but noisy pairs
    steady = [a + 0.02 for a in base]  # +0.02 on every fold: no noise
    rows = [_row("cheap", 0.70, base, 10), _row("costly noisy", 0.72, noisy, 50)]
    best, why = H.choose(rows)
    assert best["name"] == "cheap" and any("does not replace" in w for w in why)
    rows = [_row("cheap", 0.70, base, 10), _row("costly steady", 0.72, steady, 50)]
    assert H.choose(rows)[0]["name"] == "costly steady"
    # equal cost: the higher AUC wins outright
    rows = [_row("a", 0.70, base, 10), _row("b", 0.701, noisy, 10)]
    assert H.choose(rows)[0]["name"] == "b"
    # not eligible: a weak source, too slow, or the recorded stage
    rows = [_row("cheap", 0.70, base, 10), _row("weak source", 0.80, steady, 20, anno=0.6),
            _row("slow", 0.80, steady, 30, ips=2.5), _row("recorded", 0.80, steady, 5, recorded=True)]
    best, why = H.choose(rows)
    assert best["name"] == "cheap" and sum(w.startswith("not eligible") for w in why) == 3


def test_decision_rule_three_keeps_the_study_structure_unless_it_hurts():
    from cervscan.training import selection as H

    base = [0.7] * 15
    rows = [_row("I1 x", 0.72, [0.72] * 15, 90), _row("F1s x", 0.71, [0.71 + 0.05 * (-1) ** k for k in range(15)], 180),
            _row("F2 x", 0.73, [0.73] * 15, 540, ips=2.4)]
    shipped, why = H.structure(rows, rows[0])
    assert shipped["name"] == "F1s x" and any("kept" in w for w in why) and any("not eligible" in w for w in why)
    rows[1] = _row("F1s x", 0.60, [0.60] * 15, 180)  # the segmented view lowers the AUC by more than the noise
    shipped, why = H.structure(rows, rows[0])
    assert shipped["name"] == "I1 x" and any("left out" in w for w in why)
    assert base  # the rows above are the whole input


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_train_decision_refuses_too_few_patients_per_class(tmp_path):
    from cervscan import api
    from cervscan.errors import DataError

    visits, lab = _small_bank(tmp_path, n_per_class=2, images=1)
    with pytest.raises(DataError, match="needs at least 5 of each class"):
        api.train_decision(visits=str(visits), labels=str(lab), out=str(tmp_path / "run"), input_size=64, folds=5,
                           repeats=1, decision_stages=("acetic", "lugol", "green", "saline", "other"),
                           cache_dir=str(tmp_path / "cache"), threads=2)
