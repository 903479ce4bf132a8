"""Files that a reader never sees half-written: write ``<name>.tmp`` beside the target, fsync it,
rename it onto the target (``os.replace``, atomic on one filesystem), then fsync the folder so the
rename itself survives a crash. Every writer of the package that must not leave a torn file uses this:
checkpoints, post-hoc EMA snapshots, converted weights, sample files.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["STAGING_SUFFIX", "fsync_directory", "staging_path", "write_atomically"]

#: Suffix of the temporary a file is written to, in the target's own folder (never ``$TMPDIR``).
STAGING_SUFFIX = ".tmp"
#: errno of a filesystem that cannot fsync a folder: the rename is then as durable as it allows.
_NO_DIRECTORY_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


def staging_path(path: str | Path) -> Path:
    """Where the file for ``path`` is written before it is renamed onto ``path``: ``<path>.tmp``."""
    path = Path(path)
    return path.with_name(path.name + STAGING_SUFFIX)


def fsync_directory(path: str | Path) -> None:
    """Make the renames inside ``path`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _NO_DIRECTORY_FSYNC:
            raise
    finally:
        os.close(fd)


def write_atomically(
    path: str | Path, write: Callable[[Path], object], *, rename: bool = True, parents: bool = False
) -> Path:
    """``write(<path>.tmp)``, fsync the temporary, rename it onto ``path`` and fsync the folder.

    Args:
        path: the file to write.
        write: writes the whole file at the path it is given (``torch.save``, ``save_file``, ...).
        rename: False keeps the finished temporary for the caller to rename later (it is returned).
        parents: create missing parent folders first.

    Returns:
        ``path``, or the temporary when ``rename`` is False.

    A failed write (also ``KeyboardInterrupt``) deletes the temporary and leaves ``path`` as it was.
    """
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    try:
        write(staging)
        with open(staging, "rb") as written:  # the rename must not reach the disk before the data
            os.fsync(written.fileno())
        if rename:
            os.replace(staging, path)
            fsync_directory(path.parent)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path if rename else staging
