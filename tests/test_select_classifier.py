"""The classifier selection rule of docs/model-selection.md (cervscan.training.selection, which scripts/select_classifier.py applies)."""

from __future__ import annotations

from pathlib import Path

from cervscan.training import selection


def cand(name, auc, size, epochs):
    return {"run": Path(name), "auc": auc, "cost": (size, epochs)}


def test_equal_cost_candidates_compete_on_auc_alone():
    best, _ = selection.choose_by_cost([cand("a", 0.650, 160, 6), cand("b", 0.652, 160, 6)], 0.01)
    assert best["run"].name == "b"


def test_a_dearer_candidate_must_beat_by_the_margin():
    best, why = selection.choose_by_cost([cand("big", 0.659, 224, 6), cand("small", 0.650, 160, 6)], 0.01)
    assert best["run"].name == "small" and "does not beat" in why[0]
    best, _ = selection.choose_by_cost([cand("big", 0.661, 224, 6), cand("small", 0.650, 160, 6)], 0.01)
    assert best["run"].name == "big"


def test_candidates_are_visited_from_the_cheapest():
    # 160/12 fails its margin over 160/6; 224/6 is then measured against 160/6, not 160/12
    best, why = selection.choose_by_cost([cand("e12", 0.655, 160, 12), cand("e6", 0.650, 160, 6), cand("p224", 0.662, 224, 6)], 0.01)
    assert best["run"].name == "p224" and len(why) == 2
