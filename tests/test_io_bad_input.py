"""Bad and unusual input: each case is its own test.

Three levels: ``read_image`` (decoding), ``discover_visits`` (folders) and a
whole ``screen`` run over a batch that holds every case at once, where each
case must (a) give a clear message naming the file and the reason, (b) not
stop the batch, (c) leave nothing half-written, and (d) turn a patient whose
images all failed into decision ``error`` with the reason.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cervscan.files as cio
import cervscan.files.atomic
import cervscan.files.decode
from cervscan.errors import CervscanError, ImageError
from cervscan.files import discover_visits, read_image

from conftest import assert_no_tmp_files, read_csv, running_as_root, synthetic_image, write_image

RNG_SEED = 1234


def rgb(h=96, w=128, seed=RNG_SEED) -> np.ndarray:
    return synthetic_image(np.random.default_rng(seed), h, w)


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG file whose header claims w x h pixels (a decompression bomb stand-in)."""

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------- file makers (one per case)

def make_zero_byte(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def make_truncated_jpeg(p: Path) -> Path:
    b = jpeg_bytes(rgb())
    p.write_bytes(b[: len(b) // 2])
    return p


def make_text_as_jpg(p: Path) -> Path:
    p.write_text("patient notes, not an image\n")
    return p


def make_png_alpha(p: Path) -> Path:
    a = rgb()
    alpha = np.full(a.shape[:2], 255, np.uint8)
    alpha[:, : a.shape[1] // 2] = 0  # left half fully transparent
    alpha[0, -1] = 128
    Image.fromarray(np.dstack([a, alpha]), "RGBA").save(p)
    return p


def make_grayscale(p: Path) -> Path:
    Image.fromarray(rgb()[..., 1], "L").save(p)
    return p


def make_png16(p: Path) -> Path:
    a = np.zeros((96, 128), np.uint16)
    a[:, 32:64] = 32768
    a[:, 64:] = 65535
    Image.fromarray(a).save(p)  # mode I;16
    return p


def make_cmyk_jpeg(p: Path) -> Path:
    Image.new("CMYK", (128, 96), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    return p


def make_exif_rotated(p: Path) -> Path:
    """Stored landscape 128x96 with a red block in the stored top-left; EXIF orientation 6 (rotate 90 CW)."""
    a = np.full((96, 128, 3), 200, np.uint8)
    a[:20, :20] = (255, 0, 0)
    ex = Image.Exif()
    ex[0x0112] = 6
    Image.fromarray(a).save(p, exif=ex, quality=95)
    return p


def make_huge_jpeg(p: Path) -> Path:
    Image.new("RGB", (8000, 6000), (150, 70, 80)).save(p, quality=50)  # solid colour: ~1 MB
    return p


def make_bomb_png(p: Path) -> Path:
    p.write_bytes(png_header_only(30000, 30000))
    return p


def make_tiny(p: Path) -> Path:
    Image.fromarray(rgb(8, 8)).save(p)
    return p


def make_good(p: Path, seed: int = 7) -> Path:
    return write_image(p, rgb(seed=seed))


# --------------------------------------------------------------------------- read_image, one test per case

def test_zero_byte_file(tmp_path):
    p = make_zero_byte(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        read_image(p)


def test_truncated_jpeg(tmp_path):
    p = make_truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match=r"cut\.jpg: truncated or corrupt image data"):
        read_image(p)


def test_text_file_named_jpg(tmp_path):
    p = make_text_as_jpg(tmp_path / "notes.jpg")
    with pytest.raises(ImageError, match=r"notes\.jpg: not a readable image"):
        read_image(p)


def test_png_with_alpha_is_composited_on_black(tmp_path):
    p = make_png_alpha(tmp_path / "alpha.png")
    d = read_image(p)
    a = rgb()
    assert d.rgb.shape == (96, 128, 3) and d.rgb.dtype == np.uint8
    assert d.rgb[:, :64].max() == 0  # transparent -> black
    np.testing.assert_array_equal(d.rgb[1:, 64:], a[1:, 64:])  # opaque -> unchanged
    np.testing.assert_allclose(d.rgb[0, -1].astype(float), a[0, -1].astype(float) * 128 / 255, atol=1)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_grayscale_becomes_three_equal_channels(tmp_path, ext):
    p = make_grayscale(tmp_path / f"gray{ext}")
    d = read_image(p)
    assert d.rgb.shape == (96, 128, 3)
    np.testing.assert_array_equal(d.rgb[..., 0], d.rgb[..., 1])
    np.testing.assert_array_equal(d.rgb[..., 0], d.rgb[..., 2])
    if ext == ".png":
        np.testing.assert_array_equal(d.rgb[..., 0], rgb()[..., 1])


def test_16_bit_png_is_scaled_to_8_bit(tmp_path):
    p = make_png16(tmp_path / "deep.png")
    assert Image.open(p).mode.startswith("I")
    d = read_image(p)
    assert d.rgb.dtype == np.uint8 and d.rgb.shape == (96, 128, 3)
    assert (d.rgb[:, :32] == 0).all()
    assert (d.rgb[:, 32:64] == 128).all()  # 32768 / 65535 * 255 = 127.5 -> 128, not 255 (clipped) or 0 (truncated)
    assert (d.rgb[:, 64:] == 255).all()


def test_48_bit_rgb_png(tmp_path):
    import cv2

    a = np.zeros((96, 128, 3), np.uint16)
    a[..., 2] = 65535  # cv2 writes BGR: channel 2 is red
    a[..., 1] = 256 * 100
    cv2.imwrite(str(tmp_path / "rgb48.png"), a)
    d = read_image(tmp_path / "rgb48.png")
    assert d.rgb.dtype == np.uint8
    assert tuple(d.rgb[5, 5]) == (255, 100, 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    p = make_cmyk_jpeg(tmp_path / "cmyk.jpg")
    assert Image.open(p).mode == "CMYK"
    d = read_image(p)
    assert d.rgb.shape == (96, 128, 3) and d.rgb.dtype == np.uint8
    r, g, b = d.rgb[48, 64].astype(int)
    assert r > 240 and g < 15 and b < 15, (r, g, b)


def test_exif_rotated_jpeg_is_decided_upright(tmp_path):
    p = make_exif_rotated(tmp_path / "rotated.jpg")
    with Image.open(p) as im:
        assert im.size == (128, 96) and im.getexif()[0x0112] == 6  # stored landscape
    d = read_image(p)
    assert d.rgb.shape == (128, 96, 3)  # portrait
    assert (d.width, d.height) == (96, 128)
    assert d.scale == 1.0
    # rotating 90 degrees clockwise moves the stored top-left corner to the top-right
    tr, tl = d.rgb[5, 90].astype(int), d.rgb[5, 5].astype(int)
    assert tr[0] > 200 and tr[1] < 60 and tr[2] < 60, tr
    assert abs(tl - 200).max() < 20, tl


def test_exif_rotated_large_jpeg_reports_the_upright_original_size(tmp_path):
    ex = Image.Exif()
    ex[0x0112] = 8
    p = tmp_path / "big-rotated.jpg"
    Image.new("RGB", (3000, 1000), (10, 120, 200)).save(p, exif=ex)
    d = read_image(p, max_side=500)
    assert d.rgb.shape == (500, 167, 3)
    assert (d.width, d.height) == (1000, 3000)
    assert d.scale == pytest.approx(167 / 1000)


def test_very_large_jpeg_is_decoded_down_to_max_side(tmp_path):
    p = make_huge_jpeg(tmp_path / "huge.jpg")
    assert p.stat().st_size < 3_000_000
    d = read_image(p)
    assert d.rgb.shape == (1536, 2048, 3)
    assert (d.width, d.height) == (8000, 6000)
    assert d.scale == pytest.approx(2048 / 8000)
    assert abs(d.rgb[700, 1000].astype(int) - (150, 70, 80)).max() <= 3
    d = read_image(p, max_side=300)
    assert d.rgb.shape == (225, 300, 3)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for the peak RSS")
def test_very_large_jpeg_decode_is_memory_bounded(tmp_path):
    """A full 8000x6000 decode needs >= 144 MB per copy (~460 MB peak); the reduced-scale decode ~120 MB.

    Measured in a fresh process with VmHWM (peak RSS of this process image; ru_maxrss
    would carry over the forking pytest process's size across exec).
    """
    p = make_huge_jpeg(tmp_path / "huge.jpg")
    code = ("import sys, numpy, cv2, PIL.Image\n"
            "from cervscan.files import read_image\n"
            "def hwm():\n"
            "    with open('/proc/self/status') as f:\n"
            "        return int(next(l for l in f if l.startswith('VmHWM')).split()[1])\n"
            "b = hwm()\n"
            "d = read_image(sys.argv[1])\n"
            "a = hwm()\n"
            "print(d.rgb.shape[1], (a - b) // 1024)\n")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    width, grew_mb = map(int, r.stdout.split())
    assert width == 2048
    assert grew_mb < 250, f"decoding an 8000x6000 JPEG grew the process by {grew_mb} MB"


def test_image_over_max_pixels_is_refused_as_too_large(tmp_path):
    p = make_huge_jpeg(tmp_path / "huge.jpg")
    with pytest.raises(ImageError, match=r"huge\.jpg: image too large \(8000x6000 = 48 MP > 10 MP"):
        read_image(p, max_pixels=10_000_000)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    p = make_bomb_png(tmp_path / "bomb.png")
    assert p.stat().st_size < 200
    with pytest.raises(ImageError, match=r"bomb\.png: image too large \(30000x30000 = 900 MP > 120 MP"):
        read_image(p)  # default guard


def test_tiny_image_is_too_small(tmp_path):
    p = make_tiny(tmp_path / "tiny.png")
    with pytest.raises(ImageError, match=r"tiny\.png: image too small \(8x8; need at least 32 px"):
        read_image(p)
    assert read_image(p, min_side=8).rgb.shape == (8, 8, 3)


def test_names_with_spaces_and_non_ascii_letters(tmp_path):
    p = make_good(tmp_path / "Ana María Ñúñez" / "colposcopia ção 1 ü.jpg")
    d = read_image(p)
    assert d.rgb.shape == (96, 128, 3)
    with pytest.raises(ImageError) as ei:
        read_image(make_zero_byte(p.with_name("vazio ção.jpg")))
    assert "vazio ção.jpg" in str(ei.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or running_as_root(), reason="root can read chmod-000 files")
def test_unreadable_file_permissions(tmp_path):
    p = make_good(tmp_path / "locked.jpg")
    p.chmod(0)
    try:
        with pytest.raises(ImageError, match=r"locked\.jpg: permission denied"):
            read_image(p)
    finally:
        p.chmod(0o644)


def _deny(name: str):
    real_open = open

    def fake_open(file, *a, **k):
        if Path(file).name == name:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    return fake_open


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    """Same as above but works as root: the open() used by cervscan.files raises PermissionError."""
    p = make_good(tmp_path / "locked.jpg")
    monkeypatch.setattr(cervscan.files.decode, "open", _deny("locked.jpg"), raising=False)
    with pytest.raises(ImageError, match=r"locked\.jpg: permission denied"):
        read_image(p)
    assert read_image(make_good(tmp_path / "other.jpg")).rgb.shape == (96, 128, 3)


def test_symlink_loop(tmp_path):
    a, b = tmp_path / "loop_a.jpg", tmp_path / "loop_b.jpg"
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    with pytest.raises(ImageError, match=r"loop_a\.jpg: cannot read \(.*symbolic links"):
        read_image(a)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"gone\.jpg: cannot read \(No such file"):
        read_image(tmp_path / "gone.jpg")


@pytest.mark.parametrize("fmt, ext", [("BMP", ".bmp"), ("TIFF", ".tif"), ("PNG", ".png")])
def test_other_formats_and_palette(tmp_path, fmt, ext):
    a = rgb()
    p = tmp_path / f"x{ext}"
    Image.fromarray(a).save(p, fmt)
    np.testing.assert_array_equal(read_image(p).rgb, a)
    Image.fromarray(a).convert("P").save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").rgb.shape == (96, 128, 3)


# --------------------------------------------------------------------------- folder discovery

def test_hidden_and_non_image_files_are_skipped_and_listed(tmp_path):
    v = tmp_path / "P1"
    make_good(v / "a.jpg")
    (v / ".DS_Store").write_bytes(b"\x00\x01")
    make_good(v / ".hidden.jpg")
    (v / "notes.txt").write_text("x")
    (v / "Thumbs.db").write_bytes(b"x")
    visits = discover_visits([v])
    assert [p.name for p in visits[0].images] == ["a.jpg"]
    assert dict(visits[0].skipped) == {".DS_Store": "hidden", ".hidden.jpg": "hidden",
                                       "Thumbs.db": "not an image file", "notes.txt": "not an image file"}


def test_subfolders_inside_a_visit_are_not_descended_into(tmp_path):
    v = tmp_path / "P1"
    make_good(v / "a.jpg")
    make_good(v / "nested patient" / "b.jpg")
    visits = discover_visits([v])
    assert len(visits) == 1 and [p.name for p in visits[0].images] == ["a.jpg"]
    assert visits[0].skipped == [("nested patient/", "sub-folder inside a visit folder (not descended into)")]


def test_empty_visit_folder(tmp_path):
    (tmp_path / "P9").mkdir()
    visits = discover_visits([tmp_path / "P9"])
    assert visits[0].patient_id == "P9" and visits[0].error == "no image files in visit folder"


def test_batch_folder_expands_to_visits(tmp_path):
    make_good(tmp_path / "b" / "P1" / "a.jpg")
    (tmp_path / "b" / "P2").mkdir()
    make_good(tmp_path / "b" / "P3" / "inner" / "x.jpg")
    visits = discover_visits([tmp_path / "b"])
    assert [v.patient_id for v in visits] == ["P1", "P2", "P3"]
    assert visits[0].error is None and visits[1].error and visits[2].error
    assert visits[2].skipped == [("inner/", "sub-folder inside a visit folder (not descended into)")]


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(CervscanError, match=r"nowhere: path does not exist"):
        discover_visits([tmp_path / "nowhere"])


def test_file_instead_of_folder(tmp_path):
    p = make_good(tmp_path / "a.jpg")
    with pytest.raises(CervscanError, match=r"a\.jpg: not a folder"):
        discover_visits([p])


def test_symlink_loop_in_a_visit_folder_is_skipped(tmp_path):
    v = tmp_path / "P1"
    make_good(v / "a.jpg")
    (v / "loop.jpg").symlink_to("loop.jpg")
    (v / "dangling.png").symlink_to("missing.png")
    visits = discover_visits([v])
    assert [p.name for p in visits[0].images] == ["a.jpg"]
    skipped = dict(visits[0].skipped)
    assert set(skipped) == {"loop.jpg", "dangling.png"}
    assert "symbolic links" in skipped["loop.jpg"]
    assert "No such file" in skipped["dangling.png"]


def test_same_patient_twice_is_refused(tmp_path):
    make_good(tmp_path / "x" / "P1" / "a.jpg")
    make_good(tmp_path / "y" / "P1" / "a.jpg")
    with pytest.raises(CervscanError, match="patient id 'P1' given twice"):
        discover_visits([tmp_path / "x", tmp_path / "y"])


def test_uppercase_extensions_count_as_images(tmp_path):
    make_good(tmp_path / "P1" / "A.JPG")
    make_good(tmp_path / "P1" / "B.Png")
    assert [p.name for p in discover_visits([tmp_path / "P1"])[0].images] == ["A.JPG", "B.Png"]


# --------------------------------------------------------------------------- the whole pipeline over every case

FAILING = {
    # case: (file name, maker, expected reason in the message)
    "zero_byte": ("a_bad.jpg", make_zero_byte, "empty file (0 bytes)"),
    "truncated": ("a_bad.jpg", make_truncated_jpeg, "truncated or corrupt image data"),
    "text_as_jpg": ("a_bad.jpg", make_text_as_jpg, "not a readable image"),
    "bomb": ("a_bad.png", make_bomb_png, "image too large"),
    "tiny": ("a_bad.png", make_tiny, "image too small"),
    "unreadable": ("a_locked.jpg", make_good, "permission denied"),
}
DECODABLE = {
    # case: (file name, maker, expected (width, height) in images.csv, expected mask (h, w))
    "alpha": ("a.png", make_png_alpha, (128, 96), (96, 128)),
    "grayscale": ("a.jpg", make_grayscale, (128, 96), (96, 128)),
    "png16": ("a.png", make_png16, (128, 96), (96, 128)),
    "cmyk": ("a.jpg", make_cmyk_jpeg, (128, 96), (96, 128)),
    "exif_rotated": ("a.jpg", make_exif_rotated, (96, 128), (128, 96)),
    "huge": ("a.jpg", make_huge_jpeg, (8000, 6000), (1536, 2048)),
    "unicode_name": ("colposcopia ção 1 ü.jpg", make_good, (128, 96), (96, 128)),
}


@pytest.fixture(scope="module")
def bad_run(tiny_models, tmp_path_factory):
    """One screen run over a batch holding every case; returns (result, out folder, batch folder)."""
    from cervscan import api

    root = tmp_path_factory.mktemp("bad-input")
    batch = root / "batch"
    for case, (name, maker, _) in FAILING.items():
        for prefix in ("only", "mix"):
            d = batch / f"{prefix}-{case}"
            d.mkdir(parents=True)
            maker(d / name)
        make_good(batch / f"mix-{case}" / "z_good.jpg", seed=3)
    for case, (name, maker, _, _) in DECODABLE.items():
        d = batch / f"ok-{case}" if case != "unicode_name" else batch / "Ana María Ñúñez"
        d.mkdir(parents=True)
        maker(d / name)
    # skipped entries
    sk = batch / "skips"
    make_good(sk / "good 1.jpg")
    make_good(sk / ".hidden.jpg")
    (sk / ".DS_Store").write_bytes(b"\x00")
    (sk / "notes.txt").write_text("notes")
    make_good(sk / "sub folder" / "nested.jpg")
    (sk / "loop.jpg").symlink_to("loop.jpg")
    (batch / "empty-visit").mkdir()

    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cervscan.files.decode, "open", _deny("a_locked.jpg"), raising=False)
        res = api.screen([batch], out, seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]),
                         device="cpu", num_workers=0)
    return res, out, batch


def _rows(out: Path, name: str, key: str = "patient_id") -> dict:
    rows = read_csv(out / name)
    return {r[key]: r for r in rows} if key else rows


def test_batch_finishes_with_exit_code_3_and_nothing_half_written(bad_run):
    res, out, _ = bad_run
    assert res.exit_code == 3
    assert_no_tmp_files(out)
    for f in ("patients.csv", "images.csv", "skipped.csv", "run.json"):
        assert (out / f).is_file()
    n_visits = 2 * len(FAILING) + len(DECODABLE) + 2
    assert len(_rows(out, "patients.csv")) == n_visits == res.run["counts"]["patients"]
    assert res.run["counts"]["images_failed"] == 2 * len(FAILING)
    # masks/overlays exist exactly for the screened images
    imgs = _rows(out, "images.csv", key=None)
    ok = [r for r in imgs if r["status"] == "ok"]
    assert len(list((out / "masks").rglob("*.png"))) == len(ok)
    assert len(list((out / "overlays").rglob("*.jpg"))) == len(ok)
    for r in imgs:
        assert bool(r["mask"]) == (r["status"] == "ok")


@pytest.mark.parametrize("case", list(FAILING))
def test_failing_case_in_the_batch(bad_run, case):
    res, out, batch = bad_run
    name, _, reason = FAILING[case]
    imgs = [r for r in read_csv(out / "images.csv") if r["patient_id"] in (f"only-{case}", f"mix-{case}")]
    bad = [r for r in imgs if r["image"] == name]
    assert len(bad) == 2
    for r in bad:
        assert r["status"] == "error" and r["decision"] == "error"
        assert reason in r["error"] and name in r["error"], r["error"]  # names the file and the reason
        assert r["score"] == "" and r["mask"] == ""
        assert not (out / "masks" / r["patient_id"] / (Path(name).stem + ".png")).exists()
    pats = _rows(out, "patients.csv")
    only, mix = pats[f"only-{case}"], pats[f"mix-{case}"]
    # a patient whose images all failed: decision error, with the reason
    assert only["decision"] == "error" and only["score"] == ""
    assert only["error"].startswith("all 1 image(s) failed") and reason in only["error"] and name in only["error"]
    assert (only["n_images"], only["n_used"], only["n_failed"]) == ("1", "0", "1")
    # the batch goes on: the good image after the bad one in the same visit was screened
    assert mix["decision"] in ("severe", "mildly_normal") and mix["error"] == ""
    assert (mix["n_images"], mix["n_used"], mix["n_failed"]) == ("2", "1", "1")
    good = next(r for r in imgs if r["patient_id"] == f"mix-{case}" and r["image"] == "z_good.jpg")
    assert good["status"] == "ok" and float(mix["score"]) == pytest.approx(float(good["score"]), abs=1e-6)


@pytest.mark.parametrize("case", list(DECODABLE))
def test_decodable_case_in_the_batch(bad_run, case):
    import cv2

    res, out, _ = bad_run
    name, _, (w, h), mask_hw = DECODABLE[case]
    pid = f"ok-{case}" if case != "unicode_name" else "Ana María Ñúñez"
    pat = _rows(out, "patients.csv")[pid]
    # decoded and screened; flat test patterns (a solid colour, bands) are not fit to decide from: inadequate
    assert pat["decision"] in ("severe", "mildly_normal", "inadequate") and pat["n_used"] == "1", pat
    row = next(r for r in read_csv(out / "images.csv") if r["patient_id"] == pid)
    assert row["image"] == name and row["status"] == "ok" and row["error"] == ""
    assert (int(row["width"]), int(row["height"])) == (w, h)  # upright original size
    mask_path = out / row["mask"]
    assert mask_path == out / "masks" / pid / (Path(name).stem + ".png")
    m = cv2.imdecode(np.fromfile(mask_path, np.uint8), cv2.IMREAD_UNCHANGED)
    assert m.shape == mask_hw  # the working (upright, possibly scaled-down) image size
    assert set(np.unique(m)) <= {0, 255}
    assert (out / row["overlay"]).is_file()


def test_skipped_entries_are_listed(bad_run):
    res, out, _ = bad_run
    sk = [r for r in read_csv(out / "skipped.csv") if r["patient_id"] == "skips"]
    reasons = {r["file"]: r["reason"] for r in sk}
    assert reasons[".hidden.jpg"] == "hidden" and reasons[".DS_Store"] == "hidden"
    assert reasons["notes.txt"] == "not an image file"
    assert reasons["sub folder/"].startswith("sub-folder inside a visit folder")
    assert "symbolic links" in reasons["loop.jpg"]
    imgs = [r["image"] for r in read_csv(out / "images.csv") if r["patient_id"] == "skips"]
    assert imgs == ["good 1.jpg"]  # nothing from the sub-folder, no hidden file
    assert _rows(out, "patients.csv")["skips"]["decision"] in ("severe", "mildly_normal")
    assert res.run["counts"]["skipped_files"] == len(read_csv(out / "skipped.csv"))


def test_empty_visit_folder_in_the_batch(bad_run):
    _, out, _ = bad_run
    p = _rows(out, "patients.csv")["empty-visit"]
    assert p["decision"] == "error" and p["error"] == "no image files in visit folder" and p["n_images"] == "0"


def test_nonexistent_path_on_the_cli(tmp_path, tiny_models):
    from typer.testing import CliRunner

    from cervscan.cli import app

    r = CliRunner().invoke(app, ["screen", str(tmp_path / "no such visit"), "-o", str(tmp_path / "out"),
                                 "--seg-model", str(tiny_models["seg"]), "--cls-model", str(tiny_models["cls"])])
    assert r.exit_code == 1
    err = " ".join(r.stderr.split())
    assert "no such visit: path does not exist" in err
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()  # failed before anything was written


# --------------------------------------------------------------------------- atomic writes

def test_failed_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    target = tmp_path / "patients.csv"
    target.write_text("old\n")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cervscan.files.atomic.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cio.atomic_write_csv(target, [{"a": 1}], ["a"])
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patients.csv"]


def test_atomic_writers_round_trip(tmp_path):
    import json

    cio.atomic_write_csv(tmp_path / "a" / "x.csv", [{"a": 0.5, "b": None, "c": float("nan")}, {"a": "é", "b": 2}],
                         ["a", "b", "c"])
    assert (tmp_path / "a" / "x.csv").read_text(encoding="utf-8") == "a,b,c\n0.500000,,\né,2,\n"
    cio.atomic_write_json(tmp_path / "x.json", {"t": (1, 2), "p": tmp_path, "n": np.float32(0.5), "i": np.int64(3)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"t": [1, 2], "p": str(tmp_path), "n": 0.5, "i": 3}
    cio.atomic_write_image(tmp_path / "m.png", np.full((5, 7), 255, np.uint8))
    assert Image.open(tmp_path / "m.png").size == (7, 5)
    assert_no_tmp_files(tmp_path)


def test_file_name_that_is_not_utf8_does_not_break_the_batch(tiny_models, tmp_path):
    """A Latin-1 name from an old export ('caf\\xe9.jpg') reaches Python as a lone surrogate."""
    from cervscan import api

    v = tmp_path / "visits" / "P1"
    v.mkdir(parents=True)
    try:
        fd = os.open(os.path.join(os.fsencode(v), b"caf\xe9.jpg"), os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    with os.fdopen(fd, "wb") as fh:
        fh.write(jpeg_bytes(rgb()))
    make_good(v / "ok.jpg")
    out = tmp_path / "out"
    res = api.screen([v], out, seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]), device="cpu",
                     num_workers=0)
    assert res.exit_code == 0
    rows = read_csv(out / "images.csv")  # valid UTF-8
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["image"] == "caf\\xe9.jpg"  # the byte shown escaped (cervscan.files.display_id), not lost
    assert read_csv(out / "patients.csv")[0]["n_used"] == "2"
    import json

    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["counts"]["images"] == 2
    assert_no_tmp_files(out)
