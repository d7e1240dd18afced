"""Training caches: where they live and the key of a file as it is now."""

from __future__ import annotations

import hashlib
from pathlib import Path

from platformdirs import user_cache_dir


def cache_root(cache_dir: str | Path | None) -> Path:
    """Where training caches live: ``cache_dir`` when given, else the user's cache folder for cervscan."""
    if cache_dir:
        return Path(cache_dir)
    return Path(user_cache_dir("cervscan", appauthor=False))


def file_key(path: Path) -> str:
    """Short cache key of a file as it is now (resolved path, size, modification time)."""
    st = Path(path).stat()
    return hashlib.sha1(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
