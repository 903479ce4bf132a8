"""Throughput callback: images/s and MFU on a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sit_lightning.callbacks.throughput import (
    TRAIN_FLOPS_MULTIPLIER,
    ThroughputCallback,
    lookup_peak_flops,
    throughput,
)

FLOPS_PER_FORWARD = 1e9


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeModule:
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.network = SimpleNamespace(flops_per_sample=lambda: FLOPS_PER_FORWARD)
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **kwargs) -> None:
        self.logged[name] = value


def run(
    callback: ThroughputCallback, clock: FakeClock, world: int, batch: int, seconds: list[float]
) -> FakeModule:
    module, trainer = FakeModule(), SimpleNamespace(world_size=world)
    callback.setup(trainer, module, "fit")
    for i, dt in enumerate(seconds):
        data = {"x": torch.zeros(batch, 1), "y": torch.zeros(batch)}
        callback.on_train_batch_start(trainer, module, data, i)
        clock.now += dt
        callback.on_train_batch_end(trainer, module, None, data, i)
        clock.now += 10.0  # time between batches (data loading, logging) is not counted
    return module


def test_images_per_second_and_mfu_on_a_fake_clock():
    clock = FakeClock()
    peak = 1e12
    callback = ThroughputCallback(window=3, warmup=1, peak_flops=peak, clock=clock)
    # the first batch is warm-up (a slow compile step), then three batches of 0.5, 1.0, 1.5 s
    module = run(callback, clock, world=2, batch=16, seconds=[99.0, 0.5, 1.0, 1.5])
    images_per_sec = 3 * 16 * 2 / 3.0  # 3 batches x 16 per device x 2 devices in 3 s
    assert module.logged["throughput/images_per_sec"] == pytest.approx(images_per_sec)
    mfu = images_per_sec * TRAIN_FLOPS_MULTIPLIER * FLOPS_PER_FORWARD / (peak * 2)
    assert module.logged["throughput/mfu"] == pytest.approx(mfu)


def test_no_peak_no_mfu_on_cpu():
    clock = FakeClock()
    module = run(
        ThroughputCallback(window=2, warmup=0, clock=clock), clock, world=1, batch=8, seconds=[1.0, 1.0]
    )
    assert module.logged == {"throughput/images_per_sec": pytest.approx(8.0)}


def test_throughput_formula_and_peak_table():
    result = throughput(1000, 2.0, 3e9, 1e12, devices=4)
    assert result.images_per_sec == 500.0
    assert result.mfu == pytest.approx(500 * 3e9 / 4e12)
    assert throughput(10, 1.0, None, 1e12, 1).mfu is None
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989e12)
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert lookup_peak_flops("Tesla T4") is None
    with pytest.raises(ValueError, match="window"):
        ThroughputCallback(window=0)
