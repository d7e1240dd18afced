"""Model resolution, manifests, sha256 checks, install / use / rollback / list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cervscan.models import registry as W
from cervscan.errors import ChecksumError, CervscanError, ModelNotFoundError


def fake_model_dir(folder: Path, tag: str, roles=W.ROLES) -> Path:
    """A weights folder with a manifest; the 'models' are small files with distinct contents."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for role in roles:
        f = folder / f"{role}-{tag}.pt"
        f.write_bytes(f"{role} {tag}".encode())
        entries.append({"role": role, "file": f.name, "sha256": W.sha256_file(f), "name": f"{role}-{tag}",
                        "version": "1.0"})
    (folder / W.MANIFEST).write_text(json.dumps({"format": 1, "models": entries}))
    return folder


@pytest.fixture
def layers(tmp_path, monkeypatch, cervscan_home):
    """One folder per resolution layer, all present; the test removes layers one by one."""
    shipped = fake_model_dir(tmp_path / "shipped", "shipped")
    monkeypatch.setattr(W, "shipped_dir", lambda: shipped)
    home = Path(cervscan_home)
    installed = fake_model_dir(home / "models" / "inst-1", "installed")
    (home / "models" / "current.json").write_text(json.dumps({"segmenter": "inst-1", "classifier": "inst-1"}))
    wdir = fake_model_dir(tmp_path / "weights-dir", "wdir")
    envf = fake_model_dir(tmp_path / "env-files", "envfile")
    explicit = fake_model_dir(tmp_path / "explicit", "explicit")
    monkeypatch.setenv("CERVSCAN_WEIGHTS_DIR", str(wdir))
    monkeypatch.setenv("CERVSCAN_SEG_MODEL", str(envf / "segmenter-envfile.pt"))
    monkeypatch.setenv("CERVSCAN_CLS_MODEL", str(envf / "classifier-envfile.pt"))
    return {"shipped": shipped, "installed": installed, "wdir": wdir, "envf": envf, "explicit": explicit,
            "home": home}


def test_resolution_order(layers, monkeypatch):
    L = layers
    # 1. explicit path beats everything (a file, verified through the manifest beside it)
    r = W.resolve("segmenter", L["explicit"] / "segmenter-explicit.pt")
    assert (r.path.name, r.source, r.verified) == ("segmenter-explicit.pt", "option", True)
    # ... an explicit folder with a manifest works too
    r = W.resolve("classifier", str(L["explicit"]))
    assert (r.path.name, r.source) == ("classifier-explicit.pt", "option")
    # 2a. the per-role file variables
    r = W.resolve("segmenter")
    assert (r.path.name, r.source) == ("segmenter-envfile.pt", "env")
    assert W.resolve("classifier").path.name == "classifier-envfile.pt"
    # 2b. CERVSCAN_WEIGHTS_DIR
    monkeypatch.delenv("CERVSCAN_SEG_MODEL")
    r = W.resolve("segmenter")
    assert (r.path.name, r.source, r.verified) == ("segmenter-wdir.pt", "env", True)
    assert W.resolve("classifier").path.name == "classifier-envfile.pt"  # its own variable is still set
    # 3. installed in CERVSCAN_HOME
    monkeypatch.delenv("CERVSCAN_WEIGHTS_DIR")
    r = W.resolve("segmenter")
    assert (r.path.name, r.source, r.verified) == ("segmenter-installed.pt", "installed", True)
    # 4. shipped
    W.rollback()
    r = W.resolve("segmenter")
    assert (r.path.name, r.source, r.verified) == ("segmenter-shipped.pt", "shipped", True)
    assert r.label == f"segmenter-shipped@1.0:{r.sha256[:12]}"
    # nothing at all
    monkeypatch.setattr(W, "shipped_dir", lambda: None)
    with pytest.raises(ModelNotFoundError, match="no segmenter model found.*--seg-model"):
        W.resolve("segmenter")


def test_weights_dir_without_the_role_falls_through(tmp_path, monkeypatch, layers):
    monkeypatch.delenv("CERVSCAN_SEG_MODEL")
    seg_only = fake_model_dir(tmp_path / "seg-only", "segonly", roles=("segmenter",))
    monkeypatch.setenv("CERVSCAN_WEIGHTS_DIR", str(seg_only))
    monkeypatch.delenv("CERVSCAN_CLS_MODEL")
    assert W.resolve("segmenter").path.name == "segmenter-segonly.pt"
    assert W.resolve("classifier").source == "installed"


def test_explicit_file_without_manifest_is_hashed_but_not_verified(tmp_path):
    f = tmp_path / "loose.pt"
    f.write_bytes(b"weights")
    r = W.resolve("classifier", f)
    assert r.source == "option" and not r.verified
    assert r.sha256 == W.sha256_file(f) and len(r.sha256) == 64
    assert r.label == f"loose:{r.sha256[:12]}"


def test_explicit_run_folder_with_model_pt(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"x")
    assert W.resolve("segmenter", tmp_path / "run").path.name == "model.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no segmenter in this folder"):
        W.resolve("segmenter", tmp_path / "empty")


def test_missing_files_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="nope.pt: classifier model file not found"):
        W.resolve("classifier", tmp_path / "nope.pt")
    monkeypatch.setenv("CERVSCAN_SEG_MODEL", str(tmp_path / "gone.pt"))
    with pytest.raises(ModelNotFoundError, match="gone.pt"):
        W.resolve("segmenter")
    with pytest.raises(ValueError):
        W.resolve("detector")


def test_tampered_file_listed_in_a_manifest_is_refused(tmp_path):
    d = fake_model_dir(tmp_path / "m", "t")
    f = d / "segmenter-t.pt"
    data = bytearray(f.read_bytes())
    data[0] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256 mismatch.*refusing"):
        W.resolve("segmenter", d)
    with pytest.raises(ChecksumError):
        W.resolve("segmenter", f)  # also when the file is named directly
    assert W.resolve("classifier", d).verified  # the other, intact file is fine


def test_manifest_entry_without_sha256_is_refused(tmp_path):
    d = fake_model_dir(tmp_path / "m", "t")
    man = json.loads((d / W.MANIFEST).read_text())
    del man["models"][0]["sha256"]
    (d / W.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ChecksumError, match="no sha256"):
        W.resolve(man["models"][0]["role"], d)


def test_manifest_listing_a_missing_file(tmp_path):
    d = fake_model_dir(tmp_path / "m", "t")
    (d / "segmenter-t.pt").unlink()
    with pytest.raises(ModelNotFoundError, match="listed in the manifest is missing"):
        W.resolve("segmenter", d)


@pytest.mark.parametrize("text, msg", [("{oops", "unreadable manifest"), ('{"models": 3}', "'models' list")])
def test_bad_manifest(tmp_path, text, msg):
    (tmp_path / W.MANIFEST).write_text(text)
    with pytest.raises(CervscanError, match=msg):
        W.read_manifest(tmp_path)


def test_installed_pointer_to_a_missing_folder(cervscan_home):
    p = W.current_pointer()
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"classifier": "gone-123"}))
    with pytest.raises(ModelNotFoundError, match="gone-123.*rollback"):
        W.resolve("classifier")


def test_corrupt_installed_pointer(cervscan_home):
    p = W.current_pointer()
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    with pytest.raises(CervscanError, match="current.json: unreadable"):
        W.resolve("classifier")


def test_user_dir_follows_cervscan_home(cervscan_home):
    assert W.user_dir() == Path(cervscan_home)
    assert W.current_pointer() == Path(cervscan_home) / "models" / "current.json"


# --------------------------------------------------------------------------- install / use / rollback

def test_install_then_resolve_then_rollback(tiny_models, tmp_path, monkeypatch, no_tmp_files):
    shipped = fake_model_dir(tmp_path / "shipped", "shipped")
    monkeypatch.setattr(W, "shipped_dir", lambda: shipped)
    run = tmp_path / "run-seg"
    run.mkdir()
    shutil.copy(tiny_models["seg"], run / "model.pt")

    res = W.install([run, tiny_models["cls"]], name="mine", force=True)  # the tiny classifier records no validation
    assert set(res) == {"segmenter", "classifier"}
    for role in ("segmenter", "classifier"):
        r = W.resolve(role)
        assert r.source == "installed" and r.verified
        assert r.sha256 == res[role]["sha256"] == W.sha256_file(tiny_models["seg" if role == "segmenter" else "cls"])
        assert Path(res[role]["folder"]).name.startswith("mine-")
        assert r.entry["name"] == ("tiny-seg" if role == "segmenter" else "tiny-cls")
    assert W.resolve("classifier").entry["threshold"] == 0.5
    no_tmp_files(W.user_dir())

    # roll back one role, then the other
    W.rollback("classifier")
    assert W.resolve("classifier").source == "shipped"
    assert W.resolve("segmenter").source == "installed"
    W.rollback()
    assert W.resolve("segmenter").source == "shipped"
    # installed files are kept, and 'use' makes one the default again
    tag = Path(res["segmenter"]["folder"]).name
    assert (W.user_dir() / "models" / tag / "segmenter.pt").is_file()
    W.use("segmenter", tag)
    assert W.resolve("segmenter").sha256 == res["segmenter"]["sha256"]
    with pytest.raises(ModelNotFoundError):
        W.use("classifier", tag)  # that folder holds only the segmenter


def test_second_install_becomes_the_default_and_use_switches_back(tiny_models, tmp_path):
    first = W.install([tiny_models["cls"]], force=True)
    other = tmp_path / "other.pt"
    # another valid classifier checkpoint with a different sha256
    import torch

    ck = torch.load(tiny_models["cls"], weights_only=True)
    ck["version"] = "2"
    from cervscan.models.networks import save_checkpoint

    save_checkpoint(ck, other)
    second = W.install([other], force=True)
    assert first["classifier"]["folder"] != second["classifier"]["folder"]  # same-second installs do not collide
    assert W.resolve("classifier").sha256 == second["classifier"]["sha256"] != first["classifier"]["sha256"]
    W.use("classifier", Path(first["classifier"]["folder"]).name)
    assert W.resolve("classifier").sha256 == first["classifier"]["sha256"]


def test_install_refuses_non_checkpoints_and_duplicates(tiny_models, tmp_path):
    junk = tmp_path / "junk.pt"
    import torch

    torch.save({"hello": 1}, junk)
    with pytest.raises(CervscanError, match="not a cervscan checkpoint"):
        W.install([junk])
    with pytest.raises(CervscanError, match="two classifier models"):
        W.install([tiny_models["cls"], tiny_models["cls"]])
    with pytest.raises(ModelNotFoundError, match="no model.pt"):
        W.install([tmp_path])
    assert W.installed_current() == {}  # nothing half-installed


def test_list_models(tiny_models, tmp_path, monkeypatch):
    shipped = fake_model_dir(tmp_path / "shipped", "shipped")
    monkeypatch.setattr(W, "shipped_dir", lambda: shipped)
    assert [(r["source"], r["role"]) for r in W.list_models()] == [("shipped", role) for role in W.ROLES]
    res = W.install([tiny_models["cls"]], name="c", force=True)
    rows = W.list_models()
    inst = [r for r in rows if r["source"] == "installed"]
    assert len(inst) == 1 and inst[0]["role"] == "classifier"
    assert inst[0]["tag"] == Path(res["classifier"]["folder"]).name
    assert inst[0]["sha256"] == res["classifier"]["sha256"]
    assert W.verify(Path(inst[0]["folder"]) / inst[0]["file"], inst[0]) == inst[0]["sha256"]
    monkeypatch.setattr(W, "shipped_dir", lambda: None)
    assert [r["source"] for r in W.list_models()] == ["installed"]


def test_rollback_and_use_reject_unknown_roles_and_tags(tiny_models):
    res = W.install([tiny_models["cls"]], force=True)
    with pytest.raises(CervscanError, match="unknown role 'segmentr'"):
        W.rollback("segmentr")
    assert W.resolve("classifier").source == "installed"  # nothing was rolled back
    with pytest.raises(CervscanError, match="unknown role"):
        W.use("clasifier", Path(res["classifier"]["folder"]).name)
    with pytest.raises(ModelNotFoundError, match="no installed model 'nope'.*models list"):
        W.use("classifier", "nope")


# --------------------------------------------------------------------------- install of files that are not checkpoints

def _write_text(p: Path) -> None:
    p.write_text("these are not weights\n")


def _write_empty(p: Path) -> None:
    p.write_bytes(b"")


def _write_truncated(p: Path) -> None:
    import torch

    torch.save({"kind": "classifier", "state_dict": {"w": torch.zeros(64)}}, p)
    p.write_bytes(p.read_bytes()[:120])


def _write_list(p: Path) -> None:
    import torch

    torch.save([1, 2, 3], p)


def _write_foreign_kind(p: Path) -> None:
    import torch

    torch.save({"kind": "detector", "state_dict": {}}, p)


@pytest.mark.parametrize("make, reason", [
    (_write_text, "cannot be read"),
    (_write_empty, "the file is empty"),
    (_write_truncated, "cannot be read"),
    (_write_list, "it holds a list"),
    (_write_foreign_kind, "kind 'detector' is not one of"),
], ids=["text", "empty", "truncated", "torch-list", "foreign-kind"])
def test_cli_install_of_a_non_checkpoint_is_a_one_line_error(make, reason, tmp_path):
    from typer.testing import CliRunner

    from cervscan.cli import app

    f = tmp_path / "run-x" / "model.pt"
    f.parent.mkdir()
    make(f)
    for arg in (f, f.parent):  # the file itself, or its run folder
        r = CliRunner().invoke(app, ["models", "install", str(arg)])
        assert r.exit_code == 1, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # not a crash
        assert "Traceback" not in r.output
        squeezed = "".join(r.output.split())  # rich wraps (and may fold a long path) at any width
        for part in (f"{f}: not a cervscan checkpoint", reason):
            assert "".join(part.split()) in squeezed, r.output
    assert W.installed_current() == {}  # nothing half-installed
    assert not (W.user_dir() / "models").exists() or not any((W.user_dir() / "models").iterdir())


def test_install_recognises_a_cervix_finder_and_a_stage_model(tiny_models):
    res = W.install([tiny_models["cervix"], tiny_models["stage"]], name="new")
    assert set(res) == {"cervix", "stage"}
    assert W.resolve("cervix").source == "installed" and W.resolve("cervix").sha256 == W.sha256_file(tiny_models["cervix"])
    assert W.resolve("stage").entry["name"] == "tiny-stage"
