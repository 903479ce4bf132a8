"""Training throughput: images per second and model FLOPs utilisation (MFU).

Time is measured around each training batch (``on_train_batch_start`` to ``on_train_batch_end``).
On CUDA it is the device's time between two CUDA events recorded on the stream at both ends of the
batch, read once per window (one host-device sync per ``window`` batches, not two per batch, so the
host keeps running ahead of the device); elsewhere it is the ``clock``. Over a window of ``window``
batches:

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
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: this window's batches
        self.last: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network = getattr(pl_module, "network", None)
        flops = getattr(network, "flops_per_sample", None)
        self._flops_per_image = TRAIN_FLOPS_MULTIPLIER * float(flops()) if callable(flops) else None
        self._peak = self.peak_flops
        if self._peak is None and pl_module.device.type == "cuda":
            self._peak = lookup_peak_flops(torch.cuda.get_device_name(pl_module.device))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._seen += 1
        if self._seen <= self.warmup:
            return
        if pl_module.device.type == "cuda":  # recorded on the stream: no host-device sync
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, torch.cuda.Event(enable_timing=True)))
        self._start = self.clock()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            return
        if self._events:
            self._events[-1][1].record()
        else:
            self._seconds += self.clock() - self._start
        self._start = None
        self._images += _batch_size(batch) * trainer.world_size
        self._batches += 1
        if self._batches < self.window:
            return
        if self._events:  # the window's one sync: wait for its last batch, read every batch's time
            self._events[-1][1].synchronize()
            self._seconds = sum(start.elapsed_time(end) for start, end in self._events) / 1e3
            self._events = []
        rate, mfu = throughput(
            self._images, self._seconds, self._flops_per_image, self._peak, trainer.world_size
        )
        self.last = {"throughput/images_per_sec": rate}
        if mfu is not None:
            self.last["throughput/mfu"] = mfu
        for name, value in self.last.items():
            # a CPU tensor: a float would be copied to the device (a sync), and the progress bar reads
            # its metrics back on every step
            pl_module.log(
                name,
                torch.tensor(value, dtype=torch.float64),
                prog_bar=True,
                on_step=True,
                on_epoch=False,
                rank_zero_only=True,
            )
        self._seconds, self._images, self._batches = 0.0, 0, 0


def _batch_size(batch: Any) -> int:
    """Images in a batch: ``len(batch["x"])`` for our dict batches, else the first tensor's length."""
    if isinstance(batch, dict) and "x" in batch:
        return len(batch["x"])
    if isinstance(batch, (list, tuple)) and batch:
        return len(batch[0])
    return len(batch)
