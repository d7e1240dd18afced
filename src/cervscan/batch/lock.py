"""The lock on an output folder: one batch run per OUT.

``OUT/.cervscan/batch.lock`` is a POSIX ``lockf`` lock, released by the operating system when the process
dies, and not inherited by worker processes. A second run on the same OUT is refused at once with
:class:`~cervscan.errors.BatchLockedError` (exit code 4), or waits with ``wait=True``. The holder's pid,
host, start time and command are written into the file for the message; a file left by a process that is
no longer running is taken over (and the takeover is logged). The details are written in place (a rename
would replace the locked file), and cleared on release.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from cervscan.errors import EXIT_LOCKED, BatchLockedError, CervscanError

log = logging.getLogger(__name__)

LOCK_NAME = "batch.lock"

_HELD: set[str] = set()  # lock files held by this process (POSIX locks never conflict within one process)
_HELD_GUARD = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class BatchLock:
    """Exclusive lock on ``path`` for one batch run; see the module docstring."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.previous: dict = {}

    def _read(self, fd: int) -> dict:
        try:
            raw = os.pread(fd, 65536, 0)
            info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def _try(self, fd: int) -> bool:
        key = str(self.path.resolve())
        with _HELD_GUARD:
            if key in _HELD:
                return False
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    return False
                raise CervscanError(f"{self.path}: cannot lock ({e.strerror})") from None
            _HELD.add(key)
            return True

    def describe(self, info: dict) -> str:
        if not info:
            return f"another process (lock file {self.path}; it has not written its details yet)"
        return (f"cervscan batch pid {info.get('pid')} on host {info.get('host')} since {info.get('started')} "
                f"(lock file {self.path})")

    def acquire(self, *, wait: bool = False, timeout: float | None = None, poll: float = 0.5) -> float:
        """Take the lock; returns the seconds waited. Raises :class:`BatchLockedError` when it is held
        (at once, or after ``timeout`` seconds with ``wait``)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise CervscanError(f"{self.path}: cannot open the lock file ({e.strerror})") from None
        t0 = time.monotonic()
        try:
            while not self._try(fd):
                holder = self._read(fd)
                waited = time.monotonic() - t0
                if not wait:
                    raise BatchLockedError(f"{self.path.parent.parent}: another batch run is in progress: "
                                           f"{self.describe(holder)}; exiting (code {EXIT_LOCKED}); "
                                           "use --wait to wait for it")
                if timeout is not None and waited >= timeout:
                    raise BatchLockedError(f"{self.path.parent.parent}: still locked after waiting {waited:.0f}s by "
                                           f"{self.describe(holder)}; exiting (code {EXIT_LOCKED})")
                if waited == 0 or int(waited) % 60 == 0:
                    log.info("waiting for the lock held by %s", self.describe(holder))
                time.sleep(poll if timeout is None else max(0.01, min(poll, timeout - waited)))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.previous = self._read(fd)
        self._note_takeover(self.previous)
        self._write_info()
        return time.monotonic() - t0

    def _note_takeover(self, prev: dict) -> None:
        """A lock file that still names a holder was left by a run that died (the OS freed the lock)."""
        if not prev or prev.get("pid") == os.getpid():
            return
        host, pid = prev.get("host"), prev.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            log.warning("took over the lock %s left by pid %s (started %s), which is no longer running; "
                        "its run was interrupted and is continued now", self.path, pid, prev.get("started"))
        else:
            log.warning("took over the lock %s last written by pid %s on host %s (started %s); the lock itself "
                        "was free", self.path, pid, host, prev.get("started"))

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "argv": sys.argv}
        data = (json.dumps(info) + "\n").encode("utf-8")
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
            os.fsync(self.fd)
        except OSError as e:
            self.release()
            raise CervscanError(f"{self.path}: cannot write the lock file ({e.strerror})") from None

    def release(self) -> None:
        """Clear the holder's details and unlock (closing the file also unlocks)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)
        with _HELD_GUARD:
            _HELD.discard(str(self.path.resolve()))

    def __enter__(self) -> "BatchLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
