"""Nightly batch screening: incremental, crash-safe, locked, observable (``cervscan batch``).

A clinic points cron at ROOT, a folder that gains visit folders every day. Each run screens only what is
new or changed and keeps every earlier result, so ``OUT/patients.csv`` and ``OUT/images.csv`` always hold
every visit's latest result exactly once.

One module per concern, in the order a run uses them (:func:`run_batch` in :mod:`.run` drives them):

- :mod:`.lock`: ``OUT/.cervscan/batch.lock``, one run per OUT; a second run exits at once with code 4
  (:class:`cervscan.errors.BatchLockedError`) or waits with ``wait=True``; a lock left by a dead run is
  taken over.
- :mod:`.journal`: ``OUT/.cervscan/batch.sqlite``, the source of truth: one row per visit, written in one
  transaction; the CSVs are views of it.
- :mod:`.outdir`: OUT checked writable, temp files of an interrupted write swept, stale mask files removed.
- :mod:`.planner`: the files, models and config fingerprints of each visit and what to screen again; a
  night with nothing new loads no model (:func:`~.planner.inputs_key`).
- :mod:`.screener`: the planned visits in one :meth:`Pipeline.run` stream, each committed as soon as its
  last image is done.
- :mod:`.tables`: ``images.csv``, ``patients.csv`` and ``skipped.csv`` rendered from the journal and
  written atomically (only when their content changed) every ``csv_every`` committed visits and at the
  end; ``run.json`` last.
- :mod:`.faults`: the fault-injection hook of the tests (``CERVSCAN_BATCH_TEST_DELAY``).

A ``kill -9`` at any moment therefore loses at most the visit being screened (it is screened again by the
next run), and never leaves a half-written CSV or a visit twice. Temp files of an interrupted atomic write
are removed by the next run, under the lock.

A visit folder that disappeared from ROOT keeps its last result in the CSVs (its report stays valid;
archiving a folder must not erase a clinical result); its ``reason`` in patients.csv says that the folder is
gone (:func:`~.tables.removed_note`; a renamed folder is a new visit, and the old id carries the note), and
it is counted as ``removed`` in the summary and logged. When the folder comes back unchanged it is not
screened again and the note goes.

Nothing outside OUT is written: an OUT that is ROOT, lies inside it or holds it is refused, and only files
listed in the output ledger (:class:`cervscan.files.OutputLedger`) are ever replaced or deleted. A visit
whose output files cannot be written is committed as failed, with the reason, and screened again by the
next run (``changed_because``: ``retry``).
"""

from cervscan.batch.faults import TEST_DELAY_ENV  # noqa: F401
from cervscan.batch.journal import Journal  # noqa: F401
from cervscan.batch.lock import BatchLock  # noqa: F401
from cervscan.batch.outdir import OUTPUT_DIRS  # noqa: F401
from cervscan.batch.planner import (  # noqa: F401
    config_fingerprint,
    files_fingerprint,
    make_plan,
    models_fingerprint,
)
from cervscan.batch.run import BatchResult, log_to_file, run_batch  # noqa: F401
from cervscan.batch.tables import removed_note  # noqa: F401
