"""The fault-injection hook of the batch tests.

The environment variable ``CERVSCAN_BATCH_TEST_DELAY`` (seconds, default unset) makes a run sleep at each
crash-relevant step (after a visit's files are written, after its commit, between the CSV files) so that
the tests can kill it there. Unset, :func:`pause` does nothing.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

TEST_DELAY_ENV = "CERVSCAN_BATCH_TEST_DELAY"


def pause(step: str) -> None:
    """Sleep ``$CERVSCAN_BATCH_TEST_DELAY`` seconds (fault-injection tests only; unset: no-op)."""
    raw = os.environ.get(TEST_DELAY_ENV)
    if raw:
        try:
            delay = float(raw)
        except ValueError:
            return
        if delay > 0:
            log.debug("test delay %.2fs at %s", delay, step)
            time.sleep(delay)
