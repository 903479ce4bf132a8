"""Training throughput: images per second and model FLOPs utilisation (MFU).

Wall-clock time is measured around each training batch (``on_train_batch_start`` to
``on_train_batch_end``; CUDA is synchronised at both ends when the module is on CUDA, so the time
covers the kernels and not just their launch). Over a window of ``window`` batches:

    images/s = global images in the window / seconds in the window
    MFU      = images/s x FLOPs per training image / (peak FLOP/s per device x devices)

with FLOPs per training image = ``TRAIN_FLOPS_MULTIPLIER`` (3: forward + backward, which costs about
twice the forward) x the network's forward FLOPs (``network.flops_per_sample()``, matmuls only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

__all__ = [
    "PEAK_FLOPS_BF16_DENSE",
    "TRAIN_FLOPS_MULTIPLIER",
    "Throughput",
    "ThroughputCallback",
    "lookup_peak_flops",
    "throughput",
]

#: Forward + backward of a training step, in forward passes.
TRAIN_FLOPS_MULTIPLIER = 3
#: Dense bf16 tensor-core peak FLOP/s per device (vendor data sheets, SXM parts, no sparsity).
PEAK_FLOPS_BF16_DENSE: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def lookup_peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s of a device from :data:`PEAK_FLOPS_BF16_DENSE` by substring of its name, or None."""
    upper = device_name.upper()
    for key, value in PEAK_FLOPS_BF16_DENSE.items():
        if key in upper:
            return value
    return None


class Throughput(NamedTuple):
    """Attributes: images_per_sec (all devices together); mfu (fraction of peak, None if unknown)."""

    images_per_sec: float
    mfu: float | None


def throughput(
    images: int, seconds: float, flops_per_image: float | None, peak_flops: float | None, devices: int
) -> Throughput:
    """Images per second and MFU of ``images`` (over all devices) trained in ``seconds``.

    Args:
        images: images processed by all devices together.
        seconds: wall time.
        flops_per_image: training FLOPs per image (None: MFU unknown).
        peak_flops: peak FLOP/s of one device (None: MFU unknown).
        devices: number of devices sharing the work.
    """
    rate = images / seconds
    if flops_per_image is None or not peak_flops:
        return Throughput(rate, None)
    return Throughput(rate, rate * flops_per_image / (peak_flops * devices))


class ThroughputCallback(Callback):
    """Logs ``throughput/images_per_sec`` and ``throughput/mfu`` (logger and progress bar).

    Args:
        window: number of training batches per measurement (the first ``warmup`` batches of the fit
            are not timed: they include compilation and allocator warm-up).
        warmup: batches skipped at the start of fit.
        peak_flops: peak FLOP/s of ONE device; None looks the device up in
            :data:`PEAK_FLOPS_BF16_DENSE` (CUDA only) and skips MFU when it is not there.
        clock: time source in seconds (tests pass a fake clock).
    """

    def __init__(
        self,
        window: int = 50,
        warmup: int = 5,
        peak_flops: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1; got {window}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0; got {warmup}")
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops must be > 0 or None; got {peak_flops}")
        self.window = int(window)
        self.warmup = int(warmup)
        self.peak_flops = peak_flops
        self.clock = clock
        self._flops_per_image: float | None = None
        self._peak: float | None = None
        self._start: float | None = None
        self._seconds = 0.0
        self._images = 0
        self._batches = 0
        self._seen = 0
        self.last: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network = getattr(pl_module, "network", None)
        flops = getattr(network, "flops_per_sample", None)
        self._flops_per_image = TRAIN_FLOPS_MULTIPLIER * float(flops()) if callable(flops) else None
        self._peak = self.peak_flops
        if self._peak is None and pl_module.device.type == "cuda":
            self._peak = lookup_peak_flops(torch.cuda.get_device_name(pl_module.device))

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._seen += 1
        if self._seen <= self.warmup:
            return
        self._sync(pl_module)
        self._start = self.clock()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            return
        self._sync(pl_module)
        self._seconds += self.clock() - self._start
        self._start = None
        self._images += _batch_size(batch) * trainer.world_size
        self._batches += 1
        if self._batches < self.window:
            return
        rate, mfu = throughput(
            self._images, self._seconds, self._flops_per_image, self._peak, trainer.world_size
        )
        self.last = {"throughput/images_per_sec": rate}
        if mfu is not None:
            self.last["throughput/mfu"] = mfu
        for name, value in self.last.items():
            pl_module.log(name, value, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        self._seconds, self._images, self._batches = 0.0, 0, 0


def _batch_size(batch: Any) -> int:
    """Images in a batch: ``len(batch["x"])`` for our dict batches, else the first tensor's length."""
    if isinstance(batch, dict) and "x" in batch:
        return len(batch["x"])
    if isinstance(batch, (list, tuple)) and batch:
        return len(batch[0])
    return len(batch)
