"""Atomic, durable file writes: a unique temporary file, fsync'ed, renamed over the target.

Every writer of a finished result file (JSON, CSV, PNG, CREMI HDF5, block
manifests) goes through `atomic_path` so that a reader, or a run restarted
after a kill or a power cut, sees either the old file or the complete new one,
never a truncated mix:

1. the content is written to a temporary file with a unique name
   (`tempfile.mkstemp`) in the target's folder (a rename is only atomic within
   one file system), so concurrent writers never share a temporary file;
2. the temporary file is fsync'ed (its data reaches the disk before its name);
3. it is renamed over the target with `os.replace`;
4. the folder is fsync'ed, so the rename itself survives a power cut.

On any failure the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    # os.umask can only be read by setting it; done once, at import.
    mask = os.umask(0)
    os.umask(mask)
    return mask


# `mkstemp` creates files readable by their owner only; results get the
# permissions an ordinary `open` would give them.
_FILE_MODE = 0o666 & ~_umask()


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file's (or a folder's) data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: pathlib.Path) -> None:
    try:
        fsync_path(folder)
    except OSError:
        # Some file systems (and platforms) cannot fsync a folder; the rename
        # is still atomic there, only its durability is the system's.
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a unique, empty temporary path beside `path`; commits it on a clean exit.

    For writers that want a file name (h5py, matplotlib): write the whole
    content to the yielded path and close it inside the block. On a clean exit
    the file is fsync'ed and renamed over `path` (its folder is created if
    absent, and fsync'ed after the rename); on an exception it is deleted and
    `path` is left as it was.

    Args:
      path: the file to (re)place.

    Yields:
      The temporary file's path, `.<name>.<random>.tmp` in `path`'s folder.
    """
    path = pathlib.Path(path)
    folder = path.absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    temporary = pathlib.Path(name)
    try:
        yield temporary
        os.chmod(temporary, _FILE_MODE)
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`open` for writing, atomically: see `atomic_path`.

    Args:
      path: the file to (re)place.
      mode: "w" (text) or "wb" (bytes).
      **kwargs: passed to `open` (e.g. `newline=""` for csv).

    Yields:
      The open temporary file; it is closed, fsync'ed and renamed over `path`
      when the block exits cleanly.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode={mode!r}: expected 'w' or 'wb'")
    # Closing the file (inner context) flushes Python's buffer before
    # `atomic_path` fsyncs and renames it.
    with atomic_path(path) as temporary, open(temporary, mode, **kwargs) as stream:
        yield stream


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Writes `data` to `path` atomically and durably; returns `path`."""
    with atomic_open(path, "wb") as stream:
        stream.write(data)
    return pathlib.Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes `text` (UTF-8) to `path` atomically and durably; returns `path`."""
    with atomic_open(path, "w", encoding="utf-8") as stream:
        stream.write(text)
    return pathlib.Path(path)
