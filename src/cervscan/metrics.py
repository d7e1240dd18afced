"""Patient-level classification metrics: thin wrappers over ``sklearn.metrics``."""

from __future__ import annotations

import numpy as np

from cervscan.errors import DataError
from cervscan.files import atomic_write_with


def binary_metrics(y_true, scores, threshold: float) -> dict:
    """AUC, accuracy, sensitivity, specificity, PPV, NPV and confusion [[tn, fp], [fn, tp]].

    Decision is severe when score > threshold. A single-class label set raises
    DataError (AUC, sensitivity or specificity would be undefined).
    """
    from sklearn.metrics import (  # lazy: sklearn (api imports this module)
        accuracy_score,
        confusion_matrix,
        roc_auc_score,
    )

    y = np.asarray(y_true, dtype=int)
    s = np.asarray(scores, dtype=float)
    if y.size == 0:
        raise DataError("no labelled patients to evaluate")
    if len(np.unique(y)) < 2:
        raise DataError(f"labels contain a single class ({int(y[0])}) only: AUC, sensitivity and specificity "
                        f"are undefined; evaluate on a set with both severe and mildly normal patients")
    pred = (s > threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    div = lambda a, b: float(a / b) if b else None  # noqa: E731
    return {
        "patients": int(y.size), "severe": int(y.sum()),
        "auc": float(roc_auc_score(y, s)),
        "accuracy": float(accuracy_score(y, pred)),
        "sensitivity": div(tp, tp + fn), "specificity": div(tn, tn + fp),
        "ppv": div(tp, tp + fp), "npv": div(tn, tn + fn),
        "threshold": float(threshold),
        "confusion": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def bootstrap_ci(y_true, scores, threshold: float, n: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Percentile bootstrap over patients for AUC, sensitivity and specificity.

    Vectorised: all resamples at once; AUC by the Mann-Whitney rank statistic
    (ties get average ranks, identical to ``sklearn.metrics.roc_auc_score``).
    Resamples that lack a class are skipped for the metrics that need it.
    """
    y = np.asarray(y_true, dtype=int)
    s = np.asarray(scores, dtype=float)
    idx = _resamples(y.size, n, seed)
    Y, S = y[idx], s[idx]
    P = S > threshold
    n1 = Y.sum(1)
    n0 = y.size - n1
    both = (n1 > 0) & (n0 > 0)
    auc = rank_auc(Y, S)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (P & (Y == 1)).sum(1) / n1
        spec = (~P & (Y == 0)).sum(1) / n0
    vals = {"auc": auc[both], "sensitivity": sens[n1 > 0], "specificity": spec[n0 > 0]}
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    return {k: ([float(np.percentile(v, lo)), float(np.percentile(v, hi))] if v.size else None) for k, v in vals.items()}


def _resamples(size: int, n: int, seed: int) -> np.ndarray:
    """``n`` bootstrap resamples (rows of patient indices) of ``size`` patients."""
    return np.random.default_rng(seed).integers(0, size, (n, size))


def rank_auc(Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """AUC of each row (labels ``Y``, scores ``S``) by the Mann-Whitney rank statistic, ties at average
    ranks; NaN for a row that lacks a class."""
    from scipy.stats import rankdata  # lazy: scipy (api imports this module)

    n1 = Y.sum(1)
    n0 = Y.shape[1] - n1
    R = rankdata(S, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((R * Y).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def bootstrap_auc_ci(y_true, scores, n: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap 95 % CI (``alpha``) over patients of the AUC, or of the mean AUC of several score
    vectors of the same patients (``scores``: patients, or repeats x patients, e.g. the out-of-fold scores
    of repeated cross-validation; each resample draws the same patients for every repeat). Resamples that
    lack a class are skipped."""
    y = np.asarray(y_true, dtype=int)
    S = np.atleast_2d(np.asarray(scores, dtype=float))
    if S.shape[1] != y.size:
        raise ValueError(f"{S.shape[1]} scores for {y.size} labels")
    idx = _resamples(y.size, n, seed)
    Y = y[idx]
    auc = np.mean([rank_auc(Y, row[idx]) for row in S], axis=0)
    auc = auc[np.isfinite(auc)]
    if not auc.size:
        raise DataError("no bootstrap resample holds both classes: the AUC's confidence interval is undefined")
    return float(np.percentile(auc, 100 * alpha / 2)), float(np.percentile(auc, 100 * (1 - alpha / 2)))


def paired_auc_delta(y_true, a, b, n: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """AUC(b) - AUC(a) on the same patients, with a paired percentile bootstrap CI over patients (each
    resample scores both on the same patients; resamples that lack a class are skipped). ``b`` may be
    repeats x patients (repeated cross-validation): AUC(b) is then the mean AUC of its rows, each resample
    drawing the same patients for every row (as :func:`bootstrap_auc_ci`)."""
    y = np.asarray(y_true, dtype=int)
    A, B = np.asarray(a, dtype=float), np.atleast_2d(np.asarray(b, dtype=float))
    idx = _resamples(y.size, n, seed)
    Y = y[idx]
    d = np.mean([rank_auc(Y, row[idx]) for row in B], axis=0) - rank_auc(Y, A[idx])
    d = d[np.isfinite(d)]
    full = float(np.mean(rank_auc(np.tile(y, (len(B), 1)), B))) - rank_auc(y[None], A[None])[0]
    return {"delta": float(full), "ci95": [float(np.percentile(d, 100 * alpha / 2)),
                                          float(np.percentile(d, 100 * (1 - alpha / 2)))], "n": n}


def platt_scaling(scores, y_true) -> dict:
    """Platt scaling, P(severe) = sigmoid(a * score + c), fitted by maximum likelihood, that never reverses
    the ranking of the scores.

    A fitted slope ``a`` that is not positive means that higher scores went with fewer severe patients:
    applying it would turn the model's ranking around (a severe patient scored high would be sent home).
    Then no calibration is applied (``a`` = 1, ``c`` = 0: the scores' own log-odds), ``applied`` is False and
    the fitted values are kept in ``fitted_a`` / ``fitted_c``. Returns ``{"a", "c", "applied", ...}``.
    """
    from sklearn.linear_model import LogisticRegression  # lazy: sklearn

    s = np.asarray(scores, dtype=float).reshape(-1, 1)
    y = np.asarray(y_true, dtype=int).reshape(-1)
    if len(np.unique(y)) < 2:
        raise DataError("calibration needs both classes")
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(s, y)
    a, c = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if a > 0 and np.isfinite(a) and np.isfinite(c):
        return {"a": a, "c": c, "applied": True}
    return {"a": 1.0, "c": 0.0, "applied": False, "fitted_a": a, "fitted_c": c,
            "note": f"the fitted slope {a:.3g} is not positive: calibrating would reverse the ranking "
                    f"(severe patients would score lowest); scores left uncalibrated"}


def threshold_for_sensitivity(y_true, scores, target: float) -> dict:
    """Largest threshold whose sensitivity (score > threshold) reaches ``target``.

    Returns threshold, sensitivity and specificity reached on these patients.
    The threshold sits halfway between the score of the last severe patient kept
    above it and the next lower score, so it is not fitted onto a data point.
    """
    y = np.asarray(y_true, dtype=int)
    s = np.asarray(scores, dtype=float)
    if len(np.unique(y)) < 2:
        raise DataError("operating point needs both classes")
    pos = np.sort(s[y == 1])[::-1]
    k = int(np.ceil(target * pos.size))  # severe patients that must score above the threshold
    k = min(max(k, 1), pos.size)
    kth = pos[k - 1]
    below = s[s < kth]
    thr = float((kth + below.max()) / 2) if below.size else float(kth - 1e-6)
    pred = s > thr
    return {"threshold": thr, "target_sensitivity": float(target),
            "sensitivity": float(pred[y == 1].mean()), "specificity": float((~pred[y == 0]).mean())}


def full_report(y_true, scores, threshold: float, *, sources=None, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    m = binary_metrics(y_true, scores, threshold)
    m["ci95"] = bootstrap_ci(y_true, scores, threshold, n=n_bootstrap, seed=seed)
    if sources is not None:
        src = np.asarray(sources, dtype=object)
        y = np.asarray(y_true)
        s = np.asarray(scores)
        m["by_source"] = {}
        for v in sorted(set(src.tolist())):
            sel = src == v
            try:
                sub = binary_metrics(y[sel], s[sel], threshold)
                sub["ci95"] = bootstrap_ci(y[sel], s[sel], threshold, n=n_bootstrap, seed=seed)
            except DataError as e:
                sub = {"patients": int(sel.sum()), "severe": int(y[sel].sum()), "error": str(e)}
            m["by_source"][str(v)] = sub
    return m


def plot_roc(y_true, scores, path, *, sources=None, title: str = "ROC (patients)", point: dict | None = None):
    import matplotlib  # lazy: matplotlib (api imports this module)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib
    from sklearn.metrics import roc_auc_score, roc_curve  # lazy: sklearn

    fig, ax = plt.subplots(figsize=(5, 5))
    y, s = np.asarray(y_true), np.asarray(scores)
    groups = [("all", np.ones(len(y), bool))]
    if sources is not None:
        src = np.asarray(sources, dtype=object)
        groups += [(str(v), src == v) for v in sorted(set(src.tolist()))]
    for name, sel in groups:
        if len(np.unique(y[sel])) < 2:
            continue
        fpr, tpr, _ = roc_curve(y[sel], s[sel])
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y[sel], s[sel]):.3f}, n={sel.sum()})")
    if point:
        ax.scatter([1 - point["specificity"]], [point["sensitivity"]], c="k", zorder=5,
                   label=f"threshold {point['threshold']:.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(confusion, path, title: str = "Confusion (patients)"):
    import matplotlib  # lazy: matplotlib (api imports this module)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib

    c = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(c, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(c[i, j]), ha="center", va="center", fontsize=14,
                    color="white" if c[i, j] > c.max() / 2 else "black")
    ax.set_xticks([0, 1], ["mildly normal", "severe"])
    ax.set_yticks([0, 1], ["mildly normal", "severe"])
    ax.set_xlabel("cervscan decision")
    ax.set_ylabel("label")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path):
    import matplotlib.pyplot as plt  # lazy: matplotlib

    try:
        atomic_write_with(path, lambda f: fig.savefig(f, dpi=120, format=str(path).rsplit(".", 1)[-1]))
    finally:
        plt.close(fig)
