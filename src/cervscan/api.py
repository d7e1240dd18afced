"""Library entry points. Each takes keyword arguments or a config and returns plain objects."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .config import VARIANT_NAMES, ScreenConfig, VotingConfig, load_config_file
from .errors import CervscanError

log = logging.getLogger(__name__)

PATIENT_COLUMNS = ["patient_id", "decision", "score", "threshold", "n_images", "n_used", "n_failed",
                   "n_empty_mask", "quality", "error", "seg_model", "cls_model", "cervscan_version"]


@dataclass
class ScreenResult:
    out: Path
    patients: list[dict]
    images: list[dict]
    skipped: list[dict]
    run: dict
    exit_code: int

    def summary(self) -> dict:
        return {k: self.run[k] for k in ("out", "counts", "timings", "models", "threshold")} | {
            "patients": [{k: p.get(k) for k in ("patient_id", "decision", "score", "n_used", "n_failed", "error")}
                         for p in self.patients], "exit_code": self.exit_code}


def _voting_from(ckpt: dict, file_cfg: dict, overrides: dict, seg_ckpt: dict | None = None) -> tuple[VotingConfig, float, dict]:
    """Checkpoint defaults < config file < explicit options. Returns voting, threshold and provenance."""
    src: dict[str, str] = {}
    vals: dict[str, Any] = {}
    if seg_ckpt and seg_ckpt.get("mask_threshold") is not None:
        vals["mask_threshold"], src["mask_threshold"] = float(seg_ckpt["mask_threshold"]), "segmenter checkpoint"
    ck_vote = ckpt.get("voting") or {}
    for key in ("weights", "brightness", "brightness_from_flipped"):
        if key in ck_vote:
            vals[key], src[key] = ck_vote[key], "checkpoint"
    thr, src["threshold"] = 0.5, "default"
    if ckpt.get("threshold") is not None:
        thr, src["threshold"] = float(ckpt["threshold"]), "checkpoint"
    for layer_name, layer in (("config", file_cfg), ("option", overrides)):
        for k, v in layer.items():
            if v is None:
                continue
            if k == "threshold":
                thr, src["threshold"] = float(v), layer_name
            elif k in {f.name for f in dataclasses.fields(VotingConfig)}:
                vals[k], src[k] = v, layer_name
    if "weights" in vals:
        vals["weights"] = tuple(float(x) for x in vals["weights"])
    if "variants" in vals:
        vals["variants"] = tuple(vals["variants"])
    if not 0.0 <= thr <= 1.0:
        raise CervscanError(f"threshold must be within [0, 1], got {thr}")
    return VotingConfig(**vals), thr, src


def screen(paths: list[str | Path], out: str | Path, *, seg_model: str | None = None, cls_model: str | None = None,
           config_file: str | None = None, overrides: dict | None = None, device: str | None = None,
           num_workers: int | None = None, batch_images: int | None = None, write_masks: bool = True,
           write_overlays: bool = True, threads: int | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> ScreenResult:
    """Screen visit folders and write patients.csv, images.csv, masks, overlays and run.json to ``out``."""
    import torch

    from .device import resolve_device
    from .inference import IMAGE_COLUMNS, load_models, screen_images
    from .io import atomic_write_csv, atomic_write_image, atomic_write_json, discover_visits, output_stems
    from .transforms import overlay
    from .variants import aggregate_patient
    from .weights import resolve

    t0 = time.time()
    overrides = dict(overrides or {})
    file_cfg = load_config_file(config_file) if config_file else {}
    stray: list[tuple[Path, str]] = []
    visits = discover_visits(paths, stray)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".cervscan-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CervscanError(f"{out}: output folder is not writable ({e.strerror})") from None

    if threads:
        torch.set_num_threads(threads)
    # explicit option > config file > auto
    dev = resolve_device(overrides.pop("device", None) or device or file_cfg.get("device") or "auto")
    seg_ref = resolve("segmenter", seg_model)
    cls_ref = resolve("classifier", cls_model)
    t_load = time.time()
    models = load_models(seg_ref, cls_ref, dev)
    t_loaded = time.time()
    voting, threshold, provenance = _voting_from(models.cls_ckpt, file_cfg, overrides, models.seg_ckpt)
    base = ScreenConfig()
    cfg = dataclasses.replace(
        base, voting=voting, threshold=threshold, device=str(dev),
        num_workers=num_workers if num_workers is not None else int(file_cfg.get("num_workers", base.num_workers)),
        batch_images=batch_images or int(file_cfg.get("batch_images", base.batch_images)),
        max_side=int(file_cfg.get("max_side", base.max_side)), max_pixels=int(file_cfg.get("max_pixels", base.max_pixels)),
        min_side=int(file_cfg.get("min_side", base.min_side)),
        write_masks=write_masks, write_overlays=write_overlays)

    items = [(v.patient_id, p) for v in visits for p in v.images]
    names = {v.patient_id: output_stems([p.name for p in v.images]) for v in visits}

    def on_image(rec: dict, arrays: dict | None) -> None:
        if arrays is None:
            log.warning("%s", rec["error"])
            return
        stem = names[rec["patient_id"]][rec["image"]]
        if cfg.write_masks:
            rel = Path("masks") / rec["patient_id"] / f"{stem}.png"
            atomic_write_image(out / rel, arrays["mask"] * 255)
            rec["mask"] = str(rel)
        if cfg.write_overlays:
            rel = Path("overlays") / rec["patient_id"] / f"{stem}.jpg"
            atomic_write_image(out / rel, overlay(arrays["rgb"], arrays["mask"]))
            rec["overlay"] = str(rel)

    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress("images", done[0], len(items))

    if progress:
        progress("images", 0, len(items))
    records = screen_images(models, items, cfg, threshold, on_image=on_image, progress=step)
    t_screened = time.time()

    seg_label, cls_label = seg_ref.label, cls_ref.label
    by_pid: dict[str, list[dict]] = {}
    for r in records:
        by_pid.setdefault(r["patient_id"], []).append(r)
    patients = []
    skipped = [{"patient_id": "", "file": str(p), "reason": why} for p, why in stray]
    for v in visits:
        recs = by_pid.get(v.patient_id, [])
        ok = [r for r in recs if r["status"] == "ok"]
        failed = [r for r in recs if r["status"] != "ok"]
        for name, why in v.skipped:
            skipped.append({"patient_id": v.patient_id, "file": name, "reason": why})
        score, decision = aggregate_patient([r["score"] for r in ok], threshold)
        err = ""
        if v.error:
            err = v.error
        elif not ok:
            err = f"all {len(recs)} image(s) failed: " + "; ".join(r["error"] for r in failed[:3])
        flags: dict[str, int] = {}
        for r in ok:
            for f in filter(None, (r.get("quality_flags") or "").split(";")):
                flags[f] = flags.get(f, 0) + 1
        n_empty = sum(bool(r.get("empty_mask")) for r in ok)
        quality = "ok" if not flags else ";".join(f"{k}:{n}/{len(ok)}" for k, n in sorted(flags.items()))
        patients.append({
            "patient_id": v.patient_id, "decision": decision if not v.error else "error", "score": score,
            "threshold": threshold, "n_images": len(recs), "n_used": len(ok), "n_failed": len(failed),
            "n_empty_mask": n_empty, "quality": quality if ok else "", "error": err,
            "seg_model": seg_label, "cls_model": cls_label, "cervscan_version": __version__,
        })
    for r in records:
        r["seg_model"], r["cls_model"] = seg_label, cls_label

    n_failed_img = sum(r["status"] != "ok" for r in records)
    n_err_pat = sum(p["decision"] == "error" for p in patients)
    exit_code = 3 if (n_failed_img or n_err_pat) else 0
    atomic_write_csv(out / "images.csv", records, IMAGE_COLUMNS + ["seg_model", "cls_model"])
    atomic_write_csv(out / "patients.csv", patients, PATIENT_COLUMNS)
    atomic_write_csv(out / "skipped.csv", skipped, ["patient_id", "file", "reason"])
    import segmentation_models_pytorch as smp
    import timm

    def model_info(ref, ck):
        return {"path": str(ref.path), "source": ref.source, "sha256": ref.sha256, "verified": ref.verified,
                "label": ref.label, "name": ck.get("name"), "version": ck.get("version"), "arch": ck["arch"],
                "form": ck["form"], "input_size": ck["input_size"], "dtype": ck.get("dtype"),
                **({"threshold": ck.get("threshold"), "operating_point": ck.get("operating_point"),
                    "temperature": ck.get("temperature"), "voting": ck.get("voting")} if ck["kind"] == "classifier" else {}),
                "train_summary": ck.get("train_summary")}

    run = {
        "command": "screen", "cervscan_version": __version__, "out": str(out),
        "inputs": [str(Path(p).resolve()) for p in paths],
        "config": cfg.to_dict(), "threshold": threshold, "provenance": provenance,
        "models": {"segmenter": model_info(seg_ref, models.seg_ckpt), "classifier": model_info(cls_ref, models.cls_ckpt)},
        "versions": {"cervscan": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "segmentation_models_pytorch": smp.__version__, "python": platform.python_version()},
        "device": str(dev), "threads": torch.get_num_threads(),
        "timings": {"load_models_s": round(t_loaded - t_load, 3), "screen_s": round(t_screened - t_loaded, 3),
                    "total_s": round(time.time() - t0, 3),
                    "images_per_s": round(len(items) / max(1e-9, t_screened - t_loaded), 3)},
        "counts": {"patients": len(patients), "images": len(records), "images_failed": n_failed_img,
                   "patients_error": n_err_pat, "severe": sum(p["decision"] == "severe" for p in patients),
                   "mildly_normal": sum(p["decision"] == "mildly_normal" for p in patients),
                   "skipped_files": len(skipped)},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "exit_code": exit_code,
        "disclaimer": "Decision support only: the result supports and does not replace the clinician's judgement.",
    }
    atomic_write_json(out / "run.json", run)
    return ScreenResult(out, patients, records, skipped, run, exit_code)


def evaluate(visits: list[str | Path], labels: str | Path, out: str | Path, *, n_bootstrap: int = 2000, seed: int = 0,
             screen_out: str | Path | None = None, cv_run: str | Path | None = None, **screen_kwargs) -> dict:
    """Screen labelled visits, then compare patient decisions and scores with the labels.

    Writes OUT/metrics.json, OUT/roc.png, OUT/confusion.png, OUT/predictions.csv
    (the screen outputs go to OUT/screen unless ``screen_out`` is given).
    Patients with an empty label are skipped and counted; patients whose
    screening failed (decision ``error``) are counted and left out of the metrics.
    """
    import csv

    from .errors import DataError
    from .io import atomic_write_csv, atomic_write_json
    from .metrics import full_report, plot_confusion, plot_roc

    out = Path(out)
    lab_path = Path(labels)
    from .io import read_labels

    rows, unlabelled = read_labels(lab_path)
    lab = {r["patient_id"]: r["label"] for r in rows}
    src = {r["patient_id"]: r["source"] for r in rows}
    screen_dir = Path(screen_out) if screen_out else out / "screen"
    if cv_run:
        # cross-validation reproduction: each patient is screened by the fold model that did not train on it
        cv = Path(cv_run)
        try:
            with open(cv / "folds.csv", newline="", encoding="utf-8") as f:
                fold_of = {r["patient_id"]: int(r["fold"]) for r in csv.DictReader(f)}
        except OSError as e:
            raise CervscanError(f"{cv}/folds.csv: cannot read ({e.strerror}); --cv-run needs a 'train-cls --folds K' run") from None
        from .io import discover_visits

        all_visits = discover_visits(visits)
        screened, run = [], None
        for k in sorted(set(fold_of.values())):
            folders = [v.folder for v in all_visits if fold_of.get(v.patient_id) == k]
            if not folders:
                continue
            r = screen(folders, screen_dir / f"fold{k}", **{**screen_kwargs, "cls_model": str(cv / f"fold{k}.pt")})
            screened += r.patients
            run = run or r.run
        if run is None:
            raise DataError(f"no visit folder matches a patient of {cv}/folds.csv")
    else:
        res = screen(visits, screen_dir, **screen_kwargs)
        screened, run = res.patients, res.run
    thr = run["threshold"]
    preds, errors, not_labelled = [], [], []
    for p in screened:
        pid = p["patient_id"]
        if pid not in lab:
            not_labelled.append(pid)
            continue
        if p["decision"] == "error" or p["score"] is None:
            errors.append({"patient_id": pid, "error": p["error"]})
            continue
        preds.append({"patient_id": pid, "label": lab[pid], "source": src.get(pid, ""), "score": p["score"],
                      "decision": p["decision"], "correct": int((p["decision"] == "severe") == (lab[pid] == 1)),
                      "n_used": p["n_used"], "quality": p["quality"]})
    if not preds:
        raise DataError("no screened patient has a label: check that visit folder names match patient_id")
    y = [r["label"] for r in preds]
    s = [r["score"] for r in preds]
    has_src = any(r["source"] for r in preds)
    m = full_report(y, s, thr, sources=[r["source"] or "unknown" for r in preds] if has_src else None,
                    n_bootstrap=n_bootstrap, seed=seed)
    m.update({
        "skipped_unlabelled_rows": unlabelled, "screened_without_label": len(not_labelled),
        "patients_failed": len(errors), "failed": errors,
        "models": {k: {"label": v["label"], "sha256": v["sha256"], "path": v["path"]} for k, v in run["models"].items()},
        "operating_point": run["models"]["classifier"].get("operating_point"),
        "labels": str(lab_path), "visits": [str(v) for v in visits], "bootstrap": {"n": n_bootstrap, "seed": seed},
        "cv_run": str(cv_run) if cv_run else None,
        "cervscan_version": __version__,
    })
    atomic_write_csv(out / "predictions.csv", preds, ["patient_id", "label", "source", "score", "decision", "correct",
                                                       "n_used", "quality"])
    plot_roc(y, s, out / "roc.png", sources=[r["source"] for r in preds] if has_src else None,
             point={"threshold": thr, "sensitivity": m["sensitivity"] or 0.0, "specificity": m["specificity"] or 0.0})
    plot_confusion(m["confusion"], out / "confusion.png", title=f"threshold {thr:.3f}")
    atomic_write_json(out / "metrics.json", m)
    return m
