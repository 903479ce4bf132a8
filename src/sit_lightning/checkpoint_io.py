"""Atomic checkpoints: a checkpoint is complete under its final name or is not there at all.

A single file is written as ``<name>.tmp`` in the checkpoint's own folder, fsynced, and renamed onto
``<name>`` (``os.replace``), after which the folder is fsynced: a crash leaves the previous checkpoint
(or none), never a torn one, and ``$TMPDIR`` never has to hold a checkpoint. Lightning's
``TorchCheckpointIO`` instead stages the file in memory and then in ``$TMPDIR`` and copies it into place,
which is not atomic across filesystems.

A sharded FSDP2 checkpoint (``ModelParallelStrategy``, a folder of DCP shards plus ``meta.pt``) is
written as ``<dir>.tmp/`` and swapped in by rank 0 after every rank has finished.

``ckpt_path="last"`` (``--ckpt_path last``) with :class:`AtomicModelCheckpoint` resumes from the newest
checkpoint of the folder that loads, and names every newer one it skips. See docs/training.md,
"Checkpoints are atomic".
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from .atomic import STAGING_SUFFIX, fsync_directory, staging_path, write_atomically

__all__ = [
    "STAGING_SUFFIX",
    "AtomicCheckpointIO",
    "AtomicModelCheckpoint",
    "AtomicModelParallelStrategy",
    "checkpoint_problem",
    "find_resumable",
    "staging_path",
    "swap_in",
]

#: Suffix of the previous sharded checkpoint while a new one is swapped in (removed right after).
_REPLACED_SUFFIX = ".old"
#: Files of a sharded checkpoint: the DCP index (written last by torch) and Lightning's non-tensor state.
_DCP_INDEX = ".metadata"
_LIGHTNING_META = "meta.pt"
#: The pickle record of a ``torch.save`` archive (``<archive name>/data.pkl``).
_PICKLE_RECORD = "data.pkl"


def _is_local(path: _PATH) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a file, a symlink or a folder tree; nothing if ``path`` does not exist."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def swap_in(staging: Path, final: Path) -> None:
    """Put the finished checkpoint ``staging`` (a file or a folder) under the name ``final``.

    A file replaces a file atomically (``os.replace``). A folder cannot replace a folder in one rename,
    so an existing ``final`` is first renamed to ``<final>.old``, the new folder renamed in, and the old
    one deleted: a crash between the two renames leaves both complete checkpoints on disk, the new one
    under ``<final>.tmp`` and the old under ``<final>.old``.
    """
    if staging.is_file() and not final.is_dir():
        os.replace(staging, final)
        fsync_directory(final.parent)
        return
    replaced = final.with_name(final.name + _REPLACED_SUFFIX)
    if final.exists() or final.is_symlink():
        _remove(replaced)
        os.replace(final, replaced)
    os.replace(staging, final)
    fsync_directory(final.parent)
    _remove(replaced)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``<path>.tmp`` beside ``path``, fsyncs it and renames it onto ``path``.

    A crash or an exception while writing leaves the previous checkpoint at ``path`` (or nothing),
    never a partial file; the temporary is deleted when the write raises. Loading and removing are
    Lightning's. Remote paths (``s3://``, ...), whose uploads are atomic already, are left to Lightning.

    Use it as ``Trainer(plugins=[AtomicCheckpointIO()])``, or let :class:`AtomicModelCheckpoint` install it.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # raises on storage_options
            return
        final = Path(path)

        # renamed by swap_in, which also replaces a sharded checkpoint folder of the same name
        def write(staging: Path) -> None:
            with open(staging, "wb") as f:
                torch.save(checkpoint, f)

        staging = write_atomically(final, write, rename=False, parents=True)
        try:
            swap_in(staging, final)
        except BaseException:  # also KeyboardInterrupt: the temporary must not outlive a failed write
            staging.unlink(missing_ok=True)
            raise


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2) whose sharded checkpoints appear under their name only when complete.

    Every rank writes its DCP shards into ``<dir>.tmp/`` (rank 0 also ``meta.pt``); after a barrier,
    rank 0 fsyncs ``meta.pt`` (torch fsyncs the shards and the DCP index) and swaps the folder in
    (:func:`swap_in`). With ``save_distributed_checkpoint=False`` the single file goes through the
    strategy's CheckpointIO, which defaults to :class:`AtomicCheckpointIO` here. Arguments are
    ``ModelParallelStrategy``'s; select it in YAML as
    ``trainer.strategy.class_path: sit_lightning.checkpoint_io.AtomicModelParallelStrategy``.
    """

    @property
    @override
    def checkpoint_io(self) -> Any:
        if self._checkpoint_io is None:  # not given through plugins or a strategy argument
            self._checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    @override
    def checkpoint_io(self, io: Any) -> None:
        self._checkpoint_io = io

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)  # raises on storage_options
            return
        final = Path(self.broadcast(filepath))  # every rank writes to rank 0's path
        staging = staging_path(final)
        if self.global_rank == 0:
            _remove(staging)  # left by a run killed while saving
        self.barrier("AtomicModelParallelStrategy.save_checkpoint:staging")
        super().save_checkpoint(checkpoint, staging)
        self.barrier("AtomicModelParallelStrategy.save_checkpoint:written")
        if self.global_rank == 0:
            _fsync_file(staging / _LIGHTNING_META)
            fsync_directory(staging)
            swap_in(staging, final)
        self.barrier("AtomicModelParallelStrategy.save_checkpoint:swapped")


def _archive_problem(path: Path) -> str | None:
    """Why the ``torch.save`` archive at ``path`` would not load, or None (reads its index, not its tensors)."""
    try:
        with zipfile.ZipFile(path) as archive:  # the index is written last: a torn file has none
            records = archive.infolist()
            pickles = [r for r in records if r.filename.rsplit("/", 1)[-1] == _PICKLE_RECORD]
            if not pickles:
                return f"no {_PICKLE_RECORD} record"
            size = path.stat().st_size
            beyond = [r.filename for r in records if r.header_offset + r.compress_size > size]
            if beyond:
                return f"record {beyond[0]} lies past the end of the file ({size} bytes)"
            archive.read(pickles[0])  # checks its CRC
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _sharded_problem(path: Path) -> str | None:
    """Why the DCP folder at ``path`` would not load, or None (checks the index and the shards' sizes)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / _DCP_INDEX).is_file():
        return f"no {_DCP_INDEX} (the shards were not all written)"
    if not (path / _LIGHTNING_META).is_file():
        return f"no {_LIGHTNING_META}"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # an unpickling error can be of any type
        return f"unreadable {_DCP_INDEX}: {type(error).__name__}: {error}"
    for item in (metadata.storage_data or {}).values():
        shard = path / item.relative_path
        if not shard.is_file() or shard.stat().st_size < item.offset + item.length:
            return f"shard {item.relative_path} is missing or short"
    return _archive_problem(path / _LIGHTNING_META)


def checkpoint_problem(path: _PATH) -> str | None:
    """None if the checkpoint at ``path`` (a file, or an FSDP2 folder) is complete, else why it would not load.

    Cheap for any size: it reads the archive's index and its pickle record, or the DCP index and the
    shard sizes, never the tensors. It finds what a crash or a full disk leaves (truncated, empty or
    zero-filled files, missing shards), not bit flips inside tensor data.
    """
    path = Path(path)
    if path.is_dir():
        return _sharded_problem(path)
    if not path.is_file():
        return "no such file"
    return _archive_problem(path)


def _is_last_name(path: Path) -> bool:
    return path.name.startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST)


def find_resumable(dirpath: _PATH, extension: str = ModelCheckpoint.FILE_EXTENSION) -> Path | None:
    """The newest checkpoint (``*<extension>``, file or FSDP2 folder) in ``dirpath`` that loads.

    Newer ones that do not load are skipped with a warning naming each. Newest means last modified,
    as for Lightning's ``ckpt_path="last"``; a ``last*`` name wins a tie.

    Returns:
        The checkpoint, or None if ``dirpath`` holds no checkpoint at all.

    Raises:
        RuntimeError: if it holds checkpoints but none loads (training from scratch over them would
            silently throw the run away).
    """
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return None
    candidates = sorted(
        (p for p in dirpath.iterdir() if p.name.endswith(extension)),
        key=lambda p: (p.stat().st_mtime_ns, _is_last_name(p)),
        reverse=True,
    )
    skipped = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        skipped.append(f"{candidate.name} ({problem})")
        rank_zero_warn(f"Skipping checkpoint {candidate}: it does not load ({problem}).")
    if skipped:
        raise RuntimeError(f"No checkpoint in {dirpath} loads: {'; '.join(skipped)}")
    return None


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files are written atomically and whose ``last`` skips checkpoints that do not load.

    At setup it installs :class:`AtomicCheckpointIO` when the strategy has Lightning's default
    ``TorchCheckpointIO`` (a CheckpointIO of another class, from ``plugins`` or the strategy, is kept).
    ``fit(ckpt_path="last")`` then resumes from the newest checkpoint of this callback's folder that
    loads (:func:`find_resumable`), not only from ``last*.ckpt``; without a ``dirpath``, the folders of
    the logger's earlier versions count too, since a new run logs to a new, empty version folder.
    Arguments are ``ModelCheckpoint``'s. FSDP2 folders are atomic only under :class:`AtomicModelParallelStrategy`, which a warning suggests.
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        in_place = isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint
        if in_place and not isinstance(strategy, AtomicModelParallelStrategy):
            rank_zero_warn(
                "ModelParallelStrategy writes its sharded checkpoints in place, so a crash while saving"
                " leaves a torn one; use sit_lightning.checkpoint_io.AtomicModelParallelStrategy."
            )

    @override
    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        # Lightning's ckpt_path="last" takes the newest of these; called before setup, on every rank.
        lasts = super()._find_last_checkpoints(trainer)
        folders = {Path(p).parent for p in lasts if _is_local(p)}
        if self.dirpath is not None and _is_local(self.dirpath):
            folders.add(Path(self.dirpath))
        elif self.dirpath is None and trainer.loggers:
            # Without a dirpath each run writes to its logger's new version folder, which is still empty
            # when "last" is resolved: look in the earlier runs' folders of the same logger too, so that
            # a preempted or requeued job rerun with --ckpt_path last resumes (docs/training.md).
            logger = trainer.loggers[0]
            root = Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir)
            root = root / str(logger.name)
            if _is_local(root) and root.is_dir():
                folders.update(p for p in root.glob("*/checkpoints") if p.is_dir())
        found = (find_resumable(folder, self.FILE_EXTENSION) for folder in sorted(folders))
        return {str(p) for p in found if p is not None} | {p for p in lasts if not _is_local(p)}
