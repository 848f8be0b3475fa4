"""One writer per output directory: an exclusive `flock` on `<dir>/run.lock`, held for a run's lifetime.

    lock = DirectoryLock.acquire(directory)   # LockHeld (with the holder's pid) when another process holds it
    ...
    lock.release()                            # also what the kernel does when the process dies
    holder(directory)                         # the live holder's record, or None
    held_at_or_above(path)                    # (directory, record) of a live lock at or above `path`

The kernel drops a flock when its process dies (kill -9 included), so a lock file left behind by a
crashed run blocks nothing: the next run locks it again and writes its own record (pid, start time,
host, command). A released lock's file is removed while still locked; an acquirer that locked a file
removed in the meantime sees that its inode is no longer the path's and tries again.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "run.lock"
_WAIT_S = 0.5  # how long a refused acquirer retries: a `holder` check locks the file for microseconds


class LockHeld(Exception):
    """Another live process holds the directory's lock; `record` is what it wrote there."""

    def __init__(self, directory: str, record: dict):
        self.directory, self.record = directory, record
        super().__init__(f"{directory}: in use by {describe(record)}")


def describe(record: dict) -> str:
    """`pid 1234 [on host] since 2025-01-01T12:00:00+0000: train_sft.py ...` of a lock record."""
    where = f" on {record['host']}" if record.get("host") and record["host"] != socket.gethostname() else ""
    command = f": {record['command']}" if record.get("command") else ""
    return f"pid {record.get('pid', '?')}{where} since {record.get('started', '?')}{command}"


def _record(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # being written by its holder this instant
        return {}


@dataclass
class DirectoryLock:
    path: str
    fd: int | None

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> "DirectoryLock":
        """Lock `directory` (created if missing) for this process; LockHeld names the holder."""
        os.makedirs(directory, exist_ok=True)
        path, deadline = os.path.join(directory, LOCK_FILE), time.monotonic() + _WAIT_S
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _record(fd)
                os.close(fd)
                if time.monotonic() > deadline:
                    raise LockHeld(str(directory), record) from None
                time.sleep(0.02)
                continue
            if _same_file(fd, path):
                break
            os.close(fd)  # its holder removed the file between our open and our lock: lock the new one
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock."""
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                os.remove(self.path)
        finally:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def holder(directory: str | os.PathLike) -> dict | None:
    """The record of the live process holding `directory`'s lock (its pid, ...), or None when the
    lock is free (no lock file, or one a dead process left)."""
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or unreadable: not a run's)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _record(fd) or {"pid": "?"}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def held_at_or_above(path: str | os.PathLike) -> tuple[str, dict] | None:
    """(directory, holder record) of the nearest live lock at `path` or above it (symlinks resolved),
    ignoring this process's own locks; None when no running process writes there."""
    here = Path(os.path.abspath(path)).resolve()
    for directory in (here, *here.parents):
        record = holder(directory)
        if record is not None and record.get("pid") != os.getpid():
            return str(directory), record
    return None


def in_use_problem(option: str, path: str | os.PathLike) -> str | None:
    """One line when a running process (a training run) holds `path` or a directory above it: writing
    there would mix files with that run's or have them deleted under it."""
    found = held_at_or_above(path)
    if found is None:
        return None
    directory, record = found
    return in_use_line(option, path, record, "" if directory == str(Path(os.path.abspath(path)).resolve())
                       else f"inside {directory}, ")


def in_use_line(option: str, path: str | os.PathLike, record: dict, where: str = "") -> str:
    return (f"{option} {path}: {where}in use by a running process ({describe(record)}): wait for it to end or "
            f"choose another {option}")
