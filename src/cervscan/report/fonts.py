"""Text in any script for the reports: the embedded report font, fallback fonts, and how patient ids are printed.

Text uses an embedded TrueType font (DejaVu Sans from matplotlib, else Bitstream Vera from reportlab:
Latin, Greek, Cyrillic, Arabic, Hebrew, many symbols and the emoticons). A character it lacks (CJK,
Devanagari, ...) is set in the first TrueType font of this machine that has it (fontconfig's list, the
usual font folders; fonts with PostScript outlines, such as the OpenType Noto CJK, or bitmap-only colour
emoji cannot be embedded by reportlab and are skipped): :class:`_FontChain`.

A patient id with a character no font has, or an invisible one (zero-width, no-break space, control), is
printed with code point escapes as Python writes them (``pac \\U0001f600 ñ``, ``\\u674e\\u5a1c``; a
backslash as ``\\\\``) and a note, and a warning is logged; ids that would still print alike
(composed/decomposed accents) are followed by their exact code points (:class:`_IdDisplay`).
Right-to-left ids are put in display order (:func:`cervscan.report.bidi.visual_order`); letters are not
shaped (Arabic is printed with unjoined letters, Indic vowel signs are not reordered).
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from xml.sax.saxutils import escape

from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont, TTFontFile

from cervscan.report.bidi import visual_order

log = logging.getLogger(__name__)

#: The name under which the report font family is registered with reportlab.
FONT = "CervscanSans"


# --------------------------------------------------------------------------- the report font

def _font_files() -> dict[str, Path] | None:
    """Regular/bold/italic/bold-italic TTFs shipped with a dependency (or with cervscan)."""
    cands: list[tuple[Path, tuple[str, str, str, str]]] = []
    dejavu = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf")
    cands.append((Path(__file__).resolve().parents[1] / "fonts", dejavu))
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append((Path(loc) / "mpl-data" / "fonts" / "ttf", dejavu))
    spec = importlib.util.find_spec("reportlab")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append((Path(loc) / "fonts", ("Vera.ttf", "VeraBd.ttf", "VeraIt.ttf", "VeraBI.ttf")))
    for folder, names in cands:
        files = [folder / n for n in names]
        if all(f.is_file() for f in files):
            return dict(zip(("normal", "bold", "italic", "boldItalic"), files))
    return None


def _register_fonts() -> str:
    """Register the embedded font family once; returns its name (Helvetica if no TTF is found)."""
    if FONT in pdfmetrics.getRegisteredFontNames():
        return FONT
    files = _font_files()
    if not files:
        log.warning("no TrueType font found; non-ASCII text may not render")
        return "Helvetica"
    names = {"normal": FONT, "bold": f"{FONT}-Bold", "italic": f"{FONT}-Italic",
             "boldItalic": f"{FONT}-BoldItalic"}
    for k, f in files.items():
        pdfmetrics.registerFont(TTFont(names[k], str(f)))
    pdfmetrics.registerFontFamily(FONT, **names)
    return FONT


# --------------------------------------------------------------------------- fallback fonts

def _font_dirs() -> list[Path]:
    """Font folders searched for fallback fonts (besides what fontconfig's ``fc-list`` lists)."""
    home = Path.home()
    dirs = [home / ".fonts", home / ".local" / "share" / "fonts", Path("/usr/share/fonts"),
            Path("/usr/local/share/fonts")]
    if os.environ.get("XDG_DATA_HOME"):
        dirs.insert(0, Path(os.environ["XDG_DATA_HOME"]) / "fonts")
    if sys.platform == "darwin":
        dirs += [home / "Library" / "Fonts", Path("/Library/Fonts"), Path("/System/Library/Fonts"),
                 Path("/System/Library/Fonts/Supplemental")]
    if os.name == "nt":
        dirs += [Path(os.environ.get("WINDIR", r"C:\Windows")) / "Fonts"]
        if os.environ.get("LOCALAPPDATA"):
            dirs.append(Path(os.environ["LOCALAPPDATA"]) / "Microsoft" / "Windows" / "Fonts")
    return dirs


@dataclass
class _FontCandidate:
    """A font file (and face, in a .ttc collection) that may hold characters the base font lacks."""
    path: Path
    index: int = 0
    ranges: list[tuple[int, int]] | None = None  # code point ranges, as fontconfig lists them
    _cmap: set[int] | None = None

    def covers(self, cp: int) -> bool:
        if self.ranges is not None:
            k = bisect.bisect_right(self.ranges, (cp, 0x7FFFFFFF)) - 1
            return k >= 0 and self.ranges[k][0] <= cp <= self.ranges[k][1]
        if self._cmap is None:
            self._cmap = _read_cmap(self.path, self.index)
        return cp in self._cmap


def _read_cmap(path: Path, index: int) -> set[int]:
    """Code points of a TrueType-outline font (empty for PostScript/CFF outlines and bitmap-only fonts,
    which reportlab cannot embed, and for files that cannot be read)."""
    try:
        from fontTools.ttLib import TTFont as FTFont  # lazy: fontTools (optional)

        with FTFont(str(path), fontNumber=index, lazy=True) as f:
            return set(f.getBestCmap() or ()) if "glyf" in f else set()
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - a broken font file is just not used
        return set()
    try:
        return set(TTFontFile(str(path), subfontIndex=index).charToGlyph)
    except Exception:  # noqa: BLE001
        return set()


def _fontconfig_candidates() -> list[_FontCandidate]:
    """TrueType fonts fontconfig knows, with their character ranges (none when fc-list is not installed)."""
    exe = shutil.which("fc-list")
    if not exe:
        return []
    try:
        res = subprocess.run([exe, "--format", "%{file}\t%{index}\t%{fontformat}\t%{charset}\n"],
                             capture_output=True, text=True, timeout=30, errors="replace")
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("fc-list failed: %s", e)
        return []
    out = []
    for line in res.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) != 4 or parts[2].strip() != "TrueType":
            continue
        ranges = []
        for item in parts[3].split():
            lo, _, hi = item.partition("-")
            try:
                ranges.append((int(lo, 16), int(hi or lo, 16)))
            except ValueError:
                continue
        try:
            index = int(parts[1]) & 0xFFFF  # named instances of variable fonts: face in the low 16 bits
        except ValueError:
            index = 0
        out.append(_FontCandidate(Path(parts[0]), index, sorted(ranges)))
    return out


def _folder_candidates() -> list[_FontCandidate]:
    """Font files in the usual font folders and matplotlib's DejaVu and STIX fonts (cmaps read when needed)."""
    files: list[Path] = []
    for d in _font_dirs():
        if d.is_dir():
            try:
                files += sorted(p for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".ttc", ".otf"))
            except OSError:
                continue
    spec = importlib.util.find_spec("matplotlib")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        ttf = Path(loc) / "mpl-data" / "fonts" / "ttf"
        if ttf.is_dir():
            files += sorted(p for p in ttf.glob("*.ttf") if p.name.startswith(("DejaVu", "STIX")))
    out = []
    for p in files:
        n = 1
        if p.suffix.lower() == ".ttc":
            try:
                with open(p, "rb") as f:
                    head = f.read(12)
                n = int.from_bytes(head[8:12], "big") if head[:4] == b"ttcf" else 0
            except OSError:
                n = 0
        out += [_FontCandidate(p, i) for i in range(min(n, 64))]
    return out


def _font_candidates() -> list[_FontCandidate]:
    """Fallback font candidates on this machine, regular sans-serif faces first. Fonts whose glyphs are
    placeholders for whole Unicode blocks (Last Resort) are left out: they would print two different
    ids alike."""
    seen: set[tuple[str, int]] = set()
    out = []
    for c in [*_fontconfig_candidates(), *_folder_candidates()]:
        key = (str(c.path), c.index)
        if key in seen or "lastresort" in c.path.name.lower():
            continue
        seen.add(key)
        out.append(c)

    def rank(c: _FontCandidate):
        n = c.path.name.lower()
        styled = any(w in n for w in ("bold", "italic", "oblique", "light", "thin", "black", "mono", "condensed"))
        return ("sans" not in n, styled, str(c.path), c.index)

    return sorted(out, key=rank)


#: Characters never printed as they are, but as code points: controls, format characters (zero width,
#: direction overrides), private-use, unassigned and surrogate code points, and spaces other than
#: U+0020 (invisible, or looking like other characters).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cn", "Cs", "Zl", "Zp", "Zs"})


def _hidden(ch: str) -> bool:
    return ch != " " and unicodedata.category(ch) in _HIDDEN_CATEGORIES


def _code_point(ch: str) -> str:
    """One character as a code point escape, as Python writes it: ``\\xe9``, ``\\u674e``, ``\\U0001f600``
    (a backslash as ``\\\\``)."""
    o = ord(ch)
    if ch == "\\":
        return "\\\\"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _char_name(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, '')}".strip()


class _FontChain:
    """The report font and, for characters it lacks, TrueType fonts found on this machine (fontconfig,
    the usual font folders, matplotlib's fonts). ``font_for(ch)`` names the first font that has the
    character, registered with reportlab (embedded as a subset when used), or None."""

    def __init__(self, base: str):
        self.base = base
        if base == FONT:
            faces = [pdfmetrics.getFont(n).face for n in (FONT, f"{FONT}-Bold")]
            self.base_cover = set(faces[0].charToGlyph) & set(faces[1].charToGlyph)
        else:  # a standard PDF font: Latin-1
            self.base_cover = set(range(0x20, 0x7F)) | set(range(0xA0, 0x100))
        self._candidates: list[_FontCandidate] | None = None
        self._registered: dict[tuple[str, int], str | None] = {}
        self._by_char: dict[str, str | None] = {}

    def font_for(self, ch: str) -> str | None:
        if ord(ch) in self.base_cover:
            return self.base
        if ch not in self._by_char:
            self._by_char[ch] = self._find(ord(ch))
        return self._by_char[ch]

    def _find(self, cp: int) -> str | None:
        if self._candidates is None:
            self._candidates = _font_candidates()
        for c in self._candidates:
            if c.covers(cp):
                name = self._register(c)
                if name and self._has(name, cp):
                    return name
        return None

    @staticmethod
    def _has(name: str, cp: int) -> bool:
        return cp in pdfmetrics.getFont(name).face.charToGlyph

    def _register(self, c: _FontCandidate) -> str | None:
        key = (str(c.path), c.index)
        if key not in self._registered:
            # named after the file, so that a name always means the same font in this process
            digest = hashlib.sha1(f"{c.path}:{c.index}".encode("utf-8", "surrogateescape")).hexdigest()
            name = f"{FONT}-F{digest[:10]}"
            try:
                if name not in pdfmetrics.getRegisteredFontNames():
                    pdfmetrics.registerFont(TTFont(name, str(c.path), subfontIndex=c.index))
                    pdfmetrics.registerFontFamily(name, normal=name, bold=name, italic=name, boldItalic=name)
                log.debug("fallback font %s: %s (face %d)", name, c.path, c.index)
            except Exception as e:  # noqa: BLE001 - PostScript outlines, bitmap-only or broken: not usable
                log.debug("font %s (face %d) not usable: %s", c.path, c.index, e)
                name = None
            self._registered[key] = name
        return self._registered[key]

    def missing(self, text: str) -> list[str]:
        """The characters of ``text`` that are printed as code points (no font has them, or hidden)."""
        return list(dict.fromkeys(ch for ch in text if _hidden(ch) or self.font_for(ch) is None))

    def markup(self, text: str, *, reorder: bool = True) -> tuple[str, str, list[str]]:
        """Paragraph markup of a name or id: (markup, the text as printed, characters printed as code points).

        Each character is set in the first font that has it; when a character is in no font (or is
        hidden), every such character and every backslash is written as a code point escape
        (:func:`_code_point`), so that the printed text still tells the id apart from every other.
        Right-to-left letters are put in display order (:func:`visual_order`). ``reorder=False``: free
        text (a message), kept in its order, with line breaks and other spaces as plain spaces."""
        if not reorder:
            text = "".join(" " if unicodedata.category(ch) in ("Cc", "Zs", "Zl", "Zp") else ch for ch in text)
        missing = self.missing(text)
        shown = "".join(_code_point(ch) if ch in missing or (missing and ch == "\\") else ch for ch in text)
        if reorder:
            shown = visual_order(shown)
        out, run, run_font = [], [], self.base
        for ch in shown:
            f = self.font_for(ch) or self.base
            if f != run_font and run:
                out.append(_in_font("".join(run), run_font, self.base))
                run = []
            run_font = f
            run.append(ch)
        if run:
            out.append(_in_font("".join(run), run_font, self.base))
        return "".join(out), shown, missing


def _in_font(text: str, font: str, base: str) -> str:
    return escape(text) if font == base else f"<font face='{font}'>{escape(text)}</font>"


_CHAIN: _FontChain | None = None


def _font_chain() -> _FontChain:
    """The process's font chain (the report font registered first)."""
    global _CHAIN
    base = _register_fonts()
    if _CHAIN is None or _CHAIN.base != base:
        _CHAIN = _FontChain(base)
    return _CHAIN


def _markup(text: str, *, reorder: bool = True) -> str:
    """Paragraph markup of a name (an image or file name, a clinic; ``reorder=False``: free text such as an
    error message): every character in a font that has it, or as a code point escape."""
    return _font_chain().markup(str(text), reorder=reorder)[0]


# --------------------------------------------------------------------------- patient ids

_SHAPED_SCRIPTS = ((0x0600, 0x08FF, "Arabic"), (0x0700, 0x074F, "Syriac"), (0x0900, 0x0DFF, "Indic"),
                   (0x0F00, 0x0FFF, "Tibetan"), (0x1000, 0x109F, "Myanmar"), (0x1780, 0x17FF, "Khmer"),
                   (0x1800, 0x18AF, "Mongolian"), (0xFB50, 0xFDFF, "Arabic"), (0xFE70, 0xFEFF, "Arabic"))


def _unshaped_scripts(text: str) -> list[str]:
    out = []
    for ch in text:
        for lo, hi, name in _SHAPED_SCRIPTS:
            if lo <= ord(ch) <= hi and name not in out:
                out.append(name)
    return out


@dataclass
class _IdText:
    markup: str  # the id as printed (paragraph markup)
    shown: str  # the id as printed (plain text, display order)
    missing: list[str]  # characters printed as code points
    exact: str = ""  # the exact id as code points, when another id of the run would print alike


class _IdDisplay:
    """How each patient id of a run is printed: as written, every character in a font that has it; where
    no font on this machine has a character, with code point escapes and a note; and where two ids would
    still look alike (Unicode normalisation, display order), each followed by its exact code points."""

    def __init__(self, ids: Iterable[str]):
        chain = _font_chain()
        self._ids: dict[str, _IdText] = {}
        seen: dict[str, list[str]] = {}
        unshaped: dict[str, int] = {}
        for pid in dict.fromkeys(ids):
            markup, shown, missing = chain.markup(pid)
            self._ids[pid] = _IdText(markup, shown, missing)
            seen.setdefault(unicodedata.normalize("NFKC", shown), []).append(pid)
            if missing:
                log.warning("patient id %r: %s; the reports print it with code points as %s", pid,
                            _why_code_points(missing, hint=True), shown)
            for script in _unshaped_scripts(pid) if not missing else ():
                unshaped[script] = unshaped.get(script, 0) + 1
        for script, n in unshaped.items():
            log.info("%d patient id(s) in %s script: printed letter by letter, without text shaping (letters "
                     "unjoined, vowel signs not reordered); the characters themselves are exact", n, script)
        for group in seen.values():
            if len(group) > 1:
                for pid in group:
                    self._ids[pid].exact = pid.encode("unicode_escape").decode("ascii")
                log.warning("patient ids %s would print alike; the reports add their exact code points",
                            ", ".join(self._ids[p].exact for p in group))

    def get(self, pid: str) -> _IdText:
        if pid not in self._ids:
            markup, shown, missing = _font_chain().markup(pid)
            self._ids[pid] = _IdText(markup, shown, missing)
        return self._ids[pid]

    def markup(self, pid: str, *, bold: bool = False, note: str = "full") -> str:
        """The id as paragraph markup, followed (smaller, on a new line) by why it has code points and by
        its exact code points when another id would print alike. ``note``: "full"; "short" (only that
        it has code points); "inline" (one line: only the exact code points, in brackets)."""
        t = self.get(pid)
        out = f"<b>{t.markup}</b>" if bold else t.markup
        if note == "inline":
            return out + (f" (exact id: {escape(t.exact)})" if t.exact else "")
        if t.missing:
            why = "written with code points" + ("" if note == "short" else ": " + _why_code_points(t.missing))
            out += f"<br/><font size='7'>{escape(why)}</font>"
        if t.exact:
            out += f"<br/><font size='7'>exact id: {escape(t.exact)}</font>"
        return out


def _why_code_points(chars: list[str], hint: bool = False) -> str:
    """Why these characters of an id are printed as code points, naming them (``hint``: and what to do)."""
    hidden = [c for c in chars if _hidden(c)]
    absent = [c for c in chars if not _hidden(c)]
    parts = []
    if absent:
        parts.append("no font on this computer has " + ", ".join(_char_name(c) for c in absent)
                     + (" (install a TrueType font that has it to print the id as written)" if hint else ""))
    if hidden:
        parts.append("invisible or look-alike " + ", ".join(_char_name(c) for c in hidden))
    return "; ".join(parts)


# --------------------------------------------------------------------------- file names
