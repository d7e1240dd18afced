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
    site: dict | None = None  # the site settings screened with (run.json's ``site``), None without



def _is_shipped(ref) -> bool:
    """The shipped classifier, also when named by its path (same sha256 as the shipped manifest's)."""
    if getattr(ref, "source", "") == "shipped":
        return True
    shipped = registry.shipped_file(getattr(ref, "role", "classifier"))
    return shipped is not None and shipped.sha256 == getattr(ref, "sha256", None)


def _warn_unvalidated(ref, ckpt: dict) -> None:
    """A classifier that failed its validation, or one not shipped with cervscan that records none (installed
    or given with --force), screens with a warning: its decisions may be no better than chance."""
    val = ckpt.get("validation")
    if isinstance(val, dict) and not val.get("passed", False):
        log.warning("%s: this classifier failed its validation (cross-validated patient AUC %s, 95 %% CI %s-%s) "
                    "and was kept with --force: its decisions may be no better than chance",
                    ref.path, val.get("auc"), val.get("ci_low"), val.get("ci_high"))
    elif not isinstance(val, dict) and not _is_shipped(ref):
        log.warning("%s: this classifier records no validation (it was not shown to be better than chance on "
                    "held-out patients); check it with 'cervscan evaluate' before relying on it", ref.path)

def _warn_not_installable(ref, ckpt: dict) -> None:
    """A site's adapted classifier whose run records ``installable: false`` screens (it was asked for) with a
    warning naming why."""
    site = ckpt.get("site")
    if isinstance(site, dict) and site.get("installable") is False:
        log.warning("%s: this site's adapted classifier is marked not installable (%s); it screens because it was "
                    "given, but check it with 'cervscan evaluate' before relying on it", ref.path,
                    "; ".join(str(w) for w in site.get("not_installable_because") or ()) or "no reason recorded")


def config_layers(*, site=None, cls_model: str | None = None, config_file: str | None = None):
    """The classifier to load (None: resolved as usual) and the settings files under the options, each read and
    checked (:func:`cervscan.config.load_config_file`): the site settings (``--site RUN``, or those installed
    with the classifier: :func:`cervscan.models.registry.site_files`) and the config file. Returns
    ``(cls_model, site_ref, site_cfg, file_cfg)``; ``screen`` and ``batch`` call it to fail before writing."""
    cls_model, site_ref = registry.site_files(site, cls_model)
    site_cfg = load_config_file(site_ref.path) if site_ref else {}
    return cls_model, site_ref, site_cfg, load_config_file(config_file) if config_file else {}


def _site_belongs(site_ref, site_cfg: dict, cls_ref, ckpt: dict) -> None:
    """Site settings belong to the adapted classifier they were written with: its threshold was chosen on
    that classifier's scores. Settings from another run (a copied or half-replaced RUN) are refused."""
    if site_ref is None or "threshold" not in site_cfg or ckpt.get("threshold") is None:
        return
    if abs(float(site_cfg["threshold"]) - float(ckpt["threshold"])) > 1e-9:
        raise CervscanError(f"{site_ref.path}: its threshold {site_cfg['threshold']} is not that of the classifier "
                            f"{cls_ref.path} ({ckpt['threshold']}): these site settings belong to another adapt "
                            "run; use a RUN folder as adapt wrote it")


def _site_record(ref, site_cfg: dict, file_cfg: dict, provenance: dict, ckpt: dict) -> dict | None:
    """run.json's ``site``; the settings the site file gave (and the config file did not) are marked ``site``
    in ``provenance``."""
    if ref is None:
        return None
    for key, src in provenance.items():
        if src == "config" and key in site_cfg and key not in file_cfg:
            provenance[key] = "site"
    s = ckpt.get("site") if isinstance(ckpt.get("site"), dict) else {}
    over = sorted(set(site_cfg) & set(file_cfg))
    if over:
        log.warning("the config file sets %s over the site settings %s", ", ".join(over), ref.path)
    return {"settings": str(ref.path), "source": ref.source, "name": ref.entry.get("name") or ref.path.parent.name,
            "sha256": ref.sha256, "keys": sorted(site_cfg), "overridden_by_config": over,
            "visits": s.get("visits"), "adapted_at": s.get("adapted_at"), "installable": s.get("installable"),
            "not_installable_because": s.get("not_installable_because")}


def resolve(*, seg_model: str | None = None, cls_model: str | None = None, cervix_model: str | None = None,
                  stage_model: str | None = None, config_file: str | None = None, overrides: dict | None = None,
                  device: str | None = None, num_workers: int | None = None, batch_images: int | None = None,
                  write_masks: bool = True, write_overlays: bool = True, use_stage: bool = True, site=None):
    """Resolve and load every model and resolve the configuration (checkpoint < site settings < config file <
    options).

    ``overrides``: setting -> value given on the command line (named options and ``--set``); ``device``,
    ``num_workers`` and ``batch_images`` count as such options too. ``site``: a ``cervscan adapt`` run folder
    (its model.pt is the classifier, its site.toml the site settings), None (the site settings installed with
    the installed classifier, if screening uses it) or False (none): :func:`config_layers`."""
    overrides = dict(overrides or {})
    overrides |= {k: v for k, v in (("num_workers", num_workers), ("batch_images", batch_images)) if v is not None}
    check_layer(overrides, SETTINGS, "option")  # every option, before any model is loaded
    cls_model, site_ref, site_cfg, own_cfg = config_layers(site=site, cls_model=cls_model, config_file=config_file)
    file_cfg = {**site_cfg, **own_cfg}  # the site settings, under the config file's
    dev = resolve_device(overrides.pop("device", None) or device or file_cfg.get("device") or "auto")
    t0 = time.time()
    refs = {"segmenter": registry.resolve("segmenter", seg_model), "classifier": registry.resolve("classifier", cls_model)}
    models = {role: load_model(role, refs[role].path, dev, refs[role]) for role in ("segmenter", "classifier")}
    _warn_unvalidated(refs["classifier"], models["classifier"].ckpt)
    _warn_not_installable(refs["classifier"], models["classifier"].ckpt)
    _site_belongs(site_ref, site_cfg, refs["classifier"], models["classifier"].ckpt)
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
    site_rec = _site_record(site_ref, site_cfg, own_cfg, provenance, models["classifier"].ckpt)
    return Resolved(models, cfg, dev, refs, provenance, time.time() - t0, site_rec)
