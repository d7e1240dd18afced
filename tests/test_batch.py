"""``cervscan batch``: incremental runs, crash safety, locking, disk errors, observability.

The long ``kill -9`` fault-injection loop is marked ``slow``; everything else runs in about a minute
with the tiny models on one CPU thread.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cervscan import api
from cervscan import batch as B
from cervscan import files as cio
from cervscan.cli import app
from cervscan.errors import EXIT_FAILED, BatchLockedError, CervscanError
from cervscan.pipeline.steps import IMAGE_COLUMNS, PATIENT_COLUMNS
from cervscan.pipeline.outputs import SKIPPED_COLUMNS

from conftest import assert_no_tmp_files, read_csv, read_json, running_as_root, synthetic_image, write_image

SUMMARY_KEYS = {"new", "changed", "unchanged", "failed", "inadequate", "removed", "duration_s", "images",
                "images_per_s"}


# --------------------------------------------------------------------------- helpers

@pytest.fixture
def models(tiny_models) -> dict:
    return {"seg_model": str(tiny_models["seg"]), "cls_model": str(tiny_models["cls"]), "device": "cpu",
            "num_workers": 0, "use_stage": False}


@pytest.fixture
def cli_models(tiny_models) -> list[str]:
    return ["--seg-model", str(tiny_models["seg"]), "--cls-model", str(tiny_models["cls"]), "--device", "cpu",
            "--workers", "0", "--no-stage"]


def add_visit(root: Path, pid: str, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [write_image(root / pid / f"img{i + 1}.jpg", synthetic_image(rng)) for i in range(n)]


@pytest.fixture
def root(tmp_path) -> Path:
    """Three visits: V01 (2 images), V02 (3), V03 (1)."""
    r = tmp_path / "root"
    for k, n in ((1, 2), (2, 3), (3, 1)):
        add_visit(r, f"V{k:02d}", n, seed=k)
    return r


def batch(root: Path, out: Path, models: dict, **kw) -> B.BatchResult:
    return api.batch(root, out, **{**models, **kw})


def rows_by(out: Path) -> tuple[dict[str, dict], dict[tuple[str, str], dict]]:
    pats = read_csv(out / "patients.csv")
    imgs = read_csv(out / "images.csv")
    return {p["patient_id"]: p for p in pats}, {(r["patient_id"], r["image"]): r for r in imgs}


def visits_on_disk(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in d.iterdir() if p.suffix.lower() in cio.IMAGE_EXTS)
            for d in sorted(root.iterdir()) if d.is_dir()}


def check_csv(path: Path, columns: list[str]) -> list[dict]:
    """The file parses completely: the header, every row with exactly the columns, a final newline."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), f"{path} is cut short"
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == columns, path
        rows = list(reader)
    for r in rows:
        assert None not in r and None not in r.values(), f"{path}: a row with the wrong number of fields: {r}"
    return rows


def check_consistent(out: Path, root: Path, *, complete: bool) -> tuple[list[dict], list[dict]]:
    """Invariants of OUT at any moment (``complete``: after a run that finished)."""
    if not (out / "patients.csv").exists():
        assert not complete
        return [], []
    pats = check_csv(out / "patients.csv", PATIENT_COLUMNS)
    imgs = check_csv(out / "images.csv", IMAGE_COLUMNS)
    check_csv(out / "skipped.csv", SKIPPED_COLUMNS)
    on_disk = visits_on_disk(root)
    pids = [p["patient_id"] for p in pats]
    assert len(pids) == len(set(pids)), "a visit twice in patients.csv"
    keys = [(r["patient_id"], r["image"]) for r in imgs]
    assert len(keys) == len(set(keys)), "an image twice in images.csv"
    assert set(pids) <= set(on_disk)
    for pid, name in keys:
        assert name in on_disk[pid], f"{pid}/{name} is not in ROOT"
    if complete:
        assert sorted(pids) == sorted(on_disk), "patients.csv does not hold every visit exactly once"
        assert sorted(keys) == sorted((pid, n) for pid, names in on_disk.items() for n in names)
        for p in pats:
            assert int(p["n_images"]) == len(on_disk[p["patient_id"]])
        for r in imgs:
            for col in ("mask", "overlay"):
                if r[col]:
                    assert (out / r[col]).is_file(), r[col]
        referenced = {r[c] for r in imgs for c in ("mask", "cervix_mask", "overlay") if r[c]}
        written = {str(p.relative_to(out)) for d in B.OUTPUT_DIRS if (out / d).is_dir()
                   for p in (out / d).rglob("*") if p.is_file()}
        assert written == referenced, f"stale or missing mask files: {written ^ referenced}"
        assert_no_tmp_files(out)
        read_json(out / "run.json")
    return pats, imgs


def same_rows_within(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if ra[k] == rb[k]:
                continue
            try:
                assert abs(float(ra[k]) - float(rb[k])) <= tol, (k, ra[k], rb[k])
            except ValueError:
                raise AssertionError(f"{k}: {ra[k]!r} != {rb[k]!r}") from None


def squash(text: str) -> str:
    """Rich wraps long lines, even inside a path: compare without any white space."""
    return "".join(text.split())


def last_json_line(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines, "no JSON on stdout"
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- first run

def test_first_run_writes_what_screen_writes(root, tmp_path, models):
    (root / "V02" / "notes.txt").write_text("not an image")
    (root / "labels.csv").write_text("patient_id,label\n")
    res = batch(root, tmp_path / "out", models)
    assert res.exit_code == 0
    s = res.summary
    assert SUMMARY_KEYS <= set(s)
    assert (s["new"], s["changed"], s["unchanged"], s["failed"], s["removed"], s["images"]) == (3, 0, 0, 0, 0, 6)
    assert res.screened == ["V01", "V02", "V03"]
    check_consistent(tmp_path / "out", root, complete=True)

    ref = api.screen([root], tmp_path / "ref", **models)
    for name in ("patients.csv", "images.csv", "skipped.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name

    run = read_json(tmp_path / "out" / "run.json")
    assert run["batch"]["new"] == 3 and run["batch"]["journal"].endswith("batch.sqlite")
    assert set(run["models"]) == {"segmenter", "classifier"}
    assert all(len(m["sha256"]) == 64 for m in run["models"].values())
    assert run["config"]["threshold"] == run["threshold"] and "voting" in run["config"]
    assert run["counts"]["patients"] == 3 and run["exit_code"] == 0
    assert (tmp_path / "out" / ".cervscan" / "batch.sqlite").is_file()


def test_empty_root_has_no_visit_and_no_bogus_patient(tmp_path, models):
    (tmp_path / "root").mkdir()
    res = batch(tmp_path / "root", tmp_path / "out", models)
    assert res.exit_code == 0 and res.summary["new"] == 0
    assert read_csv(tmp_path / "out" / "patients.csv") == []
    add_visit(tmp_path / "root", "V01", 1, seed=1)
    assert batch(tmp_path / "root", tmp_path / "out", models).screened == ["V01"]


def test_missing_root_fails_before_writing(tmp_path, models):
    with pytest.raises(CervscanError, match="no such root: path does not exist"):
        batch(tmp_path / "no such root", tmp_path / "out", models)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- incremental runs

def test_nothing_changed_screens_nothing_and_leaves_the_csvs_alone(root, tmp_path, models):
    out = tmp_path / "out"
    batch(root, out, models)
    files = [out / n for n in ("patients.csv", "images.csv", "skipped.csv")] + sorted((out / "masks").rglob("*.png"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    res = batch(root, out, models)
    s = res.summary
    assert (s["new"], s["changed"], s["unchanged"], s["images"], s["failed"]) == (0, 0, 3, 0, 0)
    assert res.screened == [] and res.exit_code == 0
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    # speed-only settings are not part of the configuration fingerprint
    assert batch(root, out, models, batch_images=1).summary["unchanged"] == 3


def test_quiet_night_loads_no_model(root, tmp_path, models, monkeypatch):
    out = tmp_path / "out"
    batch(root, out, models)
    first = read_json(out / "run.json")
    import cervscan.pipeline.build

    real = cervscan.pipeline.build.resolve

    def refuse(**kw):
        raise AssertionError("a night with nothing to screen must not load the models")

    monkeypatch.setattr(cervscan.pipeline.build, "resolve", refuse)
    res = batch(root, out, models)
    assert res.screened == [] and res.summary["unchanged"] == 3
    run = read_json(out / "run.json")
    assert run["batch"]["models_loaded"] is False and run["batch"]["unchanged"] == 3
    assert run["models"] == first["models"] and run["config"] == first["config"]
    # without the last run.json (same inputs) the models are loaded to write it again
    (out / "run.json").unlink()
    with pytest.raises(AssertionError, match="must not load"):
        batch(root, out, models)
    monkeypatch.setattr(cervscan.pipeline.build, "resolve", real)
    assert batch(root, out, models).summary["unchanged"] == 3
    assert read_json(out / "run.json")["models"] == first["models"]
    add_visit(root, "V04", 1, seed=4)
    res = batch(root, out, models)
    assert res.screened == ["V04"] and read_json(out / "run.json")["batch"]["models_loaded"] is True


def test_added_visit_is_the_only_one_screened(root, tmp_path, models):
    out = tmp_path / "out"
    batch(root, out, models)
    pats0, imgs0 = rows_by(out)
    add_visit(root, "V04", 2, seed=4)
    res = batch(root, out, models)
    assert res.screened == ["V04"]
    assert (res.summary["new"], res.summary["unchanged"], res.summary["images"]) == (1, 3, 2)
    pats, imgs = rows_by(out)
    check_consistent(out, root, complete=True)
    assert {k: v for k, v in pats.items() if k != "V04"} == pats0
    assert {k: v for k, v in imgs.items() if k[0] != "V04"} == imgs0


def test_added_changed_or_removed_image_rescreens_that_visit(root, tmp_path, models):
    out = tmp_path / "out"
    batch(root, out, models)
    write_image(root / "V02" / "img9.png", synthetic_image(np.random.default_rng(9)))
    res = batch(root, out, models)
    assert res.screened == ["V02"] and res.summary["changed_because"] == {"files": 1}
    assert rows_by(out)[0]["V02"]["n_images"] == "4"

    img = root / "V01" / "img1.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same bytes, new mtime
    assert batch(root, out, models).screened == ["V01"]

    (root / "V02" / "img2.jpg").unlink()
    assert batch(root, out, models).screened == ["V02"]
    assert not (out / "masks" / "V02" / "img2.png").exists()  # the old result's files are removed
    check_consistent(out, root, complete=True)


def test_changed_model_rescreens_everything(root, tmp_path, models):
    from helpers import make_tiny_models

    out = tmp_path / "out"
    batch(root, out, models)
    other = make_tiny_models(tmp_path / "other-models", seed=1)
    res = batch(root, out, {**models, "cls_model": str(other["cls"])})
    assert res.screened == ["V01", "V02", "V03"]
    assert res.summary["changed_because"] == {"models": 3}
    sha = read_json(out / "run.json")["models"]["classifier"]["sha256"]
    assert all(p["cls_model"].endswith(sha[:12]) for p in read_csv(out / "patients.csv"))


def test_changed_config_rescreens_everything(root, tmp_path, models):
    out = tmp_path / "out"
    batch(root, out, models)
    cfg = tmp_path / "screen.json"
    cfg.write_text(json.dumps({"threshold": 0.25}))
    res = batch(root, out, models, config_file=str(cfg))
    assert res.summary["changed"] == 3 and res.summary["changed_because"] == {"config": 3}
    assert {p["threshold"] for p in read_csv(out / "patients.csv")} == {"0.250000"}
    assert batch(root, out, models, config_file=str(cfg)).screened == []
    assert batch(root, out, models, overrides={"threshold": 0.3}).summary["changed_because"] == {"config": 3}


def test_removed_visit_keeps_its_last_result(root, tmp_path, models, caplog):
    out = tmp_path / "out"
    batch(root, out, models)
    pats0, imgs0 = rows_by(out)
    shutil.move(root / "V02", tmp_path / "archived-V02")
    caplog.set_level(logging.INFO, logger="cervscan")
    res = batch(root, out, models)
    assert (res.summary["removed"], res.summary["unchanged"], res.screened) == (1, 2, [])
    pats, imgs = rows_by(out)
    assert imgs == imgs0
    assert {k: v for k, v in pats.items() if k != "V02"} == {k: v for k, v in pats0.items() if k != "V02"}
    # the kept result says that its folder is gone, and nothing else of it changed
    assert pats["V02"]["reason"] == B.removed_note(str((root / "V02").resolve()))
    assert {k: v for k, v in pats["V02"].items() if k != "reason"} == {k: v for k, v in pats0["V02"].items()
                                                                       if k != "reason"}
    assert "V02" in caplog.text and "no longer in ROOT" in caplog.text
    assert (out / "masks" / "V02").is_dir()
    # the folder comes back unchanged: not screened again, and the note goes
    shutil.move(tmp_path / "archived-V02", root / "V02")
    res = batch(root, out, models)
    assert res.screened == [] and res.summary["removed"] == 0
    assert rows_by(out) == (pats0, imgs0)


def test_failed_image_exits_3_once(root, tmp_path, models):
    out = tmp_path / "out"
    (root / "V02" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    res = batch(root, out, models)
    assert res.exit_code == EXIT_FAILED
    assert (res.summary["failed"], res.summary["failed_ids"]) == (1, ["V02"])
    assert read_json(out / "run.json")["exit_code"] == 3
    # the next night the same files are not screened again, and nothing new failed
    res = batch(root, out, models)
    assert res.exit_code == 0 and res.summary["failed"] == 0 and res.screened == []


# --------------------------------------------------------------------------- crash safety (in process)

def test_crash_between_files_and_commit_is_redone_once(root, tmp_path, models, monkeypatch):
    out = tmp_path / "out"
    batch(root, out, models)
    add_visit(root, "V04", 2, seed=4)
    add_visit(root, "V05", 1, seed=5)
    real = B.Journal.save_visit

    def die_at_v05(self, pid, *a, **k):
        if pid == "V05":
            raise KeyboardInterrupt("simulated crash")
        return real(self, pid, *a, **k)

    monkeypatch.setattr(B.Journal, "save_visit", die_at_v05)
    with pytest.raises(KeyboardInterrupt):
        batch(root, out, models, csv_every=1)
    # V04 was committed and the tables were rewritten after it; V05 was not
    assert set(rows_by(out)[0]) == {"V01", "V02", "V03", "V04"}
    monkeypatch.setattr(B.Journal, "save_visit", real)
    res = batch(root, out, models)
    assert res.screened == ["V05"]
    check_consistent(out, root, complete=True)


def test_temp_files_of_an_interrupted_write_are_swept(root, tmp_path, models):
    out = tmp_path / "out"
    batch(root, out, models)
    left = [out / ".patients.csv.a1b2c3d4.tmp", out / "masks" / "V01" / ".img1.png.x_9yz123.tmp",
            out / ".cervscan-write-test"]
    for p in left:
        p.write_bytes(b"half")
    keep = out / ".my-notes"
    keep.write_text("not ours")
    batch(root, out, models)
    assert not any(p.exists() for p in left) and keep.exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_write_error_on_a_csv_names_it_and_keeps_earlier_results(root, tmp_path, models, monkeypatch, err):
    out = tmp_path / "out"
    batch(root, out, models)
    before = (out / "patients.csv").read_bytes()
    add_visit(root, "V04", 1, seed=4)
    real = cio.atomic_write_bytes

    def fail_patients(path, data):
        if Path(path).name == "patients.csv":
            raise OSError(err, os.strerror(err))
        return real(path, data)

    monkeypatch.setattr(cio.atomic, "atomic_write_bytes", fail_patients)
    with pytest.raises(CervscanError) as ei:
        batch(root, out, models)
    msg = str(ei.value)
    assert str(out / "patients.csv") in msg and os.strerror(err) in msg and "batch.sqlite" in msg
    assert (out / "patients.csv").read_bytes() == before
    check_consistent(out, root, complete=False)
    monkeypatch.setattr(cio.atomic, "atomic_write_bytes", real)
    res = batch(root, out, models)
    assert res.screened == [] and res.summary["unchanged"] == 4  # V04 had been committed before the failure
    check_consistent(out, root, complete=True)


def test_disk_full_while_writing_masks_keeps_earlier_results(root, tmp_path, models, monkeypatch, capsys):
    out = tmp_path / "out"
    batch(root, out, models)
    before = {n: (out / n).read_bytes() for n in ("patients.csv", "images.csv", "skipped.csv")}
    add_visit(root, "V04", 2, seed=4)
    real = cio.atomic_write_bytes

    def full(path, data):
        if "V04" in Path(path).parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(cio.atomic, "atomic_write_bytes", full)
    r = CliRunner().invoke(app, ["batch", str(root), "-o", str(out), "--seg-model", models["seg_model"],
                                 "--cls-model", models["cls_model"], "--device", "cpu", "--no-stage", "--json"])
    assert r.exit_code == 1
    err = squash(r.stderr)
    assert squash(str(out)) in err and "V04" in err and squash("No space left on device") in err
    assert "Traceback" not in r.output
    assert last_json_line(r.stdout)["exit_code"] == 1
    assert {n: (out / n).read_bytes() for n in before} == before
    monkeypatch.setattr(cio.atomic, "atomic_write_bytes", real)
    assert batch(root, out, models).screened == ["V04"]
    check_consistent(out, root, complete=True)


def test_journal_commit_failure_names_the_journal(root, tmp_path, models, monkeypatch):
    out = tmp_path / "out"
    batch(root, out, models)
    before = (out / "patients.csv").read_bytes()
    add_visit(root, "V04", 1, seed=4)
    real_commit, real_save = B.Journal._commit, B.Journal.save_visit

    def saving(self, *a, **k):
        self.saving = True
        return real_save(self, *a, **k)

    def full(self):  # the visit's commit fails (the schema check and the run's start went through)
        if getattr(self, "saving", False):
            raise sqlite3.OperationalError("database or disk is full")
        return real_commit(self)

    monkeypatch.setattr(B.Journal, "save_visit", saving)
    monkeypatch.setattr(B.Journal, "_commit", full)
    with pytest.raises(CervscanError) as ei:
        batch(root, out, models)
    msg = str(ei.value)
    assert str(out / ".cervscan" / "batch.sqlite") in msg and "disk is full" in msg and "V04" in msg
    assert (out / "patients.csv").read_bytes() == before
    monkeypatch.setattr(B.Journal, "_commit", real_commit)
    monkeypatch.setattr(B.Journal, "save_visit", real_save)
    assert batch(root, out, models).screened == ["V04"]
    check_consistent(out, root, complete=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or running_as_root(), reason="root can write to read-only folders")
def test_read_only_out_exits_1_and_keeps_results(root, tmp_path, cli_models, models):
    out = tmp_path / "out"
    batch(root, out, models)
    before = (out / "patients.csv").read_bytes()
    add_visit(root, "V04", 1, seed=4)
    out.chmod(0o555)
    try:
        r = CliRunner().invoke(app, ["batch", str(root), "-o", str(out), *cli_models])
    finally:
        out.chmod(0o755)
    assert r.exit_code == 1
    assert squash(str(out)) in squash(r.stderr) and "notwritable" in squash(r.stderr)
    assert (out / "patients.csv").read_bytes() == before


# --------------------------------------------------------------------------- locking

HOLDER = textwrap.dedent("""
    import sys, time
    from cervscan.batch.lock import BatchLock
    lock = BatchLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
""")


def hold_lock(out: Path, seconds: float) -> subprocess.Popen:
    """Another process holding OUT's lock for ``seconds``."""
    (out / ".cervscan").mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / ".cervscan" / "batch.lock"), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_live_lock_exits_4_at_once_or_after_the_wait_timeout(root, tmp_path, cli_models):
    out = tmp_path / "out"
    holder = hold_lock(out, 60)
    try:
        t0 = time.monotonic()
        r = CliRunner().invoke(app, ["batch", str(root), "-o", str(out), *cli_models, "--json"])
        assert r.exit_code == 4 and time.monotonic() - t0 < 15
        err = squash(r.stderr)
        assert f"pid{holder.pid}" in err and squash(str(out / ".cervscan" / "batch.lock")) in err and "--wait" in err
        assert last_json_line(r.stdout)["exit_code"] == 4
        assert not (out / "patients.csv").exists()

        t0 = time.monotonic()
        r = CliRunner().invoke(app, ["batch", str(root), "-o", str(out), *cli_models, "--wait", "--wait-timeout", "1"])
        assert r.exit_code == 4 and 1 <= time.monotonic() - t0 < 15
        assert "stilllockedafterwaiting" in squash(r.stderr)
    finally:
        holder.kill()
        holder.wait()


def test_wait_waits_for_the_holder_then_runs(root, tmp_path, cli_models):
    out = tmp_path / "out"
    holder = hold_lock(out, 2.0)
    try:
        r = CliRunner().invoke(app, ["batch", str(root), "-o", str(out), *cli_models, "--wait", "--json"])
    finally:
        holder.kill()
        holder.wait()
    assert r.exit_code == 0, r.output
    s = last_json_line(r.stdout)
    assert s["new"] == 3 and s["lock_wait_s"] >= 0.5


def test_lock_of_a_dead_process_is_taken_over(root, tmp_path, models, caplog):
    out = tmp_path / "out"
    holder = hold_lock(out, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = out / ".cervscan" / "batch.lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the dead holder's details are still there
    caplog.set_level(logging.INFO, logger="cervscan")
    res = batch(root, out, models)
    assert res.exit_code == 0 and res.summary["new"] == 3
    assert "took over the lock" in caplog.text and str(holder.pid) in caplog.text
    assert lock.read_text() == ""  # released


def test_second_run_in_the_same_process_is_refused(tmp_path):
    with B.BatchLock(tmp_path / "lock") as a:
        a.acquire()
        with pytest.raises(BatchLockedError, match=f"pid {os.getpid()}"):
            B.BatchLock(tmp_path / "lock").acquire()
    with B.BatchLock(tmp_path / "lock") as b:
        b.acquire()


# --------------------------------------------------------------------------- observability

def test_cli_json_summary_log_file_and_exit_codes(root, tmp_path, cli_models):
    out, log_file = tmp_path / "out", tmp_path / "logs" / "batch.log"
    args = ["batch", str(root), "-o", str(out), *cli_models, "--json", "--log-file", str(log_file)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) == 1  # one line: appendable to a .jsonl
    s = last_json_line(r.stdout)
    assert SUMMARY_KEYS <= set(s) and (s["new"], s["images"], s["inadequate"]) == (3, 6, 0)
    assert s["images_per_s"] > 0 and s["out"] == str(out.resolve())
    lines = log_file.read_text().splitlines()
    assert lines and all(ln[:4].isdigit() and ln[10] == "T" for ln in lines), lines[:3]
    assert any("screened V02 (new)" in ln for ln in lines) and any("done:" in ln for ln in lines)

    (root / "V03" / "bad.png").write_bytes(b"")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 3
    assert "V03" in r.stderr and "failed" in r.stderr  # cron mails stderr
    s = last_json_line(r.stdout)
    assert (s["changed"], s["failed"], s["failed_ids"]) == (1, 1, ["V03"])


def test_api_log_file_records_the_run_and_a_refused_one(root, tmp_path, models):
    out, log_file = tmp_path / "out", tmp_path / "logs" / "batch.log"
    handlers = list(logging.getLogger("cervscan").handlers)
    batch(root, out, models, log_file=log_file)
    first = log_file.read_text(encoding="utf-8")
    assert "plan: 3 new, 0 changed" in first and "tables: written" in first
    with B.BatchLock(out / ".cervscan" / "batch.lock") as held:
        held.acquire()
        with pytest.raises(BatchLockedError):
            batch(root, out, models, log_file=log_file)
    refused = log_file.read_text(encoding="utf-8")[len(first):]
    assert "ERROR" in refused and "another batch run is in progress" in refused
    assert logging.getLogger("cervscan").handlers == handlers  # the file handler is gone after the run


def test_cli_reaches_the_batch_only_through_api():
    import ast

    import cervscan.cli

    tree = ast.parse(Path(cervscan.cli.__file__).read_text(encoding="utf-8"))
    from_batch = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  and (n.module or "").startswith("cervscan.batch")]
    assert from_batch == []


def test_cli_help_documents_batch(cli_models):
    r = CliRunner().invoke(app, ["batch", "--help"])
    assert r.exit_code == 0
    flat = " ".join(r.output.split())
    for opt in ("--out", "--wait", "--wait-timeout", "--log-file", "--json", "--report", "--config", "--no-stage"):
        assert opt in flat, opt
    assert "4 another batch run holds OUT's lock" in flat


def test_report_only_for_new_or_changed_visits(root, tmp_path, models, monkeypatch):
    import cervscan.report.reports as R

    out = tmp_path / "out"
    calls = []
    monkeypatch.setattr(R, "write_reports", lambda o, **kw: calls.append(kw["patients"]) or [])
    batch(root, out, models, report=True)
    add_visit(root, "V04", 1, seed=4)
    batch(root, out, models, report=True)
    batch(root, out, models, report=True)  # nothing new: no report
    assert calls == [["V01", "V02", "V03"], ["V04"]]


def test_real_reports_from_a_batch_output(tmp_path, models):
    root = tmp_path / "root"
    add_visit(root, "V01", 1, seed=1)
    res = batch(root, tmp_path / "out", models, report=True, report_options={"heatmaps": False})
    assert sorted(p.name for p in res.reports) == ["V01.pdf", "summary.pdf"]
    assert all(p.stat().st_size > 1000 for p in res.reports)


# --------------------------------------------------------------------------- kill -9 fault injection

class _Night:
    """One ``cervscan batch`` subprocess, its log read from where this run starts."""

    def __init__(self, args: list[str], env: dict, log_file: Path):
        self.log_file = log_file
        self.offset = log_file.stat().st_size if log_file.exists() else 0
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def log(self) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(self.offset)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, text: str, after: str = "", timeout: float = 120) -> bool:
        """True once ``text`` is logged after ``after``; False when the process ended first."""
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            lg = self.log()
            i = lg.find(after) if after else 0
            if i >= 0 and text in lg[i + len(after):]:
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {text!r}")

    def kill(self) -> bool:
        """SIGKILL; False when the run had already finished."""
        if self.proc.poll() is not None:
            return False
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return True


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_or_duplicates(tmp_path, tiny_models):
    seed = int(os.environ.get("CERVSCAN_FAULT_SEED", "20261128"))
    rng = random.Random(seed)
    root, out, log_file = tmp_path / "root", tmp_path / "out", tmp_path / "batch.log"
    for k in range(12):
        add_visit(root, f"V{k:02d}", 1 + k % 4, seed=k)
    cfg = tmp_path / "screen.json"
    cfg.write_text(json.dumps({"threshold": 0.5}))
    args = [sys.executable, "-m", "cervscan", "batch", str(root), "-o", str(out), "--seg-model",
            str(tiny_models["seg"]), "--cls-model", str(tiny_models["cls"]), "--device", "cpu", "--workers", "0",
            "--no-stage", "--config", str(cfg), "--csv-every", "2", "--json", "-q", "--log-file", str(log_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CERVSCAN_NO_REEXEC": "1", B.TEST_DELAY_ENV: "0.15"}
    kills, csv_kills, moments = 0, 0, []
    done: dict[str, tuple[dict, list[dict]]] = {}  # completed visits not changed since: their rows must stay
    seen: set[str] = set()  # patients.csv never loses a visit
    next_id = 12

    def snapshot() -> None:
        pats, imgs = check_consistent(out, root, complete=True)
        done.clear()
        for p in pats:
            done[p["patient_id"]] = (p, [r for r in imgs if r["patient_id"] == p["patient_id"]])

    def check_after_kill() -> None:
        pats, imgs = check_consistent(out, root, complete=False)
        ids = {p["patient_id"] for p in pats}
        assert seen <= ids, f"visits lost from patients.csv: {seen - ids}"
        seen.update(ids)
        by_id = {p["patient_id"]: p for p in pats}
        for pid, (prow, irows) in done.items():
            assert by_id[pid] == prow, f"completed visit {pid} changed"
            assert [r for r in imgs if r["patient_id"] == pid] == irows, f"images of completed visit {pid} changed"
        db = sqlite3.connect(out / ".cervscan" / "batch.sqlite")
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()

    def mutate(i: int) -> None:
        nonlocal next_id
        kind = i % 4
        if kind == 0 and i:  # the configuration changes: everything is screened again
            cfg.write_text(json.dumps({"threshold": 0.5 if i % 8 == 0 else 0.45}))
            done.clear()
        elif kind == 1:
            for _ in range(2):
                add_visit(root, f"V{next_id:02d}", 1 + next_id % 3, seed=next_id)
                next_id += 1
        elif kind == 2:
            pid = rng.choice(sorted(visits_on_disk(root)))
            write_image(root / pid / f"extra{i}.jpg", synthetic_image(np.random.default_rng(100 + i)))
            other = rng.choice(sorted(visits_on_disk(root)))
            img = root / other / visits_on_disk(root)[other][0]
            st = img.stat()
            os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
            done.pop(pid, None)
            done.pop(other, None)
        else:
            add_visit(root, f"V{next_id:02d}", 2, seed=next_id)
            next_id += 1

    for i in range(24):
        if kills >= 12 and csv_kills >= 2:
            break
        mutate(i)
        night = _Night(args, env, log_file)
        mode = ("csv", "any", "screening")[i % 3]
        if mode == "any":  # any moment from the start: imports, lock, journal, model loading, screening
            time.sleep(rng.uniform(0.05, 6.0))
        elif night.wait_for("plan:"):
            if mode == "csv":
                night.wait_for("tables: writing", after="plan:")
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                lg = night.log()
                n = sum(int(x) for x in re.findall(r"plan: (\d+) new, (\d+) changed", lg)[0])
                time.sleep(rng.uniform(0.0, max(0.2, 0.5 * n)))
        lg = night.log()
        if night.kill():
            kills += 1
            in_tables = lg.rfind("tables: writing") > max(lg.rfind("tables: written"), lg.rfind("plan:"), -1) >= 0
            csv_kills += in_tables
            moments.append(("tables" if in_tables else mode, lg.strip().splitlines()[-1][:80] if lg.strip() else ""))
            check_after_kill()
        else:
            assert night.proc.returncode == 0
            check_consistent(out, root, complete=True)
        if i % 4 == 3:  # now and then a night that runs to its end
            night = _Night(args, env, log_file)
            assert night.proc.wait(timeout=300) == 0
            snapshot()
            seen.update(done)

    # the final complete night, then compare with an uninterrupted run over the same ROOT
    night = _Night(args, env, log_file)
    assert night.proc.wait(timeout=300) == 0
    pats, imgs = check_consistent(out, root, complete=True)
    ref = api.batch(root, tmp_path / "ref", seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]),
                    device="cpu", num_workers=0, use_stage=False, config_file=str(cfg))
    assert ref.exit_code == 0
    ref_pats, ref_imgs = check_consistent(tmp_path / "ref", root, complete=True)
    same_rows_within(pats, ref_pats)
    same_rows_within(imgs, ref_imgs)
    print(f"seed {seed}: {kills} kills ({csv_kills} while writing the CSVs): {moments}")
    assert kills >= 10 and csv_kills >= 1, (kills, csv_kills, moments)
