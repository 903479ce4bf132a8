"""Reading checkpoints without running code from them.

A ``.ckpt`` is a pickle, and unpickling can call any function the file names (``os.system`` ...).
``torch.load(weights_only=True)`` refuses every global outside a small list (tensors, storages,
``OrderedDict``, dtypes, plain containers); this module adds exactly the classes a sit-lightning
checkpoint holds, and nothing that can execute code:

- the training objective a module built in Python keeps in its hyperparameters
  (``TrainingObjective`` with its path ``Linear`` / ``GVP`` / ``VP`` and its ``UniformTimeSampler`` /
  ``LogitNormalTimeSampler``; a CLI-written checkpoint stores them as a ``class_path`` dict instead);
- ``pathlib.PosixPath`` / ``WindowsPath`` (a data folder given as a ``Path`` in Python lands in the
  datamodule's hyperparameters).

Why these are safe: the weights-only unpickler only calls ``cls.__new__``, the class itself (with
arguments that are in turn allowed objects), and ``__setstate__`` or a plain ``__dict__`` update. Our
classes define no ``__setstate__`` / ``__reduce__``: their ``__init__`` validates numbers and names,
so a crafted file can at worst build a wrong objective, never call a function. Constructing a path
does no I/O. Everything else Lightning writes (network and EMA weights, optimizer and LR scheduler
state, ``ModelCheckpoint`` state, loops, the loss profile, hyperparameter dicts) is tensors and plain
data that ``weights_only=True`` reads as is; ``OneCycleLR`` stores its annealing as a name, not as a
function. ``functools.partial``, ``argparse.Namespace`` and modules are deliberately absent.

A user's own ``Interpolant`` or ``TimeSampler`` subclass is not on the list: allow it with
``torch.serialization.add_safe_globals([MyPath])`` (after checking it has no ``__setstate__`` /
``__reduce__`` that runs code), or load a file you trust with ``weights_only=False``.
"""

from __future__ import annotations

import contextlib
import pathlib
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from .interpolants import GVP, VP, Linear
from .models.checkpoint import UntrustedCheckpointError, refused_type
from .objective import LogitNormalTimeSampler, TrainingObjective, UniformTimeSampler

__all__ = [
    "TRUSTED_CLASSES",
    "UntrustedCheckpointError",
    "load_checkpoint",
    "refusing_untrusted",
    "trusted_globals",
]

#: The classes besides torch's defaults that sit-lightning checkpoints hold (see the module docstring).
TRUSTED_CLASSES: tuple[type, ...] = (
    TrainingObjective,
    Linear,
    GVP,
    VP,
    UniformTimeSampler,
    LogitNormalTimeSampler,
    pathlib.PosixPath,
    pathlib.WindowsPath,
)


@contextlib.contextmanager
def trusted_globals(extra: Sequence[Any] = ()) -> Iterator[None]:
    """Within the block ``torch.load(weights_only=True)`` also accepts :data:`TRUSTED_CLASSES` (and ``extra``).

    Wrap Lightning's own loading in it to resume a checkpoint written from Python without
    ``weights_only=False``: ``with trusted_globals(): trainer.fit(module, ckpt_path=path)``.
    Classes already allowed by the caller (``torch.serialization.add_safe_globals``) stay allowed
    after the block.
    """
    present = torch.serialization.get_safe_globals()
    added = [cls for cls in (*TRUSTED_CLASSES, *extra) if cls not in present]
    with torch.serialization.safe_globals(added):
        yield


def _describe(source: str | Path | IO) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return str(getattr(source, "name", type(source).__name__))


@contextlib.contextmanager
def refusing_untrusted(source: str | Path | IO) -> Iterator[None]:
    """:func:`trusted_globals`, turning torch's refusal into a one-line :class:`UntrustedCheckpointError`.

    Args:
        source: the file being read, named in the message.
    """
    try:
        with trusted_globals():
            yield
    except UntrustedCheckpointError:
        raise
    except pickle.UnpicklingError as error:
        raise UntrustedCheckpointError(
            f"refused to load {_describe(source)}: it names {refused_type(error)}, which is not among the "
            "types a sit-lightning checkpoint holds (tensors, plain data, sit_lightning.trusted_loading."
            "TRUSTED_CLASSES) and could run code when unpickled; nothing was run. Only if you trust the "
            "file: load it with weights_only=False"
        ) from None


def load_checkpoint(
    path: str | Path | IO, map_location: Any = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` that also accepts the classes our checkpoints hold.

    Args:
        path: a ``.ckpt`` written by Lightning (``ModelCheckpoint``, ``trainer.save_checkpoint``), a
            path or an open binary file.
        map_location: as for ``torch.load``.
        mmap: memory-map the tensors instead of reading them (file paths only).

    Returns:
        The checkpoint dict.

    Raises:
        UntrustedCheckpointError: the file names a type outside the allow-list (a code payload, or a
            class of your own: see the module docstring). Nothing from the file was run.
    """
    with refusing_untrusted(path):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
