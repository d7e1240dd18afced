"""What a Pipeline is built from: every model resolved and loaded for its role, and the configuration
resolved (checkpoint < config file < options, every value checked, where each came from recorded).
:meth:`cervscan.pipeline.steps.Pipeline.from_config` calls :func:`resolve`. No torch import at load."""

from __future__ import annotations

import dataclasses
import logging
import time

from cervscan.config import (
    CROP_MODES,
    SETTINGS,
    ScreenConfig,
    check_layer,
    gate_from,
    load_config_file,
    resolve_choice,
    screen_settings,
    voting_from,
)
from cervscan.device import resolve_device
from cervscan.errors import CervscanError
from cervscan.models import registry
from cervscan.models.loading import load_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Resolved:
    """Everything a Pipeline is made of, and where it came from."""

    models: dict  # role -> cervscan.models.loading.LoadedModel
    cfg: ScreenConfig
    device: object  # torch.device
    refs: dict  # role -> cervscan.models.registry.ResolvedModel
    provenance: dict  # setting -> where its value came from
    seconds: float  # to resolve and load



def _warn_unvalidated(ref, ckpt: dict) -> None:
    """A classifier that failed its validation, or one not shipped with cervscan that records none (installed
    or given with --force), screens with a warning: its decisions may be no better than chance."""
    val = ckpt.get("validation")
    if isinstance(val, dict) and not val.get("passed", False):
        log.warning("%s: this classifier failed its validation (cross-validated patient AUC %s, 95 %% CI %s-%s) "
                    "and was kept with --force: its decisions may be no better than chance",
                    ref.path, val.get("auc"), val.get("ci_low"), val.get("ci_high"))
    elif not isinstance(val, dict) and getattr(ref, "source", "") != "shipped":
        log.warning("%s: this classifier records no validation (it was not shown to be better than chance on "
                    "held-out patients); check it with 'cervscan evaluate' before relying on it", ref.path)

def resolve(*, seg_model: str | None = None, cls_model: str | None = None, cervix_model: str | None = None,
                  stage_model: str | None = None, config_file: str | None = None, overrides: dict | None = None,
                  device: str | None = None, num_workers: int | None = None, batch_images: int | None = None,
                  write_masks: bool = True, write_overlays: bool = True, use_stage: bool = True):
    """Resolve and load every model and resolve the configuration (checkpoint < config file < options).

    ``overrides``: setting -> value given on the command line (named options and ``--set``); ``device``,
    ``num_workers`` and ``batch_images`` count as such options too."""
    overrides = dict(overrides or {})
    overrides |= {k: v for k, v in (("num_workers", num_workers), ("batch_images", batch_images)) if v is not None}
    check_layer(overrides, SETTINGS, "option")  # every option, before any model is loaded
    file_cfg = load_config_file(config_file) if config_file else {}
    dev = resolve_device(overrides.pop("device", None) or device or file_cfg.get("device") or "auto")
    t0 = time.time()
    refs = {"segmenter": registry.resolve("segmenter", seg_model), "classifier": registry.resolve("classifier", cls_model)}
    models = {role: load_model(role, refs[role].path, dev, refs[role]) for role in ("segmenter", "classifier")}
    _warn_unvalidated(refs["classifier"], models["classifier"].ckpt)
    voting, threshold, provenance = voting_from(models["classifier"].ckpt, file_cfg, overrides, models["segmenter"].ckpt)
    crop = resolve_choice("crop", CROP_MODES, "frame", models["classifier"].ckpt, file_cfg, overrides, provenance)
    if crop == "cervix":
        refs["cervix"] = registry.resolve("cervix", cervix_model)
        models["cervix"] = load_model("cervix", refs["cervix"].path, dev, refs["cervix"])
    if use_stage:
        try:
            refs["stage"] = registry.resolve("stage", stage_model)
        except CervscanError as e:
            if stage_model:
                raise
            log.warning("no exam-stage model (%s); stage left empty", e)
        else:
            models["stage"] = load_model("stage", refs["stage"].path, dev, refs["stage"])
    gate = gate_from(file_cfg, overrides, provenance, models["classifier"].ckpt)
    view = resolve_choice("classify_view", ("crop", "frame"), "crop", models["classifier"].ckpt, file_cfg,
                           overrides, provenance)
    cfg = ScreenConfig(voting=voting, threshold=threshold, device=str(dev), crop=crop, gate=gate, classify_view=view,
                       **screen_settings(file_cfg, overrides, provenance),
                       write_masks=write_masks, write_overlays=write_overlays)
    return Resolved(models, cfg, dev, refs, provenance, time.time() - t0)
