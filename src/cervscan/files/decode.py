"""Robust, memory-bounded image decoding to upright 8-bit RGB. No torch import."""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cervscan.errors import ImageError

# --------------------------------------------------------------------------- decoding

@dataclass
class DecodedImage:
    rgb: np.ndarray  # HxWx3 uint8, upright, possibly scaled down to max_side
    width: int  # original (upright) size
    height: int
    scale: float  # working size / original size


#: Memory budget of one image decode, in MB (10^6 bytes): an image whose decode would hold more pixel data
#: at once (estimated from its size and colour mode before anything is decoded) is refused. Config
#: ``max_decode_mb``.
MAX_DECODE_MB = 256
#: Decoded pixel data per strip (bytes of full-resolution rows) when a large image is converted and
#: scaled down strip by strip.
_BAND_BYTES = 2 << 20
#: Images of up to this many pixels (as decoded; after a JPEG ``draft``) are converted to a full-size 8-bit
#: RGB array (3 bytes a pixel) and resized at once; larger ones are box-averaged strip by strip first.
_EXACT_PIXELS = 32_000_000


def read_image(path: str | Path, *, max_side: int = 2048, max_pixels: int = 120_000_000,
               min_side: int = 32, max_decode_mb: float = MAX_DECODE_MB) -> DecodedImage:
    """Decode any supported image to upright 8-bit RGB, memory-bounded.

    EXIF orientation is applied; grayscale, palette, RGBA (composited on
    black), CMYK and 16-bit images become 8-bit RGB. Images with more than
    ``max_pixels`` pixels are refused before decoding (decompression bomb),
    and so are images whose decode would hold more than ``max_decode_mb`` MB
    of pixel data at once (:func:`decode_bytes`, estimated from the size and
    colour mode before decoding).

    Large images never become full-size RGB or float arrays: JPEGs larger
    than ``max_side`` are decoded at a reduced DCT scale (``draft``); PNGs
    (not interlaced) are decoded a strip of rows at a time straight from the
    file, so the full image is never held; other formats (TIFF, BMP,
    interlaced PNG) are decoded whole by Pillow, within the budget. Strip by
    strip, the rows are then converted to 8-bit RGB (integer arithmetic) and
    box-averaged by the integer factor ``longer side // max_side``; the result
    is scaled to ``max_side`` with area interpolation. Images of up to 32 MP
    (after a JPEG ``draft``) are not box-averaged: their full-size 8-bit RGB
    array is resized at once, as a full decode would be. Raises ImageError
    naming the file and the reason.
    """
    from PIL import UnidentifiedImageError  # lazy: keeps PIL and cv2 out of --help (the CLI imports cervscan.files)

    p = Path(path)
    with _open_image_file(p) as fh:
        try:
            rgb, orientation, (w0, h0) = _decode_within_limits(p, fh, max_side, max_pixels, min_side, max_decode_mb)
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"{p}: not a readable image (unknown or corrupt format)") from None
        except (OSError, SyntaxError, ValueError) as e:
            msg = str(e)
            if "truncated" in msg.lower() or "broken data stream" in msg.lower():
                raise ImageError(f"{p}: truncated or corrupt image data ({msg})") from None
            raise ImageError(f"{p}: cannot decode image ({msg})") from None
        except MemoryError:
            raise ImageError(f"{p}: not enough memory to decode") from None
    # original (upright) size
    if orientation in (5, 6, 7, 8):
        w0, h0 = h0, w0
    scale = rgb.shape[1] / w0
    return DecodedImage(rgb=np.ascontiguousarray(rgb), width=w0, height=h0, scale=float(scale))


def _open_image_file(p: Path):
    """``p`` opened for reading (binary); an ImageError for an empty, missing or unreadable file."""
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageError(f"{p}: cannot read ({e.strerror})") from None
    if size == 0:
        raise ImageError(f"{p}: empty file (0 bytes)")
    try:
        return open(p, "rb")
    except PermissionError:
        raise ImageError(f"{p}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot read ({e.strerror})") from None


def _decode_within_limits(p: Path, fh, max_side: int, max_pixels: int, min_side: int,
                          max_decode_mb: float) -> tuple[np.ndarray, int, tuple[int, int]]:
    """:func:`_decode_reduced` of the image in ``fh`` once its size (``max_pixels``, ``min_side``) and its
    decode's memory (``max_decode_mb``) are checked, with Pillow's own pixel limit lifted meanwhile (an
    ImageError naming ``p`` when a check fails; Pillow's errors pass through). Returns the array, the EXIF
    orientation and the size as stored."""
    from PIL import Image  # lazy: keeps PIL and cv2 out of --help (the CLI imports cervscan.files)

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        # we check ourselves below, with our own limit (Pillow checks again when it loads a TIFF)
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(fh)
            w0, h0 = im.size
            if w0 * h0 > max_pixels:
                raise ImageError(f"{p}: image too large ({w0}x{h0} = {w0 * h0 / 1e6:.0f} MP > "
                                 f"{max_pixels / 1e6:.0f} MP decompression-bomb guard)")
            if min(w0, h0) < min_side:
                raise ImageError(f"{p}: image too small ({w0}x{h0}; need at least {min_side} px per side)")
            if im.format == "JPEG" and max(w0, h0) > max_side:
                im.draft("RGB", (max_side, max_side))
            need = decode_bytes(im, max_side, (w0, h0))
            if need > max_decode_mb * 1e6:
                raise ImageError(
                    f"{p}: image too large to decode within the memory budget ({w0}x{h0} = "
                    f"{w0 * h0 / 1e6:.0f} MP, {im.mode}: about {need / 1e6:.0f} MB > {max_decode_mb:g} MB, "
                    f"setting max_decode_mb)")
            rgb, orientation = _decode_reduced(im, fh, max_side)
            im.close()
        finally:
            Image.MAX_IMAGE_PIXELS = old
    return rgb, orientation, (w0, h0)


def _pixel_bytes(mode: str) -> int:
    """Bytes per pixel of a Pillow image in ``mode`` (1-band 8-bit: 1; 16-bit: 2; the rest: 4)."""
    if mode in ("1", "L", "P") or mode.startswith("L;"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _reduce_factor(size: tuple[int, int], max_side: int) -> int:
    """The integer factor a decoded image is box-averaged by, strip by strip, before its final resize to
    ``max_side``: 1 (no box average: the full-size 8-bit RGB array is resized at once) up to
    ``_EXACT_PIXELS``, else ``longer side // max_side``."""
    if size[0] * size[1] <= _EXACT_PIXELS:
        return 1
    return max(1, max(size) // max(1, max_side))


def decode_bytes(im, max_side: int = 2048, stored_size: tuple[int, int] | None = None) -> int:
    """Estimated bytes of pixel data :func:`read_image` holds at once to decode ``im`` (a Pillow image opened,
    not loaded, after a JPEG ``draft``; ``stored_size``: its size before the draft): the full decode as Pillow
    stores it (1, 2 or 4 bytes a pixel; none for a PNG decoded strip by strip), plus the whole-image
    coefficient buffer (2 bytes a coefficient) that libjpeg keeps for a progressive JPEG whatever the scale;
    one strip of rows and its working copies (8 x); and the 8-bit RGB result before its final resize."""
    w, h = im.size
    k = _reduce_factor(im.size, max_side)
    need = -(-w // k) * -(-h // k) * 3 + 8 * min(h, _band_rows(w, im.mode, k)) * w * _pixel_bytes(im.mode)
    if _png_strip_rawmode(im) is not None:
        return need
    need += w * h * _pixel_bytes(im.mode)
    if im.format == "JPEG" and (im.info.get("progressive") or im.info.get("progression")):
        sw, sh = stored_size or im.size
        layers = getattr(im, "layer", None) or [("", 1, 1, 0)]
        hmax = max(lay[1] for lay in layers) or 1
        vmax = max(lay[2] for lay in layers) or 1
        need += sum(-(-sw * lay[1] // (8 * hmax)) * -(-sh * lay[2] // (8 * vmax)) * 64 * 2 for lay in layers)
    return need


def _band_rows(width: int, mode: str, k: int) -> int:
    """Rows per strip: about ``_BAND_BYTES`` of decoded pixels, a multiple of ``k``."""
    rows = max(1, _BAND_BYTES // max(1, width * _pixel_bytes(mode)))
    return max(k, rows // k * k)


#: PNG colour type -> samples per pixel.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Bytes per pixel of the filtered rows -> (mode, rawmode) decodes that give back the unfiltered row bytes:
#: one identity decode, or for 16-bit colour the high and the low bytes of each sample.
_PNG_UNFILTER = {1: (("L", "L"),), 2: (("LA", "LA"),), 3: (("RGB", "RGB"),), 4: (("RGBA", "RGBA"),),
                 6: (("RGB", "RGB;16B"), ("RGB", "RGB;16L")), 8: (("RGBA", "RGBA;16B"), ("RGBA", "RGBA;16L"))}


def _png_strip_rawmode(im) -> str | None:
    """The rawmode of a PNG that is decoded strip by strip (larger than one strip; not interlaced, not
    animated), else None."""
    if im.format != "PNG" or im.info.get("interlace") or getattr(im, "is_animated", False) or "bbox" in im.info:
        return None
    w, h = im.size
    if w * h * _pixel_bytes(im.mode) <= _BAND_BYTES:
        return None
    if len(im.tile) != 1 or im.tile[0][0] != "zip" or tuple(im.tile[0][1]) != (0, 0, w, h):
        return None
    args = im.tile[0][3]
    return args if isinstance(args, str) else args[0]


def _png_ihdr(fh) -> tuple[int, int, int, int]:
    """Width, height, bit depth and colour type from a PNG's header chunk (the file is left at the chunk
    after it)."""
    fh.seek(8)
    head = fh.read(8 + 13 + 4)  # length, type, data, CRC: leaves the file at the next chunk
    if len(head) < 25 or head[4:8] != b"IHDR":
        raise SyntaxError("broken PNG file (no IHDR chunk)")
    w, h, depth, ctype = struct.unpack(">IIBB", head[8:18])
    return w, h, depth, ctype


@dataclass(frozen=True)
class _PngLayout:
    """A PNG's rows as stored: size, bytes per filtered row and per pixel (at least 1), and the decodes that
    unfilter them (:data:`_PNG_UNFILTER`)."""
    w: int
    h: int
    rowbytes: int
    bpp: int
    unfilter: tuple


def _png_layout(im, fh) -> _PngLayout:
    """The layout of the PNG in ``fh`` from its header chunk, checked against ``im`` (the file is left at the
    chunk after the header)."""
    w, h, depth, ctype = _png_ihdr(fh)
    if (w, h) != im.size or ctype not in _PNG_CHANNELS:
        raise SyntaxError("broken PNG file (header does not match)")
    bits = depth * _PNG_CHANNELS[ctype]
    bpp = max(1, bits // 8)
    unfilter = _PNG_UNFILTER.get(bpp)
    if unfilter is None:
        raise SyntaxError(f"unsupported PNG pixel layout ({depth}-bit, colour type {ctype})")
    return _PngLayout(w, h, (w * bits + 7) // 8, bpp, unfilter)


def _png_idat(fh, after: dict):
    """Yield the compressed image data of the PNG in ``fh`` (from the chunk after its header) in pieces of at
    most 1 MiB, then read the chunks after it to IEND; an ``eXIf`` chunk after the image data goes to
    ``after["exif"]``."""
    seen = False
    while True:
        head = fh.read(8)
        if len(head) < 8:
            return
        length, cid = struct.unpack(">I4s", head)
        if cid == b"IDAT":
            seen = True
            left = length
            while left:
                piece = fh.read(min(left, 1 << 20))
                if not piece:
                    return
                left -= len(piece)
                yield piece
            fh.read(4)  # CRC
        elif cid == b"IEND":
            return
        elif seen and cid == b"eXIf":
            after["exif"] = fh.read(length)
            fh.read(4)
        else:
            fh.seek(length + 4, 1)


def _png_unfiltered(lay: _PngLayout, data: bytes, n: int) -> bytes:
    """The unfiltered bytes of ``n`` filtered rows ``data`` (each with its filter-type byte), by Pillow's PNG
    decoder."""
    from PIL import Image  # lazy: keeps PIL and cv2 out of --help (the CLI imports cervscan.files)

    z = zlib.compress(data, 0)
    if lay.bpp <= 4:
        mode, raw = lay.unfilter[0]
        return Image.frombytes(mode, (lay.rowbytes // lay.bpp, n), z, "zip", raw).tobytes("raw", raw)
    hi, lo = (np.frombuffer(Image.frombytes(mode, (lay.w, n), z, "zip", raw).tobytes("raw", mode), np.uint8)
              for mode, raw in lay.unfilter)
    both = np.empty((hi.size, 2), np.uint8)
    both[:, 0], both[:, 1] = hi, lo
    return both.tobytes()


def _png_bands(im, fh, rawmode: str, rows: int, after: dict):
    """Yield the rows of a PNG (not interlaced) as Pillow images of ``rows`` rows (the last may have fewer),
    read straight from the file a strip at a time, so that the full image is never held.

    The IDAT data is inflated only as far as one strip needs; the strip's filtered rows are unfiltered by
    Pillow's PNG decoder, preceded by the previous strip's last row (unfiltered, filter type 0) so that the
    filters that look at the row above work across strips. Chunks after the image data are read to the
    end, and an ``eXIf`` chunk found there goes to ``after["exif"]``.
    """
    from PIL import Image  # lazy: keeps PIL and cv2 out of --help (the CLI imports cervscan.files)

    lay = _png_layout(im, fh)
    w, h, rowbytes = lay.w, lay.h, lay.rowbytes
    stride = rowbytes + 1
    src = _png_idat(fh, after)
    inflate = zlib.decompressobj()
    buf, tail, prev, y = bytearray(), b"", None, 0
    while y < h:
        n = min(rows, h - y)
        want = n * stride
        while len(buf) < want:
            piece = tail or next(src, None)
            if piece is None:
                buf += inflate.flush()
                break
            try:
                buf += inflate.decompress(piece, want - len(buf))
            except zlib.error as e:
                raise OSError(f"broken data stream when reading image file ({e})") from None
            tail = inflate.unconsumed_tail
            if inflate.eof and len(buf) < want:
                break
        if len(buf) < want:
            raise OSError(f"image file is truncated ({y + len(buf) // stride} of {h} rows)")
        data = bytes(buf[:want])
        del buf[:want]
        if prev is not None:
            data = b"\x00" + prev + data
        raw = _png_unfiltered(lay, data, n + (prev is not None))
        prev = raw[-rowbytes:]
        band = Image.frombytes(im.mode, (w, n), raw[rowbytes:] if len(raw) > n * rowbytes else raw, "raw", rawmode)
        if im.mode in ("P", "PA") and im.palette is not None:
            band.palette = im.palette.copy()
        band.info = dict(im.info)
        yield band
        y += n
    for _ in src:  # the chunks after the image data (eXIf)
        pass


def _decode_reduced(im, fh, max_side: int) -> tuple[np.ndarray, int]:
    """Decode ``im`` (opened, not loaded; after a JPEG ``draft``) to upright 8-bit RGB of at most ``max_side``
    px: converted and box-averaged by :func:`_reduce_factor` a strip at a time, then :func:`_scaled_upright`.
    Returns the array and the EXIF orientation."""
    from PIL import Image  # lazy: keeps PIL and cv2 out of --help (the CLI imports cervscan.files)

    w, h = im.size
    k = _reduce_factor(im.size, max_side)
    rows = _band_rows(w, im.mode, k)
    after: dict = {}
    rawmode = _png_strip_rawmode(im)
    peak = None
    if rawmode is not None:
        bands = _png_bands(im, fh, rawmode, rows, after)  # a PNG never gives modes I or F
    else:
        im.load()

        def crops():
            if rows >= h:
                yield im
                return
            for y in range(0, h, rows):
                yield im.crop((0, y, w, min(h, y + rows)))

        bands = crops()
        if im.mode in ("I", "F"):  # scaled by the largest value of the whole image
            peak = np.max([np.asarray(b).max() for b in crops()])
    out = np.empty((-(-h // k), -(-w // k), 3), np.uint8)
    y = 0
    for band in bands:
        a = _to_rgb8(band, peak)
        if k > 1:
            a = np.asarray(Image.fromarray(a).reduce(k))
        out[y:y + a.shape[0]] = a
        y += a.shape[0]
    if y != out.shape[0]:
        raise OSError(f"image file is truncated ({y} of {out.shape[0]} rows)")
    if rawmode is not None and "exif" not in im.info and "Raw profile type exif" not in im.info:
        im.info["exif"] = after.get("exif", b"")  # read here, so that getexif() does not load the full image
    orientation = im.getexif().get(0x0112, 1)
    return _scaled_upright(out, (w, h), k, max_side, orientation), orientation


def _scaled_upright(rgb: np.ndarray, size: tuple[int, int], k: int, max_side: int, orientation: int) -> np.ndarray:
    """``rgb``, the decoded image of ``size`` (as stored) box-averaged by ``k``, turned upright as its EXIF
    orientation says (as ``PIL.ImageOps.exif_transpose``) and scaled with area interpolation to ``max_side``
    on its longer side when ``size`` is larger."""
    import cv2  # lazy: keeps PIL and cv2 out of --help (the CLI imports cervscan.files)
    from PIL import Image  # lazy: keeps PIL and cv2 out of --help (the CLI imports cervscan.files)

    w, h = size
    s = max_side / max(w, h)
    target = (max(1, round(w * s)), max(1, round(h * s)))
    if k > 1:
        # A row's or column's last block may be partial (its mean covers the pixels there are): scale by the
        # exact factor, so that the image's extent maps onto the target, and cut off what lies beyond it.
        a = cv2.resize(rgb, None, fx=target[0] * k / w, fy=target[1] * k / h, interpolation=cv2.INTER_AREA)
        rgb = a[:target[1], :target[0]] if a.shape[1] >= target[0] and a.shape[0] >= target[1] else \
            cv2.resize(rgb, target, interpolation=cv2.INTER_AREA)
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}.get(orientation)
    if method is not None:
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).transpose(method))
    if k == 1 and max(w, h) > max_side:
        if orientation in (5, 6, 7, 8):
            target = target[::-1]
        rgb = cv2.resize(rgb, target, interpolation=cv2.INTER_AREA)
    return rgb


def _to_rgb8(im, peak: float | None = None) -> np.ndarray:
    """8-bit RGB of a Pillow image (or of a strip of one): grey levels repeated, 16-bit scaled by 255/65535,
    alpha composited on black, other modes converted by Pillow. Modes I and F are scaled by their largest
    value: ``peak``, that of the whole image when ``im`` is a strip of it (default: ``im``'s own)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        if a.dtype != np.uint8:
            if mode.startswith("I;16"):
                # round(a / 65535 * 255) = round(a / 257), exactly, in integers
                a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
            else:
                a = a.astype(np.float64)
                hi = 65535.0 if (a.max() if peak is None else peak) > 255 else 255.0
                a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.stack([a, a, a], axis=-1)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 1 if (a.max() if peak is None else peak) <= 1 else 255
        a = (np.clip(a, 0, top) / top * 255).astype(np.uint8)
        return np.stack([a, a, a], axis=-1)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        a = np.asarray(im.convert("RGBA"))
        # composited on black: round(c * alpha / 255), exactly, in integers
        return ((a[..., :3].astype(np.uint16) * a[..., 3:4] + 127) // 255).astype(np.uint8)
    if mode == "RGB":
        arr = np.asarray(im)
        if arr.dtype != np.uint8:  # e.g. 48-bit TIFF read as RGB;16 -> scale
            arr = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
        return arr
    return np.asarray(im.convert("RGB"))
