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
from .config import CROP_MODES, VARIANT_NAMES, ScreenConfig, VotingConfig, load_config_file
from .errors import CervscanError

log = logging.getLogger(__name__)

from .pipeline import PATIENT_COLUMNS  # noqa: E402,F401 - re-exported


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
            "patients": [{k: p.get(k) for k in ("patient_id", "decision", "score", "n_used", "n_eligible", "n_failed",
                                                  "reason", "error")}
                         for p in self.patients], "exit_code": self.exit_code}


#: Where a value that fails its check came from, as the error names it (a config file is named by its path
#: when it is loaded, :func:`cervscan.config.load_config_file`).
_WHERE = {"config": "config file", "option": "command line"}


def _checked(layer: dict, keys, layer_name: str) -> dict:
    """The values of ``layer`` for ``keys`` (None: not given, left out), each checked against
    :data:`cervscan.config.SETTINGS`; options are named as on the command line (``--threshold``)."""
    from .config import check_setting

    where = _WHERE.get(layer_name, layer_name)
    return {k: check_setting(k, v, where, "--" + k.replace("_", "-") if layer_name == "option" else None)
            for k, v in layer.items() if k in keys and v is not None}


def _voting_from(ckpt: dict, file_cfg: dict, overrides: dict, seg_ckpt: dict | None = None) -> tuple[VotingConfig, float, dict]:
    """Checkpoint defaults < config file < explicit options. Returns voting, threshold and provenance.

    Every value is checked (type, finiteness, range: :data:`cervscan.config.SETTINGS`) as it comes in, the
    checkpoints' too; the error names where it came from (the checkpoint, the config file, the command line).
    """
    src: dict[str, str] = {}
    vals: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(VotingConfig)}
    if seg_ckpt and seg_ckpt.get("mask_threshold") is not None:
        vals |= _checked({"mask_threshold": float(seg_ckpt["mask_threshold"])}, fields, "segmenter checkpoint")
        src["mask_threshold"] = "segmenter checkpoint"
    ck_vote = _checked(ckpt.get("voting") or {}, ("weights", "brightness", "brightness_from_flipped", "variants",
                                                   "pooling"), "classifier checkpoint")
    vals |= ck_vote
    src |= dict.fromkeys(ck_vote, "checkpoint")
    thr, src["threshold"] = 0.5, "default"
    if ckpt.get("threshold") is not None:
        thr = _checked({"threshold": float(ckpt["threshold"])}, ("threshold",), "classifier checkpoint")["threshold"]
        src["threshold"] = "checkpoint"
    for layer_name, layer in (("config", file_cfg), ("option", overrides)):
        for k, v in _checked(layer, fields | {"threshold"}, layer_name).items():
            if k == "threshold":
                thr, src["threshold"] = float(v), layer_name
            else:
                vals[k], src[k] = v, layer_name
    if "weights" in vals:
        vals["weights"] = tuple(float(x) for x in vals["weights"])
    if "variants" in vals:
        vals["variants"] = tuple(vals["variants"])
    return VotingConfig(**vals), thr, src


def _resolve_choice(key: str, choices: tuple[str, ...], default: str, cls_ckpt: dict, file_cfg: dict,
                    overrides: dict, provenance: dict) -> str:
    """A setting the classifier checkpoint records (``crop``, ``classify_view``): option > config file >
    the classifier checkpoint > ``default``; where it came from goes to ``provenance``."""
    val, src = default, "default"
    for layer_name, layer in (("classifier checkpoint", cls_ckpt), ("config", file_cfg), ("option", overrides)):
        if layer.get(key):
            val, src = str(layer[key]), layer_name
    if val not in choices:
        raise CervscanError(f"{key} must be one of {', '.join(choices)}, not {val!r}")
    provenance[key] = src
    return val


def _gate_from(file_cfg: dict, overrides: dict, provenance: dict, cls_ckpt: dict | None = None):
    """The quality gate: defaults (``GateConfig``) < the classifier checkpoint's ``decision_stages`` (the
    stages its model was fitted and chosen on) < config file < options (``quality_gate`` False for
    ``--no-quality-gate``). Records where each changed value came from in ``provenance``."""
    from .config import GATE_KEYS, GateConfig

    vals: dict[str, Any] = {}
    if cls_ckpt and cls_ckpt.get("decision_stages"):
        stages = _checked({"decision_stages": cls_ckpt["decision_stages"]}, GATE_KEYS, "classifier checkpoint")
        vals["decision_stages"] = tuple(stages["decision_stages"])
        provenance["decision_stages"] = "classifier checkpoint"
    for layer_name, layer in (("config", file_cfg), ("option", overrides)):
        for key, v in _checked(layer, GATE_KEYS, layer_name).items():
            fld = GATE_KEYS[key]
            vals[fld] = tuple(v) if fld == "decision_stages" else v
            provenance[key] = layer_name
    return GateConfig(**vals)


def load_pipeline(*, seg_model: str | None = None, cls_model: str | None = None, cervix_model: str | None = None,
                  stage_model: str | None = None, config_file: str | None = None, overrides: dict | None = None,
                  device: str | None = None, num_workers: int | None = None, batch_images: int | None = None,
                  write_masks: bool = True, write_overlays: bool = True, use_stage: bool = True):
    """Resolve every model and the configuration (checkpoint < config file < options); return
    ``(pipeline, refs, provenance, seconds to load)``."""
    from .config import SETTINGS
    from .device import resolve_device
    from .models import read_checkpoint
    from .pipeline import Pipeline, load_model
    from .weights import resolve

    overrides = dict(overrides or {})
    _checked(overrides, SETTINGS, "option")  # every option, before any model is loaded
    file_cfg = load_config_file(config_file) if config_file else {}
    dev = resolve_device(overrides.pop("device", None) or device or file_cfg.get("device") or "auto")
    t0 = time.time()
    refs = {"segmenter": resolve("segmenter", seg_model), "classifier": resolve("classifier", cls_model)}
    models = {role: load_model(role, refs[role].path, dev, refs[role]) for role in ("segmenter", "classifier")}
    val = models["classifier"].ckpt.get("validation")
    if isinstance(val, dict) and not val.get("passed", False):
        log.warning("%s: this classifier failed its validation (cross-validated patient AUC %s, 95 %% CI %s-%s) "
                    "and was kept with --force: its decisions may be no better than chance",
                    refs["classifier"].path, val.get("auc"), val.get("ci_low"), val.get("ci_high"))
    voting, threshold, provenance = _voting_from(models["classifier"].ckpt, file_cfg, overrides, models["segmenter"].ckpt)
    crop = _resolve_choice("crop", CROP_MODES, "frame", models["classifier"].ckpt, file_cfg, overrides, provenance)
    if crop == "cervix":
        refs["cervix"] = resolve("cervix", cervix_model)
        models["cervix"] = load_model("cervix", refs["cervix"].path, dev, refs["cervix"])
    if use_stage:
        try:
            refs["stage"] = resolve("stage", stage_model)
        except CervscanError as e:
            if stage_model:
                raise
            log.warning("no exam-stage model (%s); stage left empty", e)
        else:
            models["stage"] = load_model("stage", refs["stage"].path, dev, refs["stage"])
    gate = _gate_from(file_cfg, overrides, provenance, models["classifier"].ckpt)
    view = _resolve_choice("classify_view", ("crop", "frame"), "crop", models["classifier"].ckpt, file_cfg,
                           overrides, provenance)
    base = ScreenConfig()
    cfg = dataclasses.replace(
        base, voting=voting, threshold=threshold, device=str(dev), crop=crop, gate=gate, classify_view=view,
        num_workers=num_workers if num_workers is not None else int(file_cfg.get("num_workers", base.num_workers)),
        batch_images=batch_images or int(file_cfg.get("batch_images", base.batch_images)),
        **{k: type(getattr(base, k))(file_cfg[k]) for k in ("max_side", "max_pixels", "min_side", "max_decode_mb",
                                                             "cervix_margin", "cervix_min_fraction", "centre_crop",
                                                             "classify_batch")
           if k in file_cfg},
        write_masks=write_masks, write_overlays=write_overlays)
    return Pipeline(models, cfg, dev), refs, provenance, time.time() - t0


def screen(paths: list[str | Path], out: str | Path, *, seg_model: str | None = None, cls_model: str | None = None,
           cervix_model: str | None = None, stage_model: str | None = None, use_stage: bool = True,
           config_file: str | None = None, overrides: dict | None = None, device: str | None = None,
           num_workers: int | None = None, batch_images: int | None = None, write_masks: bool = True,
           write_overlays: bool = True, threads: int | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> ScreenResult:
    """Screen visit folders and write patients.csv, images.csv, masks, overlays and run.json to ``out``."""
    import torch

    from .io import OutputLedger, check_overlap, discover_visits, display_id
    from .writer import OutputWriter

    from .device import resolve_device

    t0 = time.time()
    # a bad option, config file or device fails before anything is written
    from .config import SETTINGS

    _checked(dict(overrides or {}), SETTINGS, "option")
    file_cfg = load_config_file(config_file) if config_file else {}
    resolve_device((overrides or {}).get("device") or device or file_cfg.get("device") or "auto")
    stray: list[tuple[Path, str]] = []
    visits = discover_visits(paths, stray)
    out = Path(out)
    # an output folder that is, holds or lies inside an input folder is refused before anything is written
    check_overlap(paths, out)
    refuse_overlapping_visits(visits, out)
    probe_writable(out)
    ledger = OutputLedger(out, inputs=[*paths, *(v.folder for v in visits)])
    writer = OutputWriter(out, masks=write_masks, overlays=write_overlays, ledger=ledger)
    writer.claim_tables()  # a patients.csv cervscan did not write fails here, before the models load
    if threads:
        torch.set_num_threads(threads)
    pipe, refs, provenance, load_s = load_pipeline(
        seg_model=seg_model, cls_model=cls_model, cervix_model=cervix_model, stage_model=stage_model,
        config_file=config_file, overrides=overrides, device=device, num_workers=num_workers,
        batch_images=batch_images, write_masks=write_masks, write_overlays=write_overlays, use_stage=use_stage)
    cfg = pipe.cfg
    t_loaded = time.time()

    writer.masks, writer.overlays = cfg.write_masks, cfg.write_overlays
    for v in visits:
        writer.add_visit(v.patient_id, [display_id(p.name) for p in v.images])
    items = [(v.patient_id, p) for v in visits for p in v.images]
    labels = pipe.labels()
    model_cols = {"stage_model": labels.get("stage", ""), "cervix_model": labels.get("cervix", ""),
                  "seg_model": labels.get("segmenter", ""), "cls_model": labels.get("classifier", "")}
    if progress:
        progress("images", 0, len(items))
    records: list[dict] = []
    for res in pipe.run(items):
        try:
            rec = writer.image(res)
        except OSError as e:  # the output folder as a whole (disk full, read-only): nothing more can be written
            raise CervscanError(f"{display_id(str(out))}: cannot write the mask and overlay files "
                                f"({e.strerror or e}); fix this and run again") from None
        if rec["status"] != "ok":
            log.warning("%s", rec["error"])
        records.append({**rec, **model_cols})
        if progress:
            progress("images", len(records), len(items))
    t_screened = time.time()

    by_pid: dict[str, list[dict]] = {}
    for r in records:
        by_pid.setdefault(r["patient_id"], []).append(r)
    patients = [decide_patient(pipe, v.patient_id, by_pid.get(v.patient_id, []), v.error or "") for v in visits]
    skipped = [{"patient_id": "", "file": display_id(str(p)), "reason": why} for p, why in stray]
    skipped += [{"patient_id": v.patient_id, "file": name, "reason": why} for v in visits for name, why in v.skipped]

    n_failed_img = sum(r["status"] != "ok" for r in records)
    n_err_pat = sum(p["decision"] == "error" for p in patients)
    n_inadequate = sum(p["decision"] == "inadequate" for p in patients)
    exit_code = exit_code_of(n_failed_img + n_err_pat, n_inadequate)
    run = _run_record("screen", out, paths, pipe, refs, provenance, {
        "load_models_s": round(load_s, 3), "screen_s": round(t_screened - t_loaded, 3),
        "total_s": round(time.time() - t0, 3), "images_per_s": round(len(items) / max(1e-9, t_screened - t_loaded), 3)})
    run["counts"] = {"patients": len(patients), "images": len(records), "images_failed": n_failed_img,
                     "patients_error": n_err_pat, "severe": sum(p["decision"] == "severe" for p in patients),
                     "mildly_normal": sum(p["decision"] == "mildly_normal" for p in patients),
                     "inadequate": n_inadequate,
                     "images_ineligible": sum(r["status"] == "ok" and r.get("eligible") is False for r in records),
                     "no_cervix": sum(r.get("cervix_found") is False for r in records),
                     "skipped_files": len(skipped)}
    run["exit_code"] = exit_code
    try:
        writer.finish(patients, records, skipped, run)
    except OSError as e:
        raise CervscanError(f"{display_id(str(out))}: cannot write the result tables ({e.strerror or e}); "
                            "fix this and run again") from None
    return ScreenResult(out, patients, records, skipped, run, exit_code)


def probe_writable(out: Path) -> None:
    """Create ``out`` and check that a file can be written in it (a uniquely named probe, removed)."""
    import tempfile

    from .io import display_id

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cervscan-write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CervscanError(f"{display_id(str(out))}: output folder is not writable ({e.strerror})") from None


def refuse_overlapping_visits(visits: list, out: Path) -> None:
    """A visit folder reached through a link that leads into ``out`` (or holds it) is not screened: it gets
    decision ``error`` with the reason; the other visits go on."""
    from .io import overlap_note

    for v in visits:
        note = overlap_note(v.folder, out)
        if note:
            log.error("%s", note)
            v.images, v.error = [], note


def decide_patient(pipe, patient_id: str, records: list[dict], visit_error: str = "") -> dict:
    """The patient row (:meth:`Pipeline.aggregate`); a visit whose row cannot be computed gets decision
    ``error`` with the reason instead of stopping the run."""
    try:
        return pipe.aggregate(patient_id, records, visit_error)
    except Exception as e:  # noqa: BLE001 - one visit must not stop the others
        from .io import clean_text

        log.error("visit %s: cannot decide (%s: %s)", patient_id, type(e).__name__, e)
        return {"patient_id": patient_id, "decision": "error", "score": None, "threshold": pipe.cfg.threshold,
                "n_images": len(records), "n_used": 0, "n_eligible": 0, "n_failed": len(records),
                "error": clean_text(f"cannot decide ({type(e).__name__}: {e})"), "cervscan_version": __version__}


#: Exit codes of a run that finished: all decided; some image or patient failed; some patient inadequate.
EXIT_OK, EXIT_FAILED, EXIT_INADEQUATE = 0, 3, 5
#: Exit code of a classifier training (train-decision, train-cls) whose classifier failed its validation (no
#: better than chance on held-out patients, see :mod:`cervscan.validation`): no installable model was written.
EXIT_NOT_VALIDATED = 6


def exit_code_of(n_failed: int, n_inadequate: int) -> int:
    """3 when anything failed (it wins), else 5 when a patient is ``inadequate`` (retake), else 0."""
    return EXIT_FAILED if n_failed else (EXIT_INADEQUATE if n_inadequate else EXIT_OK)


def _run_record(command: str, out: Path, paths, pipe, refs: dict, provenance: dict, timings: dict) -> dict:
    """run.json: resolved configuration, every model's file and sha256, versions, device, timings."""
    import segmentation_models_pytorch as smp
    import timm
    import torch

    from .io import display_id

    def model_info(role):
        ref, ck = refs[role], pipe.models[role].ckpt
        return {"path": str(ref.path), "source": ref.source, "sha256": ref.sha256, "verified": ref.verified,
                "label": ref.label, "name": ck.get("name"), "version": ck.get("version"), "arch": ck["arch"],
                "form": ck["form"], "input_size": ck["input_size"], "dtype": ck.get("dtype"),
                **({"threshold": ck.get("threshold"), "operating_point": ck.get("operating_point"),
                    "temperature": ck.get("temperature"), "voting": ck.get("voting"), "crop": ck.get("crop"),
                    "validation": ck.get("validation")}
                   if ck["kind"] == "classifier" else {}),
                **({"classes": ck.get("classes")} if ck["kind"] == "stage" else {}),
                "train_summary": ck.get("train_summary")}

    return {
        "command": command, "cervscan_version": __version__, "out": display_id(str(out)),
        "inputs": [display_id(str(Path(p).resolve())) for p in paths],
        "config": pipe.cfg.to_dict(), "threshold": pipe.cfg.threshold, "provenance": provenance,
        "quality_gate": pipe.cfg.gate.enabled,
        "models": {role: model_info(role) for role in refs if role in pipe.models},
        "versions": {"cervscan": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "segmentation_models_pytorch": smp.__version__, "python": platform.python_version()},
        "device": str(pipe.device), "threads": torch.get_num_threads(), "timings": timings,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "disclaimer": "Decision support only: the result supports and does not replace the clinician's judgement.",
    }


def evaluate(visits: list[str | Path], labels: str | Path, out: str | Path, *, n_bootstrap: int = 2000, seed: int = 0,
             screen_out: str | Path | None = None, cv_run: str | Path | None = None, **screen_kwargs) -> dict:
    """Screen labelled visits, then compare patient decisions and scores with the labels.

    Writes OUT/metrics.json, OUT/roc.png, OUT/confusion.png, OUT/predictions.csv
    (the screen outputs go to OUT/screen unless ``screen_out`` is given).
    Patients with an empty label are skipped and counted; patients whose
    screening failed (decision ``error``) are counted and left out of the metrics, and so are
    patients without an eligible image (decision ``inadequate``: listed in ``inadequate``).
    Duplicated patient ids of the labels file, labelled patients without a visit folder and visit folders
    without a label are named (log) and listed in ``labels_check``. With ``cv_run``, ``in_sample`` says
    what the training run fitted on these same out-of-fold scores (calibration, threshold).
    """
    import csv

    from .errors import DataError
    from .io import atomic_write_csv, atomic_write_json
    from .metrics import full_report, plot_confusion, plot_roc
    from .validation import label_check

    out = Path(out)
    lab_path = Path(labels)
    from .io import read_labels

    label_notes: list[dict] = []
    rows, unlabelled = read_labels(lab_path, label_notes)
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
            raise CervscanError(f"{cv}/folds.csv: cannot read ({e.strerror}); --cv-run needs a train-decision or "
                                f"'train-cls --folds K' run") from None
        from .io import discover_visits

        all_visits = discover_visits(visits)
        visit_ids = [v.patient_id for v in all_visits]
        without_images = [v.patient_id for v in all_visits if not v.images]
        not_in_cv_run = sorted(v.patient_id for v in all_visits if v.patient_id not in fold_of)
        if not_in_cv_run:
            log.warning("%d visit folder(s) have no fold in %s/folds.csv and are not evaluated: %s",
                        len(not_in_cv_run), cv, ", ".join(not_in_cv_run[:20]) + (" ..." if len(not_in_cv_run) > 20 else ""))
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
        visit_ids = [p["patient_id"] for p in screened]
        without_images = [p["patient_id"] for p in screened if not p.get("n_images")]
        not_in_cv_run = []
    labels_check = label_check(rows, label_notes, visit_ids, without_images=without_images, labels=str(lab_path))
    thr = run["threshold"]
    preds, errors, not_labelled, inadequate = [], [], [], []
    for p in screened:
        pid = p["patient_id"]
        if pid not in lab:
            not_labelled.append(pid)
            continue
        if p["decision"] == "inadequate":
            inadequate.append({"patient_id": pid, "label": lab[pid], "reason": p.get("reason", "")})
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
        "patients_inadequate": len(inadequate), "inadequate": inadequate,
        "quality_gate": run.get("quality_gate", True),
        "models": {k: {"label": v["label"], "sha256": v["sha256"], "path": v["path"]} for k, v in run["models"].items()},
        "operating_point": run["models"]["classifier"].get("operating_point"),
        "labels": str(lab_path), "visits": [str(v) for v in visits], "bootstrap": {"n": n_bootstrap, "seed": seed},
        "labels_check": labels_check,
        "cv_run": str(cv_run) if cv_run else None,
        "cervscan_version": __version__,
    })
    if cv_run:
        m["not_in_cv_run"] = not_in_cv_run
        m["in_sample"] = _cv_in_sample(run)
    atomic_write_csv(out / "predictions.csv", preds, ["patient_id", "label", "source", "score", "decision", "correct",
                                                       "n_used", "quality"])
    plot_roc(y, s, out / "roc.png", sources=[r["source"] for r in preds] if has_src else None,
             point={"threshold": thr, "sensitivity": m["sensitivity"] or 0.0, "specificity": m["specificity"] or 0.0})
    plot_confusion(m["confusion"], out / "confusion.png", title=f"threshold {thr:.3f}")
    atomic_write_json(out / "metrics.json", m)
    return m


def _cv_in_sample(run: dict) -> dict:
    """What ``evaluate --cv-run`` reports on scores the training run fitted something on: the fold models'
    calibration (Platt scaling or temperature) and, unless a threshold was given, their threshold were
    chosen on the pooled out-of-fold scores that the fold models reproduce here."""
    thr_in_sample = (run.get("provenance") or {}).get("threshold") == "checkpoint"
    op = (run.get("models") or {}).get("classifier", {}).get("operating_point") or {}
    note = ("the fold models' calibration" + (" and threshold (operating point)" if thr_in_sample else "")
            + " were fitted by the training run on these same out-of-fold scores"
            + (f" ({op['evaluated_on']})" if op.get("evaluated_on") else "") + ": "
            + ("sensitivity, specificity, accuracy, PPV, NPV and the confusion at this threshold are in-sample "
               "(optimistic), not a held-out estimate; " if thr_in_sample else "")
            + "the AUC depends only on the ranking, which a Platt calibration (positive slope) keeps; "
              "a temperature (train-cls) can change it slightly")
    return {"calibration": True, "threshold": thr_in_sample, "note": note}


def train_seg(**kwargs) -> dict:
    """``cervscan train-seg``: keyword arguments of :class:`cervscan.seg_training.SegTrainConfig`."""
    from .seg_training import SegTrainConfig, train_seg as _train

    progress = kwargs.pop("progress", None)
    return _train(SegTrainConfig(**kwargs), progress=progress)


def train_cls(**kwargs) -> dict:
    """``cervscan train-cls``: keyword arguments of :class:`cervscan.cls_training.ClsTrainConfig`."""
    from .cls_training import ClsTrainConfig, train_cls as _train

    progress = kwargs.pop("progress", None)
    return _train(ClsTrainConfig(**kwargs), progress=progress)


def train_decision(**kwargs) -> dict:
    """``cervscan train-decision``: keyword arguments of :class:`cervscan.decision_training.DecisionTrainConfig`."""
    from .decision_training import DecisionTrainConfig, train_decision as _train

    progress = kwargs.pop("progress", None)
    return _train(DecisionTrainConfig(**kwargs), progress=progress)


def train_stage(**kwargs) -> dict:
    """``cervscan train-stage``: keyword arguments of :class:`cervscan.stage_training.StageTrainConfig`."""
    from .stage_training import StageTrainConfig, train_stage as _train

    return _train(StageTrainConfig(**kwargs))


def report(out: str | Path, **kwargs) -> list[Path]:
    """``cervscan report``: PDF reports of a screen output folder (see :func:`cervscan.report.write_reports`)."""
    from .report import write_reports

    return write_reports(out, **kwargs)


def batch(root: str | Path, out: str | Path, **kwargs):
    """``cervscan batch``: incremental, crash-safe, locked screening of a growing folder of visits
    (keyword arguments of :func:`cervscan.batch.run_batch`; returns a :class:`cervscan.batch.BatchResult`)."""
    from .batch import run_batch

    return run_batch(root, out, **kwargs)
