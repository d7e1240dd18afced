"""Golden test: the shipped weights screen the shipped examples as recorded.

Regenerate the expected outputs with ``tests/update_golden.sh`` after the
shipped weights change (and say so in CHANGELOG.md).

What is compared, for every patient and every image of examples/expected/:
decisions exactly, thresholds to 1e-6 (the CSVs hold 6 decimals), scores,
p_v1..p_v6 and lesion fractions to 1e-3 (float differences between CPUs and
BLAS builds stay far below that), empty_mask, status and the counts exactly.
Only the columns the expected CSVs hold are compared, so a column added to the
outputs later does not break the test before the expected files are
regenerated; add it to the tables below once it should be checked.

Independently of the expected files, the run must apply the shipped
classifier checkpoint: its threshold, its voting weights (score = weighted sum
of p_v1..p_v6) and its temperature (p_v1 recomputed here from the
network's logits).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "examples" / "expected"
VISITS = ROOT / "examples" / "visits"

PROB_TOL = 1e-3  # scores, p_v1..p_v6: float differences between CPUs / BLAS builds stay far below this
FRACTION_TOL = 1e-3  # lesion_fraction
THRESHOLD_TOL = 1e-6  # the CSVs round to 6 decimals (error <= 5e-7)
CSV_ROUNDING = 2e-6  # a weighted sum of 6-decimal values, compared with a 6-decimal score
CLOSE_TO_THRESHOLD = 1e-3  # a patient score nearer than this to its threshold is not a stable golden case
P_V = [f"p_v{i}" for i in range(1, 7)]

# column -> how it is compared; a column absent from the expected CSV is skipped
PATIENT_CHECKS = {"decision": "exact", "threshold": THRESHOLD_TOL, "score": PROB_TOL, "n_images": "int",
                  "n_used": "int", "n_failed": "int", "n_empty_mask": "int", "n_no_cervix": "int", "stages": "exact",
                  "n_eligible": "int", "reason": "exact"}
IMAGE_CHECKS = {"status": "exact", "decision": "exact", "threshold": THRESHOLD_TOL, "score": PROB_TOL,
                **{c: PROB_TOL for c in P_V}, "empty_mask": "bool", "lesion_fraction": FRACTION_TOL,
                "stage": "exact", "stage_confidence": PROB_TOL, "cervix_found": "exact", "crop_box": "box",
                "cervix_fraction": FRACTION_TOL, "eligible": "bool", "reason": "exact"}
REQUIRED = ("decision", "score", "threshold")


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def _num(v) -> float | None:
    """A CSV cell or a record value as a float; '' / None / NaN -> None."""
    if v is None or (isinstance(v, str) and v.strip() == ""):
        return None
    x = float(v)
    return None if math.isnan(x) else x


def _compare(what: str, got: dict, exp: dict, checks: dict, columns: list[str]) -> list[str]:
    """Differences between one expected CSV row and the run's record, as readable lines."""
    bad = []
    for col, how in checks.items():
        if col not in columns:
            continue
        e = exp[col]
        if col not in got:
            bad.append(f"{what}: column {col!r} is missing from the run's output (expected {e!r})")
            continue
        g = got[col]
        if how == "exact":
            ok = str(g if g is not None else "") == e
        elif how == "int":
            ok = g is not None and e != "" and int(g) == int(e)
        elif how == "box":  # x0 y0 x1 y1: a mask pixel at the threshold may move an edge by a pixel or two
            gb, eb = str(g or "").split(), e.split()
            ok = len(gb) == len(eb) and all(abs(int(a) - int(b)) <= 2 for a, b in zip(gb, eb))
        elif how == "bool":
            ok = e in ("True", "False") and bool(g) == (e == "True")
        else:
            gv, ev = _num(g), _num(e)
            ok = (gv is None and ev is None) or (gv is not None and ev is not None and abs(gv - ev) <= how)
        if not ok:
            bad.append(f"{what}: {col} = {g!r}, expected {e!r}" + ("" if isinstance(how, str) else f" (tolerance {how:g})"))
    return bad


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    from cervscan import api
    from cervscan.models.registry import shipped_dir

    if shipped_dir() is None:
        pytest.fail("shipped weights not found: weights/manifest.json is missing")
    out = tmp_path_factory.mktemp("golden")
    return api.screen([VISITS], out, device="cpu")


@pytest.fixture(scope="module")
def shipped_classifier(golden_run) -> dict:
    """The shipped classifier checkpoint, the one the manifest lists (and the golden run used)."""
    from cervscan.models.networks import read_checkpoint
    from cervscan.models.registry import resolve

    ref = resolve("classifier")
    assert ref.source == "shipped" and ref.verified, ref
    assert ref.sha256 == golden_run.run["models"]["classifier"]["sha256"], "the run used another classifier file"
    return read_checkpoint(ref.path)


@pytest.fixture(scope="module")
def expected_patients() -> tuple[list[str], dict]:
    cols, rows = _rows(EXPECTED / "patients.csv")
    missing = [c for c in REQUIRED if c not in cols]
    assert not missing, f"patients.csv lacks {missing}"
    return cols, {r["patient_id"]: r for r in rows}


@pytest.fixture(scope="module")
def expected_images() -> tuple[list[str], dict]:
    cols, rows = _rows(EXPECTED / "images.csv")
    missing = [c for c in REQUIRED if c not in cols]
    assert not missing, f"images.csv lacks {missing}"
    return cols, {(r["patient_id"], r["image"]): r for r in rows}


def test_shipped_models_are_used(golden_run):
    import json

    meta = json.loads((EXPECTED / "models.json").read_text())
    assert set(golden_run.run["models"]) == set(meta), "the shipped model roles changed: run tests/update_golden.sh"
    for role in meta:
        m = golden_run.run["models"][role]
        assert m["source"] == "shipped"
        assert m["verified"] is True
        assert m["sha256"] == meta[role]["sha256"], f"{role} weights changed: run tests/update_golden.sh"


def test_golden_patients_are_not_borderline(expected_patients):
    """A patient whose score sits on its threshold would flip on another CPU: pick other examples."""
    _, exp = expected_patients
    for pid, e in exp.items():
        s, t = _num(e["score"]), _num(e["threshold"])
        if s is None:
            continue
        if abs(s - t) <= CLOSE_TO_THRESHOLD:
            pytest.fail(f"{pid}: expected score {s:.6f} lies within {CLOSE_TO_THRESHOLD:g} of its threshold "
                        f"{t:.6f}: the example is too close to the threshold to be a stable golden case "
                        f"(choose other example visits, then run tests/update_golden.sh)")


def test_patient_decisions_and_scores_match(golden_run, expected_patients):
    cols, exp = expected_patients
    got = {r["patient_id"]: r for r in golden_run.patients}
    assert set(got) == set(exp)
    bad = []
    for pid, e in exp.items():
        bad += _compare(pid, got[pid], e, PATIENT_CHECKS, cols)
    assert not bad, "\n".join(bad)


def test_image_decisions_scores_and_masks_match(golden_run, expected_images):
    cols, exp = expected_images
    got = {(r["patient_id"], r["image"]): r for r in golden_run.images}
    assert set(got) == set(exp)
    bad = []
    for k, e in exp.items():
        g = got[k]
        assert g["status"] == e.get("status", "ok") == "ok", (k, g.get("error"))
        checks = dict(IMAGE_CHECKS)
        s, t = _num(e["score"]), _num(e["threshold"])
        if abs(s - t) <= CLOSE_TO_THRESHOLD:
            # an image (unlike a patient) may sit on the threshold: float noise between CPUs could flip its
            # decision, so it must only agree with its own score; the score itself is still compared
            checks.pop("decision")
            from cervscan.pipeline.vote import decide

            if g["decision"] != decide(g["score"], g["threshold"]):
                bad.append(f"{k}: decision {g['decision']!r} does not follow from score {g['score']} "
                           f"and threshold {g['threshold']}")
        bad += _compare(f"{k[0]}/{k[1]}", g, e, checks, cols)
    assert not bad, "\n".join(bad)


def test_the_checkpoint_threshold_is_applied(golden_run, shipped_classifier, expected_patients, expected_images):
    thr = float(shipped_classifier["threshold"])
    assert golden_run.run["threshold"] == pytest.approx(thr, abs=1e-12)
    for r in [*golden_run.patients, *golden_run.images]:
        assert r["threshold"] == pytest.approx(thr, abs=1e-12), r["patient_id"]
    # ... and the expected files were made with the same one
    for rows in (expected_patients[1].values(), expected_images[1].values()):
        for e in rows:
            assert float(e["threshold"]) == pytest.approx(thr, abs=THRESHOLD_TOL), e["patient_id"]


def _vote(ck: dict, row: dict) -> float:
    """Score = the checkpoint's voting weights over the variants present, renormalised; over probabilities
    (the study) or, when the checkpoint's ``voting.pooling`` is "logit", over log-odds."""
    from cervscan.config import STUDY_WEIGHTS

    weights = (ck.get("voting") or {}).get("weights") or STUDY_WEIGHTS
    pairs = [(float(w), _num(row.get(c))) for w, c in zip(weights, P_V)]
    pairs = [(w, p) for w, p in pairs if p is not None]
    if _pooling(ck) == "logit":
        z = sum(w * math.log(p / (1 - p)) for w, p in pairs) / sum(w for w, _ in pairs)
        return 1 / (1 + math.exp(-z))
    return sum(w * p for w, p in pairs) / sum(w for w, _ in pairs)


def _pooling(ck: dict) -> str:
    return (ck.get("voting") or {}).get("pooling") or "probability"


def test_scores_are_the_checkpoint_weighted_votes(golden_run, shipped_classifier, expected_images):
    from cervscan.pipeline.vote import aggregate_patient

    for r in golden_run.images:
        assert r["score"] == pytest.approx(_vote(shipped_classifier, r), abs=1e-9), r["image"]
    # 6-decimal probabilities carry up to ~20x their rounding into log-odds
    tol = CSV_ROUNDING if _pooling(shipped_classifier) == "probability" else 10 * CSV_ROUNDING
    for e in expected_images[1].values():
        assert float(e["score"]) == pytest.approx(_vote(shipped_classifier, e), abs=tol), e["image"]
    # a patient's score is the mean of its images' scores (or log-odds), decided against the same threshold
    for p in golden_run.patients:
        scores = [r["score"] for r in golden_run.images if r["patient_id"] == p["patient_id"] and r["status"] == "ok"]
        score, decision = aggregate_patient(scores, p["threshold"], _pooling(shipped_classifier))
        assert p["score"] == pytest.approx(score, abs=1e-12) and p["decision"] == decision, p["patient_id"]


def _classifier_input(rec: dict, rgb, ck: dict | None = None):
    """What variant 1 shows: the decoded image, cropped to the record's ``crop_box`` when it has one
    (unless the checkpoint's ``classify_view`` is "frame": then the whole decoded image)."""
    box = str(rec.get("crop_box") or "").replace(",", " ").split()
    if len(box) == 4 and (ck or {}).get("classify_view") != "frame":
        x0, y0, x1, y1 = (int(float(v)) for v in box)
        rgb = rgb[y0:y1, x0:x1]
    return rgb


def test_the_checkpoint_temperature_is_applied(golden_run, shipped_classifier):
    """p_v1 (the original image) recomputed here as softmax(logits / temperature)."""
    import numpy as np
    import torch

    from cervscan.files import read_image
    from cervscan.models.networks import model_from_checkpoint
    from cervscan.pipeline.transforms import resize_square, to_tensor_batch

    ck = shipped_classifier
    temperature = float(ck.get("temperature") or 1.0)
    net = model_from_checkpoint(ck)
    recs = [r for r in golden_run.images if r["status"] == "ok"]
    size = tuple(ck["input_size"])
    ims = [resize_square(_classifier_input(r, read_image(VISITS / r["patient_id"] / r["image"]).rgb, ck), size)
           for r in recs]
    with torch.inference_mode():
        logits = net(to_tensor_batch(ims, ck["mean"], ck["std"])).float()
    p_t = torch.softmax(logits / temperature, dim=1)[:, 1].numpy()
    p_1 = torch.softmax(logits, dim=1)[:, 1].numpy()
    got = np.array([r["p_v1"] for r in recs], np.float64)
    err = np.abs(got - p_t)
    assert err.max() <= PROB_TOL, (
        f"p_v1 differs from softmax(logits / {temperature:g}) by up to {err.max():.2e} "
        f"(without the temperature: {np.abs(got - p_1).max():.2e})")
    if abs(temperature - 1.0) > 0.05:  # then the check above fails when the temperature is dropped
        assert np.abs(got - p_1).max() > 10 * PROB_TOL
