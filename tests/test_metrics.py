"""Patient-level metrics against hand-computed cases, and the training-side AUC / threshold helpers."""

from __future__ import annotations

import numpy as np
import pytest

from cervscan.errors import DataError
from cervscan.metrics import binary_metrics, bootstrap_ci, full_report, threshold_for_sensitivity

# --------------------------------------------------------------------------- binary_metrics

def test_perfect_separation_gives_auc_1():
    m = binary_metrics([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.9], 0.5)
    assert m["auc"] == 1.0
    assert m["accuracy"] == m["sensitivity"] == m["specificity"] == m["ppv"] == m["npv"] == 1.0
    assert m["confusion"] == [[3, 0], [0, 2]]
    assert (m["patients"], m["severe"], m["threshold"]) == (5, 2, 0.5)


def test_inverted_scores_give_auc_0():
    m = binary_metrics([0, 0, 0, 1, 1], [0.9, 0.8, 0.7, 0.2, 0.1], 0.5)
    assert m["auc"] == 0.0
    assert m["confusion"] == [[0, 3], [2, 0]]
    assert m["sensitivity"] == m["specificity"] == m["accuracy"] == 0.0


def test_all_tied_scores_give_auc_one_half():
    m = binary_metrics([0, 1, 0, 1, 1, 0], [0.4] * 6, 0.5)
    assert m["auc"] == 0.5
    # every score is below the threshold: all decided mildly normal, PPV undefined
    assert m["confusion"] == [[3, 0], [3, 0]]
    assert m["sensitivity"] == 0.0 and m["specificity"] == 1.0
    assert m["ppv"] is None and m["npv"] == 0.5


def test_hand_computed_case():
    y = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.05, 0.10, 0.20, 0.35, 0.60, 0.70, 0.30, 0.55, 0.80, 0.90]
    m = binary_metrics(y, s, 0.5)
    # decisions (> 0.5): negatives 0.60 and 0.70 are false positives, positive 0.30 a false negative
    tn, fp, fn, tp = 4, 2, 1, 3
    assert m["confusion"] == [[tn, fp], [fn, tp]]
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(tn / (tn + fp)) == pytest.approx(4 / 6)
    assert m["ppv"] == pytest.approx(tp / (tp + fp)) == pytest.approx(0.6)
    assert m["npv"] == pytest.approx(tn / (tn + fn)) == pytest.approx(0.8)
    assert m["accuracy"] == pytest.approx(0.7)
    # AUC by pair counting: of the 24 (positive, negative) pairs, how many rank the positive higher
    pos = [v for v, t in zip(s, y) if t == 1]
    neg = [v for v, t in zip(s, y) if t == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert wins == 19  # 0.30 beats 3, 0.55 beats 4, 0.80 and 0.90 beat all 6
    assert m["auc"] == pytest.approx(19 / 24)


def test_threshold_is_strictly_greater_than():
    y = [0, 1, 0, 1]
    s = [0.2, 0.5, 0.5, 0.8]
    m = binary_metrics(y, s, 0.5)
    assert m["confusion"] == [[2, 0], [1, 1]]  # the two scores equal to the threshold are not severe
    m = binary_metrics(y, s, 0.4999)
    assert m["confusion"] == [[1, 1], [0, 2]]


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_single_class_labels_raise_a_clear_data_error(labels):
    with pytest.raises(DataError, match=f"single class \\({labels[0]}\\).*undefined"):
        binary_metrics(labels, np.linspace(0.1, 0.9, len(labels)), 0.5)
    with pytest.raises(DataError):
        full_report(labels, np.linspace(0.1, 0.9, len(labels)), 0.5, n_bootstrap=10)


def test_empty_label_set_is_a_data_error():
    with pytest.raises(DataError, match="no labelled patients"):
        binary_metrics([], [], 0.5)


# --------------------------------------------------------------------------- bootstrap

def _noisy_case(n=60, seed=3):
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    s = np.clip(0.35 + 0.3 * y + rng.normal(0, 0.2, n), 0, 1)
    return y, s


def test_bootstrap_ci_is_repeatable_with_a_seed_and_contains_the_estimate():
    y, s = _noisy_case()
    a = bootstrap_ci(y, s, 0.5, n=300, seed=7)
    b = bootstrap_ci(y, s, 0.5, n=300, seed=7)
    c = bootstrap_ci(y, s, 0.5, n=300, seed=8)
    assert a == b
    assert a != c
    point = binary_metrics(y, s, 0.5)
    for k in ("auc", "sensitivity", "specificity"):
        lo, hi = a[k]
        assert 0.0 <= lo < point[k] < hi <= 1.0, (k, a[k], point[k])
    # a narrower interval with more patients (same effect size)
    y2, s2 = _noisy_case(n=600)
    wide = a["auc"][1] - a["auc"][0]
    narrow = np.subtract(*bootstrap_ci(y2, s2, 0.5, n=300, seed=7)["auc"][::-1])
    assert narrow < wide


def test_full_report_by_source_keeps_single_class_sources_as_errors():
    y, s = _noisy_case(n=20)
    src = np.array(["a"] * 16 + ["b"] * 4, dtype=object)
    y = y.copy()
    y[16:] = 1  # source b has severe patients only
    m = full_report(y, s, 0.5, sources=src, n_bootstrap=50, seed=0)
    assert set(m["by_source"]) == {"a", "b"}
    assert m["by_source"]["a"]["patients"] == 16 and "auc" in m["by_source"]["a"]
    assert m["by_source"]["b"] == {"patients": 4, "severe": 4, "error": m["by_source"]["b"]["error"]}
    assert "single class" in m["by_source"]["b"]["error"]
    assert m["ci95"]["auc"][0] <= m["auc"] <= m["ci95"]["auc"][1]


# --------------------------------------------------------------------------- operating point

def test_threshold_for_sensitivity_hand_case():
    y = [0, 0, 1, 0, 1, 1]
    s = [0.1, 0.2, 0.3, 0.4, 0.6, 0.8]
    # two of three severe patients suffice: the threshold sits halfway between 0.6 and the next lower score 0.4
    op = threshold_for_sensitivity(y, s, 0.66)
    assert op["threshold"] == pytest.approx(0.5)
    assert op["sensitivity"] == pytest.approx(2 / 3) and op["specificity"] == 1.0
    # all three: halfway between 0.3 and 0.2; one negative (0.4) is now above it
    op = threshold_for_sensitivity(y, s, 1.0)
    assert op["threshold"] == pytest.approx(0.25)
    assert op["sensitivity"] == 1.0 and op["specificity"] == pytest.approx(2 / 3)
    assert op["target_sensitivity"] == 1.0
    # the threshold reproduces the reported figures through binary_metrics (strictly greater-than)
    m = binary_metrics(y, s, op["threshold"])
    assert (m["sensitivity"], m["specificity"]) == (op["sensitivity"], op["specificity"])


def test_threshold_for_sensitivity_reaches_the_target_and_is_the_largest_such():
    y, s = _noisy_case(n=80, seed=5)
    for target in (0.5, 0.8, 0.9, 0.95):
        op = threshold_for_sensitivity(y, s, target)
        assert op["sensitivity"] >= target
        # any higher threshold that falls past the next severe score loses the target
        higher = np.sort(s[(y == 1) & (s > op["threshold"])])
        if higher.size:
            above = binary_metrics(y, s, float(higher[0]))
            assert above["sensitivity"] < target


def test_threshold_for_sensitivity_needs_both_classes():
    with pytest.raises(DataError, match="both classes"):
        threshold_for_sensitivity([1, 1, 1], [0.2, 0.5, 0.9], 0.9)


# --------------------------------------------------------------------------- training helpers

def test_rank_auc_equals_sklearn_row_by_row():
    from sklearn.metrics import roc_auc_score

    from cervscan.metrics import rank_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 41)
    y[:2] = [0, 1]
    S = np.column_stack([
        rng.random(41),  # no ties
        rng.integers(0, 4, 41) / 4,  # many ties
        y + rng.normal(0, 0.3, 41),  # informative
        -y.astype(float),  # inverted: AUC 0
        np.full(41, 0.3),  # all tied: AUC 0.5
    ])
    got = rank_auc(np.broadcast_to(y, (S.shape[1], y.size)), S.T)
    want = [roc_auc_score(y, S[:, j]) for j in range(S.shape[1])]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[3] == 0.0 and got[4] == 0.5


def test_paired_auc_delta_equals_a_loop_of_resamples():
    from sklearn.metrics import roc_auc_score

    from cervscan.metrics import paired_auc_delta

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 60)
    a = rng.random(60)
    b = a + y * 0.3 * rng.random(60)
    r, d = np.random.default_rng(0), []
    for _ in range(300):
        i = r.integers(0, len(y), len(y))
        if y[i].min() != y[i].max():
            d.append(roc_auc_score(y[i], b[i]) - roc_auc_score(y[i], a[i]))
    got = paired_auc_delta(y, a, b, n=300, seed=0)
    assert got["delta"] == pytest.approx(roc_auc_score(y, b) - roc_auc_score(y, a))
    assert got["ci95"] == pytest.approx([np.percentile(d, 2.5), np.percentile(d, 97.5)])
    assert got["ci95"][0] > 0  # b ranks the severe patients higher
