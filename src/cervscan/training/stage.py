"""``train-stage``: the exam-stage model (acetic, lugol, green, saline, other).

A frozen ImageNet EfficientNet-Lite0 (offline weights) turns each whole frame
into a 1280-d feature; a class-balanced multinomial logistic regression
(scikit-learn) on the standardised features gives the stage. Accuracy is
measured by patient-wise K-fold cross-validation (stratified by the patient's
most frequent stage). The shipped checkpoint is an ordinary timm
``tf_efficientnet_lite0`` whose classifier layer holds the regression with the
standardisation folded in, so screening needs no scikit-learn.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from cervscan import __version__
from cervscan.config import STAGES  # the stage classes, in the model's output order
from cervscan.errors import CervscanError, DataError
from cervscan.files import atomic_write_csv, atomic_write_json, cache_root, file_key, read_image
from cervscan.models.networks import (build_classifier, fold_standardisation, load_lite_into_timm, make_checkpoint,
                                      pooled_features, save_checkpoint)
from cervscan.training.configs import StageTrainConfig  # noqa: F401 - re-exported
from cervscan.files import atomic_write_with

log = logging.getLogger(__name__)

STAGE_INPUT = 224


def stage_class(raw: str) -> str | None:
    """Map a recorded exam stage (as the IARC banks write it) to one of STAGES; None when empty.

    acetic: after acetic acid (also with higher magnification); lugol: after Lugol's iodine;
    green: any green-filter view; saline: after normal saline or no solution yet ("Before acetic acid
    (naked eye)" of the VIA bank: the cervix before any solution); other: speculum view, vulva (before or
    after acetic acid), vagina, SCJ close-up, endocervix / endocervical speculum.
    """
    s = (raw or "").strip().lower()
    if not s:
        return None
    if "green" in s:
        return "green"
    if any(k in s for k in ("speculum examination", "vulva", "vagina", "scj", "endocerv")):
        return "other"
    if "lugol" in s or "iodine" in s:
        return "lugol"
    if "before acetic" in s:
        return "saline"  # no solution applied yet: the saline class (the cervix as it is)
    if "acetic" in s:
        return "acetic"
    if "saline" in s:
        return "saline"
    return "other"



def _backbone():
    m = build_classifier("tf_efficientnet_lite0", num_classes=len(STAGES))
    load_lite_into_timm(m, 0)
    return m.eval()


def frame_features(model, images: list[np.ndarray]) -> np.ndarray:
    """Pooled 1280-d features of whole frames at STAGE_INPUT px (mean = std = 0.5)."""
    return pooled_features(model, images, STAGE_INPUT)


def read_stage_rows(visits: Path, images_csv: Path) -> list[dict]:
    if not images_csv.is_file():
        raise DataError(f"{images_csv}: stage table not found (columns patient_id,image,stage)")
    with open(images_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"patient_id", "image", "stage"}
    if rows and not need <= set(rows[0]):
        raise DataError(f"{images_csv}: needs columns {', '.join(sorted(need))}")
    out = []
    for r in rows:
        st = stage_class(r["stage"])
        p = visits / r["patient_id"] / r["image"]
        if st is None:
            continue
        if not p.is_file():
            log.warning("%s: listed in %s but missing; skipped", p, images_csv)
            continue
        out.append({"patient_id": r["patient_id"], "image": r["image"], "path": p, "stage": st, "raw": r["stage"]})
    if not out:
        raise DataError(f"{images_csv}: no image with a known stage")
    return out


def _stage_features(cfg: StageTrainConfig, rows: list[dict], model) -> np.ndarray:
    """The frames' features (cached by file), one row per image."""
    cache = cache_root(cfg.cache_dir) / f"stage-lite0-{STAGE_INPUT}"
    cache.mkdir(parents=True, exist_ok=True)
    feats = []
    for r in rows:
        key = file_key(r["path"])
        f = cache / f"{key}.npy"
        if f.exists():
            feats.append(np.load(f))
            continue
        v = frame_features(model, [read_image(r["path"], max_side=1024).rgb])[0]
        atomic_write_with(f, lambda fh, v=v: np.save(fh, v))
        feats.append(v)
    return np.stack(feats).astype(np.float64)


def _fit(cfg: StageTrainConfig, Xtr: np.ndarray, ytr: np.ndarray):
    """The class-balanced multinomial regression on standardised features: (scaler, regression)."""
    sc = StandardScaler().fit(Xtr)
    lr = LogisticRegression(C=cfg.C, max_iter=3000, class_weight="balanced")
    lr.fit(sc.transform(Xtr), ytr)
    return sc, lr


def _cross_validate(cfg: StageTrainConfig, X: np.ndarray, y: np.ndarray,
                    groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Held-out predicted stage and class probabilities of each image: patient-wise CV, stratified by each
    image's stage, grouped by patient."""
    skf = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    pred = np.full(len(y), -1)
    prob = np.zeros((len(y), len(STAGES)))
    for tr, va in skf.split(X, y, groups):
        assert not set(groups[tr]) & set(groups[va])
        sc, lr = _fit(cfg, X[tr], y[tr])
        p = np.zeros((len(va), len(STAGES)))
        p[:, lr.classes_] = lr.predict_proba(sc.transform(X[va]))
        prob[va] = p
        pred[va] = p.argmax(1)
    return pred, prob


def _cv_metrics(cfg: StageTrainConfig, y: np.ndarray, pred: np.ndarray, groups: np.ndarray, src: np.ndarray,
                t_feat: float) -> dict:
    """metrics.json of the cross-validation: accuracy, balanced accuracy, per class, by source, confusion."""
    cm = confusion_matrix(y, pred, labels=list(range(len(STAGES))))
    per_class = {s: {"n": int(cm[i].sum()), "recall": float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None,
                     "precision": float(cm[i, i] / cm[:, i].sum()) if cm[:, i].sum() else None}
                 for i, s in enumerate(STAGES)}
    by_source = {s: float((pred[src == s] == y[src == s]).mean()) for s in sorted(set(src.tolist()))}
    return {
        "images": int(len(y)), "patients": int(len(set(groups.tolist()))),
        "evaluation": f"{cfg.folds}-fold patient-wise cross-validation (StratifiedGroupKFold, seed {cfg.seed})",
        "accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.mean([v["recall"] for v in per_class.values() if v["recall"] is not None])),
        "per_class": per_class, "accuracy_by_source": by_source,
        "confusion": {"labels": list(STAGES), "rows_true_cols_pred": cm.tolist()},
        "seconds": {"features": t_feat},
    }


def _fold_into_network(model, X: np.ndarray, sc, lr) -> None:
    """The regression, with the standardisation folded in, as ``model``'s classifier layer; checked to give the
    regression's logits on the first training features."""
    W = np.zeros((len(STAGES), X.shape[1]))
    b = np.full(len(STAGES), -1e4)  # a class absent from training can never win
    W[lr.classes_], b[lr.classes_] = fold_standardisation(lr.coef_, lr.intercept_, sc.mean_, sc.scale_)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(torch.tensor(W, dtype=torch.float32))
        head.bias.copy_(torch.tensor(b, dtype=torch.float32))
    # check: the folded network reproduces the regression on the training features
    with torch.no_grad():
        z = head(torch.tensor(X[:16], dtype=torch.float32)).numpy()
    ref = lr.decision_function(sc.transform(X[:16]))
    if not np.allclose(z[:, lr.classes_], ref, atol=1e-3):
        raise CervscanError("folding the stage regression into the network failed (logits differ)")


def _save_stage_model(cfg: StageTrainConfig, model, metrics: dict, path: Path) -> None:
    """The deploy stage checkpoint, with the cross-validation's numbers in its train summary."""
    ck = make_checkpoint(model, kind="stage", arch="tf_efficientnet_lite0", arch_kwargs={},
                         form="deploy", input_size=(STAGE_INPUT, STAGE_INPUT), mean=(0.5,) * 3, std=(0.5,) * 3,
                         name=cfg.name, version=cfg.version,
                         extra={"classes": list(STAGES), "target": "stage",
                                "train_summary": {"backbone": "EfficientNet-Lite0, ImageNet (frozen)",
                                                  "head": f"logistic regression, C={cfg.C}, class-balanced",
                                                  "images": metrics["images"], "patients": metrics["patients"],
                                                  "cv_accuracy": metrics["accuracy"],
                                                  "cv_balanced_accuracy": metrics["balanced_accuracy"],
                                                  "cv_per_class_recall": {k: v["recall"] for k, v
                                                                          in metrics["per_class"].items()},
                                                  "data": str(Path(cfg.visits))}})
    save_checkpoint(ck, path)


def train_stage(cfg: StageTrainConfig) -> dict:
    """``train-stage``: writes predictions.csv (held-out), model.pt, metrics.json and run.json to ``cfg.out``;
    returns the metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    visits = Path(cfg.visits)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_stage_rows(visits, Path(cfg.images_csv) if cfg.images_csv else visits / "images.csv")
    model = _backbone()
    X = _stage_features(cfg, rows, model)
    y = np.array([STAGES.index(r["stage"]) for r in rows])
    groups = np.array([r["patient_id"] for r in rows])
    src = np.array([r["patient_id"].split("-")[0] for r in rows])
    t_feat = time.time() - t0

    pred, prob = _cross_validate(cfg, X, y, groups)
    metrics = _cv_metrics(cfg, y, pred, groups, src, t_feat)
    atomic_write_csv(out / "predictions.csv",
                     [{"patient_id": r["patient_id"], "image": r["image"], "stage_recorded": r["raw"], "stage": r["stage"],
                       "predicted": STAGES[k], "confidence": float(prob[i].max())} for i, (r, k) in enumerate(zip(rows, pred))],
                     ["patient_id", "image", "stage_recorded", "stage", "predicted", "confidence"])

    # final model on every image: fold the standardisation into the linear layer
    sc, lr = _fit(cfg, X, y)
    _fold_into_network(model, X, sc, lr)
    _save_stage_model(cfg, model, metrics, out / "model.pt")
    metrics["checkpoint"] = str(out / "model.pt")
    metrics["seconds"]["total"] = time.time() - t0
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "run.json", {"command": "train-stage", "config": asdict(cfg), "cervscan_version": __version__,
                                         "torch": torch.__version__})
    return metrics
