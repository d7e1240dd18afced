"""Golden test: the shipped weights screen the shipped examples as recorded.

Regenerate the expected outputs with ``tests/update_golden.sh`` after the
shipped weights change (and say so in CHANGELOG.md).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "examples" / "expected"
SCORE_TOL = 0.02  # float differences between CPUs / BLAS builds stay far below this


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    from cervscan import api
    from cervscan.weights import shipped_dir

    if shipped_dir() is None:
        pytest.fail("shipped weights not found: weights/manifest.json is missing")
    out = tmp_path_factory.mktemp("golden")
    return api.screen([ROOT / "examples" / "visits"], out, device="cpu")


def test_shipped_models_are_used(golden_run):
    meta = json.loads((EXPECTED / "models.json").read_text())
    for role in ("segmenter", "classifier"):
        m = golden_run.run["models"][role]
        assert m["source"] == "shipped"
        assert m["verified"] is True
        assert m["sha256"] == meta[role]["sha256"], f"{role} weights changed: run tests/update_golden.sh"


def test_patient_decisions_and_scores_match(golden_run):
    exp = {r["patient_id"]: r for r in _rows(EXPECTED / "patients.csv")}
    got = {r["patient_id"]: r for r in golden_run.patients}
    assert set(got) == set(exp)
    for pid, e in exp.items():
        g = got[pid]
        assert g["score"] == pytest.approx(float(e["score"]), abs=SCORE_TOL), pid
        if abs(float(e["score"]) - float(e["threshold"])) > SCORE_TOL:
            assert g["decision"] == e["decision"], pid
        assert g["n_used"] == int(e["n_used"])


def test_image_scores_and_masks_match(golden_run):
    exp = {(r["patient_id"], r["image"]): r for r in _rows(EXPECTED / "images.csv")}
    got = {(r["patient_id"], r["image"]): r for r in golden_run.images}
    assert set(got) == set(exp)
    for k, e in exp.items():
        g = got[k]
        assert g["status"] == e["status"] == "ok"
        assert g["score"] == pytest.approx(float(e["score"]), abs=SCORE_TOL), k
        assert g["lesion_fraction"] == pytest.approx(float(e["lesion_fraction"]), abs=0.01), k
