"""Inputs that must not take a clinic machine down or switch a safety check off.

Memory: a large image (under the pixel guard) is decoded in bounded memory whatever its format, and an
image whose decode would need more memory than the budget is refused before it is decoded. Settings: every
config value is checked for type, finiteness and range where it comes in (config file, command line,
checkpoint, configuration dataclasses), and the error names where it came from, the key, the value and the
allowed range.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cervscan.errors import CervscanError, ImageError
from cervscan.pipeline.steps import Pipeline
from cervscan.files import read_image


# --------------------------------------------------------------------------- PNG writers

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _ihdr(w: int, h: int, depth: int, ctype: int, interlace: int = 0) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, interlace))


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _filtered(raw: np.ndarray, bpp: int) -> bytes:
    """PNG scanlines of ``raw`` (h x rowbytes, uint8), row y with filter type y % 5 (none, sub, up,
    average, Paeth), so that every filter crosses every strip boundary."""
    out = bytearray()
    prev = np.zeros(raw.shape[1], np.int32)
    for y, row in enumerate(raw.astype(np.int32)):
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        f = y % 5
        pred = [0, left, prev, (left + prev) // 2, _paeth(left, prev, upleft)][f]
        out.append(f)
        out += ((row - pred) % 256).astype(np.uint8).tobytes()
        prev = row
    return bytes(out)


def png_file(path: Path, raw: np.ndarray, w: int, depth: int, ctype: int, *, plte: bytes | None = None,
             trns: bytes | None = None) -> Path:
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    bpp = max(1, depth * channels // 8)
    body = _ihdr(w, raw.shape[0], depth, ctype)
    if plte is not None:
        body += _chunk(b"PLTE", plte)
    if trns is not None:
        body += _chunk(b"tRNS", trns)
    z = zlib.compress(_filtered(raw, bpp), 6)
    body += b"".join(_chunk(b"IDAT", z[i:i + 5000]) for i in range(0, len(z), 5000))  # several IDAT chunks
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IEND", b""))
    return path


def big_rgba_png(path: Path, w: int, h: int, *, orientation: int | None = None) -> Path:
    """A ``w`` x ``h`` RGBA PNG written row by row (nothing of its size in memory): left of x = 0.3 w opaque
    red (200, 40, 60, 255), right of it green at alpha 128 (20, 220, 90, 128); below y = 0.6 h the colours
    are (10, 10, 240, 255) and (250, 250, 250, 64). Mostly flat, so the file is small. ``orientation``:
    an EXIF orientation in an eXIf chunk after the image data."""
    xs = int(0.3 * w)
    top = np.empty((w, 4), np.uint8)
    top[:xs], top[xs:] = (200, 40, 60, 255), (20, 220, 90, 128)
    bottom = np.empty((w, 4), np.uint8)
    bottom[:xs], bottom[xs:] = (10, 10, 240, 255), (250, 250, 250, 64)
    same = b"\x02" + bytes(4 * w)  # filter "up", identical to the row above
    z = zlib.compressobj(1)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _ihdr(w, h, 8, 6))
        for y in range(h):
            line = b"\x00" + (top if y == 0 else bottom).tobytes() if y in (0, int(0.6 * h)) else same
            data = z.compress(line)
            if data:
                f.write(_chunk(b"IDAT", data))
        f.write(_chunk(b"IDAT", z.flush()))
        if orientation is not None:
            ex = Image.Exif()
            ex[0x0112] = orientation
            f.write(_chunk(b"eXIf", ex.tobytes()))
        f.write(_chunk(b"IEND", b""))
    return path


def _composite(rgba) -> np.ndarray:
    """Composited on black, as the float formula of the method: round(c * alpha / 255)."""
    a = np.asarray(rgba, np.float32)
    return np.clip(a[..., :3] * (a[..., 3:4] / 255.0) + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- memory

@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for the peak RSS")
def test_large_rgba_png_is_decoded_in_bounded_memory(tmp_path):
    """A 60 MP RGBA PNG (a few kB on disk) decoded as a full-size float image needs > 3 GB; strip by strip it
    needs tens of MB. Measured in a fresh process (VmHWM, its peak RSS) whose address space is capped, so
    that a decode at full size fails instead of taking the machine's memory. The decoded image is checked
    too: colours composited on black, the split at 30 % of the width, EXIF orientation from an eXIf chunk
    after the image data (rotate 90 degrees clockwise)."""
    w, h = 9000, 6700
    p = big_rgba_png(tmp_path / "big.png", w, h, orientation=6)
    assert p.stat().st_size < 2_000_000
    code = ("import resource, sys, numpy, cv2, PIL.Image\n"
            "from cervscan.files import read_image\n"
            "def status(key):\n"
            "    with open('/proc/self/status') as f:\n"
            "        return int(next(l for l in f if l.startswith(key)).split()[1]) * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (status('VmSize') + (1 << 30), resource.RLIM_INFINITY))\n"
            "b = status('VmHWM')\n"
            "d = read_image(sys.argv[1])\n"
            "numpy.save(sys.argv[2], d.rgb)\n"
            "print(d.width, d.height, (status('VmHWM') - b) // (1 << 20))\n")
    r = subprocess.run([sys.executable, "-c", code, str(p), str(tmp_path / "out.npy")], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    width, height, grew_mb = map(int, r.stdout.split())
    assert grew_mb < 150, f"decoding a {w}x{h} RGBA PNG grew the process by {grew_mb} MB"
    rgb = np.load(tmp_path / "out.npy")
    # upright (orientation 6): the stored image turned 90 degrees clockwise
    assert (width, height) == (h, w) and rgb.shape == (2048, round(h * 2048 / w), 3)
    H, W = rgb.shape[:2]
    red, green = _composite([200, 40, 60, 255]), _composite([20, 220, 90, 128])
    blue, white = _composite([10, 10, 240, 255]), _composite([250, 250, 250, 64])
    # stored (x, y) -> upright (W - 1 - y, x): stored left third at the top, stored top rows on the right
    for (Y, X), want in (((int(0.15 * H), int(0.8 * W)), red), ((int(0.6 * H), int(0.8 * W)), green),
                         ((int(0.15 * H), int(0.2 * W)), blue), ((int(0.6 * H), int(0.2 * W)), white)):
        np.testing.assert_array_equal(rgb[Y, X], want)
    column = rgb[:, int(0.8 * W), 1].astype(int)  # red above the split (G 40), green below it (G 110)
    split = int(np.argmax(column > 75))
    assert abs(split - 0.3 * H) <= 1.5, split


def test_decode_over_the_memory_budget_is_refused_before_decoding(tmp_path):
    """An interlaced 16-bit RGBA PNG of 100 MP (under the 120 MP pixel guard) must be decoded whole: about
    400 MB as Pillow stores it. The file holds no image data: the budget refuses it before decoding, and
    with a larger budget the decode starts and finds the data missing."""
    p = tmp_path / "deep.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _ihdr(10000, 10000, 16, 6, interlace=1)
                  + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))
    with pytest.raises(ImageError) as ei:
        read_image(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: image too large to decode within the memory budget (10000x10000 = 100 MP")
    mb = int(msg.split("about ")[1].split(" MB")[0])
    assert 400 <= mb < 500 and "> 256 MB" in msg
    with pytest.raises(ImageError, match="truncated or corrupt|cannot decode"):
        read_image(p, max_decode_mb=1024)


def test_memory_estimate_follows_the_colour_mode_and_the_decode(tmp_path):
    from cervscan.files import decode_bytes

    est = {}
    for name, (depth, ctype, interlace) in {"gray8": (8, 0, 1), "gray16": (16, 0, 1), "rgba8": (8, 6, 1),
                                            "rgba8-strips": (8, 6, 0)}.items():
        p = tmp_path / f"{name}.png"
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + _ihdr(8000, 6000, depth, ctype, interlace)
                      + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b""))
        with Image.open(p) as im:
            est[name] = decode_bytes(im, 2048)
    full = 8000 * 6000
    assert est["gray8"] >= full and est["gray16"] >= 2 * full and est["rgba8"] >= 4 * full
    assert abs(est["gray16"] - est["gray8"] - full) < 0.02 * full  # 1 more byte a pixel (and strips of other heights)
    assert abs(est["rgba8"] - est["gray8"] - 3 * full) < 0.02 * full  # 3 more
    assert est["rgba8-strips"] < full  # decoded strip by strip: never the full image
    # a progressive JPEG: libjpeg holds every DCT coefficient (2 bytes) whatever the draft scale
    Image.new("RGB", (4000, 3000), (90, 60, 50)).save(tmp_path / "base.jpg", quality=50)
    Image.new("RGB", (4000, 3000), (90, 60, 50)).save(tmp_path / "prog.jpg", quality=50, progressive=True)
    jp = {}
    for name in ("base", "prog"):
        with Image.open(tmp_path / f"{name}.jpg") as im:
            size = im.size
            im.draft("RGB", (512, 512))
            jp[name] = decode_bytes(im, 512, size)
    assert jp["prog"] - jp["base"] >= 2 * 1.5 * 4000 * 3000  # 4:2:0: 1.5 coefficients a pixel


PNG_KINDS = {  # (bit depth, colour type) -> how to fill the raw rows
    "gray1": (1, 0), "gray2": (2, 0), "gray4": (4, 0), "gray8": (8, 0), "gray16": (16, 0),
    "rgb8": (8, 2), "rgb16": (16, 2), "pal4": (4, 3), "pal8": (8, 3), "pal8-trns": (8, 3),
    "gray-alpha8": (8, 4), "gray-alpha16": (16, 4), "rgba8": (8, 6), "rgba16": (16, 6),
}


@pytest.mark.parametrize("kind", sorted(PNG_KINDS))
def test_png_decoded_strip_by_strip_equals_a_full_decode(tmp_path, monkeypatch, kind):
    """Every PNG pixel layout, every row filter across every strip boundary (strips of a few rows): the
    same 8-bit RGB as Pillow's full decode converted with the method's formulas (alpha composited on black
    with round(c * alpha / 255); 16-bit scaled with round(v * 255 / 65535)). The RGBA and 16-bit grey
    images hold every value pair, so the integer forms are checked exhaustively."""
    import cervscan.files.decode as cio

    depth, ctype = PNG_KINDS[kind]
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    w, h = 256, 257
    rowbytes = (w * depth * channels + 7) // 8
    rng = np.random.default_rng(sorted(PNG_KINDS).index(kind))
    raw = rng.integers(0, 256, (h, rowbytes), dtype=np.uint8)
    plte = trns = None
    if kind == "rgba8":  # red = every value, alpha = every value
        px = raw.reshape(h, w, 4)
        px[:256, :, 0], px[:256, :, 3] = np.arange(256)[:, None], np.arange(256)[None, :]
    if kind == "gray16":  # every 16-bit value
        raw[:256] = np.arange(65536, dtype=">u2").reshape(256, 256).view(np.uint8).reshape(256, 512)
    if ctype == 3:
        n = 1 << depth
        plte = rng.integers(0, 256, 3 * n, dtype=np.uint8).tobytes()
        trns = rng.integers(0, 256, n // 2, dtype=np.uint8).tobytes() if kind.endswith("trns") else None
    p = png_file(tmp_path / f"{kind}.png", raw, w, depth, ctype, plte=plte, trns=trns)

    with Image.open(p) as im:
        im.load()
        mode = im.mode
        if mode in ("RGBA", "LA") or "transparency" in im.info:
            want = _composite(im.convert("RGBA"))
        elif mode.startswith("I;16"):
            a = np.asarray(im).astype(np.float64)
            want = np.repeat(np.clip(a / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None], 3, -1)
        else:
            want = np.asarray(im.convert("RGB"))
    monkeypatch.setattr(cio, "_BAND_BYTES", 7 * w)  # strips of a few rows
    with Image.open(p) as im:
        assert cio._png_strip_rawmode(im) is not None  # this file is decoded strip by strip
    got = read_image(p, max_side=4096).rgb
    np.testing.assert_array_equal(got, want)
    # cut short: a clear error naming the file, not a half image
    cut = tmp_path / f"cut-{kind}.png"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ImageError, match=rf"cut-{kind}\.png: truncated or corrupt image data"):
        read_image(cut, max_side=4096)


def test_the_budget_is_a_setting_that_reaches_the_decoder(tmp_path, tiny_models):
    from cervscan.pipeline.steps import Pipeline

    Image.new("RGB", (3000, 2000), (120, 80, 70)).save(tmp_path / "flat.tif")  # decoded whole: 24 MB
    cfg = tmp_path / "site.toml"
    cfg.write_text("max_decode_mb = 16\n")
    pipe = Pipeline.from_config(seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]),
                             config_file=str(cfg), device="cpu", use_stage=False)
    assert pipe.cfg.max_decode_mb == 16
    with pytest.raises(ImageError, match=r"flat\.tif: image too large to decode within the memory budget "
                                         r"\(3000x2000 = 6 MP, RGB: about \d+ MB > 16 MB"):
        pipe.decode(tmp_path / "flat.tif")
    assert read_image(tmp_path / "flat.tif").rgb.shape == (1365, 2048, 3)  # the default budget: decoded


def test_a_tiff_under_the_pixel_guard_is_not_refused_by_pillows_own_limit(tmp_path, monkeypatch):
    """Pillow checks a TIFF's size again when it loads it, against its own limit (89 MP by default, lowered
    here): cervscan's guards decide alone, so a TIFF of 89-120 MP is decoded, not refused as a bomb."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    a = np.full((1200, 1600), 30000, np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.tif", compression="tiff_adobe_deflate")
    d = read_image(tmp_path / "deep.tif")
    assert d.rgb.shape == (1200, 1600, 3) and (d.rgb == 117).all()  # round(30000 / 257)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000  # left as it was


# --------------------------------------------------------------------------- settings

@pytest.mark.parametrize("line, shown, allowed", [
    ("min_sharpness = nan", "min_sharpness = nan", "a finite number in [0, 1]"),
    ("min_brightness = -inf", "min_brightness = -inf", "a finite number in [0, 255]"),
    ("mask_threshold = 1.5", "mask_threshold = 1.5", "a finite number in (0, 1)"),
    ("centre_crop = 0", "centre_crop = 0", "a finite number in [0.25, 1]"),
    ("max_side = 0", "max_side = 0", "a whole number in [64, 16384]"),
    ("crop_margin = -5", "crop_margin = -5", "a finite number in [0, 1]"),
    ("threshold = 1.5", "threshold = 1.5", "a finite number in [0, 1)"),
])
def test_settings_that_switched_safety_off_are_refused_at_load(tmp_path, line, shown, allowed):
    """The cases of the issue: each refused when the file is loaded, naming the file, the key, the value and
    the allowed range."""
    from cervscan.config import load_config_file

    p = tmp_path / "settings.toml"
    p.write_text(line + "\n")
    with pytest.raises(CervscanError) as ei:
        load_config_file(p)
    assert str(ei.value) == f"{p}: {shown}: must be {allowed}"


def test_every_number_setting_refuses_nan_and_infinity_in_json_and_toml(tmp_path):
    from cervscan.config import SETTINGS, load_config_file

    numeric = [k for k, s in SETTINGS.items() if s.kind in ("number", "int")]
    assert {"threshold", "min_sharpness", "mask_threshold", "max_side", "max_decode_mb"} <= set(numeric)
    for key in numeric:
        for text, shown in (("nan", "nan"), ("inf", "inf"), ("-inf", "-inf")):
            p = tmp_path / "s.toml"
            p.write_text(f"{key} = {text}\n")
            with pytest.raises(CervscanError, match=rf"^{p}: {key} = {shown}: must be a (finite|whole) number in"):
                load_config_file(p)
        p = tmp_path / "s.json"
        p.write_text(f'{{"{key}": NaN}}')
        with pytest.raises(CervscanError, match=rf"^{p}: {key} = nan: must be"):
            load_config_file(p)
    p = tmp_path / "w.json"
    p.write_text('{"weights": [0.2, 0.2, 0.2, 0.2, 0.2, Infinity]}')
    with pytest.raises(CervscanError, match=r"weights = \[0\.2, 0\.2, 0\.2, 0\.2, 0\.2, inf\]: must be 6 finite"):
        load_config_file(p)


@pytest.mark.parametrize("name, text", [("empty.toml", ""), ("comments.toml", "# nothing set\n"),
                                        ("empty.json", "{}")])
def test_an_empty_config_file_is_an_error_naming_it(tmp_path, name, text):
    from cervscan.config import load_config_file

    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(CervscanError, match=rf"^{p}: config file sets nothing"):
        load_config_file(p)


def test_command_line_values_are_checked_and_named_as_options():
    from cervscan.config import voting_from as _voting_from

    for ov, msg in (({"threshold": math.nan}, "command line: --threshold = nan: must be a finite number in [0, 1)"),
                    ({"threshold": 1.0}, "command line: --threshold = 1.0: must be a finite number in [0, 1)"),
                    ({"brightness": math.inf}, "command line: --brightness = inf: must be a finite number in (0, 4]"),
                    ({"weights": (0.2, 0.2, 0.2, 0.2, 0.2, math.nan)},
                     "command line: --weights = [0.2, 0.2, 0.2, 0.2, 0.2, nan]: must be 6 finite numbers >= 0")):
        with pytest.raises(CervscanError) as ei:
            _voting_from({}, {}, ov)
        assert str(ei.value).startswith(msg), str(ei.value)


def test_checkpoint_values_are_checked_and_named():
    from cervscan.config import gate_from as _gate_from, voting_from as _voting_from

    with pytest.raises(CervscanError, match=r"^classifier checkpoint: threshold = nan: must be a finite number"):
        _voting_from({"threshold": math.nan}, {}, {})
    with pytest.raises(CervscanError, match=r"^classifier checkpoint: threshold = 1\.5: must be"):
        _voting_from({"threshold": 1.5}, {}, {})
    with pytest.raises(CervscanError, match=r"^segmenter checkpoint: mask_threshold = 1\.5: must be a finite "
                                            r"number in \(0, 1\)"):
        _voting_from({}, {}, {}, {"mask_threshold": 1.5})
    with pytest.raises(CervscanError, match=r"^classifier checkpoint: brightness = nan"):
        _voting_from({"voting": {"brightness": math.nan}}, {}, {})
    with pytest.raises(CervscanError, match=r"^classifier checkpoint: decision_stages = \[\"acid\"\]"):
        _gate_from({}, {}, {}, {"decision_stages": ["acid"]})
    # valid values: the option wins over the checkpoint
    v, thr, src = _voting_from({"threshold": 0.3}, {}, {"threshold": 0.4})
    assert thr == 0.4 and src["threshold"] == "option"


def test_configuration_dataclasses_check_every_value():
    from cervscan.config import GateConfig, ScreenConfig, VotingConfig

    for make, msg in ((lambda: ScreenConfig(max_side=0), r"ScreenConfig: max_side = 0: must be a whole number"),
                      (lambda: ScreenConfig(centre_crop=0.0), r"ScreenConfig: centre_crop = 0\.0"),
                      (lambda: ScreenConfig(threshold=math.nan), r"ScreenConfig: threshold = nan"),
                      (lambda: VotingConfig(mask_threshold=1.5), r"VotingConfig: mask_threshold = 1\.5"),
                      (lambda: VotingConfig(crop_margin=-5.0), r"VotingConfig: crop_margin = -5\.0"),
                      (lambda: GateConfig(min_sharpness=math.nan), r"GateConfig: min_sharpness = nan"),
                      (lambda: GateConfig(min_brightness=-math.inf), r"GateConfig: min_brightness = -inf")):
        with pytest.raises(CervscanError, match=msg):
            make()
    ScreenConfig(), VotingConfig(), GateConfig()  # the defaults are valid


def test_a_gate_check_switched_off_by_its_setting_is_logged(tmp_path, caplog):
    from cervscan.config import load_config_file

    p = tmp_path / "site.toml"
    p.write_text("max_glare = 1\nmin_sharpness = 0.3\n")
    with caplog.at_level("WARNING", logger="cervscan.config"):
        assert load_config_file(p) == {"max_glare": 1, "min_sharpness": 0.3}
    assert [r.getMessage() for r in caplog.records] == [f"{p}: max_glare = 1: the glare check rejects no image"]


def test_a_bad_value_in_the_config_file_fails_before_any_model_is_loaded(tmp_path, tiny_models, monkeypatch):
    pass

    cfg = tmp_path / "site.json"
    cfg.write_text(json.dumps({"mask_threshold": 1.5}))
    loaded = []
    monkeypatch.setattr("cervscan.pipeline.build.load_model", lambda *a, **k: loaded.append(a) or None)
    with pytest.raises(CervscanError, match=rf"^{cfg}: mask_threshold = 1\.5: must be"):
        Pipeline.from_config(seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]),
                          config_file=str(cfg), device="cpu", use_stage=False)
    assert loaded == []
