"""``train-cls --recipe frozen`` (the default): the patient decision from frozen image features, the shipped
classifier's recipe.

Every image goes through the screening pipeline (:class:`cervscan.pipeline.steps.Pipeline`: stage, cervix
crop, lesion, quality gate, the study's variants at ``input_size``), exactly as ``screen`` will see it.
A frozen ImageNet EfficientNet-Lite (offline weights) turns each variant into a 1280-d feature. The
patient's feature is the mean over their eligible images (the gate, with ``decision_stages``); a
class-balanced logistic regression over standardised patient features is fitted on the original and
segmented images together (two rows per patient, as the study trains on both), and a patient is scored
by the weighted vote of the variants' log-odds.

Because the regression is linear, the mean of the images' log-odds equals the regression's score of the
mean feature, so the shipped network (the backbone with the regression and the calibration folded into
its last layer, ``voting.pooling = "logit"``) gives through ``screen`` the score this module computes.

Evaluation: K-fold patient-wise cross-validation repeated R times (patients stratified by label x
source). Calibration (Platt scaling, slope kept positive so that it never reverses the ranking:
:func:`cervscan.metrics.platt_scaling`) is fitted on the pooled out-of-fold scores of all repeats; the
operating point is the threshold reaching ``target_sensitivity`` on those calibrated scores (both are
fitted on these scores: the sensitivity and specificity at the threshold are in-sample). The fold models
of the first repeat are written with ``folds.csv`` so that ``cervscan evaluate --cv-run`` reproduces the
first repeat's out-of-fold numbers through the screening path.

Validation (:mod:`cervscan.training.validation`): the cross-validated patient AUC (mean of the repeats) and its
bootstrap 95 % CI; when the CI's lower end is not above 0.5 the classifier is no better than chance, no
``model.pt`` is written and :class:`cervscan.training.validation.ValidationFailed` is raised (after ``metrics.json``,
``oof.csv`` and the fold models, which record the failed validation), unless ``force``. Every checkpoint
records the validation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import timm
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from cervscan import __version__
from cervscan.errors import CervscanError, DataError
from cervscan.files import atomic_write_csv, atomic_write_json, cache_root, discover_visits, file_key, read_labels
from cervscan.metrics import full_report, platt_scaling, threshold_for_sensitivity
from cervscan.models.networks import (fold_standardisation, load_lite_into_timm, make_checkpoint, pooled_features,
                                      save_checkpoint)
from cervscan.pipeline import quality
from cervscan.pipeline.steps import Pipeline
from cervscan.training.configs import BACKBONES, DecisionTrainConfig  # noqa: F401 - re-exported
from cervscan.training.splits import repeated_folds, strata
from cervscan.training.validation import classifier_validation, enforce, label_check
from cervscan.files import atomic_write_npz

log = logging.getLogger(__name__)


def backbone(name: str):
    """Frozen ImageNet ``tf_efficientnet_liteN`` with a 2-class head (to be overwritten by the fit)."""
    if name not in BACKBONES:
        raise CervscanError(f"backbone must be one of {', '.join(BACKBONES)}, not {name!r}")
    m = timm.create_model(f"tf_efficientnet_{name}", pretrained=False, num_classes=2)
    load_lite_into_timm(m, int(name[-1]))
    return m.eval()


def _pipeline(cfg: DecisionTrainConfig):
    overrides = {"crop": "cervix", "classify_view": cfg.classify_view, "variants": list(cfg.variants), "weights": list(cfg.weights),
                 "decision_stages": list(cfg.decision_stages), "pooling": "logit",
                 "quality_gate": cfg.quality_gate}
    pipe = Pipeline.from_config(seg_model=cfg.seg_model, cervix_model=cfg.cervix_model,
                                     stage_model=cfg.stage_model, overrides=overrides,
                                     write_masks=False, write_overlays=False,
                                     site=False)  # training never takes an installed site's settings
    return pipe, pipe.refs


def _cache_key(cfg: DecisionTrainConfig, pipe, refs, weights_sha: str) -> str:
    """Everything the cached values depend on: backbone, input, the pipeline's models, the variant and crop
    settings and the quality measures' code (the gate's thresholds are applied when the cache is read)."""
    c = pipe.cfg
    voting = {k: v for k, v in asdict(c.voting).items() if k not in ("weights", "pooling")}
    qsrc = hashlib.sha256(Path(quality.__file__).read_bytes()).hexdigest()[:12]
    parts = [cfg.backbone, weights_sha, str(cfg.input_size), *(refs[r].sha256 for r in ("stage", "cervix", "segmenter")
                                                                if r in refs),
             json.dumps(voting, sort_keys=True, default=str), str(c.gate.measure_side), qsrc,
             c.classify_view, str(c.cervix_margin), str(c.cervix_min_fraction), str(c.centre_crop), str(c.max_side)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _eligibility(pipe, rec: dict) -> list[str]:
    """The pipeline's gate on a cached record (the fields :meth:`Pipeline.gate` reads of a prepared image)."""
    return pipe.gate(rec["quality"], SimpleNamespace(stage=rec["stage"], stage_confidence=rec["stage_confidence"],
                                                     cervix_found=rec["cervix_found"]))


def extract(cfg: DecisionTrainConfig, pipe, refs, items: list[tuple[str, Path]], model,
            progress=None) -> list[dict]:
    """Per image: the quality measures, stage, whether a cervix was found, and ``model``'s features of every
    screened variant (cached); ``eligible``/``reason`` from the pipeline's gate with its current settings.
    Every image is extracted, eligible or not, so that a change of the gate's thresholds or stage policy
    reuses the cache."""
    wsha = hashlib.sha256(b"".join(v.numpy().tobytes() for v in list(model.state_dict().values())[:8])).hexdigest()[:12]
    cache = cache_root(cfg.cache_dir) / f"decision-{_cache_key(cfg, pipe, refs, wsha)}"
    cache.mkdir(parents=True, exist_ok=True)
    out: list[dict | None] = [None] * len(items)
    todo = []
    for i, (pid, p) in enumerate(items):
        f = cache / f"{file_key(p)}.npz"
        if f.exists():
            z = np.load(f, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
            out[i] = {**meta, "feats": {v: z[v] for v in cfg.variants if v in z.files}}
            if len(out[i]["feats"]) == len(cfg.variants):
                continue
        todo.append(i)
    log.info("decision features: %d cached, %d to extract -> %s", len(items) - len(todo), len(todo), cache)
    t0 = time.time()
    for n0 in range(0, len(todo), 4):
        idx = todo[n0:n0 + 4]
        rgbs, ok = [], []
        for i in idx:
            try:
                rgbs.append(pipe.decode(items[i][1]).rgb)
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - a bad file is reported and left out
                log.warning("%s: left out (%s)", items[i][1], e)
        if not ok:
            continue
        prepared = pipe.prepare(rgbs, size=cfg.input_size)
        for i, im, p in zip(ok, rgbs, prepared):
            q = pipe.quality(im, p)
            vs = pipe.variants(p)
            F = pooled_features(model, [vs[v] for v in cfg.variants], cfg.input_size)
            meta = {"quality": q, "stage": p.stage, "stage_confidence": p.stage_confidence,
                    "cervix_found": p.cervix_found}
            rec = {**meta, "feats": {v: F[k] for k, v in enumerate(cfg.variants)}}
            out[i] = rec
            f = cache / f"{file_key(items[i][1])}.npz"
            atomic_write_npz(f, meta=np.array(json.dumps(meta, default=float)), **rec["feats"])
        if progress:
            progress(min(n0 + 4, len(todo)), len(todo))
        if (n0 // 4) % 25 == 0:
            log.info("decision features %d/%d (%.0f s)", n0 + len(idx), len(todo), time.time() - t0)
    for r in out:
        if r is not None:
            why = _eligibility(pipe, r)
            r["eligible"], r["reason"] = not why, ";".join(why)
    return out  # type: ignore[return-value]


def fit_lr(X: np.ndarray, y: np.ndarray, C: float):
    sc = StandardScaler().fit(X)
    lr = LogisticRegression(C=C, max_iter=5000, class_weight="balanced").fit(sc.transform(X), y)
    return sc, lr


def linear_of(model) -> tuple[np.ndarray, float]:
    """The fitted (scaler, regression) as one linear map on raw features: score = f @ w + b."""
    sc, lr = model
    W, b = fold_standardisation(lr.coef_, lr.intercept_, sc.mean_, sc.scale_)
    return W[0], float(b[0])


@dataclass
class _Patients:
    """The patients with an eligible image (in visit order): labels, sources and mean features per variant."""
    ids: list[str]
    y: np.ndarray
    source: np.ndarray
    V: dict[str, np.ndarray]  # variant -> patients x features
    inadequate: list[str]  # labelled patients without an eligible image


@dataclass
class _Folds:
    """The cross-validation's out-of-fold scores (repeats x patients) and the first repeat's folds and models."""
    oof: np.ndarray
    fold_of: np.ndarray  # the first repeat's fold (1..K) of each of the patients
    fold_all: dict[str, int]  # the same for every labelled patient, eligible or not
    models: list  # the first repeat's fold models
    auc: list[float]  # per fold of every repeat, where the fold holds both classes


@dataclass
class _Calibration:
    """Platt scaling of the pooled out-of-fold scores and the operating point on the calibrated scores."""
    platt: dict
    a: float
    c: float
    cal: np.ndarray  # calibrated out-of-fold scores, repeats x patients
    op: dict
    thr: float


def _labelled_visits(cfg: DecisionTrainConfig):
    """The labels (``lab``, ``src`` by patient), their check against the visit folders, and the labelled visits
    with images (a DataError unless both classes are among them)."""
    label_notes: list[dict] = []
    rows, _ = read_labels(cfg.labels, label_notes)
    lab = {r["patient_id"]: int(r["label"]) for r in rows}
    src = {r["patient_id"]: r.get("source") or "" for r in rows}
    found = discover_visits([cfg.visits])
    labels_check = label_check(rows, label_notes, [v.patient_id for v in found],
                               without_images=[v.patient_id for v in found if not v.images], labels=str(cfg.labels),
                               what=f" under {cfg.visits}")
    visits = [v for v in found if v.patient_id in lab and v.images]
    if len({lab[v.patient_id] for v in visits}) < 2:
        n1 = sum(lab[v.patient_id] for v in visits)
        raise DataError(f"{cfg.labels}: need labelled visits of both classes under {cfg.visits}; found "
                        f"{len(visits) - n1} labelled 0 (mildly normal) and {n1} labelled 1 (severe)")
    return lab, src, labels_check, visits


def _patient_features(cfg: DecisionTrainConfig, pats: list[str], items: list[tuple[str, Path]], recs: list[dict],
                      lab: dict, src: dict) -> _Patients:
    """Patient features: the mean over the patient's eligible images, per variant (a DataError when a class has
    fewer such patients than folds)."""
    feats: dict[str, dict[str, np.ndarray]] = {}
    inadequate = []
    for pid in pats:
        el = [r for (p, _), r in zip(items, recs) if p == pid and r is not None and r["eligible"]]
        if not el:
            inadequate.append(pid)
            continue
        feats[pid] = {v: np.mean([r["feats"][v] for r in el], 0) for v in cfg.variants}
    P = [p for p in pats if p in feats]
    y = np.array([lab[p] for p in P])
    for cls in (0, 1):
        if int((y == cls).sum()) < cfg.folds:
            raise DataError(f"{cfg.labels}: {int((y == cls).sum())} patient(s) with label {cls} have an eligible image "
                            f"under {cfg.visits}; {cfg.folds}-fold cross-validation needs at least {cfg.folds} of each "
                            f"class ({len(inadequate)} patient(s) had none eligible)")
    source = np.array([src[p] or "unknown" for p in P])
    V = {v: np.stack([feats[p][v] for p in P]).astype(np.float64) for v in cfg.variants}
    return _Patients(P, y, source, V, inadequate)


def _fit(cfg: DecisionTrainConfig, pats: _Patients, tr: np.ndarray):
    """The regression fitted on the patients ``tr``, one row per patient and training variant."""
    Xtr = np.concatenate([pats.V[v][tr] for v in cfg.train_variants])
    return fit_lr(Xtr, np.concatenate([pats.y[tr]] * len(cfg.train_variants)), cfg.C)


def _score(model, pats: _Patients, vote: dict[str, float], idx: np.ndarray) -> np.ndarray:
    """The patients' ``idx`` score: the weighted vote of the variants' log-odds."""
    w, b = linear_of(model)
    return sum(wt * (pats.V[v][idx] @ w + b) for v, wt in vote.items())


def _cross_validate(cfg: DecisionTrainConfig, pats: _Patients, vote: dict[str, float], allp: list[str], lab: dict,
                    src: dict) -> _Folds:
    """Out-of-fold scores of K-fold cross-validation repeated R times.

    The folds are over every labelled patient ``allp`` (sorted by id, stratified by label x source), so that
    they do not move when the gate leaves a patient without an eligible image (and match
    benchmarks/decision.py's); a patient without one is neither trained on nor scored."""
    plan = repeated_folds(strata([lab[p] for p in allp], [src[p] for p in allp]), cfg.folds, cfg.repeats, cfg.seed)
    pos = {p: i for i, p in enumerate(pats.ids)}
    folds = _Folds(oof=np.zeros((cfg.repeats, len(pats.ids))), fold_of=np.zeros(len(pats.ids), int), fold_all={},
                   models=[], auc=[])
    y, oof = pats.y, folds.oof
    for r, repeat in enumerate(plan):
        for k, (tr_all, te_all) in enumerate(repeat):
            tr = np.array([pos[allp[i]] for i in tr_all if allp[i] in pos], int)
            te = np.array([pos[allp[i]] for i in te_all if allp[i] in pos], int)
            if r == 0:
                folds.fold_all.update({allp[i]: k + 1 for i in te_all})
            m = _fit(cfg, pats, tr)
            oof[r, te] = _score(m, pats, vote, te)
            if len(set(y[te])) == 2:
                folds.auc.append(float(roc_auc_score(y[te], oof[r, te])))
            if r == 0:
                folds.fold_of[te] = k + 1
                folds.models.append(m)
    return folds


def _calibrate(cfg: DecisionTrainConfig, y: np.ndarray, oof: np.ndarray) -> _Calibration:
    """Platt scaling on the pooled out-of-fold scores of all repeats, and the threshold reaching the target
    sensitivity on the calibrated scores.

    The slope is kept positive (a fitted slope that is not is refused: the scores stay uncalibrated), so the
    calibrated scores keep the ranking and every AUC is the same on the raw and the calibrated scores."""
    platt = platt_scaling(oof.reshape(-1), np.tile(y, cfg.repeats))
    a, c = platt["a"], platt["c"]
    if not platt["applied"]:
        log.warning("calibration refused: %s", platt["note"])
    cal = 1.0 / (1.0 + np.exp(-(a * oof + c)))
    op = threshold_for_sensitivity(np.tile(y, cfg.repeats), cal.reshape(-1), cfg.target_sensitivity)
    op["chosen_on"] = "the calibrated out-of-fold scores of all repeats (in-sample: these are also the scores it is reported on)"
    return _Calibration(platt, a, c, cal, op, op["threshold"])


def _cv_metrics(cfg: DecisionTrainConfig, pats: _Patients, calib: _Calibration, folds: _Folds, *, images: int,
                eligible_images: int, labels_check: dict) -> dict:
    """metrics.json of the cross-validation (its ``seconds`` filled in later), with the validation against
    chance."""
    y, source, cal, thr = pats.y, pats.source, calib.cal, calib.thr
    rep0 = full_report(y, cal[0], thr, sources=source, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    aucs = [float(roc_auc_score(y, cc)) for cc in cal]
    evaluation = (f"{cfg.folds}-fold patient-wise cross-validation x {cfg.repeats} repeats "
                  f"(StratifiedKFold on label x source, seeds {cfg.seed}..{cfg.seed + cfg.repeats - 1})")
    validation = classifier_validation(
        y, cal, method=f"{cfg.folds}-fold patient-wise cross-validation x {cfg.repeats} repeat(s), mean AUC of the "
                       f"repeats, bootstrap over patients", n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, force=cfg.force)
    by_src = {}
    for s in sorted(set(source.tolist())):
        sel = source == s
        if len(set(y[sel])) == 2:
            by_src[s] = {"auc": float(np.mean([roc_auc_score(y[sel], cc[sel]) for cc in cal])),
                         "sensitivity": float(np.mean([(cc[sel][y[sel] == 1] > thr).mean() for cc in cal])),
                         "specificity": float(np.mean([(cc[sel][y[sel] == 0] <= thr).mean() for cc in cal]))}
    return {
        "evaluation": evaluation,
        "validation": validation,
        "patients": len(pats.ids), "images": images, "inadequate_patients": pats.inadequate,
        "eligible_images": eligible_images,
        "auc_mean_of_repeats": float(np.mean(aucs)), "auc_repeats": aucs, "fold_auc": folds.auc,
        "by_source": by_src,
        "sensitivity_mean_of_repeats": float(np.mean([(cc[y == 1] > thr).mean() for cc in cal])),
        "specificity_mean_of_repeats": float(np.mean([(cc[y == 0] <= thr).mean() for cc in cal])),
        "repeat0": rep0, "operating_point": calib.op, "platt": calib.platt,
        "labels_check": labels_check,
        "seconds": {"total": None},
    }


def _write_oof(cfg: DecisionTrainConfig, path: Path, pats: _Patients, calib: _Calibration, folds: _Folds) -> None:
    """oof.csv: each patient's label, source, first-repeat fold and calibrated out-of-fold score per repeat."""
    atomic_write_csv(path, [{"patient_id": p, "label": int(yy), "source": s, "fold": int(f),
                             **{f"score_r{r}": float(calib.cal[r, i]) for r in range(cfg.repeats)}}
                            for i, (p, yy, s, f) in enumerate(zip(pats.ids, pats.y, pats.source, folds.fold_of))],
                     ["patient_id", "label", "source", "fold", *[f"score_r{r}" for r in range(cfg.repeats)]])


def _write_checkpoint(cfg: DecisionTrainConfig, pipe, net, calib: _Calibration, metrics: dict, model, path: Path,
                      what: str, summary: dict, extra: dict | None = None) -> None:
    """``model`` (scaler, regression) and the calibration folded into ``net``'s head, saved as a deploy
    classifier checkpoint with the voting, the operating point, the validation and ``extra`` (e.g. ``site``)."""
    a, c = calib.a, calib.c
    w, b = linear_of(model)
    head = net.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1] = torch.tensor(a * w, dtype=torch.float32)
        head.bias[1] = float(a * b + c)
    voting = {"weights": list(cfg.weights), "variants": list(cfg.variants), "pooling": "logit",
              "brightness": pipe.cfg.voting.brightness,
              "brightness_from_flipped": pipe.cfg.voting.brightness_from_flipped}
    ck = make_checkpoint(net, kind="classifier", arch=f"tf_efficientnet_{cfg.backbone}", arch_kwargs={},
                         form="deploy", input_size=(cfg.input_size, cfg.input_size), mean=(0.5,) * 3,
                         std=(0.5,) * 3, name=cfg.name, version=cfg.version,
                         extra={"threshold": calib.thr, "temperature": 1.0, "voting": voting, "crop": "cervix",
                                "classify_view": cfg.classify_view,
                                "decision_stages": list(cfg.decision_stages),
                                "operating_point": {**calib.op, "evaluated_on": metrics["evaluation"] + ", calibrated "
                                                    "out-of-fold scores of all repeats"},
                                "recipe": "frozen-linear", "what": what,
                                "validation": metrics["validation"],
                                "train_summary": summary, **(extra or {})})
    save_checkpoint(ck, path)


def _base_summary(cfg: DecisionTrainConfig, metrics: dict) -> dict:
    """The checkpoints' ``train_summary`` (without ``patients``)."""
    return {"backbone": f"EfficientNet-{cfg.backbone.capitalize()}, ImageNet (frozen)",
            "head": f"logistic regression over the patient's mean feature, C={cfg.C}, class-balanced, "
                    f"trained on {'+'.join(cfg.train_variants)}; Platt-calibrated",
            "input_size": cfg.input_size, "classify_view": cfg.classify_view, "decision_stages": list(cfg.decision_stages),
            "cv_auc": metrics["auc_mean_of_repeats"], "cv_auc_repeats": metrics["auc_repeats"],
            "cv_by_source": metrics["by_source"], "data": str(cfg.visits)}


def _write_model(cfg: DecisionTrainConfig, pipe, net, pats: _Patients, calib: _Calibration, metrics: dict,
                 model_path: Path, summary: dict, full=None, extra: dict | None = None) -> None:
    """model.pt, fitted on all patients (``full``: a model fitted otherwise, e.g. with more patients), when the
    validation passed (or ``force``), checked to reproduce the calibrated regression; else no installable
    model: an earlier run's model.pt in this folder must not pass for this run's."""
    if metrics["validation"]["passed"] or cfg.force:
        full = full or _fit(cfg, pats, np.arange(len(pats.ids)))
        _write_checkpoint(cfg, pipe, net, calib, metrics, full, model_path, "all patients",
                          {**summary, "patients": summary.get("patients", len(pats.ids))}, extra)
        # check: the folded network reproduces the calibrated regression on the patients' mean features
        w, b = linear_of(full)
        X = pats.V["original"][:8]
        with torch.no_grad():
            z = net.get_classifier()(torch.tensor(X, dtype=torch.float32)).numpy()
        if not np.allclose(z[:, 1] - z[:, 0], calib.a * (X @ w + b) + calib.c, atol=1e-3):
            raise CervscanError("folding the regression into the network failed (logits differ)")
        metrics["checkpoint"] = str(model_path)
    else:
        model_path.unlink(missing_ok=True)
        metrics["checkpoint"] = None


def write_training_features(cfg: DecisionTrainConfig, path: Path, *, data: str, keep=None) -> tuple[dict, _Patients]:
    """The training patients' features as ``cervscan adapt`` pools them (``classifier-training-features.npz``):
    every labelled visit of ``cfg`` (``keep(patient_id, source)``: only those it keeps) through :func:`extract`
    (cached) at the recipe's settings; per patient with an eligible image the mean feature of each training view
    (float16), the label, the source and a ``meta`` record (``data``: what the patients are). Returns the meta
    record and the patients."""
    lab, src, _, visits = _labelled_visits(cfg)
    visits = [v for v in visits if keep is None or keep(v.patient_id, src[v.patient_id])]
    items = [(v.patient_id, p) for v in visits for p in v.images]
    pipe, refs = _pipeline(cfg)
    recs = extract(cfg, pipe, refs, items, backbone(cfg.backbone))
    pats = _patient_features(cfg, [v.patient_id for v in visits], items, recs, lab, src)
    meta = {"what": "per training patient with an eligible image: the mean feature of the frozen backbone over "
                    "the eligible images, per view", "recipe": {k: v for k, v in asdict(cfg).items() if k in (
                        "backbone", "input_size", "classify_view", "variants", "decision_stages", "quality_gate")},
            "gate": asdict(pipe.cfg.gate), "models": {r: refs[r].sha256 for r in ("stage", "cervix", "segmenter")},
            "data": data, "patients": len(pats.ids), "images": len(items),
            "eligible_images": int(sum(1 for r in recs if r is not None and r["eligible"])),
            "inadequate_patients": pats.inadequate, "cervscan_version": __version__}
    atomic_write_npz(path, patient_id=np.array(pats.ids), label=pats.y.astype(np.int8),
                     source=np.array(pats.source.tolist()), meta=np.array(json.dumps(meta, default=str)),
                     **{v: pats.V[v].astype(np.float16) for v in cfg.train_variants})
    return meta, pats


def train_frozen(cfg: DecisionTrainConfig, progress=None) -> dict:
    """``train-cls --recipe frozen`` (the module's docstring): writes oof.csv, the fold models with folds.csv,
    model.pt (unless the validation failed), metrics.json and run.json to ``cfg.out``; returns the metrics."""
    bad = [v for v in cfg.train_variants if v not in cfg.variants]
    if bad:
        raise CervscanError(f"training variants {bad} are not among the screened variants {list(cfg.variants)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lab, src, labels_check, visits = _labelled_visits(cfg)
    items = [(v.patient_id, p) for v in visits for p in v.images]
    pipe, refs = _pipeline(cfg)
    net = backbone(cfg.backbone)  # feature extractor now; its head holds the fitted regression later
    recs = extract(cfg, pipe, refs, items, net, progress)
    pats = _patient_features(cfg, [v.patient_id for v in visits], items, recs, lab, src)
    vote = pipe.cfg.voting.active_weights()  # the screened variants' weights, renormalised as screening does
    allp = sorted(v.patient_id for v in visits)
    folds = _cross_validate(cfg, pats, vote, allp, lab, src)
    calib = _calibrate(cfg, pats.y, folds.oof)
    metrics = _cv_metrics(cfg, pats, calib, folds, images=len(items), labels_check=labels_check,
                          eligible_images=int(sum(1 for r in recs if r is not None and r["eligible"])))
    validation = metrics["validation"]
    _write_oof(cfg, out / "oof.csv", pats, calib, folds)
    summary = _base_summary(cfg, metrics)
    fold_rows = [{"patient_id": p, "fold": folds.fold_all[p], "label": lab[p], "source": src[p]} for p in allp]
    for k, m in enumerate(folds.models):
        _write_checkpoint(cfg, pipe, net, calib, metrics, m, out / f"fold{k + 1}.pt",
                          f"fold {k + 1} of {cfg.folds} (repeat 0): validation patients in folds.csv",
                          {**summary, "patients": int((folds.fold_of != k + 1).sum())})
    atomic_write_csv(out / "folds.csv", fold_rows, ["patient_id", "fold", "label", "source"])
    model_path = out / "model.pt"
    _write_model(cfg, pipe, net, pats, calib, metrics, model_path, summary)
    metrics["seconds"]["total"] = time.time() - t0
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "run.json", {"command": "train-cls", "recipe": "frozen", "config": asdict(cfg),
                                         "cervscan_version": __version__, "torch": torch.__version__,
                                         "validation": validation, "labels_check": labels_check,
                                         "models": {r: {"label": getattr(refs[r], "label", ""),
                                                        "sha256": getattr(refs[r], "sha256", "")} for r in refs}})
    enforce(validation, metrics, no_model=f"No {model_path} was written (metrics.json, oof.csv and the fold models "
                                          f"are, for inspection).")
    return metrics
