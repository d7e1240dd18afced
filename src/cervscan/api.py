"""Library entry points. Each takes keyword arguments or a config and returns plain objects."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cervscan import __version__
from cervscan.batch import BatchResult, run_batch
from cervscan.config import SETTINGS, check_layer
from cervscan.errors import CervscanError, DataError, exit_code_of
from cervscan.device import resolve_device
from cervscan.files import OutputLedger, atomic_write_csv, atomic_write_json, check_overlap, discover_visits, display_id, read_labels
from cervscan.metrics import full_report, plot_confusion, plot_roc
from cervscan.models import registry
from cervscan.pipeline.build import config_layers
from cervscan.pipeline.outputs import OutputWriter
from cervscan.pipeline.steps import Pipeline
from cervscan.pipeline.screening import decide_patient, probe_writable, refuse_overlapping_visits, run_record
from cervscan.report import write_reports
from cervscan.training.configs import classifier_config, seg_config
from cervscan.training.validation import label_check

log = logging.getLogger(__name__)

from cervscan.pipeline.steps import PATIENT_COLUMNS  # noqa: E402,F401 - re-exported


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


def screen(paths: list[str | Path], out: str | Path, *, seg_model: str | None = None, cls_model: str | None = None,
           cervix_model: str | None = None, stage_model: str | None = None, use_stage: bool = True,
           config_file: str | None = None, overrides: dict | None = None, device: str | None = None,
           num_workers: int | None = None, batch_images: int | None = None, write_masks: bool = True,
           write_overlays: bool = True, threads: int | None = None, site: str | Path | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> ScreenResult:
    """Screen visit folders and write patients.csv, images.csv, masks, overlays and run.json to ``out``.
    ``site``: a ``cervscan adapt`` run folder, its model.pt the classifier and its site.toml the site settings
    (:func:`cervscan.pipeline.build.config_layers`)."""
    import torch  # lazy: torch

    t0 = time.time()
    # a bad option, config file or device fails before anything is written
    given = {"num_workers": num_workers, "batch_images": batch_images}
    check_layer({**(overrides or {}), **{k: v for k, v in given.items() if v is not None}}, SETTINGS, "option")
    _, _, site_cfg, file_cfg = config_layers(site=site, cls_model=cls_model, config_file=config_file)
    spec = (overrides or {}).get("device") or device or file_cfg.get("device") or site_cfg.get("device") or "auto"
    if str(spec).strip().lower() not in ("auto", "cpu"):  # those two never fail; the pipeline resolves them
        resolve_device(spec)
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
    pipe = Pipeline.from_config(
        seg_model=seg_model, cls_model=cls_model, cervix_model=cervix_model, stage_model=stage_model,
        config_file=config_file, overrides=overrides, device=device, num_workers=num_workers,
        batch_images=batch_images, write_masks=write_masks, write_overlays=write_overlays, use_stage=use_stage,
        site=site)
    cfg = pipe.cfg
    t_loaded = time.time()

    writer.masks, writer.overlays = cfg.write_masks, cfg.write_overlays
    for v in visits:
        writer.add_visit(v.patient_id, [display_id(p.name) for p in v.images])
    items = [(v.patient_id, p) for v in visits for p in v.images]
    records = _screen_images(pipe, writer, items, out, progress)
    t_screened = time.time()

    by_pid: dict[str, list[dict]] = {}
    for r in records:
        by_pid.setdefault(r["patient_id"], []).append(r)
    patients = [decide_patient(pipe, v.patient_id, by_pid.get(v.patient_id, []), v.error or "") for v in visits]
    skipped = [{"patient_id": "", "file": display_id(str(p)), "reason": why} for p, why in stray]
    skipped += [{"patient_id": v.patient_id, "file": name, "reason": why} for v in visits for name, why in v.skipped]

    run = run_record("screen", out, paths, pipe, pipe.refs, pipe.provenance, {
        "load_models_s": round(pipe.load_seconds, 3), "screen_s": round(t_screened - t_loaded, 3),
        "total_s": round(time.time() - t0, 3), "images_per_s": round(len(items) / max(1e-9, t_screened - t_loaded), 3)})
    run["counts"] = _counts(patients, records, skipped)
    exit_code = run["exit_code"] = exit_code_of(run["counts"]["images_failed"] + run["counts"]["patients_error"],
                                                run["counts"]["inadequate"])
    try:
        writer.finish(patients, records, skipped, run)
    except OSError as e:
        raise CervscanError(f"{display_id(str(out))}: cannot write the result tables ({e.strerror or e}); "
                            "fix this and run again") from None
    return ScreenResult(out, patients, records, skipped, run, exit_code)


def _screen_images(pipe, writer, items: list, out: Path, progress) -> list[dict]:
    """Every image through the pipeline, its masks and overlays written; its record (with the models' labels)."""

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
    return records


def _counts(patients: list[dict], records: list[dict], skipped: list[dict]) -> dict:
    """run.json's ``counts`` of a screen run."""
    return {"patients": len(patients), "images": len(records), "images_failed": sum(r["status"] != "ok" for r in records),
            "patients_error": sum(p["decision"] == "error" for p in patients),
            "severe": sum(p["decision"] == "severe" for p in patients),
            "mildly_normal": sum(p["decision"] == "mildly_normal" for p in patients),
            "inadequate": sum(p["decision"] == "inadequate" for p in patients),
            "images_ineligible": sum(r["status"] == "ok" and r.get("eligible") is False for r in records),
            "no_cervix": sum(r.get("cervix_found") is False for r in records),
            "skipped_files": len(skipped)}


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
    if cv_run and screen_kwargs.get("site"):
        raise CervscanError(f"--site {screen_kwargs['site']} and --cv-run {cv_run}: give one (--cv-run screens each "
                            f"patient with its fold's classifier)")
    out = Path(out)
    lab_path = Path(labels)
    label_notes: list[dict] = []
    rows, unlabelled = read_labels(lab_path, label_notes)
    lab = {r["patient_id"]: r["label"] for r in rows}
    src = {r["patient_id"]: r["source"] for r in rows}
    screen_dir = Path(screen_out) if screen_out else out / "screen"
    if cv_run:
        screened, run, visit_ids, without_images, not_in_cv_run = _screen_cv_folds(visits, Path(cv_run), screen_dir,
                                                                                  screen_kwargs)
    else:
        res = screen(visits, screen_dir, **screen_kwargs)
        screened, run = res.patients, res.run
        visit_ids = [p["patient_id"] for p in screened]
        without_images = [p["patient_id"] for p in screened if not p.get("n_images")]
        not_in_cv_run = []
    labels_check = label_check(rows, label_notes, visit_ids, without_images=without_images, labels=str(lab_path))
    thr = run["threshold"]
    preds, errors, not_labelled, inadequate = _labelled_outcomes(screened, lab, src)
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
        "operating_point": run["models"]["classifier"].get("operating_point"), "site": run.get("site"),
        "labels": str(lab_path), "visits": [str(v) for v in visits], "bootstrap": {"n": n_bootstrap, "seed": seed},
        "labels_check": labels_check,
        "cv_run": str(cv_run) if cv_run else None,
        "cervscan_version": __version__,
    })
    if cv_run:
        m["not_in_cv_run"] = not_in_cv_run
        m["in_sample"] = _cv_in_sample(run)
    _write_evaluation(out, preds, m, thr, has_src)
    return m


def _screen_cv_folds(visits: list[str | Path], cv: Path, screen_dir: Path, screen_kwargs: dict):
    """Cross-validation reproduction: each patient is screened by the fold model of ``cv`` (a training run with
    folds.csv) that did not train on it. Returns the screened patients, a screen run's run.json, the visit
    folders' patient ids, those without images and those without a fold."""
    try:
        with open(cv / "folds.csv", newline="", encoding="utf-8") as f:
            fold_of = {r["patient_id"]: int(r["fold"]) for r in csv.DictReader(f)}
    except OSError as e:
        raise CervscanError(f"{cv}/folds.csv: cannot read ({e.strerror}); --cv-run needs a 'train-cls' run "
                            f"with folds (the frozen recipe always has them; --recipe finetune with --folds K)") from None
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
    return screened, run, visit_ids, without_images, not_in_cv_run


def _labelled_outcomes(screened: list[dict], lab: dict, src: dict):
    """The screened patients sorted by outcome: predictions (labelled, scored), failures, patients without a
    label and inadequate patients (no eligible image). A DataError when no patient has a prediction."""
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
    return preds, errors, not_labelled, inadequate


def _write_evaluation(out: Path, preds: list[dict], m: dict, thr: float, has_src: bool) -> None:
    """OUT/predictions.csv, roc.png, confusion.png and metrics.json of an evaluation."""
    y = [r["label"] for r in preds]
    s = [r["score"] for r in preds]
    atomic_write_csv(out / "predictions.csv", preds, ["patient_id", "label", "source", "score", "decision", "correct",
                                                       "n_used", "quality"])
    plot_roc(y, s, out / "roc.png", sources=[r["source"] for r in preds] if has_src else None,
             point={"threshold": thr, "sensitivity": m["sensitivity"] or 0.0, "specificity": m["specificity"] or 0.0})
    plot_confusion(m["confusion"], out / "confusion.png", title=f"threshold {thr:.3f}")
    atomic_write_json(out / "metrics.json", m)


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
    """``cervscan train-seg``: keyword arguments of :class:`cervscan.training.configs.SegTrainConfig`; those left
    out are the shipped recipe of the ``target`` (:func:`cervscan.training.configs.seg_config`)."""
    from cervscan.training.segmenter import train_seg as _train  # lazy: torch

    progress = kwargs.pop("progress", None)
    return _train(seg_config(**kwargs), progress=progress)


def train_cls(recipe: str = "frozen", **kwargs) -> dict:
    """``cervscan train-cls``: the classifier role. ``recipe`` "frozen" (the shipped recipe: keyword arguments of
    :class:`cervscan.training.configs.DecisionTrainConfig`) or "finetune" (those of
    :class:`cervscan.training.configs.ClsTrainConfig`); settings left out are the recipe's defaults."""

    progress = kwargs.pop("progress", None)
    cfg = classifier_config(recipe, **kwargs)
    if recipe == "finetune":
        from cervscan.training.finetune import train_cls as _finetune  # lazy: torch

        return _finetune(cfg, progress=progress)
    from cervscan.training.classifier import train_frozen as _frozen  # lazy: torch

    return _frozen(cfg, progress=progress)


def train_decision(**kwargs) -> dict:
    """Deprecated (one release): ``train_cls(recipe="frozen", ...)``."""
    return train_cls("frozen", **kwargs)


def train_stage(**kwargs) -> dict:
    """``cervscan train-stage``: keyword arguments of :class:`cervscan.training.stage.StageTrainConfig`."""
    from cervscan.training.stage import StageTrainConfig, train_stage as _train  # lazy: torch

    return _train(StageTrainConfig(**kwargs))


def adapt(**kwargs) -> dict:
    """``cervscan adapt``: the patient decision made a site's own from its labelled visits; keyword arguments of
    :class:`cervscan.training.configs.AdaptConfig` (those left out: the frozen recipe's defaults) and
    ``progress(done, total)``. Writes RUN/ (:mod:`cervscan.training.adapt`) and returns its metrics; raises
    :class:`cervscan.training.validation.ValidationFailed` when the adapted decision is no better than chance."""
    from cervscan.training.adapt import adapt as _adapt  # lazy: timm and sklearn, for this command only
    from cervscan.training.configs import AdaptConfig  # lazy: as the other training commands

    progress = kwargs.pop("progress", None)
    return _adapt(AdaptConfig(**kwargs), progress=progress)


def report(out: str | Path, **kwargs) -> list[Path]:
    """``cervscan report``: PDF reports of a screen output folder (see :func:`cervscan.report.write_reports`)."""
    return write_reports(out, **kwargs)


def batch(root: str | Path, out: str | Path, **kwargs) -> BatchResult:
    """``cervscan batch``: incremental, crash-safe, locked screening of a growing folder of visits
    (keyword arguments of :func:`cervscan.batch.run.run_batch`, among them ``log_file`` and ``console_level``
    for a log file of the run). Raises :class:`cervscan.errors.BatchLockedError` when another run holds OUT."""
    return run_batch(root, out, **kwargs)


# --------------------------------------------------------------------------- models

def models_list() -> dict:
    """``cervscan models list``: ``rows``, every shipped and installed model (its manifest entry with
    ``source``, ``tag``, ``folder`` and ``in_use``: whether screening uses it now), and ``active``, per role the
    model screening uses now as (folder, source), or ("", "error: ...") when none resolves; ``settings``: the site
    settings installed with the classifier in use (("", "none") without)."""
    rows = registry.list_models()
    active: dict[str, tuple[str, str]] = {}
    for role in (*registry.ROLES, registry.SITE_ROLE):
        try:
            r = registry.resolve(role) if role != registry.SITE_ROLE else registry.installed_settings()
            active[role] = (str(r.path.parent), r.source) if r else ("", "none (the classifier's own settings)")
        except CervscanError as e:
            active[role] = ("", f"error: {e}")
    rows = [{**r, "in_use": active.get(r["role"], ("", ""))[0] == str(Path(r["folder"]))} for r in rows]
    return {"rows": rows, "active": active}


def models_install(runs: list[str | Path], *, name: str | None = None, force: bool = False) -> dict:
    """``cervscan models install``: each checkpoint loaded as screening loads it, a classifier's validation
    checked (``force`` installs one that failed), then copied and made the default for its role
    (:func:`cervscan.models.registry.install`); an adapt run's classifier with its site settings (refused when the
    run records ``installable: false``, unless ``force``). Returns role -> folder, sha256 (and ``forced``)."""
    return registry.install([Path(r) for r in runs], name=name, force=force)


def models_rollback(role: str | None = None) -> dict:
    """``cervscan models rollback``: back to the shipped model of ``role`` (default every role); the site
    settings installed with a classifier go with it."""
    return registry.rollback(role)


def models_use(role: str, tag: str) -> dict:
    """``cervscan models use``: make the installed model ``tag`` the default for ``role`` again."""
    return registry.use(role, tag)


def models_verify() -> list[tuple[dict, str | None]]:
    """``cervscan models verify``: every shipped and installed model with None when its file matches its
    recorded sha256, else the message saying why not."""
    checked = []
    for r in registry.list_models():
        try:
            registry.verify(Path(r["folder"]) / r["file"], r)
            checked.append((r, None))
        except CervscanError as e:
            checked.append((r, str(e)))
    return checked
