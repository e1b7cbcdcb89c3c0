"""The writer lock of an activation store: one process writes a store at a time.

A writer holds an exclusive ``fcntl.flock`` on a lock file inside the store (``.writer.lock``)
for as long as it writes, and records its pid and host in it; a second writer is refused at once
with "store ... is being written by pid N". The kernel drops the lock when the holder exits,
however it exits, so a killed writer never blocks the next one (its file, with the dead pid, is
taken over). The holder removes the file when it is done, so a finished store holds only its
data. Advisory: readers (:meth:`ActivationStore.open`) never take it.

The lock file's name is a parameter so that writers that cooperate can hold one each: several
ranks of one distributed job writing their own shards into one store would each hold
``.writer-rank{R}.lock`` (rank 0 also ``.writer.lock``, which keeps other jobs out).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Self

from interp.store.schema import StoreError

LOCK_NAME = ".writer.lock"
RANK_LOCK = re.compile(r"\.writer-rank(\d+)\.lock")
"""The lock file of one rank of a distributed job (:func:`rank_lock_name`)."""


def rank_lock_name(rank: int) -> str:
    """The lock file rank ``rank`` of a distributed job holds while it writes its shards."""
    return f".writer-rank{rank}.lock"


def holder(path: Path) -> dict[str, Any] | None:
    """What the lock file at ``path`` records (``{"pid", "host"}``), or None if unreadable."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def describe(rec: dict[str, Any] | None) -> str:
    if not rec or "pid" not in rec:
        return "another process"
    host = rec.get("host")
    return f"pid {rec['pid']}" + (f" on {host}" if host and host != socket.gethostname() else "")


class WriterLock:
    """``with WriterLock(folder):`` holds ``folder / name`` exclusively, or raises
    :class:`StoreError` naming the process that holds it."""

    def __init__(self, folder: str | Path, name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreError(f"store {self.folder} is being written by {describe(holder(self.path))}; "
                                 "wait for it to finish (or stop it) and run again") from None
            try:
                ours = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                ours = False
            if ours:
                break
            os.close(fd)  # its holder removed the file while we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking, so a waiter retries on a new file
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
