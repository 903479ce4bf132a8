"""Exponential moving average of the weights (the EMA the paper samples and evaluates with).

After every optimizer step (or every ``update_every`` steps) the callback applies

    ema <- decay_t * ema + (1 - decay_t) * theta          (one fused ``torch._foreach_lerp_``)

over all parameters of the LightningModule, frozen ones included (``pos_embed`` is fixed, so its
average is a no-op, as in the released ``update_ema``). Buffers are not averaged: the EMA model
uses the live buffers (SiT has none). As in the released code the EMA starts as a copy of the
initial weights.

``decay_t`` is ``decay`` (0.9999 in the paper, no warm-up). With ``warmup=True`` it is
``min(decay, (1 + n) / (10 + n))`` with ``n`` the number of optimizer steps taken, which lets a
short run's EMA follow the weights early on (n = 1: 0.18, n = 100: 0.92, n = 1000: 0.991).

Distributed: under DDP every rank holds the full EMA (identical on all ranks). Under FSDP2
(``fully_shard``; parameters are DTensors) each rank holds the EMA of its own local shards only, so
the EMA costs no more memory per rank than the sharded weights.

Checkpoints: a single file (single device, DDP, FSDP2 with ``save_distributed_checkpoint=False``)
holds the **full** EMA tensors keyed by parameter name in the callback's state (gathered on save,
re-sliced to the local shard on load), so it moves freely between single-device, DDP and FSDP2 runs
of any world size. A sharded FSDP2 checkpoint (a DCP folder) holds the EMA **sharded**, beside the
weights: DTensors under ``checkpoint["state_dict"]["_ema." + name]`` (:data:`SHARDED_EMA_PREFIX`),
which Lightning hands to ``torch.distributed.checkpoint`` with the weights; the callback's state then
says ``"ema": None, "ema_prefix": "_ema."``. No rank gathers the full EMA to save it, and a resume at
any world size reads only the slices of its own shards (DCP reshards). ``sit-lightning convert``
reads such a folder, and :func:`sit_lightning.convert_cli.consolidate_checkpoint` turns it into one
file in the single-file layout (what ``sample`` and ``convert`` read). See docs/training.md,
"Sharded EMA".

Use the EMA weights with ``with ema.swap(module): ...`` or ``with module.ema_weights(): ...`` (which
looks the callback up among ``module.trainer.callbacks``; ``EMACallback.find(trainer)`` returns it);
validation runs on the EMA weights by default (``validate_with_ema``). The callback writes nothing
into the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = ["EMACallback", "PAPER_EMA_DECAY", "SHARDED_EMA_PREFIX", "SHARDED_EMA_FIELD"]

#: EMA decay of the paper and the released code.
PAPER_EMA_DECAY = 0.9999
#: Warm-up schedule constants: decay_t = min(decay, (WARMUP_A + n) / (WARMUP_B + n)).
WARMUP_A = 1.0
WARMUP_B = 10.0
#: Key prefix of the EMA tensors in the ``state_dict`` of a sharded (DCP folder) checkpoint; mirrored by
#: ``convert_cli`` (which may not import callbacks), a test holds them equal.
SHARDED_EMA_PREFIX = "_ema."
#: Field of the callback's state naming that prefix (present only in a sharded checkpoint's state).
SHARDED_EMA_FIELD = "ema_prefix"
#: Where ``torch.distributed.checkpoint`` files Lightning's ``checkpoint["state_dict"]`` (keys flattened with ".").
_DCP_STATE_DICT = "state_dict"


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor parameter (same storage), or the tensor itself."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        # without grad, to_local() is the local shard itself (a view of it), not an autograd node
        with torch.no_grad():
            return t.to_local()
    return t


class EMACallback(Callback):
    """Keeps an exponential moving average of the module's parameters.

    Args:
        decay: EMA decay per update, in [0, 1) (0.9999 in the paper).
        warmup: use ``decay_t = min(decay, (1 + n) / (10 + n))`` (n = optimizer steps so far) for
            short runs; the paper uses no warm-up.
        update_every: update after every k-th optimizer step (the decay is per update).
        start_step: before this optimizer step the EMA is a plain copy of the weights.
        validate_with_ema: run validation (and so the loss profile), test and predict on the EMA weights.
    """

    def __init__(
        self,
        decay: float = PAPER_EMA_DECAY,
        warmup: bool = False,
        update_every: int = 1,
        start_step: int = 0,
        validate_with_ema: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1; got {update_every}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0; got {start_step}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.update_every = int(update_every)
        self.start_step = int(start_step)
        self.validate_with_ema = bool(validate_with_ema)
        self.num_updates = 0
        self._names: list[str] | None = None
        self._ema: list[Tensor] | None = None
        self._pending: dict[str, Tensor] | None = None
        self._last_step: int | None = None
        self._validation_swap: contextlib.ExitStack | None = None
        self._module_ref: pl.LightningModule | None = None  # set in setup(); state_dict() needs the params
        self._restoring: tuple[Path | None, pl.LightningModule] | None = None  # set by on_load_checkpoint

    # ---- state -------------------------------------------------------------------------------
    @staticmethod
    def _named_params(pl_module: pl.LightningModule) -> list[tuple[str, Tensor]]:
        return list(pl_module.named_parameters())

    def _ensure(self, pl_module: pl.LightningModule) -> None:
        """Create the EMA from a restored checkpoint or, failing that, from the current weights."""
        if self._ema is not None:
            return
        named = self._named_params(pl_module)
        self._names = [name for name, _ in named]
        if self._pending is None:
            self._ema = [_local(p).detach().float().clone() for _, p in named]
            return
        _check_names(self._names, self._pending, "EMA state")
        self._ema = [_local_slice(self._pending[name], p).float().clone() for name, p in named]
        self._pending = None

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimizer step ``step`` (1-based count of steps)."""
        if self.warmup:
            return min(self.decay, (WARMUP_A + step) / (WARMUP_B + step))
        return self.decay

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule, step: int) -> None:
        """One EMA update from the current weights (``step``: optimizer steps taken so far).

        A step the module skipped as non-finite (``pl_module.last_step_finite``, see
        ``SiTModule.last_step_finite``) leaves the EMA unchanged: False (decided on the host) returns
        at once; a 0-d bool tensor (decided on the device) multiplies the lerp weight, so a skipped
        step lerps with weight 0, bit for bit the old EMA, without a host sync.
        """
        self._ensure(pl_module)
        assert self._ema is not None
        finite = getattr(pl_module, "last_step_finite", None)
        if finite is False:
            return
        params = [_local(p).detach() for _, p in self._named_params(pl_module)]
        params = [p if p.dtype == torch.float32 else p.float() for p in params]
        if step < self.start_step:  # a skipped step left the weights, so also this copy, unchanged
            torch._foreach_copy_(self._ema, params)
            return
        if (step - self.start_step) % self.update_every != 0:
            return
        weight = 1.0 - self.decay_at(step)
        if isinstance(finite, Tensor):
            # a 0-d tensor weight would be read back as a Python scalar (a sync): pass one per tensor
            masked = finite.to(torch.float32) * weight
            weights = [masked.to(e.device) for e in self._ema]  # the same tensor when on its device
            torch._foreach_lerp_(self._ema, params, weights)
        else:
            torch._foreach_lerp_(self._ema, params, weight)
        self.num_updates += 1

    def ema_tensors(self) -> dict[str, Tensor]:
        """Parameter name -> EMA tensor (local shard under FSDP2), float32."""
        if self._ema is None or self._names is None:
            raise RuntimeError("the EMA is not initialised yet (no training or validation has started)")
        return dict(zip(self._names, self._ema, strict=True))

    # ---- lookup and swap -----------------------------------------------------------------------
    @classmethod
    def find(cls, trainer: pl.Trainer | None) -> EMACallback | None:
        """The trainer's ``EMACallback``, or None when it has none.

        Raises:
            ValueError: when the trainer has several (which average to sample with is ambiguous).
        """
        found = [cb for cb in (trainer.callbacks if trainer is not None else []) if isinstance(cb, cls)]
        if len(found) > 1:
            raise ValueError(f"the trainer has {len(found)} EMACallbacks; keep one (or pass ema= explicitly)")
        return found[0] if found else None

    @contextlib.contextmanager
    def swap(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Within the block the module's parameters hold the EMA weights; restored exactly on exit."""
        self._ensure(pl_module)
        assert self._ema is not None
        params = [_local(p).detach() for _, p in self._named_params(pl_module)]
        with torch.no_grad():
            backup = [p.clone() for p in params]
            torch._foreach_copy_(params, [e.to(p.dtype) for e, p in zip(self._ema, params, strict=True)])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)

    # ---- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module_ref = pl_module

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure(pl_module)
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        self.update(pl_module, step)

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.validate_with_ema and self._validation_swap is None:
            self._validation_swap = contextlib.ExitStack()
            self._validation_swap.enter_context(self.swap(pl_module))

    def _swap_out(self) -> None:
        if self._validation_swap is not None:
            self._validation_swap.close()
            self._validation_swap = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The EMA keyed by parameter name, plus the update count.

        Single device / DDP: full tensors, copied to the CPU. FSDP2: a mapping over the live shards whose
        values are the full tensors, gathered when read (a collective: read it on every rank, in the same
        order; ``dict(state["ema"])`` snapshots it). Lightning's checkpointing never reads it:
        :meth:`on_save_checkpoint` either puts the shards into a sharded checkpoint's ``state_dict`` or,
        for a single file, gathers it there (on every rank, as Lightning calls it).
        """
        ema: Mapping[str, Tensor] | None
        if self._ema is None:
            ema = self._pending
        else:
            assert self._names is not None and self._module_ref is not None
            params = dict(self._named_params(self._module_ref))
            dtensor = _dtensor_type()
            if dtensor is not None and any(isinstance(p, dtensor) for p in params.values()):
                ema = _ShardedEMA(dict(zip(self._names, self._ema, strict=True)), params)
            else:
                ema = {name: e.detach().clone().cpu() for name, e in zip(self._names, self._ema, strict=True)}
        return {"decay": self.decay, "num_updates": self.num_updates, "ema": ema}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if not isinstance(state, dict) or not isinstance(state.get("ema"), _ShardedEMA):
            return
        sharded: _ShardedEMA = state["ema"]
        if _saves_sharded(trainer):
            # DCP writes each rank's shards (``checkpoint["state_dict"]`` is its part); meta.pt gets no tensor
            checkpoint["state_dict"].update(
                {SHARDED_EMA_PREFIX + name: t for name, t in sharded.dtensors().items()}
            )
            state["ema"] = None
            state[SHARDED_EMA_FIELD] = SHARDED_EMA_PREFIX
        else:
            state["ema"] = dict(sharded)  # one file: gathered on every rank, rank 0's is written

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning calls this just before load_state_dict, which needs the folder of a sharded state
        self._restoring = (Path(trainer.ckpt_path) if trainer.ckpt_path else None, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        prefix = state_dict.get(SHARDED_EMA_FIELD)
        restoring, self._restoring = self._restoring, None
        if prefix is None:
            self._pending = state_dict.get("ema")
            self._ema = None
            return
        folder, pl_module = _sharded_source(
            restoring,
            lambda folder: (
                f"this EMA state is sharded (its tensors are the checkpoint's '{prefix}*' state_dict entries "
                f"of a DCP folder), but it is restored from {folder}; resume from the checkpoint folder "
                "with an FSDP2 strategy, or write one file with sit_lightning.convert_cli.consolidate_checkpoint"
            ),
        )
        self._read_sharded(folder, prefix, pl_module)

    def _read_sharded(self, folder: Path, prefix: str, pl_module: pl.LightningModule) -> None:
        """Read the EMA from the DCP folder into tensors laid out as the parameters (collective).

        Each rank asks DCP for its own shards only, so a folder written at another world size is
        resharded on the way in and no rank holds the full EMA.
        """
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        named = self._named_params(pl_module)
        stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        targets = _sharded_targets(stored, prefix, named, folder, what="EMA state", tensors="EMA tensors")
        dcp_load({_DCP_STATE_DICT: targets}, checkpoint_id=str(folder))
        self._names = [name for name, _ in named]
        self._ema = [_local(targets[prefix + name]) for name in self._names]
        self._pending = None


def _check_names(names: Iterable[str], stored: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` unless the stored tensors' names are the parameters' ``names``."""
    missing = sorted(set(names) - set(stored))
    unexpected = sorted(set(stored) - set(names))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )


def _sharded_source(
    restoring: tuple[Path | None, pl.LightningModule] | None, message: Callable[[Path | None], str]
) -> tuple[Path, pl.LightningModule]:
    """The DCP folder and the module a sharded state is read into, as ``on_load_checkpoint`` noted them.

    Raises ``ValueError(message(folder))`` when the state is restored from anything but a folder (a single
    file, or ``load_state_dict`` called directly).
    """
    folder, pl_module = restoring if restoring is not None else (None, None)
    if folder is None or pl_module is None or not folder.is_dir():
        raise ValueError(message(folder))
    return folder, pl_module


def _sharded_targets(
    stored: Mapping[str, Any],
    prefix: str,
    named: list[tuple[str, Tensor]],
    folder: Path,
    what: str,
    tensors: str,
) -> dict[str, Tensor]:
    """Empty tensors laid out like the parameters, keyed ``prefix + name``, for DCP to read the shards into.

    ``stored`` is the metadata of the DCP ``folder``, whose entries ``state_dict.<prefix><name>`` must be
    the parameters' names (else ``ValueError``; ``what`` names the state) with their shapes (else
    ``ValueError``; ``tensors`` names them).
    """
    head = f"{_DCP_STATE_DICT}.{prefix}"
    found = {key.removeprefix(head): meta for key, meta in stored.items() if key.startswith(head)}
    _check_names([name for name, _ in named], found, f"{what} in {folder}")
    wrong = [n for n, p in named if tuple(getattr(found[n], "size", ())) != tuple(p.shape)]
    if wrong:
        raise ValueError(f"{tensors} in {folder} do not fit the parameters' shapes: {wrong[:5]}")
    return {prefix + name: _empty_like_param(p) for name, p in named}


def _saves_sharded(trainer: pl.Trainer) -> bool:
    """Whether the trainer writes DCP folders (FSDP2 with ``save_distributed_checkpoint=True``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = trainer.strategy
    return isinstance(strategy, ModelParallelStrategy) and bool(strategy._save_distributed_checkpoint)


class _ShardedEMA(Mapping[str, Tensor]):
    """Parameter name -> full EMA tensor on the CPU, gathered from the live shards when read (collective).

    A view: it reads the EMA as it is when read. It cannot be pickled (``torch.save`` on one rank would
    have to gather alone); ``dict(...)`` it on every rank first.
    """

    def __init__(self, shards: dict[str, Tensor], params: dict[str, Tensor]) -> None:
        self._shards = shards
        self._params = params

    def __getitem__(self, name: str) -> Tensor:
        # copy=True: on a 1-rank mesh full_tensor() is the live shard itself, which later updates would change
        return _full_tensor(self._shards[name], self._params[name]).to("cpu", copy=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shards)

    def __len__(self) -> int:
        return len(self._shards)

    def dtensors(self) -> dict[str, Tensor]:
        """Name -> the EMA shard wrapped as a DTensor laid out like its parameter (no copy, no communication)."""
        return {name: _as_dtensor(e, self._params[name]) for name, e in self._shards.items()}

    def __reduce__(self) -> Any:
        raise TypeError(
            "a sharded EMA state gathers its tensors when read; snapshot it with dict(state['ema']) on every "
            "rank before saving it"
        )


def _as_dtensor(local: Tensor, param: Tensor) -> Tensor:
    """The EMA shard ``local`` as a DTensor with ``param``'s mesh, placements, shape and stride."""
    dtensor = _dtensor_type()
    assert dtensor is not None and isinstance(param, dtensor)
    return dtensor.from_local(
        local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


def _empty_like_param(param: Tensor) -> Tensor:
    """An uninitialised float32 tensor laid out like ``param`` (a DTensor of local shards, or a plain tensor)."""
    dtensor = _dtensor_type()
    local = _local(param)
    empty = torch.empty(local.shape, dtype=torch.float32, device=local.device)
    if dtensor is not None and isinstance(param, dtensor):
        return _as_dtensor(empty, param)
    return empty


def _full_tensor(local: Tensor, param: Tensor) -> Tensor:
    """Gather the full tensor of an EMA shard laid out like the DTensor ``param`` (collective)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        return _as_dtensor(local, param).full_tensor()
    return local.detach().clone()


def _local_slice(full: Tensor, param: Tensor) -> Tensor:
    """This rank's part of a full tensor, laid out like the (possibly DTensor) ``param``."""
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(
            f"EMA tensor of shape {tuple(full.shape)} does not fit a parameter of {tuple(param.shape)}"
        )
    dtensor = _dtensor_type()
    local = _local(param)
    if dtensor is not None and isinstance(param, dtensor):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds the full tensor and cuts its own piece (torch.chunk
        # semantics, as FSDP2 shards), with no communication
        piece = distribute_tensor(full.detach(), param.device_mesh, param.placements, src_data_rank=None)
        return piece.to_local().to(local.device)
    return full.to(local.device)
