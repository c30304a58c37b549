"""Files written whole or not at all: a temporary name in the same folder, fsync, atomic rename."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def _naming(path: Path):
    """Raise an OSError from a write, which names no file, naming path."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path via a temporary file in the same folder and an atomic rename.

    A write that fails (a full disk, an interrupt) removes its temporary file, and an OSError
    from the write itself, which names no file, is raised naming path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with _naming(path), open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_staged_bytes(path: Path, data: bytes) -> None:
    """Write data to path inside a staging folder that is renamed into place once complete and
    flushed to disk once before (`os.sync`), so a file needs no rename or fsync of its own (an
    fsync per file took 2 ms on the development machine's disk, 40 of the 110 s of exporting
    10,584 masks with their images; more on a network file system). An OSError from the write
    itself is raised naming path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming(path), open(path, "wb") as handle:
        handle.write(data)


def check_file_can_be_written(path: Path) -> None:
    """Raise the OSError that writing a file at path (its missing folders made) would raise where
    the path cannot take one: a folder at path, a file where a folder of it is needed, or a
    first existing folder that is not writable. Checked before long work whose result it holds."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    if not os.access(folder, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def atomic_write_json(path: Path, value) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
