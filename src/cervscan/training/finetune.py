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

import itertools
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cervscan import __version__
from cervscan.config import STUDY_WEIGHTS, VotingConfig
from cervscan.errors import CervscanError, DataError
from cervscan.files import atomic_write_csv, atomic_write_json
from cervscan.metrics import binary_metrics, full_report, plot_confusion, plot_roc, rank_auc, threshold_for_sensitivity
from cervscan.training.configs import ClsTrainConfig  # noqa: F401 - re-exported
from cervscan.training.samples import Sample, patient_table, prepare_samples, preparation_pipeline, read_labels  # noqa: F401
from cervscan.training.splits import patient_folds, patient_split  # noqa: F401 - re-exported
from cervscan.training.validation import classifier_validation, enforce
from cervscan.models.networks import build_classifier, default_norm, load_lite_into_timm, make_checkpoint, to_deploy
from cervscan.training.segmenter import seed_everything
from cervscan.pipeline.transforms import resize_square, to_tensor_batch
from cervscan.pipeline.vote import make_variants

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data

class ClsDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], which: str, mean, std, train: bool, size: int):
        from torchvision.transforms import v2

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
    start = 0
    if cfg.resume and state_path is not None and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st["sched"].get("total_steps") != sched.total_steps:
            # the one-cycle schedule cannot be continued past its end (torch raises ValueError mid-epoch)
            raise CervscanError(f"{state_path}: saved for {st['sched'].get('total_steps')} training steps, the options "
                                f"now give {sched.total_steps}; resume with the same --epochs, --batch-size and "
                                f"patients, or train into a new run folder")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start = st["epoch"]
        torch.set_rng_state(st["rng"])
        g.set_state(st["gen"])
        log.info("%s resumed at epoch %d", tag, start)
    for epoch in range(start, cfg.epochs):
        model.train()
        losses = []
        for step, (x, y) in enumerate(dl):
            if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
                break
            x, y = x.to(dev), y.to(dev)
            loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress:
                progress({"phase": "train", "epoch": epoch + 1, "epochs": cfg.epochs, "step": step + 1,
                          "steps": len(dl), "loss": losses[-1], "fold": tag})
        log.info("%s epoch %d/%d loss %.4f", tag, epoch + 1, cfg.epochs, float(np.mean(losses)))
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
            model.train()
        if state_path is not None:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "epoch": epoch + 1, "rng": torch.get_rng_state(), "gen": g.get_state()}, tmp)
            tmp.replace(state_path)
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
    """Per-image weighted score (temperature-scaled), then the mean per patient."""
    p = p_severe(logits, temperature)  # N x 6
    w = np.asarray(weights, float)
    w = w / w.sum()
    img_scores = p @ w
    by: dict[str, list[float]] = {}
    for s, sc in zip(samples, img_scores):
        by.setdefault(s.patient_id, []).append(float(sc))
    pids = sorted(by)
    return pids, np.array([np.mean(by[q]) for q in pids]), img_scores


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

def train_cls(cfg: ClsTrainConfig, progress: Callable[[dict], None] | None = None) -> dict:
    from cervscan.device import resolve_device

    if cfg.samples not in ("both", "original", "segmented"):
        raise CervscanError(f"--samples must be both, original or segmented, not {cfg.samples!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dev = resolve_device(cfg.device)
    checks: dict = {}
    samples, model_info = prepare_samples(cfg, progress, checks)
    seg_info = model_info["segmenter"]
    pids, y, src = patient_table(samples)
    if len(np.unique(y)) < 2:
        raise DataError("labels contain a single class; a classifier needs both")
    y_by = dict(zip(pids, y.tolist()))
    src_by = dict(zip(pids, src.tolist()))
    if cfg.folds and cfg.folds >= 2:
        splits = patient_folds(pids, y, src, cfg.folds, cfg.seed)
    else:
        splits = [patient_split(pids, y, src, cfg.val_fraction, cfg.seed)]
    for tr, va in splits:
        assert not (tr & va), "a patient on both sides of a split"

    fold_models: list[nn.Module] = []
    oof_logits = np.zeros((len(samples), 6, 2))
    oof_fold = np.full(len(samples), -1)
    fold_rows = []
    curve_logits: dict[int, np.ndarray] = {}
    t_folds = time.time()
    for k, (tr, va) in enumerate(splits):
        if cfg.only_folds and (k + 1) not in cfg.only_folds:
            continue
        tag = f"fold {k + 1}/{len(splits)}" if len(splits) > 1 else "split"
        tr_s = [s for s in samples if s.patient_id in tr]
        va_i = [i for i, s in enumerate(samples) if s.patient_id in va]
        va_s = [samples[i] for i in va_i]
        curve_path = out / f"curve_fold{k + 1}.npz"

        def on_epoch(epoch: int, m: nn.Module, va_s=va_s, curve_path=curve_path) -> None:
            if epoch not in cfg.eval_epochs or epoch == cfg.epochs:
                return
            m.eval()
            saved = dict(np.load(curve_path)) if curve_path.exists() else {}
            saved[f"e{epoch}"] = variant_logits(m, va_s, cfg, dev)
            tmp = curve_path.with_name(f".{curve_path.stem}.tmp.npz")
            np.savez(tmp, **saved)
            tmp.replace(curve_path)

        model = fit(cfg, tr_s, dev, progress, tag, state_path=out / f"state_fold{k + 1}.pt", on_epoch=on_epoch)
        lg = variant_logits(model, va_s, cfg, dev)
        if cfg.eval_epochs:
            if curve_path.exists():
                z = np.load(curve_path)
                for e in cfg.eval_epochs:
                    if f"e{e}" in z.files:
                        curve_logits.setdefault(e, np.full((len(samples), 6, 2), np.nan))[va_i] = z[f"e{e}"]
            curve_logits.setdefault(cfg.epochs, np.full((len(samples), 6, 2), np.nan))[va_i] = lg
        oof_logits[va_i] = lg
        oof_fold[va_i] = k
        vp, vs, _ = patient_scores([samples[i] for i in va_i], lg, 1.0, STUDY_WEIGHTS)
        vy = np.array([y_by[q] for q in vp])
        vsrc = [src_by[q] for q in vp]
        row = {"fold": k + 1, "train_patients": len(tr), "val_patients": len(va)}
        try:
            m = binary_metrics(vy, vs, 0.5)
            row.update(auc=m["auc"], sensitivity_at_0_5=m["sensitivity"], specificity_at_0_5=m["specificity"],
                       accuracy_at_0_5=m["accuracy"])
        except DataError as e:
            row["error"] = str(e)
        row.update(auc_by_source(vy, vs, vsrc))
        fold_rows.append(row)
        log.info("%s: %s", tag, row)
        if len(splits) == 1:
            last_model = model
        else:
            fold_models.append(to_deploy(model.cpu().eval()))
            model.to(dev)
    fold_seconds = time.time() - t_folds
    if cfg.only_folds:
        # a partial run: its fold states are saved; a later run with --resume on the same folder picks them up
        if 0 in cfg.only_folds:
            fit(cfg, samples, dev, progress, "all patients", state_path=out / "state_full.pt")
        log.info("trained folds %s in %.0fs; run again with --resume (without --only-folds) for the metrics",
                 cfg.only_folds, time.time() - t0)
        return {"only_folds": list(cfg.only_folds), "seconds": time.time() - t0, "summary": {}}

    # ---- calibration and operating point on held-out (validation / out-of-fold) patients
    held = oof_fold >= 0
    held_samples = [s for s, h in zip(samples, held) if h]
    held_logits = oof_logits[held]
    T = fit_temperature(held_logits, np.repeat([s.label for s in held_samples], 6))
    weights = tuple(STUDY_WEIGHTS)
    tuned_auc = None
    if cfg.tune_votes:
        weights, tuned_auc = tune_vote_weights(held_samples, held_logits, T, y_by)
    hp, hs, img_scores = patient_scores(held_samples, held_logits, T, weights)
    hy = np.array([y_by[q] for q in hp])
    hsrc = np.array([src_by[q] for q in hp], dtype=object)
    op = threshold_for_sensitivity(hy, hs, cfg.target_sensitivity)
    op["chosen_on"] = "the held-out patients' scores (in-sample: these are also the scores it is reported on)"
    rep = full_report(hy, hs, op["threshold"], sources=hsrc, seed=cfg.seed)
    validation = classifier_validation(
        hy, hs, method=(f"{len(splits)}-fold patient-wise cross-validation" if len(splits) > 1 else
                        f"validation split ({len(hp)} held-out patients)") + ", bootstrap over patients",
        seed=cfg.seed, force=cfg.force)
    # per fold, at the final (calibrated) operating point, overall and per source
    fold_of_pid = {s.patient_id: int(f) for s, f in zip(samples, oof_fold) if f >= 0}
    hfold = np.array([fold_of_pid[q] for q in hp])
    for row in fold_rows:
        sel = hfold == row["fold"] - 1
        for sname in [None, *sorted(set(hsrc.tolist()))]:
            ss = sel if sname is None else sel & (hsrc == sname)
            suffix = "" if sname is None else f"[{sname}]"
            yy, pp = hy[ss], hs[ss] > op["threshold"]
            row[f"sensitivity_at_op{suffix}"] = float(pp[yy == 1].mean()) if (yy == 1).any() else None
            row[f"specificity_at_op{suffix}"] = float((~pp[yy == 0]).mean()) if (yy == 0).any() else None
    rep05 = binary_metrics(hy, hs, 0.5)
    # the study's setting: no temperature, study weights, threshold 0.5
    _, hs_raw, _ = patient_scores(held_samples, held_logits, 1.0, STUDY_WEIGHTS)
    rep_study = binary_metrics(hy, hs_raw, 0.5)
    # single-variant (no voting) for comparison
    _, hs_orig, _ = patient_scores(held_samples, held_logits, 1.0, (1, 0, 0, 0, 0, 0))
    auc_no_vote = binary_metrics(hy, hs_orig, 0.5)["auc"]

    epoch_curve = (learning_curve(held_samples, {e: lg[held] for e, lg in curve_logits.items()}, y_by, src_by,
                                  cfg.target_sensitivity) if cfg.eval_epochs else None)

    fold_summary = {}
    for key in ("auc", "sensitivity_at_0_5", "specificity_at_0_5", "accuracy_at_0_5", "sensitivity_at_op", "specificity_at_op",
                *[f"{m}_at_op[{sn}]" for sn in sorted(set(src.tolist())) for m in ("sensitivity", "specificity")]):
        vals = [r[key] for r in fold_rows if r.get(key) is not None]
        if vals:
            fold_summary[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    for sname in sorted(set(src.tolist())):
        vals = [r.get(f"auc[{sname}]") for r in fold_rows if r.get(f"auc[{sname}]") is not None]
        if vals:
            fold_summary[f"auc[{sname}]"] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}

    # ---- final model: the single-split model, or retrained on every patient (--full)
    t_full = time.time()
    if cfg.full or len(splits) > 1:
        if cfg.full:
            model = fit(cfg, samples, dev, progress, "all patients", state_path=out / "state_full.pt")
            final_note = f"trained on all {len(pids)} patients; calibration and operating point from {'cross-validation' if len(splits) > 1 else 'the validation split'}"
        else:
            model = None
            final_note = "cross-validation only (no --full): no model written"
    else:
        model = last_model
        final_note = f"trained on {len(splits[0][0])} patients; {len(splits[0][1])} validation patients"
    full_seconds = time.time() - t_full

    metrics = {
        "patients": int(len(pids)), "images": len(samples), "severe": int(y.sum()),
        "evaluation": "cross-validation" if len(splits) > 1 else "validation split",
        "validation": validation, "labels_check": checks.get("labels_check"),
        "folds": fold_rows, "fold_summary": fold_summary, "epoch_curve": epoch_curve,
        "held_out": rep, "held_out_at_0_5": rep05, "study_setting": rep_study,
        "auc_original_only": auc_no_vote,
        "temperature": T, "operating_point": op, "voting_weights": list(weights), "tuned_vote_auc": tuned_auc,
        "seconds": {"total": time.time() - t0, "folds": fold_seconds, "final": full_seconds},
        "final_model": final_note,
        "summary": {"arch": cfg.arch, "pretrained": cfg.pretrained, "samples": cfg.samples,
                    "auc": rep["auc"], "auc_ci95": rep["ci95"]["auc"], "threshold": op["threshold"],
                    "sensitivity": op["sensitivity"], "specificity": op["specificity"],
                    "by_source_auc": {k: v.get("auc") for k, v in rep.get("by_source", {}).items()},
                    "fold_auc": fold_summary.get("auc"), "minutes": (time.time() - t0) / 60},
    }
    # per-patient predictions (held-out)
    rows = [{"patient_id": q, "label": int(yy), "source": s_, "score": float(sc), "fold": fold_of_pid[q] + 1,
             "decision": "severe" if sc > op["threshold"] else "mildly_normal"} for q, yy, s_, sc in zip(hp, hy, hsrc, hs)]
    atomic_write_csv(out / "predictions.csv", rows, ["patient_id", "label", "source", "fold", "score", "decision"])
    img_rows = [{"patient_id": s.patient_id, "image": s.image, "label": s.label, "score": float(sc),
                 "empty_mask": s.empty_mask, "lesion_fraction": s.lesion_fraction} for s, sc in zip(held_samples, img_scores)]
    atomic_write_csv(out / "image_predictions.csv", img_rows, ["patient_id", "image", "label", "score", "empty_mask", "lesion_fraction"])
    np.savez(out / "oof_logits.npz", logits=oof_logits, fold=oof_fold,
             patient=np.array([s.patient_id for s in samples]), image=np.array([s.image for s in samples]))
    plot_roc(hy, hs, out / "roc.png", sources=hsrc, point=op,
             title=f"{cfg.arch}: held-out patients ({metrics['evaluation']})")
    plot_confusion(rep["confusion"], out / "confusion.png", title=f"threshold {op['threshold']:.3f}")

    from cervscan.models.networks import save_checkpoint

    def write_ckpt(m: nn.Module, path: Path, note: str, already_deploy: bool = False) -> None:
        deploy = m if already_deploy else to_deploy(m.cpu().eval())
        ck = make_checkpoint(deploy, kind="classifier", arch=cfg.arch, arch_kwargs={}, form="deploy",
                             input_size=(cfg.input_size, cfg.input_size), mean=default_norm(cfg.arch)[0],
                             std=default_norm(cfg.arch)[1], name=cfg.name, version=cfg.version, extra={
                                 "threshold": op["threshold"],
                                 "operating_point": {**op, "evaluated_on": metrics["evaluation"],
                                                     "patients": int(len(hp)), "auc": rep["auc"],
                                                     "auc_ci95": rep["ci95"]["auc"],
                                                     "sensitivity_ci95": rep["ci95"]["sensitivity"],
                                                     "specificity_ci95": rep["ci95"]["specificity"]},
                                 "temperature": T,
                                 "validation": validation,
                                 "crop": cfg.crop,
                                 "voting": {"weights": list(weights), "brightness": cfg.brightness,
                                            "brightness_from_flipped": False,
                                            "tuned": bool(cfg.tune_votes)},
                                 "train_summary": {"final_model": note, "samples": cfg.samples,
                                                   "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size,
                                                   "input_size": cfg.input_size, "arch": cfg.arch,
                                                   "pretrained": cfg.pretrained, "segmenter": seg_info,
                                                   "cervix": model_info.get("cervix"), "crop": cfg.crop,
                                                   "labels": str(cfg.labels), "patients": int(len(pids)),
                                                   "images": len(samples), "seed": cfg.seed}})
        save_checkpoint(ck, path)

    model_path = out / "model.pt"
    if model is not None and (validation["passed"] or cfg.force):
        write_ckpt(model, model_path, final_note)
        metrics["checkpoint"] = str(model_path)
    elif model is not None:
        # no installable model: an earlier run's model.pt in this folder must not pass for this run's
        model_path.unlink(missing_ok=True)
        metrics["checkpoint"] = None
        metrics["final_model"] = f"{final_note}; not written: the classifier failed its validation"
    if fold_models:
        # each fold's model with the pooled calibration, and which patients it did not see:
        # `cervscan evaluate --cv-run OUT` re-screens every patient with the model of its fold.
        fold_rows_csv = []
        for k, (fm, (_, va)) in enumerate(zip(fold_models, splits)):
            write_ckpt(fm, out / f"fold{k + 1}.pt", f"fold {k + 1} of {len(splits)}: validation patients in folds.csv",
                       already_deploy=True)
            fold_rows_csv += [{"patient_id": q, "fold": k + 1, "label": y_by[q], "source": src_by[q]} for q in sorted(va)]
        atomic_write_csv(out / "folds.csv", fold_rows_csv, ["patient_id", "fold", "label", "source"])
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "run.json", {"command": "train-cls", "recipe": "finetune", "config": asdict(cfg), "cervscan_version": __version__,
                                         "torch": torch.__version__, "device": str(dev), "threads": torch.get_num_threads(),
                                         "validation": validation, "labels_check": checks.get("labels_check"),
                                         "models": model_info})
    enforce(validation, metrics, no_model=(f"No {model_path} was written (metrics.json, predictions.csv"
                                           + (" and the fold models" if fold_models else "") + " are, for inspection)."
                                           if model is not None else "No model was to be written (no --full)."))
    return metrics
