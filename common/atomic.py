"""Crash-safe file writes for every part of the project: a temp file next to the target, renamed
over it only when complete, so a reader (or an interrupted run) never sees half a file."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path` to write; it is fsynced and replaces `path` when the
    block succeeds, and is removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise whoever reads the file next
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | os.PathLike, chunks: Iterable[str]) -> None:
    """Write text chunks (e.g. one JSON line each, streamed) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.writelines(chunks)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_tree(root: str) -> None:
    """fsync and give the usual permissions (0644 files, 0755 directories under the umask) to
    everything below `root`: mkdtemp's 0700 would surprise whoever serves the directory next."""
    umask = _umask()
    for here, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(here, name)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(path, 0o666 & ~umask)
        os.chmod(here, 0o777 & ~umask)


@contextmanager
def atomic_dir(path: str | os.PathLike, prefix: str | None = None) -> Iterator[str]:
    """Yield a temporary directory next to `path` to fill; when the block succeeds its files are
    fsynced, and it replaces `path` (an old `path` is removed only after the new one is complete);
    when it fails it is removed. Temp names start with `.<name>-` (or `prefix`), so a cleaner can
    find the leftovers of a killed process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix or f".{path.name}-", dir=path.parent)
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():  # rename cannot replace a non-empty directory: move the old one aside first
            old = tempfile.mkdtemp(prefix=prefix or f".{path.name}-", dir=path.parent)
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
