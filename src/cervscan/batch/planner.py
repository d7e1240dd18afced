"""What a batch run screens: the fingerprints of each visit and the plan.

A visit is screened again only when its *files* fingerprint (folder, and name, size and mtime_ns of every
image; no hashing), its *models* fingerprint (sha256 of every model used) or its *config* fingerprint (the
resolved :class:`~cervscan.config.ScreenConfig` without the fields in :data:`RUNTIME_ONLY`, which change
speed but not results, plus the cervscan version) differ from the journal's. A visit whose output files
could not be written is recorded with a files fingerprint starting :data:`RETRY` and is screened again
(``changed_because``: ``retry``). :func:`inputs_key` lets a night with nothing new reuse the last finished
run's models and config fingerprints without loading any model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cervscan import __version__
from cervscan import files as cio
from cervscan.batch.journal import Stored
from cervscan.config import ScreenConfig
from cervscan.errors import CervscanError
from cervscan.models.registry import resolve, site_files
from cervscan.pipeline.screening import refuse_overlapping_visits

log = logging.getLogger(__name__)

#: ScreenConfig fields that change speed, not results: left out of the config fingerprint.
RUNTIME_ONLY = ("device", "num_workers", "batch_images", "classify_batch")
#: Start of the files fingerprint of a visit whose output files could not be written: the next run screens
#: it again (``changed_because``: ``retry``).
RETRY = "retry:"


# --------------------------------------------------------------------------- fingerprints

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def files_fingerprint(visit) -> str:
    """The visit's folder, and name, size and mtime_ns of each image (no content hashing), and its error."""
    items = []
    for p in visit.images:
        try:
            st = p.stat()
            items.append([p.name, st.st_size, st.st_mtime_ns])
        except OSError as e:
            items.append([p.name, None, e.strerror])
    return _digest({"folder": str(Path(visit.folder).resolve()), "images": items, "error": visit.error or ""})


def models_fingerprint(refs: dict, roles) -> str:
    """sha256 of every model the pipeline uses, by role."""
    return _digest({role: refs[role].sha256 for role in sorted(roles)})


def config_fingerprint(cfg) -> str:
    """The resolved screening configuration (without speed-only fields) and the cervscan version."""
    d = cfg.to_dict()
    for k in RUNTIME_ONLY:
        d.pop(k, None)
    return _digest({"config": d, "cervscan": __version__})


def inputs_key(opts: dict) -> str:
    """A key of everything the resolved models and configuration depend on, computed without torch: each
    role's resolved file and sha256 (or why none resolves), the config file's bytes, the options, the
    default screening configuration and the cervscan version. Equal keys mean equal models and
    configuration fingerprints (the converse need not hold). The site settings (``--site RUN`` or installed with
    the classifier, :func:`~cervscan.models.registry.site_files`) count as a model file."""
    models: dict[str, Any] = {}
    try:
        cls_model, site_ref = site_files(opts.get("site"), opts.get("cls_model"))
        site = [str(site_ref.path), site_ref.sha256] if site_ref else None
    except CervscanError as e:
        cls_model, site = opts.get("cls_model"), f"unresolved: {e}"
    roles = {"segmenter": opts.get("seg_model"), "classifier": cls_model, "cervix": opts.get("cervix_model")}
    if opts.get("use_stage", True):
        roles["stage"] = opts.get("stage_model")
    for role, explicit in roles.items():
        try:
            r = resolve(role, explicit)
            models[role] = [str(r.path), r.sha256]
        except CervscanError as e:
            models[role] = f"unresolved: {e}"
    cfg_file = opts.get("config_file")
    cfg = None
    if cfg_file:
        try:
            cfg = hashlib.sha256(Path(cfg_file).read_bytes()).hexdigest()
        except OSError as e:
            cfg = f"unreadable: {e.strerror}"
    defaults = {k: v for k, v in ScreenConfig().to_dict().items() if k not in RUNTIME_ONLY}  # the code's own
    other = {k: v for k, v in opts.items() if k not in ("device", "num_workers", "batch_images", "config_file")}
    return _digest({"models": models, "config_file": cfg, "options": other, "defaults": defaults,
                    "cervscan": __version__, **({"site": site} if site else {})})


# --------------------------------------------------------------------------- plan

@dataclass
class Plan:
    new: list = field(default_factory=list)
    changed: list = field(default_factory=list)
    unchanged: list = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # patient_id -> what changed
    fps: dict[str, dict[str, str]] = field(default_factory=dict)  # patient_id -> fingerprints now

    @property
    def todo(self) -> list:
        """Visits to screen, in discovery (patient-id) order."""
        return sorted(self.new + self.changed, key=lambda v: v.patient_id)

    def reason_counts(self) -> dict[str, int]:
        """How many changed visits each reason (files, models, config, retry) applies to."""
        why: dict[str, int] = {}
        for r in self.reasons.values():
            for k in r:
                why[k] = why.get(k, 0) + 1
        return why


def make_plan(visits: list, stored: dict[str, Stored], models_fp: str, config_fp: str) -> Plan:
    """Split the visits into new, changed (with the reasons) and unchanged; list the removed ones."""
    plan = Plan()
    for v in visits:
        fps = {"files": files_fingerprint(v), "models": models_fp, "config": config_fp}
        plan.fps[v.patient_id] = fps
        old = stored.get(v.patient_id)
        if old is None:
            plan.new.append(v)
            continue
        why = [k for k in ("files", "models", "config") if getattr(old, f"{k}_fp") != fps[k]]
        if old.files_fp == RETRY + fps["files"]:
            why = ["retry" if k == "files" else k for k in why]
        if why:
            plan.changed.append(v)
            plan.reasons[v.patient_id] = why
        else:
            plan.unchanged.append(v)
    present = {v.patient_id for v in visits}
    plan.removed = sorted(pid for pid in stored if pid not in present)
    return plan


def log_plan(plan: Plan, stored: dict[str, Stored]) -> None:
    """One line of counts (the fault-injection tests wait for its ``plan:``), one per removed visit."""
    why = plan.reason_counts()
    log.info("plan: %d new, %d changed%s, %d unchanged, %d removed (kept)", len(plan.new), len(plan.changed),
             f" ({', '.join(f'{k} {n}' for k, n in sorted(why.items()))})" if why else "", len(plan.unchanged),
             len(plan.removed))
    for pid in plan.removed:
        log.info("visit %s: folder %s is no longer in ROOT; its last result is kept", pid, stored[pid].folder)


def discover(root: Path, out: Path | None = None) -> tuple[list, list[dict]]:
    """Visits under ROOT and stray files. An empty ROOT (no visit folder yet) has no visits. A visit folder
    that leads (through a link) into OUT is not screened: it gets decision ``error`` with the reason."""
    stray: list[tuple[Path, str]] = []
    visits = cio.discover_visits([root], stray)
    if len(visits) == 1 and not visits[0].images and Path(visits[0].folder) == root:
        log.info("%s: no visit folders yet", cio.display_id(str(root)))
        visits = []
    if out is not None:
        refuse_overlapping_visits(visits, out)
    return visits, [{"patient_id": "", "file": cio.display_id(str(p)), "reason": why} for p, why in stray]
