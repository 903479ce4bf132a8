"""Errors a user fixes by changing a run's inputs, and the output-folder check that raises one early.

The ``sit-lightning`` command prints a :class:`ConfigurationError` as one line
(``sit-lightning: error: ...``) and exits with status 2 instead of showing a traceback; the message
names the bad value and what was expected. Every layer may import this module: it imports nothing of
ours and no Lightning.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "ConfigurationError",
    "DataError",
    "DataNotFoundError",
    "OutputFolderError",
    "ShapeMismatchError",
    "exit_in_one_line",
    "one_line_message",
    "require_writable_folder",
    "subcommand_argv",
]

_WORKER_TRACEBACK = "\nOriginal Traceback"  # how torch's DataLoader re-raises a worker's exception
_MIB = 2**20


class ConfigurationError(ValueError):
    """Parts of a run's configuration do not fit together (the CLI prints it as one line)."""


class ShapeMismatchError(ConfigurationError):
    """The data do not fit the network (latent shape or number of classes)."""


class DataError(ConfigurationError):
    """Data that cannot be trained on: a broken shard folder, labels out of range, non-finite latents."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The data folder, its index or a listed file is missing (the message says how to create it)."""


class OutputFolderError(ConfigurationError):
    """An output folder (``trainer.default_root_dir``, a checkpoint ``dirpath``) is unwritable or full."""


def one_line_message(err: BaseException) -> str:
    """The message of ``err`` on one line.

    An exception raised in a DataLoader worker reaches the main process with the worker's whole traceback
    as its message; its last line holds the original message (``module.Class: message``).
    """
    text = str(err)
    if _WORKER_TRACEBACK in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, sep, message = last.partition(": ")
        if sep and name.rsplit(".", 1)[-1] == type(err).__name__:
            text = message
    return " ".join(text.split())


def require_writable_folder(path: str | os.PathLike, *, setting: str, min_free_bytes: int = 0) -> None:
    """Raise :class:`OutputFolderError` unless ``path`` can be created and written, with space to spare.

    Nothing is created: the check writes (and deletes) a one-byte probe in the nearest existing folder.

    Args:
        path: the folder a run will write to (it may not exist yet).
        setting: the setting that names it, for the message (e.g. ``"trainer.default_root_dir"``).
        min_free_bytes: the free space the run needs there (e.g. the size of one checkpoint).
    """
    folder = Path(path).expanduser()
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(
            f"{setting} {str(path)!r} cannot be created: {existing} is a file, not a folder; "
            "choose another folder"
        )
    try:
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(b"\0")
            probe.flush()
    except OSError as err:
        raise OutputFolderError(
            f"{setting} {str(path)!r} is not writable ({existing}: {err.strerror}); choose a writable folder"
        ) from None
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        raise OutputFolderError(
            f"{setting} {str(path)!r} has {free / _MIB:.1f} MiB free at {existing}, a checkpoint needs about "
            f"{min_free_bytes / _MIB:.1f} MiB; free some space or choose another folder"
        )


def subcommand_argv(subcommand: str, argv: list[str] | None) -> list[str]:
    """The arguments of a standalone ``sit-lightning <subcommand>``: ``argv`` as given, else ``sys.argv``
    without the program and the subcommand's name (``sit-lightning sample a.ckpt ...`` -> ``[a.ckpt, ...]``)."""
    if argv is not None:
        return argv
    argv = sys.argv[1:]
    return argv[1:] if argv[:1] == [subcommand] else argv


@contextlib.contextmanager
def exit_in_one_line(subcommand: str, *errors: type[BaseException]) -> Iterator[None]:
    """Turn ``errors`` raised inside into ``sit-lightning <subcommand>: error: <one line>`` on stderr and
    exit status 2, as the ``fit`` command does with a :class:`ConfigurationError`: the user's input was bad,
    and a traceback would hide the message."""
    try:
        yield
    except errors as err:
        print(f"sit-lightning {subcommand}: error: {one_line_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None
