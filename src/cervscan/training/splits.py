"""Patient-wise splits, stratified by label x source: the one fold plan of every trainer and of the harness.

A patient is never on both sides of a split. ``train-cls`` (both recipes) and ``benchmarks/decision.py`` call
:func:`repeated_folds` / :func:`patient_folds` / :func:`patient_split`, so their folds are the same by
construction: K-fold ``StratifiedKFold(shuffle=True)`` over the patients sorted by id, repeat ``r`` seeded
``seed + r``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from cervscan.errors import DataError


def strata(labels: Sequence, sources: Sequence) -> np.ndarray:
    """One stratum per patient: ``label-source`` (an empty source counts as ``unknown``)."""
    return np.array([f"{a}-{b or 'unknown'}" for a, b in zip(labels, sources)])


def folds(strata_: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` stratified folds over the rows of ``strata_`` (train indices, validation indices)."""
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(strata_, strata_))


def repeated_folds(strata_: np.ndarray, k: int, repeats: int, seed: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`folds` for repeats ``0..repeats-1``, repeat ``r`` seeded ``seed + r``."""
    return [folds(strata_, k, seed + r) for r in range(repeats)]


def fold_index(strata_: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The validation fold (0-based) of every row: :func:`folds` as one array."""
    out = np.full(len(strata_), -1)
    for f, (_, va) in enumerate(folds(strata_, k, seed)):
        out[va] = f
    return out


def patient_folds(pids, y, src, k: int, seed: int) -> list[tuple[set, set]]:
    """Stratified (label x source) K-fold over patients; every patient is in exactly one validation fold. Strata
    too rare to split ``k`` ways fall back to the label alone."""
    st = strata(y, src)
    _, counts = np.unique(st, return_counts=True)
    if counts.min() < k:
        st = np.asarray(y).astype(str)
        _, counts = np.unique(st, return_counts=True)
        if counts.min() < k:
            raise DataError(f"{k}-fold cross-validation needs at least {k} patients of each class, "
                            f"have {counts.min()} of one class; use fewer folds")
    return [({pids[i] for i in tr}, {pids[i] for i in va}) for tr, va in folds(st, k, seed)]


def patient_split(pids, y, src, val_fraction: float, seed: int) -> tuple[set, set]:
    """One stratified train / validation split of the patients (label x source, else label alone)."""
    n_val = math.ceil(val_fraction * len(pids))  # how train_test_split counts a fractional test_size

    def splittable(st) -> bool:  # sklearn needs >= 2 per stratum and >= 1 per stratum on each side
        _, c = np.unique(st, return_counts=True)
        return c.min() >= 2 and min(n_val, len(pids) - n_val) >= len(c)

    st = strata(y, src)
    if not splittable(st):
        st = np.asarray(y).astype(str)
        if not splittable(st):
            raise DataError(f"{len(pids)} patients are too few for a stratified validation split of {val_fraction:g}: "
                            f"each class needs at least 2 patients and a place on both sides; use more patients "
                            f"or a different --val-fraction")
    tr, va = train_test_split(list(pids), test_size=val_fraction, random_state=seed, stratify=st)
    return set(tr), set(va)
