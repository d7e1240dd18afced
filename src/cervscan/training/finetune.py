"""``train-cls``: classifier on original + segmented images, patient-wise splits,
calibration (temperature), operating point and optional voting-weight search.

Data preparation: every image of every labelled patient is decoded, segmented
with the given segmenter and stored (original and segmented image, both at the
input size) in a cache keyed by the segmenter's sha256, so cross-validation
folds and later runs do not segment again.

Validation (:mod:`cervscan.training.validation`): the held-out patient AUC and its bootstrap 95 % CI; a classifier
whose CI does not lie above 0.5 gets no ``model.pt`` and :class:`cervscan.training.validation.ValidationFailed` is
raised after the run's metrics are written, unless ``force``. Every checkpoint records the validation.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from cervscan import __version__
from cervscan.config import STUDY_WEIGHTS, VARIANT_NAMES, VotingConfig
from cervscan.device import resolve_device
from cervscan.errors import CervscanError, DataError
from cervscan.files import atomic_write_csv, atomic_write_json
from cervscan.metrics import binary_metrics, full_report, plot_confusion, plot_roc, rank_auc, threshold_for_sensitivity
from cervscan.training.configs import ClsTrainConfig  # noqa: F401 - re-exported
from cervscan.training.samples import Sample, patient_table, prepare_samples, preparation_pipeline, read_labels  # noqa: F401
from cervscan.training.splits import patient_folds, patient_split  # noqa: F401 - re-exported
from cervscan.training.validation import classifier_validation, enforce
from cervscan.models.networks import build_classifier, default_norm, load_lite_into_timm, make_checkpoint, save_checkpoint, to_deploy
from cervscan.training.loop import EpochLoop, seed_everything
from cervscan.pipeline.transforms import resize_square, to_tensor_batch
from cervscan.pipeline.vote import aggregate_patient, make_variants, weighted_score
from cervscan.files import atomic_write_npz

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data

class ClsDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], which: str, mean, std, train: bool, size: int):
        self.items: list[tuple[np.ndarray, int]] = []
        for s in samples:
            if which in ("both", "original"):
                self.items.append((s.original, s.label))
            if which in ("both", "segmented"):
                self.items.append((s.segmented, s.label))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.tf = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.RandomRotation(15)], p=0.5),
            v2.ColorJitter(0.25, 0.25, 0.2, 0.02),
        ]) if train else None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img, lab = self.items[i]
        x = torch.from_numpy(img).permute(2, 0, 1)
        if self.tf is not None:
            x = self.tf(x)
        x = (x.float() / 255.0 - self.mean) / self.std
        return x, lab


# --------------------------------------------------------------------------- one training run

def _build(cfg: ClsTrainConfig) -> tuple[nn.Module, tuple, tuple]:
    model = build_classifier(cfg.arch)
    mean, std = default_norm(cfg.arch)
    if cfg.pretrained:
        if cfg.arch != "tf_efficientnet_lite0":
            raise CervscanError(f"ImageNet weights are available offline only for tf_efficientnet_lite0, not {cfg.arch}")
        load_lite_into_timm(model, 0)
    if cfg.head_std > 0:
        # timm's EfficientNet head starts at U(+-1/sqrt(num_classes)) = U(+-0.71) for two classes: large
        # logits before any training
        head = model.get_classifier()
        nn.init.normal_(head.weight, std=cfg.head_std)
        nn.init.zeros_(head.bias)
    return model, mean, std


def _same_schedule(state: dict, sched: torch.optim.lr_scheduler.OneCycleLR, state_path: Path) -> None:
    """Refuse a saved state whose one-cycle schedule has another length than the options now give."""
    if state["sched"].get("total_steps") != sched.total_steps:
        # the one-cycle schedule cannot be continued past its end (torch raises ValueError mid-epoch)
        raise CervscanError(f"{state_path}: saved for {state['sched'].get('total_steps')} training steps, the options "
                            f"now give {sched.total_steps}; resume with the same --epochs, --batch-size and "
                            f"patients, or train into a new run folder")


def fit(cfg: ClsTrainConfig, train: list[Sample], dev, progress=None, tag: str = "", state_path: Path | None = None,
        on_epoch: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Train one classifier. ``on_epoch(epoch, model)`` runs after each epoch (1-based), before the state is saved."""
    seed_everything(cfg.seed)
    model, mean, std = _build(cfg)
    model = model.to(dev)
    ds = ClsDataset(train, cfg.samples, mean, std, True, cfg.input_size)
    labels = np.array([lab for _, lab in ds.items])
    counts = np.bincount(labels, minlength=2).astype(float)
    w = torch.tensor(counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32, device=dev)
    crit = nn.CrossEntropyLoss(weight=w, label_smoothing=0.05)
    g = torch.Generator().manual_seed(cfg.seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(ds) > cfg.batch_size,
                                     generator=g, num_workers=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * (min(len(dl), cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else len(dl))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps), pct_start=0.15)
    loop = EpochLoop(model, opt, sched, dl, g, cfg.epochs, state_path, cfg.max_steps_per_epoch)
    st = loop.resume(adapt=functools.partial(_same_schedule, sched=sched, state_path=state_path)) if cfg.resume else None
    start = 0 if st is None else st["epoch"]
    if st is not None:
        log.info("%s resumed at epoch %d", tag, start)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return crit(model(x.to(dev)), y.to(dev))

    def after_epoch(epoch: int, losses: list[float], started: float) -> None:
        log.info("%s epoch %d/%d loss %.4f", tag, epoch, cfg.epochs, float(np.mean(losses)))
        if on_epoch is not None:
            on_epoch(epoch, model)
            model.train()

    loop.run(start, cfg.epochs, loss_of, after_epoch, progress, fold=tag)
    return model.eval()


def auc_by_source(y: np.ndarray, scores: np.ndarray, sources) -> dict[str, float | None]:
    """``{"auc[SOURCE]": AUC}`` per source; None where a source holds a single class."""
    src = np.asarray(sources, dtype=object)
    out: dict[str, float | None] = {}
    for sname in sorted(set(src.tolist())):
        sel = src == sname
        try:
            out[f"auc[{sname}]"] = binary_metrics(y[sel], scores[sel], 0.5)["auc"]
        except DataError:
            out[f"auc[{sname}]"] = None
    return out


def learning_curve(samples: list[Sample], curve_logits: dict[int, np.ndarray], y_by: dict, src_by: dict,
                   target_sensitivity: float) -> list[dict]:
    """Held-out patient AUC (overall and per source) after each scored epoch, each epoch calibrated on its own
    out-of-fold logits. Epochs that are missing for some fold (e.g. after a resume) are left out."""
    rows = []
    for e in sorted(curve_logits):
        lg = curve_logits[e]
        ok = ~np.isnan(lg).any(axis=(1, 2))
        if not ok.all():
            log.warning("epoch %d was not scored in every fold; left out of the learning curve", e)
            continue
        T = fit_temperature(lg, np.repeat([s.label for s in samples], 6))
        hp, hs, _ = patient_scores(samples, lg, T, STUDY_WEIGHTS)
        hy = np.array([y_by[q] for q in hp])
        op = threshold_for_sensitivity(hy, hs, target_sensitivity)
        rows.append({"epoch": e, "auc": binary_metrics(hy, hs, 0.5)["auc"], "temperature": T,
                     "specificity_at_op": op["specificity"], "sensitivity_at_op": op["sensitivity"],
                     **auc_by_source(hy, hs, [src_by[q] for q in hp])})
    return rows


@torch.inference_mode()
def variant_logits(model: nn.Module, samples: list[Sample], cfg: ClsTrainConfig, dev, batch: int = 8) -> np.ndarray:
    """Logits (N x 6 x 2) of the six variants of each sample, in v1..v6 order."""
    mean, std = default_norm(cfg.arch)
    vcfg = VotingConfig(brightness=cfg.brightness)
    out = []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        imgs = []
        for s in chunk:
            imgs.extend(make_variants(s.original, s.segmented, vcfg).values())
        x = to_tensor_batch([resize_square(im, cfg.input_size) for im in imgs], mean, std).to(dev)
        out.append(model(x).float().cpu().numpy().reshape(len(chunk), 6, 2))
    return np.concatenate(out) if out else np.zeros((0, 6, 2))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar T minimising the NLL."""
    z = torch.tensor(logits.reshape(-1, 2), dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.exp().item())
    return float(min(max(t, 0.05), 20.0))


def p_severe(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probability of class 1 (severe) of temperature-scaled logits (..., 2)."""
    z = logits / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True))[..., 1]


def patient_scores(samples: list[Sample], logits: np.ndarray, temperature: float, weights) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each image's score by the screening pipeline's own vote (:func:`cervscan.pipeline.vote.weighted_score`
    over the six variants' temperature-scaled probabilities), then each patient's score by its own
    aggregation (:func:`cervscan.pipeline.vote.aggregate_patient`): what ``screen`` computes with a checkpoint
    of this recipe (``pooling`` "probability", all six variants)."""
    p = p_severe(logits, temperature)  # N x 6
    vote = VotingConfig(weights=tuple(float(x) for x in weights))
    img_scores = np.array([weighted_score(dict(zip(VARIANT_NAMES, row)), vote) for row in p], dtype=float)
    by: dict[str, list[float]] = {}
    for s, sc in zip(samples, img_scores):
        by.setdefault(s.patient_id, []).append(float(sc))
    pids = sorted(by)
    return pids, np.array([aggregate_patient(by[q], 0.5, vote.pooling)[0] for q in pids]), img_scores


def tune_vote_weights(samples, logits, temperature, y_by_pid: dict, step: float = 0.05) -> tuple[tuple, float]:
    """Simplex grid over the six weights (step ``step``) maximising patient AUC; ties keep the study's order."""

    p = p_severe(logits, temperature)
    pids = sorted({s.patient_id for s in samples})
    idx = {q: i for i, q in enumerate(pids)}
    A = np.zeros((len(pids), len(samples)))
    for j, s in enumerate(samples):
        A[idx[s.patient_id], j] = 1
    A /= A.sum(1, keepdims=True)
    P = A @ p  # patients x 6: mean per-variant probability per patient
    y = np.array([y_by_pid[q] for q in pids])
    n = int(round(1 / step))
    grid = np.array([(*c, n - sum(c)) for c in itertools.product(range(n + 1), repeat=5) if sum(c) <= n], float) / n
    study = np.array(STUDY_WEIGHTS) / sum(STUDY_WEIGHTS)
    grid = np.vstack([study, grid])
    aucs = rank_auc(np.broadcast_to(y, (len(grid), y.size)), (P @ grid.T).T)
    study_auc = float(aucs[0])
    i = int(np.argmax(aucs > aucs[0] + 1e-9)) if (aucs > aucs[0] + 1e-9).any() else 0
    i = int(np.argmax(aucs)) if i else 0
    best_auc, best_w = float(aucs[i]), tuple(float(x) for x in grid[i])
    log.info("vote weights: study AUC %.4f -> tuned %.4f %s", study_auc, best_auc, best_w)
    return best_w, best_auc


# --------------------------------------------------------------------------- the command

@dataclass
class _Data:
    """The labelled samples, their patients and the splits (one validation split, or the folds)."""

    samples: list[Sample]
    model_info: dict  # the segmenter's and the cervix finder's records
    checks: dict  # labels_check
    pids: list[str]
    y: np.ndarray
    src: np.ndarray
    y_by: dict[str, int]
    src_by: dict[str, str]
    splits: list[tuple[set, set]]


def _prepare(cfg: ClsTrainConfig, progress) -> _Data:
    checks: dict = {}
    samples, model_info = prepare_samples(cfg, progress, checks)
    pids, y, src = patient_table(samples)
    if len(np.unique(y)) < 2:
        raise DataError("labels contain a single class; a classifier needs both")
    if cfg.folds and cfg.folds >= 2:
        splits = patient_folds(pids, y, src, cfg.folds, cfg.seed)
    else:
        splits = [patient_split(pids, y, src, cfg.val_fraction, cfg.seed)]
    for tr, va in splits:
        assert not (tr & va), "a patient on both sides of a split"
    return _Data(samples, model_info, checks, pids, y, src, dict(zip(pids, y.tolist())), dict(zip(pids, src.tolist())),
                 splits)


@dataclass
class _Folds:
    """What training the folds (or the one split) gives."""

    oof_logits: np.ndarray  # N x 6 x 2, each image's logits from the model that did not see its patient
    oof_fold: np.ndarray  # each image's fold (0-based), -1: not scored
    rows: list[dict] = field(default_factory=list)  # per fold, for metrics.json
    models: list[nn.Module] = field(default_factory=list)  # the fold models in deploy form (cross-validation)
    curve_logits: dict[int, np.ndarray] = field(default_factory=dict)  # epoch -> held-out logits (learning curve)
    last_model: nn.Module | None = None  # the single split's model
    seconds: float = 0.0


def _save_epoch_logits(cfg: ClsTrainConfig, dev, va_s: list[Sample], curve_path: Path, epoch: int, m: nn.Module) -> None:
    """``--eval-epochs``: the held-out logits after ``epoch`` into the fold's curve file."""
    if epoch not in cfg.eval_epochs or epoch == cfg.epochs:
        return
    m.eval()
    saved = dict(np.load(curve_path)) if curve_path.exists() else {}
    saved[f"e{epoch}"] = variant_logits(m, va_s, cfg, dev)
    atomic_write_npz(curve_path, **saved)


def _fold_row(d: _Data, k: int, va_i: list[int], lg: np.ndarray) -> dict:
    """One fold's held-out patient numbers at threshold 0.5 (no temperature, the study's weights)."""
    tr, va = d.splits[k]
    vp, vs, _ = patient_scores([d.samples[i] for i in va_i], lg, 1.0, STUDY_WEIGHTS)
    vy = np.array([d.y_by[q] for q in vp])
    vsrc = [d.src_by[q] for q in vp]
    row = {"fold": k + 1, "train_patients": len(tr), "val_patients": len(va)}
    try:
        m = binary_metrics(vy, vs, 0.5)
        row.update(auc=m["auc"], sensitivity_at_0_5=m["sensitivity"], specificity_at_0_5=m["specificity"],
                   accuracy_at_0_5=m["accuracy"])
    except DataError as e:
        row["error"] = str(e)
    row.update(auc_by_source(vy, vs, vsrc))
    return row


def _train_fold(cfg: ClsTrainConfig, d: _Data, k: int, dev, out: Path, progress, folds: _Folds) -> None:
    """Train fold ``k`` (0-based) and score its held-out patients into ``folds``."""
    tr, va = d.splits[k]
    tag = f"fold {k + 1}/{len(d.splits)}" if len(d.splits) > 1 else "split"
    tr_s = [s for s in d.samples if s.patient_id in tr]
    va_i = [i for i, s in enumerate(d.samples) if s.patient_id in va]
    va_s = [d.samples[i] for i in va_i]
    curve_path = out / f"curve_fold{k + 1}.npz"
    on_epoch = functools.partial(_save_epoch_logits, cfg, dev, va_s, curve_path)
    model = fit(cfg, tr_s, dev, progress, tag, state_path=out / f"state_fold{k + 1}.pt", on_epoch=on_epoch)
    lg = variant_logits(model, va_s, cfg, dev)
    if cfg.eval_epochs:
        n = len(d.samples)
        if curve_path.exists():
            z = np.load(curve_path)
            for e in cfg.eval_epochs:
                if f"e{e}" in z.files:
                    folds.curve_logits.setdefault(e, np.full((n, 6, 2), np.nan))[va_i] = z[f"e{e}"]
        folds.curve_logits.setdefault(cfg.epochs, np.full((n, 6, 2), np.nan))[va_i] = lg
    folds.oof_logits[va_i] = lg
    folds.oof_fold[va_i] = k
    row = _fold_row(d, k, va_i, lg)
    folds.rows.append(row)
    log.info("%s: %s", tag, row)
    if len(d.splits) == 1:
        folds.last_model = model
    else:
        folds.models.append(to_deploy(model.cpu().eval()))
        model.to(dev)


def _train_folds(cfg: ClsTrainConfig, d: _Data, dev, out: Path, progress) -> _Folds:
    """Every fold (``--only-folds``: those named) in turn."""
    folds = _Folds(np.zeros((len(d.samples), 6, 2)), np.full(len(d.samples), -1))
    t_folds = time.time()
    for k in range(len(d.splits)):
        if cfg.only_folds and (k + 1) not in cfg.only_folds:
            continue
        _train_fold(cfg, d, k, dev, out, progress, folds)
    folds.seconds = time.time() - t_folds
    return folds


@dataclass
class _HeldOut:
    """Calibration, operating point and validation on the held-out (validation / out-of-fold) patients."""

    samples: list[Sample]  # the held-out images
    logits: np.ndarray
    temperature: float
    weights: tuple
    tuned_auc: float | None
    pids: list[str]  # the held-out patients, and per patient:
    scores: np.ndarray
    y: np.ndarray
    src: np.ndarray
    img_scores: np.ndarray  # per held-out image
    op: dict
    report: dict
    validation: dict
    fold_of_pid: dict[str, int]


def _held_out(cfg: ClsTrainConfig, d: _Data, folds: _Folds) -> _HeldOut:
    held = folds.oof_fold >= 0
    held_samples = [s for s, h in zip(d.samples, held) if h]
    held_logits = folds.oof_logits[held]
    T = fit_temperature(held_logits, np.repeat([s.label for s in held_samples], 6))
    weights = tuple(STUDY_WEIGHTS)
    tuned_auc = None
    if cfg.tune_votes:
        weights, tuned_auc = tune_vote_weights(held_samples, held_logits, T, d.y_by)
    hp, hs, img_scores = patient_scores(held_samples, held_logits, T, weights)
    hy = np.array([d.y_by[q] for q in hp])
    hsrc = np.array([d.src_by[q] for q in hp], dtype=object)
    op = threshold_for_sensitivity(hy, hs, cfg.target_sensitivity)
    op["chosen_on"] = "the held-out patients' scores (in-sample: these are also the scores it is reported on)"
    rep = full_report(hy, hs, op["threshold"], sources=hsrc, seed=cfg.seed)
    validation = classifier_validation(
        hy, hs, method=(f"{len(d.splits)}-fold patient-wise cross-validation" if len(d.splits) > 1 else
                        f"validation split ({len(hp)} held-out patients)") + ", bootstrap over patients",
        seed=cfg.seed, force=cfg.force)
    fold_of_pid = {s.patient_id: int(f) for s, f in zip(d.samples, folds.oof_fold) if f >= 0}
    return _HeldOut(held_samples, held_logits, T, weights, tuned_auc, hp, hs, hy, hsrc, img_scores, op, rep,
                    validation, fold_of_pid)


def _fold_rows_at_op(rows: list[dict], h: _HeldOut) -> None:
    """Per fold, sensitivity and specificity at the final (calibrated) operating point, overall and per source."""
    hfold = np.array([h.fold_of_pid[q] for q in h.pids])
    for row in rows:
        sel = hfold == row["fold"] - 1
        for sname in [None, *sorted(set(h.src.tolist()))]:
            ss = sel if sname is None else sel & (h.src == sname)
            suffix = "" if sname is None else f"[{sname}]"
            yy, pp = h.y[ss], h.scores[ss] > h.op["threshold"]
            row[f"sensitivity_at_op{suffix}"] = float(pp[yy == 1].mean()) if (yy == 1).any() else None
            row[f"specificity_at_op{suffix}"] = float((~pp[yy == 0]).mean()) if (yy == 0).any() else None


def _fold_summary(rows: list[dict], src: np.ndarray) -> dict:
    """Mean and standard deviation over the folds of each fold number."""
    sources = sorted(set(src.tolist()))
    summary = {}
    for key in ("auc", "sensitivity_at_0_5", "specificity_at_0_5", "accuracy_at_0_5", "sensitivity_at_op", "specificity_at_op",
                *[f"{m}_at_op[{sn}]" for sn in sources for m in ("sensitivity", "specificity")],
                *[f"auc[{sn}]" for sn in sources]):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            summary[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    return summary


def _comparisons(cfg: ClsTrainConfig, d: _Data, folds: _Folds, h: _HeldOut) -> dict:
    """The held-out numbers at 0.5, in the study's setting and without voting; the learning curve; the fold summary."""
    rep05 = binary_metrics(h.y, h.scores, 0.5)
    # the study's setting: no temperature, study weights, threshold 0.5
    _, hs_raw, _ = patient_scores(h.samples, h.logits, 1.0, STUDY_WEIGHTS)
    rep_study = binary_metrics(h.y, hs_raw, 0.5)
    # single-variant (no voting) for comparison
    _, hs_orig, _ = patient_scores(h.samples, h.logits, 1.0, (1, 0, 0, 0, 0, 0))
    auc_no_vote = binary_metrics(h.y, hs_orig, 0.5)["auc"]
    held = folds.oof_fold >= 0
    curve = {e: lg[held] for e, lg in folds.curve_logits.items()}
    epoch_curve = learning_curve(h.samples, curve, d.y_by, d.src_by, cfg.target_sensitivity) if cfg.eval_epochs else None
    return {"held_out_at_0_5": rep05, "study_setting": rep_study, "auc_original_only": auc_no_vote,
            "epoch_curve": epoch_curve, "fold_summary": _fold_summary(folds.rows, d.src)}


def _final_model(cfg: ClsTrainConfig, d: _Data, folds: _Folds, dev, out: Path, progress) -> tuple[nn.Module | None, str]:
    """The single split's model, or one retrained on every patient (``--full``); and what it is."""
    if cfg.full or len(d.splits) > 1:
        if cfg.full:
            model = fit(cfg, d.samples, dev, progress, "all patients", state_path=out / "state_full.pt")
            return model, (f"trained on all {len(d.pids)} patients; calibration and operating point from "
                           f"{'cross-validation' if len(d.splits) > 1 else 'the validation split'}")
        return None, "cross-validation only (no --full): no model written"
    return folds.last_model, f"trained on {len(d.splits[0][0])} patients; {len(d.splits[0][1])} validation patients"


def _metrics(cfg: ClsTrainConfig, d: _Data, folds: _Folds, h: _HeldOut, comp: dict, final_note: str,
             t0: float, full_seconds: float) -> dict:
    rep, op = h.report, h.op
    return {
        "patients": int(len(d.pids)), "images": len(d.samples), "severe": int(d.y.sum()),
        "evaluation": "cross-validation" if len(d.splits) > 1 else "validation split",
        "validation": h.validation, "labels_check": d.checks.get("labels_check"),
        "folds": folds.rows, "fold_summary": comp["fold_summary"], "epoch_curve": comp["epoch_curve"],
        "held_out": rep, "held_out_at_0_5": comp["held_out_at_0_5"], "study_setting": comp["study_setting"],
        "auc_original_only": comp["auc_original_only"],
        "temperature": h.temperature, "operating_point": op, "voting_weights": list(h.weights), "tuned_vote_auc": h.tuned_auc,
        "seconds": {"total": time.time() - t0, "folds": folds.seconds, "final": full_seconds},
        "final_model": final_note,
        "summary": {"arch": cfg.arch, "pretrained": cfg.pretrained, "samples": cfg.samples,
                    "auc": rep["auc"], "auc_ci95": rep["ci95"]["auc"], "threshold": op["threshold"],
                    "sensitivity": op["sensitivity"], "specificity": op["specificity"],
                    "by_source_auc": {k: v.get("auc") for k, v in rep.get("by_source", {}).items()},
                    "fold_auc": comp["fold_summary"].get("auc"), "minutes": (time.time() - t0) / 60},
    }


def _write_predictions(cfg: ClsTrainConfig, out: Path, d: _Data, folds: _Folds, h: _HeldOut, metrics: dict) -> None:
    """predictions.csv (per held-out patient), image_predictions.csv, oof_logits.npz, roc.png and confusion.png."""
    op = h.op
    rows = [{"patient_id": q, "label": int(yy), "source": s_, "score": float(sc), "fold": h.fold_of_pid[q] + 1,
             "decision": "severe" if sc > op["threshold"] else "mildly_normal"} for q, yy, s_, sc in zip(h.pids, h.y, h.src, h.scores)]
    atomic_write_csv(out / "predictions.csv", rows, ["patient_id", "label", "source", "fold", "score", "decision"])
    img_rows = [{"patient_id": s.patient_id, "image": s.image, "label": s.label, "score": float(sc),
                 "empty_mask": s.empty_mask, "lesion_fraction": s.lesion_fraction} for s, sc in zip(h.samples, h.img_scores)]
    atomic_write_csv(out / "image_predictions.csv", img_rows, ["patient_id", "image", "label", "score", "empty_mask", "lesion_fraction"])
    np.savez(out / "oof_logits.npz", logits=folds.oof_logits, fold=folds.oof_fold,
             patient=np.array([s.patient_id for s in d.samples]), image=np.array([s.image for s in d.samples]))
    plot_roc(h.y, h.scores, out / "roc.png", sources=h.src, point=op,
             title=f"{cfg.arch}: held-out patients ({metrics['evaluation']})")
    plot_confusion(h.report["confusion"], out / "confusion.png", title=f"threshold {op['threshold']:.3f}")


def _write_checkpoint(cfg: ClsTrainConfig, d: _Data, h: _HeldOut, evaluation: str, m: nn.Module, path: Path,
                      note: str, already_deploy: bool = False) -> None:
    """A deploy-form classifier checkpoint with the run's calibration, operating point, validation and recipe."""
    op, rep = h.op, h.report
    deploy = m if already_deploy else to_deploy(m.cpu().eval())
    ck = make_checkpoint(deploy, kind="classifier", arch=cfg.arch, arch_kwargs={}, form="deploy",
                         input_size=(cfg.input_size, cfg.input_size), mean=default_norm(cfg.arch)[0],
                         std=default_norm(cfg.arch)[1], name=cfg.name, version=cfg.version, extra={
                             "threshold": op["threshold"],
                             "operating_point": {**op, "evaluated_on": evaluation,
                                                 "patients": int(len(h.pids)), "auc": rep["auc"],
                                                 "auc_ci95": rep["ci95"]["auc"],
                                                 "sensitivity_ci95": rep["ci95"]["sensitivity"],
                                                 "specificity_ci95": rep["ci95"]["specificity"]},
                             "temperature": h.temperature,
                             "validation": h.validation,
                             "crop": cfg.crop,
                             "voting": {"weights": list(h.weights), "brightness": cfg.brightness,
                                        "brightness_from_flipped": False,
                                        "tuned": bool(cfg.tune_votes)},
                             "train_summary": {"final_model": note, "samples": cfg.samples,
                                               "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size,
                                               "input_size": cfg.input_size, "arch": cfg.arch,
                                               "pretrained": cfg.pretrained, "segmenter": d.model_info["segmenter"],
                                               "cervix": d.model_info.get("cervix"), "crop": cfg.crop,
                                               "labels": str(cfg.labels), "patients": int(len(d.pids)),
                                               "images": len(d.samples), "seed": cfg.seed}})
    save_checkpoint(ck, path)


def _write_models(cfg: ClsTrainConfig, out: Path, d: _Data, folds: _Folds, h: _HeldOut, metrics: dict,
                  model: nn.Module | None, final_note: str) -> Path:
    """model.pt where the classifier passed its validation (or ``--force``), the fold models and folds.csv."""
    model_path = out / "model.pt"
    if model is not None and (h.validation["passed"] or cfg.force):
        _write_checkpoint(cfg, d, h, metrics["evaluation"], model, model_path, final_note)
        metrics["checkpoint"] = str(model_path)
    elif model is not None:
        # no installable model: an earlier run's model.pt in this folder must not pass for this run's
        model_path.unlink(missing_ok=True)
        metrics["checkpoint"] = None
        metrics["final_model"] = f"{final_note}; not written: the classifier failed its validation"
    if folds.models:
        # each fold's model with the pooled calibration, and which patients it did not see:
        # `cervscan evaluate --cv-run OUT` re-screens every patient with the model of its fold.
        fold_rows_csv = []
        for k, (fm, (_, va)) in enumerate(zip(folds.models, d.splits)):
            _write_checkpoint(cfg, d, h, metrics["evaluation"], fm, out / f"fold{k + 1}.pt",
                              f"fold {k + 1} of {len(d.splits)}: validation patients in folds.csv", already_deploy=True)
            fold_rows_csv += [{"patient_id": q, "fold": k + 1, "label": d.y_by[q], "source": d.src_by[q]} for q in sorted(va)]
        atomic_write_csv(out / "folds.csv", fold_rows_csv, ["patient_id", "fold", "label", "source"])
    return model_path


def train_cls(cfg: ClsTrainConfig, progress: Callable[[dict], None] | None = None) -> dict:
    if cfg.samples not in ("both", "original", "segmented"):
        raise CervscanError(f"--samples must be both, original or segmented, not {cfg.samples!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dev = resolve_device(cfg.device)
    d = _prepare(cfg, progress)
    folds = _train_folds(cfg, d, dev, out, progress)
    if cfg.only_folds:
        # a partial run: its fold states are saved; a later run with --resume on the same folder picks them up
        if 0 in cfg.only_folds:
            fit(cfg, d.samples, dev, progress, "all patients", state_path=out / "state_full.pt")
        log.info("trained folds %s in %.0fs; run again with --resume (without --only-folds) for the metrics",
                 cfg.only_folds, time.time() - t0)
        return {"only_folds": list(cfg.only_folds), "seconds": time.time() - t0, "summary": {}}

    h = _held_out(cfg, d, folds)
    _fold_rows_at_op(folds.rows, h)
    comp = _comparisons(cfg, d, folds, h)
    t_full = time.time()
    model, final_note = _final_model(cfg, d, folds, dev, out, progress)
    metrics = _metrics(cfg, d, folds, h, comp, final_note, t0, time.time() - t_full)
    _write_predictions(cfg, out, d, folds, h, metrics)
    model_path = _write_models(cfg, out, d, folds, h, metrics, model, final_note)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "run.json", {"command": "train-cls", "recipe": "finetune", "config": asdict(cfg), "cervscan_version": __version__,
                                         "torch": torch.__version__, "device": str(dev), "threads": torch.get_num_threads(),
                                         "validation": h.validation, "labels_check": d.checks.get("labels_check"),
                                         "models": d.model_info})
    enforce(h.validation, metrics, no_model=(f"No {model_path} was written (metrics.json, predictions.csv"
                                             + (" and the fold models" if folds.models else "") + " are, for inspection)."
                                             if model is not None else "No model was to be written (no --full)."))
    return metrics
