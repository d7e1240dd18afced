"""Is a trained classifier better than chance? One rule for every command that trains a classifier.

A classifier passes when the lower end of the bootstrap 95 % confidence interval of its held-out
(cross-validated) patient AUC lies above 0.5. A training run whose classifier does not pass says so,
writes no installable model (no ``model.pt``) and raises :class:`ValidationFailed` (the command line exits
with :data:`cervscan.errors.EXIT_NOT_VALIDATED`), unless it is forced; the checkpoint then records
``forced: true``. Every classifier checkpoint records its validation (``ckpt["validation"]``) and
``cervscan models install`` refuses one that records none or a failed one, unless forced
(:func:`install_problem`).

The labels of a training or evaluation run are checked against the visit folders the same way
(:func:`label_check`): duplicated patient ids, labelled patients without a folder (or without an image) and
folders without a label are named in the output and recorded in the run's ``metrics.json``.
"""

from __future__ import annotations

import logging

import numpy as np

from cervscan.errors import CervscanError
from cervscan.metrics import bootstrap_auc_ci

log = logging.getLogger(__name__)

#: The pass rule, recorded with every validation.
RULE = "passed: the lower end of the bootstrap 95 % CI of the held-out patient AUC is above 0.5"


class ValidationFailed(CervscanError):
    """A trained classifier is no better than chance on its held-out patients; no installable model was
    written. ``validation``: the record (see :func:`classifier_validation`); ``metrics``: the run's
    metrics (also in its ``metrics.json``)."""

    def __init__(self, message: str, validation: dict, metrics: dict | None = None):
        super().__init__(message)
        self.validation = validation
        self.metrics = metrics or {}


def classifier_validation(y_true, scores, *, method: str, n_bootstrap: int = 2000, seed: int = 0,
                          force: bool = False) -> dict:
    """The validation record of a classifier from its held-out patient scores.

    ``scores``: one score per patient, or repeats x patients (repeated cross-validation: the AUC is the
    mean of the repeats' AUCs and each bootstrap resample draws the same patients in every repeat).
    Returns ``{auc, ci_low, ci_high, n_patients, n_severe, method, passed, forced, rule}``; ``forced`` is
    True when the classifier did not pass and ``force`` kept it anyway.
    """
    from sklearn.metrics import roc_auc_score  # lazy: sklearn, out of --help

    y = np.asarray(y_true, dtype=int)
    S = np.atleast_2d(np.asarray(scores, dtype=float))
    if len(np.unique(y)) < 2:
        raise CervscanError("validation needs held-out patients of both classes")
    auc = float(np.mean([roc_auc_score(y, row) for row in S]))
    lo, hi = bootstrap_auc_ci(y, S, n=n_bootstrap, seed=seed)
    passed = bool(lo > 0.5)
    return {"auc": auc, "ci_low": lo, "ci_high": hi, "n_patients": int(y.size), "n_severe": int(y.sum()),
            "method": method, "passed": passed, "forced": bool(force and not passed), "rule": RULE}


def describe(v: dict) -> str:
    """One line: the AUC, its CI, the patients, and what it means."""
    head = (f"held-out patient AUC {v['auc']:.3f} (95 % CI {v['ci_low']:.3f}-{v['ci_high']:.3f}; "
            f"{v['n_patients']} patients, {v['n_severe']} severe; {v['method']})")
    if v["passed"]:
        return head + ": better than chance"
    if v["auc"] < 0.5:
        return head + ": BELOW CHANCE, it ranks severe patients below mildly normal ones"
    return head + ": NO BETTER THAN CHANCE, the CI includes 0.5"


def failure_message(v: dict, *, no_model: str) -> str:
    """What a failed validation means for the run (``no_model``: what was not written)."""
    return (f"the classifier failed its validation: {describe(v)}. {no_model} Do not use it to screen. "
            f"Use more (or better labelled) patients; --force writes the model anyway and records that it "
            f"was forced.")


def enforce(v: dict, metrics: dict, *, no_model: str) -> None:
    """Raise :class:`ValidationFailed` for a failed validation that was not forced (a forced one is in the
    returned metrics and the checkpoint: ``validation.forced``)."""
    if v["passed"] or v["forced"]:
        return
    raise ValidationFailed(failure_message(v, no_model=no_model), v, metrics)


def install_problem(ck: dict) -> str | None:
    """Why a classifier checkpoint must not become the default (None: it may): it records no validation, or
    its recorded validation says it is no better than chance."""
    v = ck.get("validation")
    if not isinstance(v, dict) or "passed" not in v:
        return ("it records no validation (trained before cervscan checked that a classifier is better than "
                "chance, or not by a cervscan training command)")
    if v.get("passed") is True:
        return None
    try:
        return f"its recorded validation failed: {describe(v)}" + (" (it was forced at training)" if v.get("forced") else "")
    except (KeyError, TypeError, ValueError):
        return "its recorded validation failed"


# --------------------------------------------------------------------------- labels against visit folders

def label_check(rows: list[dict], label_notes: list[dict], visit_ids, *, without_images=(), labels: str = "",
                what: str = "") -> dict:
    """Compare the labelled rows (``read_labels``) with the visit folders found.

    ``label_notes``: what ``read_labels`` noted (duplicated ids); ``visit_ids``: patient ids of the visit
    folders; ``without_images``: ids of folders without an image. Logs each finding with the patient ids and
    returns the record for ``metrics.json``: ``duplicates``, ``labelled_without_folder``,
    ``labelled_without_images``, ``folders_without_label``."""
    labelled = {r["patient_id"] for r in rows}
    visit_ids = list(dict.fromkeys(visit_ids))
    no_images = sorted(set(without_images) & labelled)
    rec = {
        "labels": labels,
        "duplicates": [n for n in label_notes if n.get("kind") == "duplicate"],
        "labelled_without_folder": sorted(labelled - set(visit_ids)),
        "labelled_without_images": no_images,
        "folders_without_label": sorted(set(visit_ids) - labelled),
    }
    for line in label_check_lines(rec, what=what):
        log.warning("%s", line)
    return rec


def _names(ids: list[str], limit: int = 20) -> str:
    return ", ".join(ids[:limit]) + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


def label_check_lines(rec: dict | None, *, what: str = "", limit: int = 20) -> list[str]:
    """The findings of :func:`label_check`, one line each, naming the patients (at most ``limit``)."""
    if not rec:
        return []
    src = f"{rec.get('labels')}: " if rec.get("labels") else ""
    out = []
    dups = rec.get("duplicates") or []
    if dups:
        out.append(f"{src}{len(dups)} patient id(s) listed more than once (the first row is used): "
                   + "; ".join(f"{d['patient_id']} (lines {', '.join(map(str, d['rows']))})" for d in dups[:limit])
                   + (f" ... ({len(dups)} in all)" if len(dups) > limit else ""))
    if rec.get("labelled_without_folder"):
        ids = rec["labelled_without_folder"]
        out.append(f"{src}{len(ids)} labelled patient(s) have no visit folder{what}: {_names(ids, limit)}")
    if rec.get("labelled_without_images"):
        ids = rec["labelled_without_images"]
        out.append(f"{src}{len(ids)} labelled patient(s) have a visit folder without images: {_names(ids, limit)}")
    if rec.get("folders_without_label"):
        ids = rec["folders_without_label"]
        out.append(f"{len(ids)} visit folder(s) have no label in {rec.get('labels') or 'the labels file'}: "
                   f"{_names(ids, limit)}")
    return out
