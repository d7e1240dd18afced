"""Where models come from, their manifests and sha256 checks. No torch import.

Resolution order for each role (stage, cervix, segmenter, classifier):

1. an explicit path (``--seg-model`` / ``--cls-model``);
2. ``$CERVSCAN_SEG_MODEL`` / ``$CERVSCAN_CLS_MODEL`` (a file), or
   ``$CERVSCAN_WEIGHTS_DIR`` (a folder with ``manifest.json``);
3. the model installed with ``cervscan models install`` in the user data dir
   (``platformdirs.user_data_dir("cervscan")/models``, or ``$CERVSCAN_HOME/models``);
4. the shipped defaults (``weights/`` of the source tree, installed as package data).

The site settings of a ``cervscan adapt`` run (``site.toml``) are installed with its classifier, in the same
folder (manifest role ``settings``), and are used exactly when that installed classifier is
(:func:`site_files`): rollback, ``use`` or another install of the classifier take them along.

Nothing is ever downloaded. A file listed in a manifest must match its sha256,
otherwise loading is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from platformdirs import user_data_dir

from cervscan.config import CROP_MODES, load_config_file, resolve_choice, voting_from
from cervscan.errors import (
    CervscanError,
    CheckpointError,
    ChecksumError,
    ModelNotFoundError,
)
from cervscan.files import atomic_write_bytes, atomic_write_json, atomic_write_with
from cervscan.models.loading import (  # ROLES: the model roles, declared there once
    ROLES,
    load_model,
)
from cervscan.training.validation import install_problem

ENV_FILE = {"segmenter": "CERVSCAN_SEG_MODEL", "classifier": "CERVSCAN_CLS_MODEL",
            "cervix": "CERVSCAN_CERVIX_MODEL", "stage": "CERVSCAN_STAGE_MODEL"}
OPTION = {"segmenter": "--seg-model", "classifier": "--cls-model", "cervix": "--cervix-model", "stage": "--stage-model"}
MANIFEST = "manifest.json"


@dataclass
class ResolvedModel:
    role: str
    path: Path
    source: str  # option | env | installed | shipped
    sha256: str
    verified: bool  # sha256 checked against a manifest entry
    entry: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        name = self.entry.get("name") or self.path.stem
        ver = self.entry.get("version")
        return f"{name}{'@' + ver if ver else ''}:{self.sha256[:12]}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def user_dir() -> Path:
    env = os.environ.get("CERVSCAN_HOME")
    if env:
        return Path(env)
    return Path(user_data_dir("cervscan", appauthor=False))


def shipped_dir() -> Path | None:
    """The shipped weights: package data when installed, else the source tree's weights/."""
    package = Path(__file__).resolve().parents[1]  # src/cervscan (or site-packages/cervscan)
    for cand in (package / "_weights", package.parent.parent / "weights"):
        if (cand / MANIFEST).is_file():
            return cand
    return None


def read_manifest(folder: Path) -> dict:
    p = folder / MANIFEST
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{p}: manifest not found") from None
    except (OSError, ValueError) as e:
        raise CervscanError(f"{p}: unreadable manifest ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CervscanError(f"{p}: manifest must have a 'models' list")
    return data


def _entry_for(folder: Path, role: str) -> dict | None:
    for e in read_manifest(folder)["models"]:
        if e.get("role") == role:
            return e
    return None


def verify(path: Path, entry: dict) -> str:
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: model file listed in the manifest is missing")
    digest = sha256_file(path)
    want = entry.get("sha256")
    if not want:
        raise ChecksumError(f"{path}: manifest entry has no sha256")
    if digest != want:
        raise ChecksumError(
            f"{path}: sha256 mismatch (manifest {want[:16]}..., file {digest[:16]}...): the file was changed "
            f"or corrupted; refusing to load it. Reinstall the model or roll back with 'cervscan models rollback'."
        )
    return digest


def _from_folder(folder: Path, role: str, source: str) -> ResolvedModel | None:
    entry = _entry_for(folder, role)
    if entry is None:
        return None
    path = folder / entry["file"]
    return ResolvedModel(role, path, source, verify(path, entry), True, entry)


def _from_file(path: Path, role: str, source: str) -> ResolvedModel:
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: {role} model file not found")
    # a manifest beside the file that lists it is honoured
    if (path.parent / MANIFEST).is_file():
        try:
            entries = read_manifest(path.parent)["models"]
        except CervscanError:
            entries = []
        for e in entries:
            if e.get("file") == path.name:
                return ResolvedModel(role, path, source, verify(path, e), True, e)
    return ResolvedModel(role, path, source, sha256_file(path), False, {})


#: A file the shipped weights hold that is not a model: the shipped classifier's training patients' features
#: (``scripts/package_training_features.py``), which ``cervscan adapt`` pools with a site's patients.
TRAINING_FEATURES = "training-features"


def shipped_file(role: str) -> ResolvedModel | None:
    """The file a weights manifest lists under ``role`` (``$CERVSCAN_WEIGHTS_DIR``'s, else the shipped one), its
    sha256 checked; None when none lists one."""
    for folder, source in ((os.environ.get("CERVSCAN_WEIGHTS_DIR"), "env"), (shipped_dir(), "shipped")):
        if folder and (Path(folder) / MANIFEST).is_file():
            r = _from_folder(Path(folder), role, source)
            if r:
                return r
    return None


#: The site settings of a ``cervscan adapt`` run (``RUN/site.toml``: gate thresholds, decision stages, threshold):
#: ``screen --site RUN`` reads them beside ``RUN/model.pt``; ``models install RUN`` installs them with the classifier,
#: as this manifest role in the classifier's installed folder.
SITE_ROLE, SITE_FILE = "settings", "site.toml"


def site_files(site: str | Path | bool | None = None,
               cls_model: str | Path | None = None) -> tuple[str | None, ResolvedModel | None]:
    """The classifier (an explicit path, or None: resolved as usual) and the site settings a screening uses,
    decided here once.

    ``site`` (``--site RUN``, a ``cervscan adapt`` run folder): ``RUN/model.pt`` and ``RUN/site.toml``; a missing
    one, or ``cls_model`` given too, is a CervscanError naming it. ``site=False``: no site settings. ``site=None``:
    the site settings installed with the classifier (:func:`install` of an adapt run) when screening uses that
    installed classifier, else none (another classifier brings no site settings: they belong to theirs)."""
    if site is False:
        return (str(cls_model) if cls_model else None), None
    if site:
        run = Path(site)
        if cls_model:
            raise CervscanError(f"--site {run} and --cls-model {cls_model}: give one (--site screens with "
                                f"{run / 'model.pt'}, the classifier its {SITE_FILE} belongs to)")
        if not run.is_dir():
            raise ModelNotFoundError(f"{run}: not a folder; --site takes a 'cervscan adapt' run folder (RUN)")
        for name in ("model.pt", SITE_FILE):
            if not (run / name).is_file():
                raise ModelNotFoundError(f"{run / name}: not found; --site needs a 'cervscan adapt' run folder with "
                                         f"model.pt and {SITE_FILE}")
        settings = run / SITE_FILE
        return str(run / "model.pt"), ResolvedModel(SITE_ROLE, settings, "option", sha256_file(settings), False,
                                                    {"name": run.resolve().name})
    return (str(cls_model) if cls_model else None), (None if cls_model else installed_settings())


def installed_settings() -> ResolvedModel | None:
    """The site settings installed with the classifier screening uses now (sha256 checked), or None when that
    classifier is not an installed one or was installed without site settings."""
    try:
        ref = resolve("classifier")
    except CervscanError:  # no classifier: the pipeline says so when it loads one
        return None
    return _from_folder(ref.path.parent, SITE_ROLE, "installed") if ref.source == "installed" else None


def current_pointer() -> Path:
    return user_dir() / "models" / "current.json"


def installed_current() -> dict:
    p = current_pointer()
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CervscanError(f"{p}: unreadable ({e}); delete it or run 'cervscan models rollback'") from None


def resolve(role: str, explicit: str | Path | None = None) -> ResolvedModel:
    if role not in ROLES:
        raise ValueError(role)
    if explicit:
        p = Path(explicit)
        if p.is_dir():
            if (p / MANIFEST).is_file():
                r = _from_folder(p, role, "option")
                if r:
                    return r
            if (p / "model.pt").is_file():
                return _from_file(p / "model.pt", role, "option")
            raise ModelNotFoundError(f"{p}: no {role} in this folder (no manifest entry, no model.pt)")
        return _from_file(p, role, "option")
    env_file = os.environ.get(ENV_FILE[role])
    if env_file:
        return _from_file(Path(env_file), role, "env")
    env_dir = os.environ.get("CERVSCAN_WEIGHTS_DIR")
    if env_dir:
        r = _from_folder(Path(env_dir), role, "env")
        if r:
            return r
    cur = installed_current().get(role)
    if cur:
        folder = user_dir() / "models" / cur
        r = _from_folder(folder, role, "installed") if (folder / MANIFEST).is_file() else None
        if r:
            return r
        raise ModelNotFoundError(f"installed {role} '{cur}' is missing from {folder}; run 'cervscan models rollback'")
    sd = shipped_dir()
    if sd is not None:
        r = _from_folder(sd, role, "shipped")
        if r:
            return r
    raise ModelNotFoundError(
        f"no {role} model found. Pass {OPTION[role]} PATH, set "
        f"{ENV_FILE[role]}, install a trained one with 'cervscan models install RUN_DIR', or reinstall "
        f"cervscan (the package ships default weights)."
    )


# --------------------------------------------------------------------------- install / list / rollback

def check_usable(f: Path, role: str) -> None:
    """Load a checkpoint as screening will (read, build the network, load its weights, one forward pass at its
    input size; for a classifier also its screening settings) and raise a one-line
    :class:`~cervscan.errors.CheckpointError` naming the file when anything fails."""
    import torch  # lazy: torch, out of models list / verify / rollback / use

    from cervscan.models.networks import _first_line  # lazy: networks imports torch

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{f}: not a usable cervscan checkpoint ({why}); not installed")

    try:
        lm = load_model(role, f, torch.device("cpu"))
        ck = lm.ckpt
        h, w = (int(x) for x in ck["input_size"])
        with torch.inference_mode():
            y = lm.net(torch.zeros(1, 3, h, w))
        y = y[0] if isinstance(y, (tuple, list)) else y
        if ck["kind"] in ("classifier", "stage"):
            want = len(ck.get("classes") or ())
            if y.ndim != 2 or (want and y.shape[1] != want):
                raise CheckpointError(f"its network gives outputs of shape {tuple(y.shape)}, not one score per class "
                                      f"({want})")
        if not torch.isfinite(y).all():
            raise CheckpointError("its network gives non-finite outputs")
        if role == "classifier":
            voting_from(ck, {}, {})
            resolve_choice("crop", CROP_MODES, "frame", ck, {}, {}, {})
            resolve_choice("classify_view", ("crop", "frame"), "crop", ck, {}, {}, {})
    except CervscanError as e:
        msg = str(e)
        if msg.startswith(f"{f}: "):
            msg = msg[len(f"{f}: "):]
        if msg.startswith("not a "):  # already says what it is not
            raise CheckpointError(f"{f}: {msg}; not installed") from None
        raise refuse(msg) from None
    except Exception as e:  # noqa: BLE001 - building or running a network raises many types
        raise refuse(f"loading it failed: {_first_line(e)}") from None


def _read_for_install(rd: Path) -> tuple[str, Path, dict]:
    """The checkpoint of a run folder (its model.pt) or file, read safely: its role, its path and what its
    manifest entry records (with its sha256 as read, and ``installed_with_force`` when a classifier's
    validation is missing or failed)."""
    from cervscan.models.networks import load_file  # lazy: networks imports torch

    f = rd / "model.pt" if rd.is_dir() else rd
    if not f.is_file():
        hint = ""
        if rd.is_dir() and (rd / "metrics.json").is_file():
            try:
                v = json.loads((rd / "metrics.json").read_text(encoding="utf-8")).get("validation") or {}
            except (OSError, ValueError):
                v = {}
            if v.get("passed") is False:
                hint = " (the training run wrote none: its classifier failed its validation, see metrics.json)"
        raise ModelNotFoundError(f"{rd}: no model.pt to install{hint}")
    if f.stat().st_size == 0:
        raise CheckpointError(f"{f}: not a cervscan checkpoint (the file is empty)")
    checked_sha = sha256_file(f)
    ck = load_file(f, what="a cervscan checkpoint")
    if not isinstance(ck, dict):
        raise CheckpointError(f"{f}: not a cervscan checkpoint (it holds a {type(ck).__name__}, "
                              f"not a checkpoint dict)")
    kind = ck.get("kind")
    if kind == "segmenter" and ck.get("target") == "cervix":
        kind = "cervix"  # the cervix finder is a segmenter of the cervix
    if kind not in ROLES:
        why = "it has no 'kind'" if kind is None else f"kind {kind!r:.60} is not one of {', '.join(ROLES)}"
        raise CheckpointError(f"{f}: not a cervscan checkpoint ({why})")
    meta = {k: ck.get(k) for k in ("name", "version", "arch", "input_size", "threshold", "operating_point",
                                    "target", "classes", "crop", "validation", "train_summary",
                                    "cervscan_version")}
    meta["_checked_sha256"] = checked_sha
    settings, site_problem = _site_for_install(f, ck) if kind == "classifier" else (None, None)
    problems = [p for p in (install_problem(ck) if kind == "classifier" else None, site_problem) if p]
    if problems:
        meta["installed_with_force"] = "; ".join(problems)
    if settings:
        meta["_settings"] = (settings, sha256_file(settings))
    return kind, f, meta


def _site_for_install(f: Path, ck: dict) -> tuple[Path | None, str | None]:
    """For the classifier of a ``cervscan adapt`` run (a checkpoint recording its ``site``): the site settings
    beside it (``site.toml``, checked as any config file is) and why it must not become the default without
    --force (the run records ``installable: false``, with its reasons). (None, None) for any other checkpoint."""
    site = ck.get("site")
    if not isinstance(site, dict):
        return None, None
    toml = f.parent / SITE_FILE
    if not toml.is_file():
        raise ModelNotFoundError(f"{toml}: not found; the classifier of a 'cervscan adapt' run installs together "
                                 f"with its {SITE_FILE} (gate thresholds, decision stages, threshold)")
    load_config_file(toml)
    if site.get("installable") is not False:
        return toml, None
    why = "; ".join(str(w) for w in site.get("not_installable_because") or ()) or "no reason recorded"
    return toml, f"its adapt run records installable: false ({why})"


def install(run_dirs: list[Path], *, name: str | None = None, force: bool = False) -> dict:
    """Copy trained model(s) into the user data dir and make them the default for their role.

    Each checkpoint is loaded fully first (:func:`check_usable`); a classifier whose recorded validation is
    missing or failed (:func:`cervscan.training.validation.install_problem`) is refused unless ``force``. Nothing is
    installed unless every file given passes."""
    found: dict[str, tuple[Path, dict]] = {}
    for rd in run_dirs:
        kind, f, meta = _read_for_install(Path(rd))
        if kind in found:
            raise CervscanError(f"two {kind} models given ({found[kind][0]} and {f})")
        found[kind] = (f, meta)
    # then the full check of each: loaded as screening loads it; a classifier validated
    for kind, (f, meta) in found.items():
        check_usable(f, kind)
        if meta.get("installed_with_force") and not force:
            raise CheckpointError(f"{f}: not installed: {meta['installed_with_force']}. A classifier no better than "
                                  f"chance, or worse than the installed one, could send severe patients home; install "
                                  f"it anyway only knowingly, with --force")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    models_root = user_dir() / "models"
    cur = installed_current()
    result = {}
    for role, (f, meta) in found.items():
        tag = f"{name or role}-{stamp}"
        dest = models_root / tag
        k = 1
        while dest.exists():
            k += 1
            dest = models_root / f"{tag}-{k}"
        dest.mkdir(parents=True)
        target = dest / f"{role}.pt"
        with open(f, "rb") as src:
            atomic_write_with(target, lambda out, src=src: shutil.copyfileobj(src, out))
        digest = sha256_file(target)
        if digest != meta.pop("_checked_sha256"):
            shutil.rmtree(dest, ignore_errors=True)
            raise CheckpointError(f"{f}: the file changed while it was being installed; nothing installed")
        settings = meta.pop("_settings", None)
        entry = {"role": role, "file": target.name, "sha256": digest, "installed_from": str(f.resolve()),
                 "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **{k: v for k, v in meta.items() if v is not None}}
        entries = [entry] + ([_install_settings(dest, *settings)] if settings else [])
        atomic_write_json(dest / MANIFEST, {"format": 1, "models": entries})
        cur[role] = dest.name
        result[role] = {"folder": str(dest), "sha256": digest,
                        **({"forced": meta["installed_with_force"]} if meta.get("installed_with_force") else {})}
        if settings:
            result[SITE_ROLE] = {"folder": str(dest), "sha256": entries[1]["sha256"], "file": str(settings[0])}
    atomic_write_json(current_pointer(), cur)
    return result


def _install_settings(dest: Path, src: Path, checked_sha: str) -> dict:
    """Copy an adapt run's site settings beside its installed classifier (checked again as a config file) and
    return their manifest entry (role :data:`SITE_ROLE`)."""
    target = dest / SITE_FILE
    atomic_write_bytes(target, src.read_bytes())
    digest = sha256_file(target)
    if digest != checked_sha:
        shutil.rmtree(dest, ignore_errors=True)
        raise CheckpointError(f"{src}: the file changed while it was being installed; nothing installed")
    load_config_file(target)
    return {"role": SITE_ROLE, "file": SITE_FILE, "sha256": digest, "name": src.parent.resolve().name,
            "installed_from": str(src.resolve()), "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def rollback(role: str | None = None) -> dict:
    """Forget the installed default(s): ``screen`` goes back to the shipped models. The site settings installed
    with a classifier (:data:`SITE_ROLE`) live in its folder and go with it: back to the shipped classifier is
    back to no site settings."""
    if role is not None and role not in ROLES:
        raise CervscanError(f"unknown role '{role}': use {' or '.join(ROLES)}")
    cur = installed_current()
    for r in (ROLES if role is None else (role,)):
        cur.pop(r, None)
    atomic_write_json(current_pointer(), cur)
    return cur


def use(role: str, tag: str) -> dict:
    if role not in ROLES:
        raise CervscanError(f"unknown role '{role}': use {' or '.join(ROLES)}")
    folder = user_dir() / "models" / tag
    if not (folder / MANIFEST).is_file():
        raise ModelNotFoundError(f"no installed model '{tag}' in {folder.parent}; see 'cervscan models list'")
    if _from_folder(folder, role, "installed") is None:
        raise ModelNotFoundError(f"{folder}: no installed {role}")
    cur = installed_current()
    cur[role] = tag
    atomic_write_json(current_pointer(), cur)
    return cur


def list_models() -> list[dict]:
    rows = []
    sd = shipped_dir()
    if sd:
        for e in read_manifest(sd)["models"]:
            rows.append({"source": "shipped", "tag": "shipped", "folder": str(sd), **e})
    root = user_dir() / "models"
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if (d / MANIFEST).is_file():
                for e in read_manifest(d)["models"]:
                    rows.append({"source": "installed", "tag": d.name, "folder": str(d), **e})
    return rows
