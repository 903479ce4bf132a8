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
the EMA costs no more memory per rank than the sharded weights. Checkpoints always hold the **full**
EMA tensors keyed by parameter name (gathered on save, re-sliced to the local shard on load), so a
checkpoint moves freely between single-device, DDP and FSDP2 runs of any world size.

Use the EMA weights with ``with ema.swap(module): ...`` or ``with module.ema_weights(): ...`` (which
looks the callback up among ``module.trainer.callbacks``; ``EMACallback.find(trainer)`` returns it);
validation runs on the EMA weights by default (``validate_with_ema``). The callback writes nothing
into the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = ["EMACallback", "PAPER_EMA_DECAY"]

#: EMA decay of the paper and the released code.
PAPER_EMA_DECAY = 0.9999
#: Warm-up schedule constants: decay_t = min(decay, (WARMUP_A + n) / (WARMUP_B + n)).
WARMUP_A = 1.0
WARMUP_B = 10.0


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
        missing = sorted(set(self._names) - set(self._pending))
        unexpected = sorted(set(self._pending) - set(self._names))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                f"({len(missing)} missing, {len(unexpected)} unexpected)"
            )
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
        """Full (gathered) EMA tensors on CPU keyed by parameter name, plus the update count.

        Under FSDP2 this gathers every shard and must be called on all ranks (Lightning does).
        """
        if self._ema is None:
            ema = self._pending
        else:
            assert self._names is not None and self._module_ref is not None
            ema = {
                name: _full_tensor(e, p).cpu()
                for name, e, (_, p) in zip(
                    self._names, self._ema, self._named_params(self._module_ref), strict=True
                )
            }
        return {"decay": self.decay, "num_updates": self.num_updates, "ema": ema}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        self._pending = state_dict.get("ema")
        self._ema = None


def _full_tensor(local: Tensor, param: Tensor) -> Tensor:
    """Gather the full tensor of an EMA shard laid out like the DTensor ``param`` (collective)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        shard = dtensor.from_local(
            local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
        )
        return shard.full_tensor()
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
