"""The global sample stream: per-epoch shuffling, global batches, rank and worker sharding, exact resume.

Training sees one stream of global batches. Global step ``s`` (counted over the whole run) lies in epoch
``e = s // steps_per_epoch``; its samples are the positions ``[k*G, (k+1)*G)`` (``k = s % steps_per_epoch``,
``G`` the global batch size) of the epoch's permutation, drawn from a generator keyed by ``(seed, epoch)``.
Each sample of the stream has a **key**, its position in the run's sample stream::

    key = epoch * samples_per_epoch + position_in_epoch_permutation

Rank ``r`` of ``world_size`` takes positions ``[r*b, (r+1)*b)`` of each global batch (``b = G / world_size``),
and data-loader worker ``w`` of ``W`` produces every ``W``-th per-rank batch, which PyTorch's loader returns
in order. So the samples of global step ``s`` -- and every random draw keyed by a sample's key (flip,
posterior sample, and in the module: time, noise, label dropout) -- do not depend on the number of GPUs or
workers. The remainder of an epoch that does not fill a whole global batch is dropped.

Resume is exact: :class:`StreamPosition` counts the global batches the training loop has *consumed*
(observed through the datamodule's ``on_before_batch_transfer`` hook, so Lightning's one-batch prefetch
does not count), it is saved in the checkpoint (datamodule ``state_dict`` and the train loader's
``state_dict``), and every new pass over the train loader starts at the first unconsumed global batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sit_lightning.errors import ConfigurationError, require_writable_folder
from sit_lightning.randomness import keyed_generator

# Our streams yield whole per-rank batches and split them across workers themselves, so their
# __len__ is exact; Lightning's generic warning about IterableDataset lengths does not apply.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", module="lightning")

__all__ = [
    "BatchRef",
    "GlobalBatchSampler",
    "SampleSource",
    "GlobalBatchStream",
    "StreamPosition",
    "ResumableLoader",
    "SampleStreamDataModule",
    "per_device_batch_size",
]

SHUFFLE_STREAM = "data.shuffle"
# version of the position state saved in checkpoints; bump when its meaning changes
_POSITION_STATE_VERSION = 1


def per_device_batch_size(global_batch_size: int, world_size: int) -> int:
    """``global_batch_size / world_size``, with a clear error when it does not divide."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_batch_size % world_size != 0:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by world_size={world_size} "
            f"(devices x nodes); choose a global batch size that is a multiple of {world_size}"
        )
    return global_batch_size // world_size


class BatchRef(NamedTuple):
    """One per-rank batch of the stream: its global step, the samples' keys and dataset indices."""

    step: int  # global step of the run (counts over epochs)
    keys: np.ndarray  # (b,) int64: position in the run's sample stream
    indices: np.ndarray  # (b,) int64: index into the data set


class GlobalBatchSampler:
    """Maps global steps to the keys and dataset indices of one rank's share of the global batch.

    Args:
        num_samples: size of the data set.
        global_batch_size: samples per optimizer micro-step over all ranks (``G``).
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of processes (devices x nodes).
        seed: base seed of the per-epoch permutation.
        shuffle: permute each epoch (training); ``False`` keeps the data set order (validation).
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.batch_size = per_device_batch_size(global_batch_size, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
        if num_samples < global_batch_size:
            raise ValueError(
                f"the data set has {num_samples} samples, fewer than one global batch of {global_batch_size}: "
                "lower global_batch_size or add data"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_samples // global_batch_size
        self.samples_per_epoch = self.steps_per_epoch * global_batch_size
        self._cached_epoch: int | None = None
        self._cached_permutation: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """``(num_samples,)`` int64: the order of the data set in ``epoch`` (keyed by ``(seed, epoch)``)."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        if self._cached_epoch != epoch:
            g = keyed_generator(self.seed, SHUFFLE_STREAM, epoch)
            self._cached_permutation = torch.randperm(self.num_samples, generator=g).numpy()
            self._cached_epoch = epoch
        assert self._cached_permutation is not None
        return self._cached_permutation

    def keys(self, step: int) -> np.ndarray:
        """``(b,)`` int64 keys of this rank's share of global step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        first = epoch * self.samples_per_epoch + k * self.global_batch_size + self.rank * self.batch_size
        return np.arange(first, first + self.batch_size, dtype=np.int64)

    def indices(self, keys: np.ndarray) -> np.ndarray:
        """Dataset indices of ``keys`` (all from one epoch, as the keys of one batch are)."""
        epochs, positions = np.divmod(keys, self.samples_per_epoch)
        if np.any(epochs != epochs[0]):
            raise ValueError("keys of one batch must belong to one epoch")
        return self.permutation(int(epochs[0]))[positions]

    def batch(self, step: int) -> BatchRef:
        """This rank's share of global step ``step``."""
        keys = self.keys(step)
        return BatchRef(step=step, keys=keys, indices=self.indices(keys))

    def step_of_key(self, key: int) -> int:
        """The global step whose global batch contains the sample with ``key``."""
        epoch, position = divmod(int(key), self.samples_per_epoch)
        return epoch * self.steps_per_epoch + position // self.global_batch_size

    def epoch_end(self, step: int) -> int:
        """The first global step of the epoch after the one holding ``step``."""
        return (step // self.steps_per_epoch + 1) * self.steps_per_epoch


class SampleSource(Protocol):
    """What a data set offers the stream: its size and a batched, keyed loader."""

    def __len__(self) -> int: ...

    def load(self, indices: np.ndarray, keys: np.ndarray) -> dict[str, Tensor]:
        """``{"x": (b, C, H, W) float32, "y": (b,) int64}`` for dataset ``indices``; draws keyed by ``keys``."""
        ...


class GlobalBatchStream(IterableDataset):
    """Yields whole per-rank batches ``{"x", "y", "key"}`` for global steps ``[start, stop)``.

    Worker ``w`` of ``W`` produces the steps ``start + w, start + w + W, ...``; PyTorch's loader
    asks the workers in turn, so the batches come out in step order.
    """

    def __init__(self, source: SampleSource, sampler: GlobalBatchSampler, start: int, stop: int) -> None:
        super().__init__()
        self.source = source
        self.sampler = sampler
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        # what Lightning counts as the epoch length: its loop resumes its own batch count mid-epoch, so
        # this stays the full epoch even when the stream starts mid-epoch
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.start + worker, self.stop, num_workers):
            ref = self.sampler.batch(step)
            batch = self.source.load(ref.indices, ref.keys)
            batch["key"] = torch.from_numpy(ref.keys.copy())
            yield batch


class StreamPosition:
    """The first global step the training loop has not consumed yet (saved in checkpoints).

    The state also records the stream's data-set size and global batch size. A checkpoint from a stream
    with other values (another batch size or data set) cannot continue mid-epoch: the position moves to
    the start of the next epoch, with a warning. A different world size or worker count needs nothing:
    the stream does not depend on them.
    """

    def __init__(self) -> None:
        self.next_step = 0
        self._stream: tuple[int, int] | None = None  # (num_samples, global_batch_size) of the bound sampler
        self._pending: dict[str, Any] | None = None  # loaded before the sampler was known
        self._warned: tuple[Any, Any] | None = None

    def bind(self, sampler: GlobalBatchSampler) -> None:
        """Attach the stream this position counts in (resolves a state loaded before)."""
        self._stream = (sampler.num_samples, sampler.global_batch_size)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def observe(self, keys: Tensor, sampler: GlobalBatchSampler) -> None:
        """Record that the training loop took the batch with ``keys`` (any rank's share)."""
        if keys.numel():
            self.next_step = sampler.step_of_key(int(keys.reshape(-1)[-1])) + 1

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:  # saved again before any loader was built: keep it as loaded
            return dict(self._pending)
        num_samples, global_batch_size = self._stream or (None, None)
        return {
            "version": _POSITION_STATE_VERSION,
            "next_step": self.next_step,
            "num_samples": num_samples,
            "global_batch_size": global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _POSITION_STATE_VERSION:
            raise ValueError(
                f"data stream state version {state.get('version')!r} is not the supported "
                f"{_POSITION_STATE_VERSION}; the checkpoint comes from another sit-lightning data layer"
            )
        if self._stream is None:
            self._pending = dict(state)
            return
        saved = (state.get("num_samples"), state.get("global_batch_size"))
        next_step = int(state["next_step"])
        if saved == self._stream or saved == (None, None):
            self.next_step = next_step
            return
        old_steps_per_epoch = saved[0] // saved[1]
        epoch, within = divmod(next_step, old_steps_per_epoch)
        new_epoch = epoch + (1 if within else 0)
        self.next_step = new_epoch * (self._stream[0] // self._stream[1])
        if self._warned == (saved, self._stream):
            return  # the datamodule and the train loader both load the same state on resume: warn once
        self._warned = (saved, self._stream)
        rank_zero_warn(
            f"the checkpoint's data stream had {saved[0]} samples in global batches of {saved[1]}, this run "
            f"has {self._stream[0]} in batches of {self._stream[1]}: the sample stream cannot continue "
            f"exactly, so training resumes at the start of epoch {new_epoch}"
        )


class ResumableLoader(DataLoader):
    """The training ``DataLoader``: each pass runs from the first unconsumed global step to its epoch's end.

    Lightning treats a loader with ``state_dict``/``load_state_dict`` as resumable, saves its state in the
    fit loop's checkpoint entry and loads it before iterating again.
    """

    def __init__(
        self, stream: GlobalBatchStream, position: StreamPosition, *, num_workers: int, pin_memory: bool
    ) -> None:
        # batch_size=None: the stream yields whole per-rank batches; persistent workers would keep a copy
        # of the stream with a stale start step
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False
        )
        self.position = position
        position.bind(stream.sampler)

    def __iter__(self) -> Iterator[Any]:
        stream: GlobalBatchStream = self.dataset  # type: ignore[assignment]
        stream.start = self.position.next_step
        stream.stop = stream.sampler.epoch_end(stream.start)
        return self._pass(super().__iter__(), stream.stop)

    def _pass(self, batches: Iterator[Any], stop: int) -> Iterator[Any]:
        yield from batches
        # a finished pass moves on to the next epoch even where no datamodule hook counts the batches
        # (a loader used outside its datamodule); with the hook this sets the value it already holds
        self.position.next_step = max(self.position.next_step, stop)

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.bind(self.dataset.sampler)  # type: ignore[attr-defined]
        self.position.load_state_dict(state)


class SampleStreamDataModule(pl.LightningDataModule):
    """Shared machinery of the datamodules: train/val streams, rank sharding, exact mid-epoch resume.

    Subclasses implement :meth:`train_source` and :meth:`val_source` (called after ``setup``).
    Do not override ``on_before_batch_transfer`` in the LightningModule: Lightning then calls only the
    datamodule's, which records the consumed position here.
    """

    def __init__(
        self,
        global_batch_size: int,
        num_workers: int,
        seed: int,
        pin_memory: bool,
        val_global_batch_size: int | None,
    ) -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        per_device_batch_size(global_batch_size, 1)
        self.global_batch_size = global_batch_size
        self.val_global_batch_size = val_global_batch_size or global_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self._position = StreamPosition()
        self._train_sampler: GlobalBatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        """Before a fit: fail on one that would train nothing or could not save (:func:`check_fit`)."""
        if stage == "fit" and self.trainer is not None:
            check_fit(self.trainer)

    # ----------------------------------------------------------------- to implement
    def train_source(self) -> SampleSource:
        raise NotImplementedError(f"{type(self).__name__} must implement train_source() -> SampleSource")

    def val_source(self) -> SampleSource | None:
        raise NotImplementedError(
            f"{type(self).__name__} must implement val_source() -> SampleSource | None (None: no validation)"
        )

    # ----------------------------------------------------------------- ranks
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    @property
    def per_device_batch_size(self) -> int:
        """``global_batch_size / world_size`` for the attached trainer (1 process without one)."""
        return per_device_batch_size(self.global_batch_size, self._rank_world()[1])

    def train_sampler(self) -> GlobalBatchSampler:
        """The global-batch sampler of this rank's training stream."""
        rank, world = self._rank_world()
        return GlobalBatchSampler(
            len(self.train_source()), self.global_batch_size, rank=rank, world_size=world, seed=self.seed
        )

    # ----------------------------------------------------------------- loaders
    def train_dataloader(self) -> ResumableLoader:
        sampler = self.train_sampler()
        self._train_sampler = sampler
        self._position.bind(sampler)
        start = self._position.next_step
        stream = GlobalBatchStream(self.train_source(), sampler, start, sampler.epoch_end(start))
        return ResumableLoader(
            stream, self._position, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def val_dataloader(self) -> DataLoader | list:
        source = self.val_source()
        if source is None:
            return []
        rank, world = self._rank_world()
        batch = self.val_global_batch_size
        if len(source) < batch:
            # a validation split smaller than one batch: evaluate one whole batch of what divides by the ranks
            batch = (len(source) // world) * world
            if batch == 0:
                raise ValueError(
                    f"the validation split has {len(source)} samples, fewer than the {world} ranks"
                )
        sampler = GlobalBatchSampler(
            len(source), batch, rank=rank, world_size=world, seed=self.seed, shuffle=False
        )
        stream = GlobalBatchStream(source, sampler, 0, sampler.steps_per_epoch)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)

    # ----------------------------------------------------------------- resume
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_sampler is not None:
            self._position.observe(batch["key"], self._train_sampler)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._position.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position.load_state_dict(state_dict)

    @property
    def consumed_steps(self) -> int:
        """Global batches the training loop has taken so far (the resume point)."""
        return self._position.next_step


#: Copies of the parameters in a checkpoint: weights, EMA weights and AdamW's two moments.
CHECKPOINT_PARAMETER_COPIES = 4


def check_fit(trainer: Any) -> None:
    """Fail before the first step on a fit that would train nothing or could not save its results."""
    if trainer.max_steps == 0:
        raise ConfigurationError(
            "trainer.max_steps is 0: the fit would train nothing; set trainer.max_steps >= 1, "
            "or -1 to train for trainer.max_epochs"
        )
    checkpoints = list(trainer.checkpoint_callbacks)
    folders: dict[str, str] = {}
    for callback in checkpoints:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath is not None and "://" not in str(dirpath):  # remote storage is not checked
            folders.setdefault(str(dirpath), f"{type(callback).__name__} dirpath")
    writes_root = trainer.loggers or any(getattr(c, "dirpath", None) is None for c in checkpoints)
    if writes_root and "://" not in str(trainer.default_root_dir):
        folders.setdefault(str(trainer.default_root_dir), "trainer.default_root_dir")
    module = trainer.lightning_module
    parameter_bytes = sum(p.numel() * p.element_size() for p in module.parameters()) if module else 0
    needed = CHECKPOINT_PARAMETER_COPIES * parameter_bytes if checkpoints else 0
    for folder, setting in folders.items():
        require_writable_folder(folder, setting=setting, min_free_bytes=needed)
