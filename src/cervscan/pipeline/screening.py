"""What a screening run needs around the pipeline: output-folder checks, each visit's patient row, and
run.json."""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from cervscan import __version__
from cervscan.errors import CervscanError
from cervscan.files import clean_text, display_id, overlap_note

log = logging.getLogger(__name__)

def probe_writable(out: Path) -> None:
    """Create ``out`` and check that a file can be written in it (a uniquely named probe, removed)."""
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
        log.error("visit %s: cannot decide (%s: %s)", patient_id, type(e).__name__, e)
        return {"patient_id": patient_id, "decision": "error", "score": None, "threshold": pipe.cfg.threshold,
                "n_images": len(records), "n_used": 0, "n_eligible": 0, "n_failed": len(records),
                "error": clean_text(f"cannot decide ({type(e).__name__}: {e})"), "cervscan_version": __version__}





def run_record(command: str, out: Path, paths, pipe, refs: dict, provenance: dict, timings: dict) -> dict:
    """run.json: resolved configuration, every model's file and sha256, the site settings (path, name, sha256;
    None without), versions, device, timings."""
    import segmentation_models_pytorch as smp  # lazy: torch (api imports this module)
    import timm  # lazy: timm
    import torch  # lazy: torch

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
        "site": getattr(pipe, "site", None),  # the site settings screened with (--site RUN, or installed)
        "quality_gate": pipe.cfg.gate.enabled,
        "models": {role: model_info(role) for role in refs if role in pipe.models},
        "versions": {"cervscan": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "segmentation_models_pytorch": smp.__version__, "python": platform.python_version()},
        "device": str(pipe.device), "threads": torch.get_num_threads(), "timings": timings,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "disclaimer": "Decision support only: the result supports and does not replace the clinician's judgement.",
    }
