"""The labels CSV (patient_id,label[,source]) and its problems."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cervscan.errors import DataError

# --------------------------------------------------------------------------- labels

def read_labels(path: str | Path, notes: list[dict] | None = None) -> tuple[list[dict], int]:
    """Read ``patient_id,label[,source]``: rows with label 0/1 (source as given, may be
    empty) and the number of rows with an empty label, which are skipped. The file may start with a byte-order
    mark, end its lines the Windows way and separate its fields by ``;`` or a tab instead of ``,`` (spreadsheets
    in many locales write ``;``): the header line's separator is used. Every label that is not 0 or 1 is named
    in one :class:`~cervscan.errors.DataError` (line and patient).

    A patient id listed more than once with the same label is kept once (its first row) and noted; with
    opposite labels it is a :class:`~cervscan.errors.DataError` naming the id and the rows (line numbers of
    the file, the header is line 1). Notes go to ``notes`` when given: ``{"kind": "duplicate",
    "patient_id", "rows", "labels", "sources"}``."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            text = f.read()
        header = text.splitlines()[0] if text else ""
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=max(",;\t", key=header.count))
        if reader.fieldnames:
            reader.fieldnames = [h.strip() for h in reader.fieldnames]
        rows = [(r, reader.line_num) for r in reader]
    except OSError as e:
        raise DataError(f"{p}: cannot read labels ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not a readable CSV file ({e})") from None
    if not rows or "patient_id" not in rows[0][0] or "label" not in rows[0][0]:
        raise DataError(f"{p}: needs columns patient_id,label[,source]")
    out, unlabelled, bad = [], 0, []
    seen: dict[str, list[tuple[int, int, str]]] = {}  # id -> (line, label, source) of each labelled row
    for r, line in rows:
        lab = (r.get("label") or "").strip()
        if lab == "":
            unlabelled += 1
            continue
        pid = (r.get("patient_id") or "").strip()
        if lab not in ("0", "1"):
            bad.append(f"line {line}, patient {pid}: {lab!r}")
            continue
        if not pid:
            raise DataError(f"{p}: line {line}: a label without a patient_id")
        src = (r.get("source") or "").strip()
        if pid in seen:
            seen[pid].append((line, int(lab), src))
            continue
        seen[pid] = [(line, int(lab), src)]
        out.append({"patient_id": pid, "label": int(lab), "source": src})
    if bad:
        raise DataError(f"{p}: label must be 0 or 1 (0 = mildly normal, 1 = severe; empty = not labelled), "
                        f"{len(bad)} row(s) are not: " + "; ".join(bad[:20]) + (" ..." if len(bad) > 20 else ""))
    dups = {pid: v for pid, v in seen.items() if len(v) > 1}
    conflicts = {pid: v for pid, v in dups.items() if len({lab for _, lab, _ in v}) > 1}
    if conflicts:
        raise DataError(f"{p}: contradictory labels: " + "; ".join(
            f"patient {pid} is labelled " + " and ".join(f"{lab} (line {line})" for line, lab, _ in v)
            for pid, v in conflicts.items()) + "; correct the labels file")
    if notes is not None:
        notes.extend({"kind": "duplicate", "patient_id": pid, "rows": [line for line, _, _ in v],
                      "labels": [lab for _, lab, _ in v], "sources": [src for _, _, src in v]}
                     for pid, v in dups.items())
    return out, unlabelled
