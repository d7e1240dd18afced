"""Every file cervscan writes goes through one atomic writer (:func:`cervscan.files.atomic_write_with`):
no temp-file-and-rename written by hand anywhere else, and the writer leaves either the old file or the
whole new one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cervscan.files import atomic_write_bytes, atomic_write_npz, atomic_write_with

PKG = Path(__file__).resolve().parents[1] / "src" / "cervscan"


def test_no_hand_written_rename_outside_the_writer():
    hand = re.compile(r"os\.replace\(|os\.rename\(|\btmp\w*\.replace\(|\.tmp[\"']|tempfile\.mkstemp")
    allowed = {PKG / "files" / "atomic.py", PKG / "pipeline" / "screening.py"}  # the writer; the write probe
    found = [f"{p.relative_to(PKG)}:{n}" for p in PKG.rglob("*.py") if p not in allowed
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if hand.search(line) and not line.strip().startswith("#")]
    assert not found, f"write through cervscan.files.atomic_write_with, not by hand: {found}"


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old")

    def half_then_fail(f):
        f.write(b"new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_with(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_npz_round_trip(tmp_path):
    import numpy as np

    f = atomic_write_npz(tmp_path / "x.npz", a=np.arange(3), b=np.ones((2, 2)))
    z = np.load(f)
    assert z["a"].tolist() == [0, 1, 2] and z["b"].shape == (2, 2)
