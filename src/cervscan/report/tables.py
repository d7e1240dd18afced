"""Reading a ``cervscan screen`` output folder for the reports, and refusing tables that do not belong together.

:func:`load_screen_output` reads ``run.json``, ``patients.csv``, ``images.csv`` and ``skipped.csv``;
:func:`check_tables` makes sure that patients.csv, images.csv and run.json describe the same run (each
patient's image count, screened/failed/deciding counts, models, threshold and score against its rows of
images.csv). Tables of different runs, or of a batch run that is still writing or was interrupted, are
refused with the first mismatch.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cervscan.errors import CervscanError
from cervscan.pipeline.steps import is_eligible
from cervscan.pipeline.vote import aggregate_patient


# --------------------------------------------------------------------------- reading the screen output

@dataclass
class ScreenOutput:
    out: Path
    run: dict
    patients: list[dict]
    images: list[dict]
    skipped: list[dict] = field(default_factory=list)
    ledger: Any = None  # cervscan.files.OutputLedger when reports are written: what cervscan may overwrite

    def images_of(self, pid: str) -> list[dict]:
        return [r for r in self.images if r.get("patient_id") == pid]

    def skipped_of(self, pid: str) -> list[dict]:
        return [r for r in self.skipped if r.get("patient_id") == pid]


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CervscanError(f"{path}: cannot read ({e})") from None


def load_screen_output(out: str | Path) -> ScreenOutput:
    """Read a ``cervscan screen`` output folder; CervscanError if it is not one."""
    out = Path(out)
    if not out.is_dir():
        raise CervscanError(f"{out}: not a folder (give the output folder of 'cervscan screen')")
    missing = [n for n in ("run.json", "patients.csv", "images.csv") if not (out / n).is_file()]
    if missing:
        raise CervscanError(f"{out}: not a cervscan screen output folder (missing {', '.join(missing)}); "
                            "run 'cervscan screen VISITS -o OUT' first")
    try:
        run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CervscanError(f"{out / 'run.json'}: cannot read ({e})") from None
    if not isinstance(run, dict) or run.get("command", "screen") != "screen" or "models" not in run:
        raise CervscanError(f"{out / 'run.json'}: not the record of a 'cervscan screen' run")
    patients = _read_csv(out / "patients.csv")
    if patients and not {"patient_id", "decision"} <= set(patients[0]):
        raise CervscanError(f"{out / 'patients.csv'}: lacks the columns patient_id and decision")
    images = _read_csv(out / "images.csv")
    skipped = _read_csv(out / "skipped.csv") if (out / "skipped.csv").is_file() else []
    so = ScreenOutput(out, run, patients, images, skipped)
    check_tables(so)
    return so


def check_tables(so: ScreenOutput) -> None:
    """CervscanError unless patients.csv, images.csv (and the counts in run.json) describe the same run.

    Each patient must appear once in patients.csv, and images.csv must hold exactly its images: as many
    as ``n_images``, with ``n_used`` screened, ``n_failed`` failed and ``n_eligible`` deciding, the same
    models and threshold, and a score that is the mean of its deciding images' scores. Every image row
    must belong to a patient of patients.csv, once. A report must never print one run's decision beside
    another run's images. Columns an older output lacks are not checked."""
    pat_file, img_file = so.out / "patients.csv", so.out / "images.csv"
    is_batch = bool(so.run.get("batch")) or (so.out / ".cervscan" / "batch.sqlite").is_file()

    def refuse(what: str) -> None:
        if is_batch:
            advice = ("this is a 'cervscan batch' output folder: a batch run may be writing it or was interrupted; "
                      "run the batch again (or wait for it to finish), then the report")
        else:
            advice = ("the tables come from different runs; screen again ('cervscan screen VISITS -o OUT') "
                      "instead of mixing tables of different output folders")
        raise CervscanError(f"{pat_file} and {img_file} do not belong together: {what}; {advice}")

    if so.images and not {"patient_id", "status"} <= set(so.images[0]):
        raise CervscanError(f"{img_file}: lacks the columns patient_id and status")
    rows_of = _rows_by_patient(so, refuse)
    for p in so.patients:
        _check_patient(p, rows_of[p.get("patient_id", "")], refuse)
    if not is_batch:  # a batch rewrites its tables before run.json
        _check_run_counts(so)


def _rows_by_patient(so: ScreenOutput, refuse: Callable[[str], None]) -> dict[str, list[dict]]:
    """The images.csv rows of each patient of patients.csv; ``refuse`` a patient listed twice, an image
    listed twice, or an image of a patient patients.csv lacks."""
    by_pid: dict[str, list[dict]] = {}
    for p in so.patients:
        pid = p.get("patient_id", "")
        if pid in by_pid:
            refuse(f"patient {pid!r} appears more than once in patients.csv")
        by_pid[pid] = []
    seen: set[tuple[str, str]] = set()
    for r in so.images:
        pid, name = r.get("patient_id", ""), r.get("image", "")
        if pid not in by_pid:
            refuse(f"images.csv has image {name!r} of patient {pid!r}, who is not in patients.csv")
        if name and (pid, name) in seen:
            refuse(f"image {name!r} of patient {pid!r} appears more than once in images.csv")
        seen.add((pid, name))
        by_pid[pid].append(r)
    return by_pid


def _check_patient(p: dict, rows: list[dict], refuse: Callable[[str], None]) -> None:
    """``refuse`` unless one patient's row of patients.csv agrees with its rows of images.csv."""
    ok = [r for r in rows if r.get("status") == "ok"]
    eligible = [r for r in ok if is_eligible(r)]
    who = f"patient {p.get('patient_id', '')!r}"
    decision = (p.get("decision") or "").strip()
    counts = [("n_images", len(rows), "image(s)")]
    if decision != "error":  # a visit that could not be decided keeps its images but counts none as used
        counts += [("n_used", len(ok), "screened image(s)"), ("n_failed", len(rows) - len(ok), "failed image(s)"),
                   ("n_eligible", len(eligible), "image(s) used for the decision")]
    for col, have, words in counts:
        want = p.get(col)
        if want not in (None, "") and _i(want, -1) != have:
            refuse(f"{who}: patients.csv counts {want} {words} ({col}), images.csv has {have}")
    for col in ("stage_model", "cervix_model", "seg_model", "cls_model"):
        want = (p.get(col) or "").strip()
        for r in rows:
            got = (r.get(col) or "").strip()
            if want and got and got != want:
                refuse(f"{who}: patients.csv has {col} {want}, images.csv has {got} (image {r.get('image', '')!r})")
    thr = _f(p.get("threshold"))
    for r in rows:
        t = _f(r.get("threshold"))
        if thr is not None and t is not None and abs(t - thr) > 1e-6:
            refuse(f"{who}: patients.csv has threshold {thr:g}, images.csv has {t:g} (image {r.get('image', '')!r})")
    _check_score(who, decision, _f(p.get("score")), eligible, refuse)


def _check_score(who: str, decision: str, score: float | None, eligible: list[dict],
                 refuse: Callable[[str], None]) -> None:
    """``refuse`` unless a patient's score is the mean of its deciding images' scores."""
    if decision in ("severe", "mildly_normal") and score is None:
        refuse(f"{who}: patients.csv has decision {decision} but no score")
    if score is None or decision == "error":
        return
    image_scores = [_f(r.get("score")) for r in eligible]
    if not image_scores or any(s is None for s in image_scores):
        refuse(f"{who}: patients.csv has score {score:.6f}, images.csv has no score for "
               f"{sum(s is None for s in image_scores) or 'any'} of the images used")
    if not _score_matches(score, [s for s in image_scores if s is not None]):
        mean = float(np.mean([s for s in image_scores if s is not None]))
        refuse(f"{who}: patients.csv has score {score:.6f}, the mean of its {len(image_scores)} image "
               f"score(s) in images.csv is {mean:.6f}")


def _check_run_counts(so: ScreenOutput) -> None:
    """CervscanError unless run.json counts as many patients and images as the tables have."""
    counts = so.run.get("counts")
    if not isinstance(counts, dict):
        return
    for key, have, name in (("patients", len(so.patients), "patients.csv"), ("images", len(so.images), "images.csv")):
        want = counts.get(key)
        if isinstance(want, int) and want != have:
            raise CervscanError(f"{so.out / 'run.json'} and {so.out / name} do not belong together: run.json "
                                f"counts {want} {key}, {name} has {have}; screen again ('cervscan screen "
                                "VISITS -o OUT') instead of mixing files of different output folders")


def _score_matches(score: float, image_scores: list[float]) -> bool:
    """Whether a patient score is the mean of its image scores, of the probabilities or of their log-odds
    (either pooling; the tables keep 6 decimals)."""
    for pooling in ("probability", "logit"):
        s, _ = aggregate_patient(image_scores, 0.5, pooling)
        if s is not None and abs(s - score) <= 1e-3:
            return True
    # log-odds of scores rounded to 0 or 1 are not known to 1e-3: those cannot be checked
    return any(s < 1e-4 or s > 1 - 1e-4 for s in image_scores)


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def _i(v: Any, default: int = 0) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return default


def _true(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")
