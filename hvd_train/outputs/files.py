"""The one way hvd_train writes a file: complete or not at all (temp file, then rename).

A reader (a test, ``--resume``, a tool tailing the run directory) never sees half a file; a run
killed mid-write leaves at most a ``*.tmp*`` file, which nothing reads.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = False) -> Iterator[str]:
    """Yields a temporary path beside ``path`` to write; renames it over ``path`` on success.

    The temporary name keeps the extension (``model.tmp.keras``), since some writers pick the
    format from it. ``durable``: fsync the file and its directory, so the rename survives a crash.
    """
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if durable:
        _fsync(os.path.dirname(os.path.abspath(path)))


def write_text(path: str, text: str, durable: bool = False) -> None:
    with atomic_path(path, durable) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


def write_bytes(path: str, data: bytes, durable: bool = False) -> None:
    with atomic_path(path, durable) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)  # a file or a directory: fsync needs no write access
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
