"""Clinic safety of ``cervscan report``: every patient id readable and distinct on paper, whatever its
script; a read-only output folder; tables of different runs never reported together (CPU, fast)."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cervscan.errors import CervscanError
from cervscan.pipeline.steps import IMAGE_COLUMNS, PATIENT_COLUMNS

from conftest import synthetic_image, write_image

LATIN = "Pérez-Núñez"
CJK = ("李娜", "王芳")
ARABIC = "فاطمة"
DEVANAGARI = "सीता"
EMOJI = "pac 😀 ñ"
IDS = (LATIN, *CJK, ARABIC, DEVANAGARI, EMOJI)


def escaped(pid: str, missing: str) -> str:
    """The documented fallback: each character in ``missing`` (and each backslash) as a Python code point
    escape (\\xNN, \\uNNNN, \\UNNNNNNNN), everything else as written."""
    out = []
    for ch in pid:
        if ch in missing or ch == "\\":
            o = ord(ch)
            out.append("\\\\" if ch == "\\" else f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000
                       else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def pdf_text(pdf: Path) -> str:
    from pypdf import PdfReader

    return unicodedata.normalize("NFC", "\n".join(p.extract_text() or "" for p in PdfReader(pdf).pages))


def id_line(pdf: Path) -> str:
    """The printed patient id: the line after 'Patient ID' in the report's text."""
    lines = pdf_text(pdf).splitlines()
    return lines[lines.index("Patient ID") + 1]


def embedded_fonts(pdf: Path) -> set[str]:
    from pypdf import PdfReader

    fonts = set()
    for page in PdfReader(pdf).pages:
        for f in (page["/Resources"].get("/Font") or {}).values():
            fonts.add(str(f.get_object()["/BaseFont"]))
    return fonts


def write_tables(out: Path, ids, *, run: dict | None = None) -> Path:
    """A minimal output folder: one patient without images (decision error) per id."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run or {"command": "screen", "models": {}, "threshold": 0.5}),
                                  encoding="utf-8")
    with open(out / "patients.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, PATIENT_COLUMNS, lineterminator="\n")
        w.writeheader()
        for pid in ids:
            w.writerow({"patient_id": pid, "decision": "error", "threshold": 0.5, "n_images": 0, "n_used": 0,
                        "n_eligible": 0, "n_failed": 0, "error": "no image files in visit folder"})
    with open(out / "images.csv", "w", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, IMAGE_COLUMNS, lineterminator="\n").writeheader()
    return out


@pytest.fixture
def fresh_fonts(monkeypatch):
    """A new font chain for the test (the fallback fonts are looked up again)."""
    import cervscan.report.fonts as F

    monkeypatch.setattr(F, "_CHAIN", None)
    return F


def reports_by_id(paths: list[Path], ids) -> dict[str, Path]:
    return dict(zip(ids, paths[:-1]))


# --------------------------------------------------------------------------- ids in any script

def test_every_id_is_printed_as_written_or_as_code_points(tmp_path, fresh_fonts, caplog):
    from cervscan.report import write_reports

    out = write_tables(tmp_path / "out", IDS)
    with caplog.at_level(logging.WARNING, logger="cervscan"):
        paths = write_reports(out, heatmaps=False)
    by_id = reports_by_id(paths, IDS)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    summary = "".join(pdf_text(paths[-1]).split())
    printed = {}
    for pid, pdf in by_id.items():
        line = id_line(pdf)
        printed[pid] = line
        fallback = escaped(pid, "".join(c for c in pid if not c.isascii() and c not in "éúñ"))
        if line == pid:  # a font on this machine has every character
            assert f"patient id {pid!r}" not in warned
        else:  # no font has some character: code points, a note and a warning
            assert line == fallback, (pid, line)
            assert "written with code points" in pdf_text(pdf)
            assert f"patient id {pid!r}" in warned and fallback in warned
        assert "".join(line.split()) in summary  # the summary prints it the same way (may wrap)
        if pid != ARABIC:  # (pypdf moves the spaces around a right-to-left word inside a line)
            assert f"Patient {line} · cervscan" in pdf_text(pdf)  # the footer of every page
    # DejaVu Sans (shipped with matplotlib, a dependency) has Latin, Arabic and the emoticons:
    # these are printed exactly (the emoji used to be lost, Arabic came out in reverse order)
    assert printed[LATIN] == LATIN
    assert printed[ARABIC] == ARABIC
    assert printed[EMOJI] == EMOJI
    # two women with CJK names are never printed alike
    assert printed[CJK[0]] != printed[CJK[1]]
    assert len(set(printed.values())) == len(IDS)


def test_without_a_fallback_font_ids_are_code_points_with_a_warning(tmp_path, fresh_fonts, monkeypatch, caplog):
    """On a machine with no font for CJK or Devanagari (the Last Resort font of matplotlib, which draws
    a placeholder for a whole block, does not count), the ids are printed as code points."""
    import matplotlib

    from cervscan.report import write_reports

    F = fresh_fonts
    last_resort = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "LastResortHE-Regular.ttf"
    monkeypatch.setattr(F, "_fontconfig_candidates", lambda: [])
    monkeypatch.setattr(F, "_folder_candidates", lambda: [F._FontCandidate(last_resort)] if last_resort.is_file()
                        else [])
    ids = (*CJK, DEVANAGARI)
    out = write_tables(tmp_path / "out", ids)
    with caplog.at_level(logging.WARNING, logger="cervscan"):
        paths = write_reports(out, heatmaps=False)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for pid, pdf in reports_by_id(paths, ids).items():
        want = escaped(pid, pid)
        assert id_line(pdf) == want
        assert "written with code points" in pdf_text(pdf)
        assert f"patient id {pid!r}" in warned and want in warned
    assert escaped(CJK[0], CJK[0]) == "\\u674e\\u5a1c" and escaped(CJK[1], CJK[1]) == "\\u738b\\u82b3"


def test_a_character_only_a_fallback_font_has_is_printed_with_that_font(tmp_path, fresh_fonts, monkeypatch):
    """U+1D8D is not in DejaVu Sans but in STIX General (shipped with matplotlib): the id is printed as
    written, with STIX embedded."""
    import matplotlib

    from cervscan.report import write_reports

    F = fresh_fonts
    stix = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "STIXGeneral.ttf"
    monkeypatch.setattr(F, "_fontconfig_candidates", lambda: [])
    monkeypatch.setattr(F, "_folder_candidates", lambda: [F._FontCandidate(stix)])
    pid = "pac \u1d8d-7"
    out = write_tables(tmp_path / "out", [pid])
    paths = write_reports(out, heatmaps=False)
    assert id_line(paths[0]) == pid
    assert any("STIX" in f for f in embedded_fonts(paths[0])), embedded_fonts(paths[0])


def test_ids_that_would_print_alike_get_their_exact_code_points(tmp_path, fresh_fonts):
    """Two folders 'Zoë' (composed, as Linux keeps it) and 'Zoë' (decomposed, as macOS writes it) are two
    ids that look the same: each report adds its exact code points, and their files stay apart."""
    from cervscan.report import write_reports

    nfc, nfd = "Zo\u00eb", "Zoe\u0308"
    out = write_tables(tmp_path / "out", [nfc, nfd])
    paths = write_reports(out, heatmaps=False)
    assert len({p.name for p in paths}) == 3
    t1, t2 = pdf_text(paths[0]), pdf_text(paths[1])
    assert "exact id: Zo\\xeb" in t1 and "exact id: Zoe\\u0308" in t2
    assert "Patient Zoë (exact id: Zo\\xeb) · cervscan" in t1  # also in the footer of every page


def test_hidden_characters_are_printed_as_code_points(tmp_path, fresh_fonts):
    """A zero-width space or a no-break space would make two ids look alike: printed as code points."""
    from cervscan.report import write_reports

    ids = ["P\u200b01", "P 02", "P\u00a002"]
    out = write_tables(tmp_path / "out", ids)
    paths = write_reports(out, heatmaps=False)
    got = [id_line(p) for p in paths[:-1]]
    assert got == ["P\\u200b01", "P 02", "P\\xa002"]


def test_right_to_left_ids_are_drawn_in_display_order():
    """PDF text is drawn left to right in display order (Unicode bidirectional algorithm): a Hebrew or
    Arabic name reversed, its numbers not, brackets around them mirrored, left-to-right ids untouched."""
    from cervscan.report.bidi import visual_order as _visual_order

    assert _visual_order("שרה 12") == "12 הרש"
    assert _visual_order("P-12 שרה") == "P-12 הרש"
    assert _visual_order("فاطمة (2)") == "(2) ةمطاف"
    assert _visual_order("مُحَمَّد")[:2] == "دم"  # marks stay after their letter: 'مَّ' follows 'د'
    assert _visual_order("مُحَمَّد")[2:4] == "َّ"
    for ltr in (LATIN, EMOJI, "a(b)c", *CJK):
        assert _visual_order(ltr) == ltr


def test_file_names_of_reports_never_collide_or_escape(fresh_fonts):
    from cervscan.report.filenames import _file_name, _file_names

    ids = ["a\\b", "a_b", "Anna", "anna", "summary", "summary_patient", "../x", ".hidden", "CON", "x" * 300,
           "caf\\xe9", "caf_xe9", "Zo\u00eb", "Zoe\u0308", "李娜"]
    names = _file_names(ids)
    keys = [unicodedata.normalize("NFC", n).casefold() for n in names.values()]
    assert len(set(keys)) == len(ids)  # apart also where letter case and normalisation are ignored
    for n in names.values():
        assert "/" not in n and "\\" not in n and not n.startswith(".") and len(n.encode()) <= 200
        assert n.split(".")[0].casefold() not in ("summary", "con")
    assert names["李娜"] == "李娜" and names["a_b"] == "a_b"  # a portable id stays as it is
    # a folder name that is not UTF-8 (in memory: a lone surrogate) gets a valid name of its own
    raw = _file_name("caf\udce9")
    assert raw.startswith("caf_xe9~") and raw != names["caf\\xe9"] and raw.encode("utf-8")


# --------------------------------------------------------------------------- read-only output folder

@pytest.fixture
def read_only(tmp_path):
    """Make a folder unwritable: chmod, or for root (who ignores modes) the immutable attribute."""
    made: list[Path] = []

    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        made.append(folder)
        probe = folder / ".probe"
        try:
            probe.touch()
        except OSError:
            return folder
        probe.unlink()
        chattr = shutil.which("chattr")
        if chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0:
            try:
                probe.touch()
            except OSError:
                return folder
            probe.unlink()
        pytest.skip("cannot make a folder read-only here")

    yield make
    for f in made:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(f)], capture_output=True)
        f.chmod(0o755)


def test_report_on_a_read_only_output_folder_is_a_clear_error(tmp_path, read_only, fresh_fonts):
    from cervscan.cli import app

    out = write_tables(tmp_path / "out", ["P001"])
    read_only(out)
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit)  # no traceback
    err = " ".join(r.stderr.split())  # (the console folds long lines)
    assert err.startswith("error:") and "cannot write the reports" in err
    assert str(out / "reports") in "".join(r.stderr.split())  # names the folder


# --------------------------------------------------------------------------- tables that do not belong together

def _visits(root: Path, spec: dict[str, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for pid, n in spec.items():
        for i in range(n):
            write_image(root / pid / f"img{i + 1}.jpg", synthetic_image(rng, 64, 80))
    return root


@pytest.fixture(scope="module")
def two_runs(tiny_models, tmp_path_factory) -> dict:
    """Two screens of the same patient ids with other images (V01: 2 then 3 images)."""
    from cervscan import api

    base = tmp_path_factory.mktemp("two-runs")
    outs = {}
    for k, spec in enumerate(({"V01": 2, "V02": 1}, {"V01": 3, "V02": 1})):
        visits = _visits(base / f"visits{k}", spec, seed=k)
        outs[k] = base / f"out{k}"
        api.screen([visits], outs[k], seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]),
                   device="cpu", num_workers=0, threads=1, use_stage=False)
    return outs


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("reports", "heatmaps"))
    return dst


def test_heatmap_folder_that_cannot_be_written_keeps_the_heatmaps_in_the_report(two_runs, tmp_path, read_only,
                                                                               caplog):
    """OUT/reports can be written but OUT/heatmaps cannot: the heatmap files are not saved (a warning),
    the reports still show the heatmaps."""
    from pypdf import PdfReader

    from conftest import read_csv
    from cervscan.report import write_reports

    out = _copy(two_runs[0], tmp_path / "out")
    (out / "heatmaps").mkdir()
    read_only(out / "heatmaps")
    with caplog.at_level(logging.WARNING, logger="cervscan"):
        paths = write_reports(out, patients=["V01"])
    assert "heatmap file not saved" in caplog.text
    rows = [r for r in read_csv(out / "images.csv") if r["patient_id"] == "V01" and r["status"] == "ok"]
    n_used = sum(r["eligible"] != "False" for r in rows)
    assert n_used, "the test needs an image used for the decision"
    assert sum(len(pg.images) for pg in PdfReader(paths[0]).pages) == 2 * len(rows) + n_used


def test_images_of_another_run_are_refused(two_runs, tmp_path):
    from cervscan.cli import app
    from cervscan.report import write_reports

    out = _copy(two_runs[0], tmp_path / "out")
    paths = write_reports(out, heatmaps=False)  # the folder as screen wrote it is reported
    assert [p.name for p in paths] == ["V01.pdf", "V02.pdf", "summary.pdf"]
    shutil.rmtree(out / "reports")
    shutil.copy(two_runs[1] / "images.csv", out / "images.csv")
    with pytest.raises(CervscanError, match=r"patients\.csv and .*images\.csv do not belong together: patient 'V01': "
                                            r"patients\.csv counts 2 image\(s\) \(n_images\), images\.csv has 3"):
        write_reports(out, heatmaps=False)
    assert not (out / "reports").exists()  # nothing rendered
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "do not belong together" in " ".join(r.stderr.split())


def test_patients_of_another_run_missing_images_are_refused(two_runs, tmp_path):
    """The reported case: a patient 'SEVERE' beside 'No score' and '0 of 5 used'."""
    from conftest import read_csv
    from cervscan.report import write_reports

    out = _copy(two_runs[0], tmp_path / "out")
    rows = [r for r in read_csv(out / "images.csv") if r["patient_id"] != "V01"]
    with open(out / "images.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, IMAGE_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(CervscanError, match=r"patient 'V01': patients\.csv counts 2 image\(s\).*images\.csv has 0"):
        write_reports(out, heatmaps=False)


def test_same_counts_other_scores_or_models_are_refused(two_runs, tmp_path):
    from conftest import read_csv
    from cervscan.report import write_reports

    out = _copy(two_runs[0], tmp_path / "out")
    imgs = read_csv(out / "images.csv")
    orig = [dict(r) for r in imgs]

    def write(rows):
        with open(out / "images.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, IMAGE_COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)

    for r in imgs:  # the same images, scored by another run
        if r["score"]:
            r["score"] = f"{min(1.0, float(r['score']) + 0.2):.6f}"
    write(imgs)
    with pytest.raises(CervscanError, match=r"patients\.csv has score .* the mean of its .* image score\(s\)"):
        write_reports(out, heatmaps=False)
    imgs = [dict(r) for r in orig]
    imgs[0]["cls_model"] = "other-cls@9"
    write(imgs)
    with pytest.raises(CervscanError, match=r"patients\.csv has cls_model .* images\.csv has other-cls@9"):
        write_reports(out, heatmaps=False)
    imgs = [dict(r) for r in orig] + [{**orig[0], "patient_id": "V99"}]
    write(imgs)
    with pytest.raises(CervscanError, match=r"image 'img1\.jpg' of patient 'V99', who is not in patients\.csv"):
        write_reports(out, heatmaps=False)
    write(orig)
    pats = read_csv(out / "patients.csv")
    with open(out / "patients.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, PATIENT_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(pats + pats[:1])
    with pytest.raises(CervscanError, match=r"patient 'V01' appears more than once in patients\.csv"):
        write_reports(out, heatmaps=False)


def test_run_json_of_another_run_is_refused(two_runs, tmp_path):
    from cervscan.report import write_reports

    out = _copy(two_runs[0], tmp_path / "out")
    shutil.copy(two_runs[1] / "images.csv", out / "images.csv")
    shutil.copy(two_runs[1] / "patients.csv", out / "patients.csv")
    with pytest.raises(CervscanError, match=r"run\.json and .*images\.csv do not belong together: run\.json counts 3 "
                                            r"images, images\.csv has 4"):
        write_reports(out, heatmaps=False)


def test_batch_output_is_reported_and_checked(tiny_models, tmp_path):
    from cervscan import api
    from cervscan.report import write_reports

    root = _visits(tmp_path / "root", {"V01": 2, "V02": 1}, seed=3)
    out = tmp_path / "out"
    api.batch(root, out, seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]), device="cpu",
              num_workers=0, use_stage=False)
    paths = write_reports(out, heatmaps=False)
    assert [p.name for p in paths] == ["V01.pdf", "V02.pdf", "summary.pdf"]
    # an interrupted night: images.csv already lists a visit that patients.csv does not have yet
    with open(out / "images.csv", "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, IMAGE_COLUMNS, lineterminator="\n").writerow({"patient_id": "V03", "image": "a.jpg",
                                                                          "status": "ok"})
    with pytest.raises(CervscanError, match=r"do not belong together: .*'V03'.*'cervscan batch' output folder.*"
                                            r"run the batch again"):
        write_reports(out, heatmaps=False)


def test_patient_given_as_a_folder_name_that_is_not_utf8(tmp_path, fresh_fonts):
    """screen writes a Latin-1 folder name as 'caf\\xe9' (cervscan.files.display_id); --patient with the
    folder's name finds it, and its report file name stays inside reports/."""
    from cervscan.report import write_reports

    out = write_tables(tmp_path / "out", ["caf\\xe9", "P2"])
    paths = write_reports(out, patients=[os.fsdecode(b"caf\xe9")], heatmaps=False)
    assert paths[0].parent == out / "reports" and paths[0].name.startswith("caf_xe9~")
    assert id_line(paths[0]) == "caf\\xe9"


def test_cli_report_names_a_file_it_cannot_write(tmp_path, monkeypatch):
    import cervscan.api
    from cervscan.cli import app

    out = write_tables(tmp_path / "out", ["P001"])

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device", str(out / "reports" / "P001.pdf"))

    monkeypatch.setattr(cervscan.api, "write_reports", full_disk)
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)  # no traceback
    assert "No space left on device" in " ".join(r.stderr.split())
    assert str(out / "reports" / "P001.pdf") in "".join(r.stderr.split())


def test_report_never_overwrites_a_file_cervscan_did_not_create(two_runs, tmp_path):
    from cervscan.report import write_reports

    out = _copy(two_runs[0], tmp_path / "out")
    (out / "reports").mkdir()
    theirs = out / "reports" / "V02.pdf"
    theirs.write_bytes(b"the clinic's own letter")
    with pytest.raises(CervscanError, match=r"V02\.pdf: exists and was not written by cervscan"):
        write_reports(out, heatmaps=False)
    assert theirs.read_bytes() == b"the clinic's own letter"
    assert sorted(p.name for p in (out / "reports").iterdir()) == ["V02.pdf"]  # nothing else written
    theirs.unlink()
    first = write_reports(out, heatmaps=False)
    again = write_reports(out, heatmaps=False)  # its own reports it may replace
    assert [p.name for p in first] == [p.name for p in again] == ["V01.pdf", "V02.pdf", "summary.pdf"]


def test_report_refuses_an_output_folder_that_holds_the_runs_input(two_runs, tmp_path):
    from cervscan.report import write_reports

    out = _copy(two_runs[0], tmp_path / "out")
    visits = out / "visits" / "V01"
    visits.mkdir(parents=True)
    original = write_image(visits / "a.jpg", synthetic_image(np.random.default_rng(3)))
    before = original.read_bytes()
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    run["inputs"] = [str(out / "visits")]
    (out / "run.json").write_text(json.dumps(run), encoding="utf-8")
    with pytest.raises(CervscanError, match=r"output folder .* holds the input folder"):
        write_reports(out, heatmaps=False)
    assert original.read_bytes() == before and not (out / "reports").exists()


@pytest.mark.parametrize("bad", ["2026-13-45", "08/12/2026", "yesterday", "2026-2-3"])
def test_exam_date_given_by_hand_must_be_a_real_date(bad):
    from cervscan.report.reports import _check_exam_date

    with pytest.raises(CervscanError, match="YYYY-MM-DD"):
        _check_exam_date(bad)
    _check_exam_date("2026-12-08")
    _check_exam_date(None)
