"""One place that rewrites a marked block of ``benchmarks/RESULTS.md`` (each benchmark owns one block)."""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_block(start: str, end: str, block: str, path: Path = RESULTS) -> None:
    """Put ``block`` (which begins with ``start`` and ends with ``end``) in place of the file's block between
    the same markers, or append it; written atomically, so a crash leaves the old file whole."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = block.rstrip("\n")
    if start in old and end in old:
        a, b = old.index(start), old.index(end) + len(end)
        new = old[:a] + block + old[b:]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)
