"""Peak memory and time of decoding the largest image ``read_image`` accepts, by kind of image.

For each kind (baseline and progressive JPEG; 8-bit RGB, 8-bit RGBA and 16-bit RGBA PNG; 16-bit grey and
8-bit RGB TIFF) the largest 4:3 image that :func:`cervscan.files.read_image` accepts with its defaults (the
120 MP decompression-bomb guard and the 256 MB decode budget, :func:`cervscan.files.decode_bytes`) is found
by bisection on header-only probe files, then written (mostly flat content, so the files are small; each
in its own process) and decoded in a fresh child process. Recorded per kind: the size, which guard stops
the next larger image, the estimate, the child's peak RSS (``ru_maxrss`` from ``os.wait4``), how much the
decode itself added to the child's resident set (VmHWM after minus before ``read_image``, the imports
excluded) and the decode time.

``--before REV`` also decodes the 8-bit RGBA PNG (the image of the issue: a 115 MP RGBA PNG of 471 KB
peaked at 7.65 GB) with ``read_image`` of ``src/cervscan/io.py`` at git revision REV (several GB).

    python benchmarks/large_image.py [--before REV] [--kinds png-rgba,jpeg,...] [--no-write]

Prints JSON and rewrites the ``large_image`` block of benchmarks/RESULTS.md (``--no-write``: don't).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- large_image:start -->", "<!-- large_image:end -->"
#: kind -> (format, what it is)
KINDS = {
    "jpeg": ("JPEG", "JPEG, baseline, 4:2:0"),
    "jpeg-progressive": ("JPEG", "JPEG, progressive, 4:2:0"),
    "png-rgb": ("PNG", "PNG, 8-bit RGB"),
    "png-rgba": ("PNG", "PNG, 8-bit RGBA"),
    "png-rgba16": ("PNG", "PNG, 16-bit RGBA"),
    "tiff-gray16": ("TIFF", "TIFF, 16-bit grey, deflate"),
    "tiff-rgb": ("TIFF", "TIFF, 8-bit RGB, deflate"),
}
#: PNG kind -> (bit depth, colour type, bytes a pixel)
PNG_LAYOUT = {"png-rgb": (8, 2, 3), "png-rgba": (8, 6, 4), "png-rgba16": (16, 6, 8)}


# --------------------------------------------------------------------------- files

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_head(w: int, h: int, depth: int, ctype: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))


def _size(h: int) -> tuple[int, int]:
    return round(h * 4 / 3), h


def make_image(kind: str, path: Path, w: int, h: int) -> None:
    """Write a ``w`` x ``h`` image of ``kind``: a flat background with a brighter ellipse (JPEG, TIFF) or
    four flat quadrants (PNG, written row by row)."""
    import numpy as np
    from PIL import Image, ImageDraw

    if kind in PNG_LAYOUT:
        depth, ctype, bpp = PNG_LAYOUT[kind]
        nch = bpp // (depth // 8)
        x = int(0.3 * w)
        rows = []
        for colours in (((200, 40, 60, 255), (20, 220, 90, 128)), ((10, 10, 240, 255), (250, 250, 250, 64))):
            row = np.empty((w, nch), np.uint16 if depth == 16 else np.uint8)
            row[:x], row[x:] = colours[0][:nch], colours[1][:nch]
            rows.append((row.astype(">u2") * 257 if depth == 16 else row).tobytes())
        same = b"\x02" + bytes(w * bpp)  # filter "up", the row above again
        z = zlib.compressobj(6)
        with open(path, "wb") as f:
            f.write(_png_head(w, h, depth, ctype))
            for y in range(h):
                data = z.compress(b"\x00" + rows[y > 0] if y in (0, int(0.6 * h)) else same)
                if data:
                    f.write(_chunk(b"IDAT", data))
            f.write(_chunk(b"IDAT", z.flush()) + _chunk(b"IEND", b""))
        return
    if kind == "tiff-gray16":
        a = np.full((h, w), 30000, np.uint16)
        a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 52000
        Image.fromarray(a).save(path, compression="tiff_adobe_deflate")
        return
    im = Image.new("RGB", (w, h), (150, 70, 80))
    ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(230, 190, 190))
    if kind == "tiff-rgb":
        im.save(path, compression="tiff_adobe_deflate")
    else:
        im.save(path, quality=85, progressive=kind == "jpeg-progressive")


def _probe(kind: str, w: int, h: int, folder: Path) -> Path:
    """A file of ``kind`` whose header says ``w`` x ``h`` (little or no pixel data): what ``read_image``
    sees before it decodes anything."""
    p = folder / f"probe-{kind}{'.png' if kind in PNG_LAYOUT else '.jpg' if 'jpeg' in kind else '.tif'}"
    if kind in PNG_LAYOUT:
        depth, ctype, _ = PNG_LAYOUT[kind]
        p.write_bytes(_png_head(w, h, depth, ctype) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b""))
        return p
    small = folder / f"small-{p.name}"
    if not small.exists():
        make_image(kind, small, 64, 48)
    b = bytearray(small.read_bytes())
    if "jpeg" in kind:  # the frame header (SOF0 or SOF2): precision, height, width
        i = next(i for i in range(len(b) - 1) if b[i] == 0xFF and b[i + 1] in (0xC0, 0xC2))
        struct.pack_into(">HH", b, i + 5, h, w)
    else:  # the first IFD's ImageWidth (256) and ImageLength (257)
        assert b[:2] == b"II"
        ifd = struct.unpack_from("<I", b, 4)[0]
        for e in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", b, ifd)[0], 12):
            tag, typ = struct.unpack_from("<HH", b, e)
            if tag in (256, 257):
                struct.pack_into("<H" if typ == 3 else "<I", b, e + 8, w if tag == 256 else h)
    p.write_bytes(bytes(b))
    return p


def _verdict(path: Path, max_side: int, max_pixels: int, budget_mb: float) -> tuple[str | None, int]:
    """Which guard refuses the file (None: accepted) and the decode estimate, as :func:`read_image` decides."""
    from PIL import Image

    from cervscan.files import decode_bytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                return "pixels", 0
            if im.format == "JPEG" and max(w, h) > max_side:
                im.draft("RGB", (max_side, max_side))
            need = decode_bytes(im, max_side, (w, h))
    return ("memory" if need > budget_mb * 1e6 else None), need


def largest_accepted(kind: str, folder: Path) -> dict:
    from cervscan.files import MAX_DECODE_MB

    max_side, max_pixels = 2048, 120_000_000
    lo, hi = 1000, 20000  # accepted, refused (image height; width 4:3)
    assert _verdict(_probe(kind, *_size(lo), folder), max_side, max_pixels, MAX_DECODE_MB)[0] is None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _verdict(_probe(kind, *_size(mid), folder), max_side, max_pixels, MAX_DECODE_MB)[0] is None:
            lo = mid
        else:
            hi = mid
    stop, _ = _verdict(_probe(kind, *_size(hi), folder), max_side, max_pixels, MAX_DECODE_MB)
    return {"size": _size(lo), "next_refused_by": stop, "budget_mb": MAX_DECODE_MB,
            "max_pixels": max_pixels}


# --------------------------------------------------------------------------- measuring

CHILD = r"""
import importlib.util, json, resource, sys, time
import numpy, cv2, PIL.Image
def status(key):
    with open('/proc/self/status') as f:
        return int(next(l for l in f if l.startswith(key)).split()[1]) * 1024
path, impl = sys.argv[1], sys.argv[2]
if impl == 'current':
    from cervscan.files import read_image, decode_bytes
else:
    import cervscan.errors
    spec = importlib.util.spec_from_file_location('cervscan._io_before', impl)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    read_image = mod.read_image
before = status('VmHWM')
t = time.perf_counter()
try:
    d = read_image(path)
    res = {'shape': list(d.rgb.shape)}
except Exception as e:
    res = {'error': f'{type(e).__name__}: {e}'}
res['seconds'] = round(time.perf_counter() - t, 2)
res['decode_added_mb'] = round((status('VmHWM') - before) / 2**20, 1)
res['imports_mb'] = round(before / 2**20, 1)
print(json.dumps(res))
"""


def measure(path: Path, impl: str = "current") -> dict:
    """Decode ``path`` in a fresh child process; its peak RSS comes from ``os.wait4``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(path), impl], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, cwd=ROOT)
    out, err = p.stdout.read(), p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        return {"error": f"child exited {p.returncode}: {err.decode(errors='replace')[-500:]}",
                "peak_rss_mb": round(ru.ru_maxrss / 1024, 1)}
    return {**json.loads(out), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1)}


def run(kinds: list[str], before: str | None, folder: Path) -> dict:
    from cervscan.files import decode_bytes  # noqa: F401 - fail early without cervscan

    rows = []
    for kind in kinds:
        lim = largest_accepted(kind, folder)
        w, h = lim["size"]
        path = folder / f"{kind}{'.png' if kind in PNG_LAYOUT else '.jpg' if 'jpeg' in kind else '.tif'}"
        t = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make", kind, str(path), str(w), str(h)],
                       check=True, cwd=ROOT)
        make_s = time.perf_counter() - t
        _, need = _verdict(path, 2048, lim["max_pixels"], lim["budget_mb"])
        row = {"kind": kind, "what": KINDS[kind][1], "width": w, "height": h, "mp": round(w * h / 1e6, 1),
               "file_mb": round(path.stat().st_size / 1e6, 2), "estimate_mb": round(need / 1e6),
               "next_refused_by": lim["next_refused_by"], "make_s": round(make_s, 1), **measure(path)}
        if before and kind == "png-rgba":
            before = subprocess.run(["git", "rev-parse", "--short", before], capture_output=True, check=True,
                                    text=True, cwd=ROOT).stdout.strip()
            src = subprocess.run(["git", "show", f"{before}:src/cervscan/io.py"], capture_output=True, check=True,
                                 cwd=ROOT).stdout
            old = folder / "io_before.py"
            old.write_bytes(src)
            row["before"] = {"rev": before, **measure(path, str(old))}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        path.unlink()
    import numpy
    import PIL

    return {"rows": rows, "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pillow": PIL.__version__,
                        "numpy": numpy.__version__, "load_average": [round(x, 2) for x in os.getloadavg()]}}


def write_results(res: dict, args) -> None:
    """Replace (or append) only the large_image block of RESULTS.md."""
    m = res["machine"]
    revs = [r["before"]["rev"] for r in res["rows"] if "before" in r]
    cmd = "python benchmarks/large_image.py" + (f" --before {revs[0]}" if revs else "")
    lines = []
    for r in res["rows"]:
        got = f"{r['shape'][1]}x{r['shape'][0]}" if "shape" in r else r.get("error", "")
        lines.append(f"| {r['what']} | {r['width']}x{r['height']} ({r['mp']} MP) | {r['file_mb']} | "
                     f"{r['next_refused_by']} | {r['estimate_mb']} | {r.get('peak_rss_mb')} | "
                     f"{r.get('decode_added_mb')} | {r.get('seconds')} | {got} |")
    before = [r for r in res["rows"] if "before" in r]
    note = ""
    for r in before:
        b = r["before"]
        note += (f"\nThe same {r['what']} ({r['mp']} MP) with `read_image` of {b['rev']} (which decoded it at full "
                 f"size and composited the alpha in float32): peak RSS **{b.get('peak_rss_mb')} MB** "
                 f"(the decode added {b.get('decode_added_mb')} MB) in {b.get('seconds')} s, against "
                 f"**{r.get('peak_rss_mb')} MB** ({r.get('decode_added_mb')} MB) in {r.get('seconds')} s now.\n")
    block = f"""{START}
## large images (`{cmd}`)

Measured {res['date']} on {m['cpus']} CPU cores (shared; load average {', '.join(map(str, m['load_average']))}),
Python {m['python']}, Pillow {m['pillow']}, numpy {m['numpy']}. For each kind, the largest 4:3 image
`read_image` accepts with its defaults (`max_pixels` 120 MP, `max_decode_mb` 256, `max_side` 2048), decoded
in a fresh process: *peak RSS* is that process's `ru_maxrss` (Python, numpy, OpenCV and Pillow imported:
about {res['rows'][0].get('imports_mb', '?')} MB), *decode added* the growth of its peak during `read_image`.
*Next size refused by*: the guard that refuses the next larger image (pixels: the decompression-bomb guard;
memory: the decode budget, estimated from the size and colour mode before decoding).

| image | size | file (MB) | next size refused by | estimate (MB) | peak RSS (MB) | decode added (MB) | decode (s) | decoded to |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}
{note}
PNGs (not interlaced) are decoded a strip of rows at a time from the file; JPEGs at a reduced DCT scale
(a progressive JPEG still needs libjpeg's full-size coefficient buffer, 3 bytes a pixel at 4:2:0, hence its
lower limit); other formats (TIFF, BMP, interlaced PNG) are decoded whole by Pillow (1, 2 or 4 bytes a pixel)
and then, like the others, converted and box-averaged strip by strip.
{END}"""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_md import replace_block

    replace_block(START, END, block, RESULTS)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--make":  # internal: write one image in this process
        make_image(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma list of: " + ", ".join(KINDS))
    ap.add_argument("--before", help="git revision whose read_image also decodes the RGBA PNG (needs GBs)")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        ap.error(f"unknown kind(s) {bad}")
    with tempfile.TemporaryDirectory(prefix="cervscan-large-") as tmp:
        res = run(kinds, args.before, Path(tmp))
    print(json.dumps(res, indent=2))
    if not args.no_write:
        write_results(res, args)
        print(f"wrote {RESULTS.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
