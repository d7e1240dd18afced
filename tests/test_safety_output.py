"""Clinic safety of what ``screen`` and ``batch`` write: never inside an input, never over a file cervscan
did not create, and no folder or file name stops a run.

Overlaps of OUT with an input, files in OUT that cervscan did not create, names that are not valid UTF-8
or too long for the file system, a renamed visit folder, a link back to ROOT and hidden folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cervscan import api
from cervscan import files as cio
from cervscan.cli import app
from cervscan.errors import CervscanError

from conftest import read_csv, read_json, synthetic_image, write_image


@pytest.fixture
def models(tiny_models) -> dict:
    return {"seg_model": str(tiny_models["seg"]), "cls_model": str(tiny_models["cls"]), "device": "cpu",
            "num_workers": 0, "use_stage": False}


@pytest.fixture
def cli_models(tiny_models) -> list[str]:
    return ["--seg-model", str(tiny_models["seg"]), "--cls-model", str(tiny_models["cls"]), "--device", "cpu",
            "--workers", "0", "--no-stage"]


def add_visit(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [write_image(folder / n, synthetic_image(rng)) for n in names]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) and the sha256 of its bytes."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() if not p.is_symlink() \
                else "link:" + os.readlink(p)
    return out


def nonutf8_dir(parent: Path, raw: bytes) -> Path:
    """A folder whose name is ``raw`` (bytes that are not valid UTF-8); skips where the file system refuses."""
    parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(os.path.join(os.fsencode(parent), raw))
    except OSError:
        pytest.skip("this file system refuses names that are not valid UTF-8")
    return Path(os.fsdecode(os.path.join(os.fsencode(parent), raw)))


def last_json_line(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines, "no JSON line on stdout"
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- OUT and the inputs overlap

def _layout(tmp_path: Path, case: str) -> tuple[Path, Path, Path]:
    """(input given to cervscan, output folder, folder whose files must stay as they are) for each case."""
    out = tmp_path / "out"
    visits = tmp_path / "visits"
    if case == "input inside OUT/masks":  # the clinic's folder lies where cervscan writes masks
        given = out / "masks"
        add_visit(given / "P1", ["img1.png", "img2.jpg"])
        return given, out, given
    add_visit(visits / "P1", ["img1.png", "img2.jpg"])
    if case == "OUT is the input":
        return visits, visits, visits
    if case == "OUT inside the input":
        return visits, visits / "P1" / "out", visits
    if case == "OUT links to the input":
        (tmp_path / "link").symlink_to(visits, target_is_directory=True)
        return visits, tmp_path / "link", visits
    if case == "input links into OUT/overlays":
        (out / "overlays").mkdir(parents=True)
        shutil.move(visits / "P1", out / "overlays" / "P1")
        (tmp_path / "in-link").symlink_to(out / "overlays", target_is_directory=True)
        return tmp_path / "in-link", out, out / "overlays"
    raise AssertionError(case)


OVERLAPS = ["input inside OUT/masks", "OUT is the input", "OUT inside the input", "OUT links to the input",
            "input links into OUT/overlays"]


@pytest.mark.parametrize("command", ["screen", "batch"])
@pytest.mark.parametrize("case", OVERLAPS)
def test_overlapping_out_and_input_is_refused_and_the_originals_stay(tmp_path, models, case, command):
    given, out, keep = _layout(tmp_path, case)
    before = snapshot(keep)
    with pytest.raises(CervscanError) as ei:
        if command == "screen":
            api.screen([given], out, **models)
        else:
            api.batch(given, out, **models)
    msg = str(ei.value)
    assert "\n" not in msg and str(out) in msg and str(given) in msg, msg  # one line naming both paths
    assert snapshot(keep) == before  # the same files, byte for byte: nothing written, nothing deleted


def test_overlap_on_the_cli_exits_1_with_a_json_line(tmp_path, cli_models):
    given, out, keep = _layout(tmp_path, "input inside OUT/masks")
    before = snapshot(keep)
    r = CliRunner().invoke(app, ["batch", str(given), "-o", str(out), "--json", *cli_models])
    assert r.exit_code == 1 and "Traceback" not in r.output
    rec = last_json_line(r.stdout)
    assert rec["exit_code"] == 1 and str(given) in rec["error"] and str(out) in rec["error"]
    r = CliRunner().invoke(app, ["screen", str(given), "-o", str(out), "--json", *cli_models])
    assert r.exit_code == 1 and last_json_line(r.stdout)["exit_code"] == 1
    assert snapshot(keep) == before


def test_visit_folder_linked_into_out_is_an_error_patient_and_the_rest_goes_on(tmp_path, models):
    out = tmp_path / "out"
    root = tmp_path / "root"
    add_visit(root / "P1", ["img1.jpg"], seed=1)
    clinic = out / "masks" / "P9"  # someone's images inside OUT, reached through a link in ROOT
    add_visit(clinic, ["img1.png", "img2.jpg"], seed=2)
    (root / "P9").symlink_to(clinic, target_is_directory=True)
    before = snapshot(clinic)
    res = api.screen([root], out, **models)
    pats = {p["patient_id"]: p for p in read_csv(out / "patients.csv")}
    assert pats["P1"]["decision"] in ("severe", "mildly_normal", "inadequate")
    assert pats["P9"]["decision"] == "error" and "overlaps the output folder" in pats["P9"]["error"]
    assert res.exit_code == 3
    res = api.batch(root, out, **models)
    assert res.summary["failed_ids"] == ["P9"]
    assert snapshot(clinic) == before


# --------------------------------------------------------------------------- files cervscan did not create

def test_a_table_cervscan_did_not_write_is_not_overwritten(tmp_path, models):
    add_visit(tmp_path / "visits" / "P1", ["img1.jpg"])
    out = tmp_path / "Desktop"
    out.mkdir()
    mine = out / "patients.csv"
    mine.write_text("name,phone\nAna,555\n", encoding="utf-8")
    for run in (lambda: api.screen([tmp_path / "visits"], out, **models),
                lambda: api.batch(tmp_path / "visits", out, **models)):
        with pytest.raises(CervscanError, match="was not written by cervscan") as ei:
            run()
        assert str(mine) in str(ei.value)
        assert mine.read_text(encoding="utf-8") == "name,phone\nAna,555\n"
        assert not (out / "masks").exists()  # refused before screening


def test_a_mask_path_holding_someone_elses_file_fails_that_image_only(tmp_path, models):
    visits = tmp_path / "visits"
    add_visit(visits / "P1", ["img1.jpg", "img2.jpg"], seed=1)
    add_visit(visits / "P2", ["img1.jpg"], seed=2)
    out = tmp_path / "out"
    theirs = out / "masks" / "P1" / "img1.png"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"\x89PNG clinic photograph")
    res = api.screen([visits], out, **models)
    assert theirs.read_bytes() == b"\x89PNG clinic photograph"
    imgs = {(r["patient_id"], r["image"]): r for r in read_csv(out / "images.csv")}
    bad = imgs[("P1", "img1.jpg")]
    assert bad["status"] == "error" and str(theirs) in bad["error"] and "not written by cervscan" in bad["error"]
    assert bad["mask"] == "" and bad["score"] == ""
    assert imgs[("P1", "img2.jpg")]["status"] == "ok" and imgs[("P2", "img1.jpg")]["status"] == "ok"
    pats = {p["patient_id"]: p for p in read_csv(out / "patients.csv")}
    assert pats["P1"]["n_failed"] == "1" and pats["P2"]["n_failed"] == "0"
    assert res.exit_code == 3


def test_an_out_from_before_the_ledger_keeps_working_and_foreign_files_stay(tmp_path, models):
    visits = tmp_path / "visits"
    add_visit(visits / "P1", ["img1.jpg"], seed=1)
    out = tmp_path / "out"
    api.screen([visits], out, **models)
    (out / ".cervscan" / "written.jsonl").unlink(missing_ok=True)  # as an older cervscan left it
    assert not any((out / ".cervscan").glob("*"))
    add_visit(visits / "P1", ["img9.jpg"], seed=9)
    theirs = out / "masks" / "P1" / "img9.png"
    theirs.write_bytes(b"not cervscan's")
    res = api.screen([visits], out, **models)
    imgs = {r["image"]: r for r in read_csv(out / "images.csv")}
    assert imgs["img1.jpg"]["status"] == "ok"  # its earlier mask, named in images.csv, was cervscan's
    assert imgs["img9.jpg"]["status"] == "error" and str(theirs) in imgs["img9.jpg"]["error"]
    assert theirs.read_bytes() == b"not cervscan's" and res.exit_code == 3


def test_batch_deletes_and_sweeps_only_its_own_files(tmp_path, models):
    root = tmp_path / "root"
    add_visit(root / "V01", ["img1.jpg", "img2.jpg"], seed=1)
    out = tmp_path / "out"
    api.batch(root, out, **models)
    notes = out / "masks" / "V01" / "notes.txt"
    notes.write_text("reviewed by Dr A", encoding="utf-8")
    look_alike = out / ".holiday.jpg.a1b2c3d4.tmp"
    look_alike.write_bytes(b"someone's file")
    (root / "V01" / "img2.jpg").unlink()  # V01 changes: its stale files are removed
    res = api.batch(root, out, **models)
    assert res.screened == ["V01"]
    assert not (out / "masks" / "V01" / "img2.png").exists()  # cervscan's own stale mask: removed
    assert notes.read_text(encoding="utf-8") == "reviewed by Dr A"
    assert look_alike.read_bytes() == b"someone's file"


def test_batch_retries_a_visit_whose_files_could_not_be_written(tmp_path, models):
    root = tmp_path / "root"
    add_visit(root / "V01", ["img1.jpg"], seed=1)
    add_visit(root / "V02", ["img1.jpg"], seed=2)
    out = tmp_path / "out"
    theirs = out / "overlays" / "V01" / "img1.jpg"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"someone's overlay")
    res = api.batch(root, out, **models)
    assert res.summary["failed_ids"] == ["V01"] and res.exit_code == 3
    assert {p["patient_id"]: p["decision"] for p in read_csv(out / "patients.csv")}["V02"] != "error"
    assert theirs.read_bytes() == b"someone's overlay"
    theirs.unlink()  # the clinic moves it away: the next night screens V01 again
    res = api.batch(root, out, **models)
    assert res.screened == ["V01"] and res.summary["changed_because"] == {"retry": 1} and res.exit_code in (0, 5)


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("raw", [b"caf\xe9", b"a\\b", b"caf\\xe9", b"line\nbreak", b"\xff\xfe", "Ana María".encode(),
                                 b"P001"])
def test_display_id_is_readable_one_line_and_lossless(raw):
    name = os.fsdecode(raw)
    shown = cio.display_id(name)
    shown.encode("utf-8")  # valid UTF-8
    assert "\n" not in shown and shown.isprintable()
    assert os.fsencode(cio.from_display_id(shown)) == raw
    if raw in (b"P001", "Ana María".encode(), b"a\\b"):
        assert shown == name  # ordinary names are shown as they are


def test_long_and_non_ascii_image_names_are_screened(tmp_path, models):
    names = ["x" * 246 + ".jpg",  # 250 bytes: the derived mask name would pass the file-system limit
             "x" * 246 + ".png",  # the same stem
             "x" * 230 + "y" * 16 + ".jpg",  # the same first 200 bytes
             "é" * 120 + ".jpg",  # 244 bytes of non-ASCII letters
             "colposcopia ção 1.jpg"]
    add_visit(tmp_path / "visits" / "P1", names)
    out = tmp_path / "out"
    res = api.screen([tmp_path / "visits" / "P1"], out, **models)
    assert res.exit_code in (0, 5)
    rows = read_csv(out / "images.csv")
    assert sorted(r["image"] for r in rows) == sorted(names)
    for col in ("mask", "overlay"):
        paths = [r[col] for r in rows]
        assert all(r["status"] == "ok" for r in rows) and len(set(paths)) == len(names)
        for p in paths:
            assert len(Path(p).name.encode("utf-8")) <= cio.MAX_NAME_BYTES + 4 and (out / p).is_file()
    assert "colposcopia ção 1.png" in {Path(r["mask"]).name for r in rows}  # short names are kept as they are


def test_nightly_batch_goes_on_past_bad_names_with_a_json_line(tmp_path, cli_models):
    root = tmp_path / "root"
    add_visit(root / "A-long", ["x" * 246 + ".jpg", "ok.jpg"], seed=1)  # screened first
    add_visit(nonutf8_dir(root, b"caf\xe9"), ["img1.jpg"], seed=2)
    add_visit(root / "P [red]1", ["img1.jpg"], seed=3)  # brackets: shown, not read as console markup
    add_visit(root / "Z9", ["img1.jpg"], seed=4)  # after the others: still screened
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["batch", str(root), "-o", str(out), "--json", *cli_models])
    assert r.exit_code == 0, r.output
    s = last_json_line(r.stdout)
    assert s["new"] == 4 and s["failed"] == 0 and s["exit_code"] == 0
    pats = {p["patient_id"]: p for p in read_csv(out / "patients.csv")}
    assert set(pats) == {"A-long", "caf\\xe9", "P [red]1", "Z9"}
    assert pats["A-long"]["n_used"] == "2" and pats["Z9"]["n_used"] == "1"
    imgs = read_csv(out / "images.csv")
    assert {r["path"] for r in imgs if r["patient_id"] == "caf\\xe9"} == {str(root.resolve()) + "/caf\\xe9/img1.jpg"}
    db = sqlite3.connect(out / ".cervscan" / "batch.sqlite")
    try:
        assert "caf\\xe9" in {pid for (pid,) in db.execute("SELECT patient_id FROM visits")}
    finally:
        db.close()
    assert read_json(out / "run.json")["batch"]["new"] == 4
    r = CliRunner().invoke(app, ["batch", str(root), "-o", str(out), "--log-file", str(tmp_path / "b.log"),
                                 *cli_models])  # a quiet night, printed to the console and the log
    assert r.exit_code == 0 and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["screen", str(root), "-o", str(tmp_path / "out-screen"), *cli_models])
    assert r.exit_code == 0 and "Traceback" not in r.output
    assert "caf\\xe9" in r.stdout and "P [red]1" in r.stdout


# --------------------------------------------------------------------------- folders of visits

def test_renamed_visit_folder_marks_the_old_id(tmp_path, models):
    root = tmp_path / "root"
    add_visit(root / "V01", ["img1.jpg"], seed=1)
    add_visit(root / "V02", ["img1.jpg"], seed=2)
    out = tmp_path / "out"
    api.batch(root, out, **models)
    (root / "V02").rename(root / "V02-Silva")
    res = api.batch(root, out, **models)
    assert res.screened == ["V02-Silva"] and res.summary["removed"] == 1
    pats = {p["patient_id"]: p for p in read_csv(out / "patients.csv")}
    assert set(pats) == {"V01", "V02", "V02-Silva"}
    assert pats["V02"]["reason"].startswith("visit folder no longer in ROOT")
    assert str((root / "V02").resolve()) in pats["V02"]["reason"]
    assert "no longer in ROOT" not in pats["V01"]["reason"] + pats["V02-Silva"]["reason"]


@pytest.mark.parametrize("command", ["screen", "batch"])
def test_link_to_root_and_hidden_folders_are_skipped_and_listed(tmp_path, models, command):
    root = tmp_path / "root"
    add_visit(root / "P1", ["img1.jpg"], seed=1)
    add_visit(root / ".trash" / "P7", ["img1.jpg"], seed=7)
    add_visit(root / ".old-visit", ["img1.jpg"], seed=8)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "up").symlink_to(tmp_path, target_is_directory=True)
    out = tmp_path / "out"
    res = api.screen([root], out, **models) if command == "screen" else api.batch(root, out, **models)
    assert res.exit_code in (0, 5)
    assert [p["patient_id"] for p in read_csv(out / "patients.csv")] == ["P1"]
    skipped = {Path(r["file"]).name: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert skipped[".trash"].startswith("hidden") and skipped[".old-visit"].startswith("hidden")
    assert "link to" in skipped["loop"] and "holds this one" in skipped["loop"]
    assert "link to" in skipped["up"]


@pytest.mark.parametrize("command", ["screen", "batch"])
def test_an_image_that_cannot_be_processed_fails_alone_and_the_run_goes_on(tmp_path, models, monkeypatch, command):
    from cervscan.pipeline.steps import Pipeline

    root = tmp_path / "root"
    add_visit(root / "A", ["a1.jpg", "a2.jpg"], seed=1)
    add_visit(root / "B", ["b1.jpg"], seed=2)
    real = Pipeline.quality

    def quality(self, rgb, p=None):  # a model step that raises on one image only
        if int(rgb[0, 0, 0]) == int(marker[0, 0, 0]):
            raise RuntimeError("step exploded")
        return real(self, rgb, p)

    from cervscan.files import read_image

    marker = read_image(root / "A" / "a2.jpg").rgb
    monkeypatch.setattr(Pipeline, "quality", quality)
    out = tmp_path / "out"
    if command == "screen":
        api.screen([root], out, **models)
    else:
        api.batch(root, out, **models)
    rows = {r["image"]: r for r in read_csv(out / "images.csv")}
    assert rows["a2.jpg"]["status"] == "error" and "step exploded" in rows["a2.jpg"]["error"]
    assert "a2.jpg" in rows["a2.jpg"]["error"]
    assert rows["a1.jpg"]["status"] == "ok" and rows["b1.jpg"]["status"] == "ok"
    pats = {p["patient_id"]: p for p in read_csv(out / "patients.csv")}
    assert pats["B"]["decision"] in ("severe", "mildly_normal", "inadequate")
    assert pats["A"]["n_failed"] == "1"
