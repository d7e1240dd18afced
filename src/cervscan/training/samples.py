"""``train-cls --recipe finetune``'s data: every labelled image through the screening pipeline up to the
classifier's inputs (cervix crop, lesion, segmented image at the input size), cached by the models' sha256s and
the settings, so cross-validation folds and later runs do not segment again."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cervscan.config import ScreenConfig, VotingConfig
from cervscan.device import resolve_device
from cervscan.errors import CervscanError, DataError
from cervscan.files import atomic_write_npz, cache_root, discover_visits, file_key
from cervscan.files import read_labels as _read_labels
from cervscan.models import registry
from cervscan.models.loading import load_model
from cervscan.pipeline.steps import Pipeline
from cervscan.training.configs import ClsTrainConfig
from cervscan.training.validation import label_check

log = logging.getLogger(__name__)


def read_labels(path: str | Path, notes: list[dict] | None = None) -> list[dict]:
    """Labelled rows of ``labels.csv``; a missing source becomes ``all`` (``notes``: as
    :func:`cervscan.files.read_labels`)."""
    rows, _ = _read_labels(path, notes)
    return [{**r, "source": r["source"] or "all"} for r in rows]


@dataclass
class Sample:
    patient_id: str
    image: str
    label: int
    source: str
    original: np.ndarray  # S x S x 3 uint8
    segmented: np.ndarray  # S x S x 3 uint8
    empty_mask: bool
    lesion_fraction: float


def preparation_pipeline(cfg: ClsTrainConfig):
    """The screening pipeline's models for data preparation: lesion segmenter, and the cervix finder when
    ``cfg.crop`` is ``cervix``. Returns the pipeline and what to record of its models."""
    dev = resolve_device(cfg.device)
    refs = {"segmenter": registry.resolve("segmenter", cfg.seg_model)}
    if cfg.crop == "cervix":
        refs["cervix"] = registry.resolve("cervix", cfg.cervix_model)
    models = {role: load_model(role, ref.path, dev, ref) for role, ref in refs.items()}
    seg_ck = models["segmenter"].ckpt
    base = ScreenConfig()
    pcfg = replace(base, crop=cfg.crop, voting=VotingConfig(mask_threshold=float(seg_ck.get("mask_threshold") or 0.5),
                                                            brightness=cfg.brightness))
    info = {role: {"path": str(ref.path), "sha256": ref.sha256, "name": models[role].ckpt.get("name"),
                   "version": models[role].ckpt.get("version")} for role, ref in refs.items()}
    return Pipeline(models, pcfg, dev), info


def prepare_samples(cfg: ClsTrainConfig, progress=None, checks: dict | None = None) -> tuple[list[Sample], dict]:
    """Decode every labelled image and run the screening pipeline up to the classifier's inputs
    (cervix crop, lesion, segmented image at the input size); cached by model sha256s and settings.
    Returns samples and the models' info; the labels' check against the visit folders
    (:func:`cervscan.training.validation.label_check`) goes to ``checks["labels_check"]`` when given."""
    notes: list[dict] = []
    rows = read_labels(cfg.labels, notes)
    labels = {r["patient_id"]: r for r in rows}
    visits = {v.patient_id: v for v in discover_visits([cfg.visits])}
    rec = label_check(rows, notes, list(visits), without_images=[p for p, v in visits.items() if not v.images],
                      labels=str(cfg.labels), what=f" under {cfg.visits} (skipped)")
    if checks is not None:
        checks["labels_check"] = rec
    pipe, info = preparation_pipeline(cfg)
    S = cfg.input_size
    cache = cache_root(cfg.cache_dir)
    c = pipe.cfg
    key_src = "|".join([f"{r}:{i['sha256']}" for r, i in sorted(info.items())] + [
        f"S{S}", f"crop:{c.crop}:{c.cervix_margin}:{c.cervix_min_fraction}:{c.centre_crop}",
        f"t{c.voting.mask_threshold:g}:{c.voting.crop_margin}:{c.voting.min_lesion_fraction}", "v2"])
    cache = cache / f"cls-{hashlib.sha1(key_src.encode()).hexdigest()[:16]}"
    cache.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    todo = [(pid, p) for pid in sorted(labels) if pid in visits for p in visits[pid].images]
    t0 = time.time()
    for k, (pid, path) in enumerate(todo):
        key = file_key(path)
        f = cache / f"{key}.npz"
        if f.exists():
            z = np.load(f)
            orig, segm, empty, frac = z["original"], z["segmented"], bool(z["empty"]), float(z["frac"])
        else:
            try:
                rgb = pipe.decode(path).rgb
            except CervscanError as e:
                log.warning("skipped: %s", e)
                continue
            p = pipe.prepare([rgb], size=S)[0]
            orig, segm, empty, frac = p.original, p.segmented, p.empty_mask, p.lesion_fraction
            atomic_write_npz(f, original=orig, segmented=segm, empty=empty, frac=frac)
        lab = labels[pid]
        samples.append(Sample(pid, path.name, lab["label"], lab["source"], orig, segm, empty, frac))
        if progress:
            progress({"phase": "train", "epoch": 0, "epochs": 0, "step": k + 1, "steps": len(todo), "loss": 0.0,
                      "fold": "preparing"})
    log.info("prepared %d images of %d patients in %.0fs (cache %s)", len(samples),
             len({s.patient_id for s in samples}), time.time() - t0, cache)
    if not samples:
        raise DataError("no usable training images")
    return samples, info


def patient_table(samples: list[Sample]) -> tuple[list[str], np.ndarray, np.ndarray]:
    pids = sorted({s.patient_id for s in samples})
    first = {}
    for s in samples:
        first.setdefault(s.patient_id, s)
    y = np.array([first[p].label for p in pids])
    src = np.array([first[p].source for p in pids], dtype=object)
    return pids, y, src
