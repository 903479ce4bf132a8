"""Cost of the keyed training draws: per-sample generators (before) against vectorised Philox (now).

Usage::

    python benchmarks/keyed_draws.py                       # CPU, and CUDA when present
    python benchmarks/keyed_draws.py --batches 256x4x32x32 --device cuda --reps 50

For each batch shape ``N x C x H x W`` it times, in one process, three ways to make the draws of one
training step (a time ``t``, a noise ``x_0`` like the latents, and a label-dropout uniform per sample):

- ``per_sample_generator``: what ``SiTModule.training_draws`` did before: one CPU ``torch.Generator``
  per sample and stream, seeded by a BLAKE2b hash, the keys copied to the host with ``.tolist()`` and
  the draws copied to the device (written out below as the reference of this benchmark);
- ``philox``: ``SiTModule.training_draws`` now: :mod:`sit_lightning.randomness`, the whole batch at once
  on the device of the keys;
- ``unkeyed``: ``torch.rand`` / ``torch.randn`` on the device with the device's global generator
  (what the released code does): the floor, but its numbers depend on the number of processes.

Each entry is the median over ``--reps`` timed repetitions after ``--warmup``, with the device
synchronised around each one. Timings on a shared machine are noisy: read the ratios in one run.

A second table times what the data workers draw for each latent on the CPU, its posterior noise
(``LatentSource.load``, stream ``data.posterior``), per ``--posterior`` batch: one ``torch.Generator``
per sample (before), ``keyed_randn`` version 1 (float64 Box-Muller on Philox4x32 words), version 2
(float32 Box-Muller on the same words) and version 3 (float32 Box-Muller on Philox4x64 words from
numpy's C generator, what the data module draws now), with the repetitions of the four interleaved.

A third table times a whole batch of the data workers, ``LatentSource.load`` (gather the moments from
shards on disk, draw the flip and the posterior noise, normalise), now against the load as it was
before version 3 (written out below: both flips' moments read, version-2 noise, out-of-place
arithmetic), on shards of ``--posterior``'s latent shape written to a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from sit_lightning.models import SiTConfig
from sit_lightning.module import SiTModule
from sit_lightning.randomness import keyed_generator, keyed_randn

DEFAULT_BATCHES = "256x4x32x32,64x4x32x32,128x1x8x8"
DEFAULT_POSTERIOR = "256x4x32x32"
POSTERIOR_STREAM = "data.posterior"
SEED = 0
STEP = 1234


def per_sample_generator_draws(x_1: Tensor, keys: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """The previous keyed draws: one CPU generator per (sample, stream), stacked, then copied."""
    rows_t, rows_x0, rows_u = [], [], []
    for k in keys.tolist():
        rows_t.append(torch.rand(1, generator=keyed_generator(SEED, "train_time", step, k)))
        rows_x0.append(
            torch.randn(tuple(x_1.shape[1:]), generator=keyed_generator(SEED, "train_noise", step, k))
        )
        rows_u.append(torch.rand((), generator=keyed_generator(SEED, "train_label_drop", step, k)))
    t = torch.cat(rows_t).to(x_1.device)
    x_0 = torch.stack(rows_x0).to(x_1.device)
    drop = torch.stack(rows_u).to(x_1.device) < 0.1
    return t, x_0, drop


def _time(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _parse_batch(text: str) -> tuple[int, ...]:
    parts = text.strip().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"batch {text!r} must be NxCxHxW with positive integers")
    return tuple(int(p) for p in parts)


def measure(shape: tuple[int, ...], device: torch.device, warmup: int, reps: int) -> dict[str, float]:
    """Median seconds of each way of drawing one step's ``(t, x_0, drop)`` for a batch of ``shape``."""
    # only the draws are timed: a one-block network of width 32 keeps the set-up cheap
    tiny = SiTConfig(
        input_size=shape[2], in_channels=shape[1], num_classes=10, depth=1, hidden_size=32, num_heads=2
    )
    module = SiTModule(arch=tiny, seed=SEED)
    x_1 = torch.zeros(shape, device=device)
    keys = torch.arange(STEP * shape[0], (STEP + 1) * shape[0], device=device)
    batch = {"x": x_1, "key": keys}

    def unkeyed() -> None:
        torch.rand(shape[0], device=device)
        torch.randn_like(x_1)
        torch.rand(shape[0], device=device)

    return {
        "per_sample_generator": _time(
            lambda: per_sample_generator_draws(x_1, keys, STEP), device, warmup, reps
        ),
        "philox": _time(lambda: module.training_draws(batch, STEP), device, warmup, reps),
        "unkeyed": _time(unkeyed, device, warmup, reps),
    }


def _interleaved_medians(ways: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds of each way, after ``warmup`` untimed calls, its ``reps`` repetitions interleaved
    with the others' (so the machine's load drifts over all of them alike)."""
    for fn in ways.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(reps):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_posterior(shape: tuple[int, ...], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds of one batch of posterior noise on the CPU, before and now (interleaved repetitions)."""
    keys = list(range(STEP * shape[0], (STEP + 1) * shape[0]))
    latent = tuple(shape[1:])

    def per_sample_generator() -> Tensor:
        return torch.stack(
            [torch.randn(latent, generator=keyed_generator(SEED, POSTERIOR_STREAM, 0, k)) for k in keys]
        )

    ways: dict[str, Callable[[], object]] = {
        "per_sample_generator": per_sample_generator,
        "philox_v1": lambda: keyed_randn(latent, SEED, POSTERIOR_STREAM, 0, keys, version=1),
        "philox_v2": lambda: keyed_randn(latent, SEED, POSTERIOR_STREAM, 0, keys, version=2),
        "philox_v3": lambda: keyed_randn(latent, SEED, POSTERIOR_STREAM, 0, keys, version=3),
    }
    return _interleaved_medians(ways, warmup, reps)


def previous_load(source, rows: np.ndarray, keys: np.ndarray) -> Tensor:
    """``LatentSource.load``'s latents as computed before version 3: both flips' moments gathered, the
    drawn one picked, version-2 noise, ``normalize(mean + std * noise)`` out of place (same laws)."""
    from sit_lightning.randomness import keyed_rand

    moments = torch.from_numpy(source.shards.moments(rows))
    flipped = keyed_rand((), source.seed, source.flip_stream, 0, keys) < 0.5
    chosen = moments[torch.arange(len(rows)), flipped.long()]
    noise = keyed_randn(source.shards.latent_shape, source.seed, source.posterior_stream, 0, keys, version=2)
    x = source.shards.normalize(chosen[:, 0] + chosen[:, 1] * noise).to(torch.float32)
    torch.isfinite(x.flatten(1).sum(1)).all()
    return x


def measure_load(shape: tuple[int, ...], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds of one ``LatentSource.load`` of ``shape[0]`` latents: before and now, interleaved."""
    from sit_lightning.data import LatentDataModule, LatentShardWriter

    n, latent = shape[0], tuple(shape[1:])
    count = 4 * n
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        writer = LatentShardWriter(
            folder, latent, shard_size=max(1, count // 3), vae_id="bench", class_names=["a"]
        )
        for _ in range(count // n):
            mean = rng.standard_normal((n, *latent), dtype=np.float32)
            std = rng.uniform(0.05, 0.5, (n, *latent)).astype(np.float32)
            writer.add(mean, std, mean[..., ::-1].copy(), std, np.zeros(n, np.int64))
        writer.close()
        datamodule = LatentDataModule(folder, num_workers=0, pin_memory=False, global_batch_size=n, seed=SEED)
        source = datamodule.train_source()
        rows = rng.permutation(count)[:n]
        keys = np.arange(STEP * n, (STEP + 1) * n)
        ways: dict[str, Callable[[], object]] = {
            "previous_load": lambda: previous_load(source, rows, keys),
            "load": lambda: source.load(rows, keys),
        }
        return _interleaved_medians(ways, warmup, reps)


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Prints the three tables; returns their rows (``"table"`` is ``"posterior"`` or ``"load"`` for the
    second and third)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batches", default=DEFAULT_BATCHES, help="comma-separated NxCxHxW shapes")
    parser.add_argument("--device", action="append", default=None, help="cpu / cuda (repeatable)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--posterior", default=DEFAULT_POSTERIOR, help="NxCxHxW shapes of posterior noise")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    args = parser.parse_args(argv)
    shapes = [_parse_batch(b) for b in args.batches.split(",") if b.strip()]
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, object]] = []
    print(
        "| device | batch | per-sample generators ms | philox ms | unkeyed ms | speed-up | philox / unkeyed |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in devices:
        device = torch.device(name)
        for shape in shapes:
            t = measure(shape, device, args.warmup, args.reps)
            row = {"device": name, "batch": "x".join(map(str, shape)), **t}
            rows.append(row)
            print(
                f"| {name} | {row['batch']} | {1e3 * t['per_sample_generator']:.2f} | {1e3 * t['philox']:.2f} "
                f"| {1e3 * t['unkeyed']:.2f} | {t['per_sample_generator'] / t['philox']:.1f}x "
                f"| {t['philox'] / t['unkeyed']:.1f}x |",
                flush=True,
            )
    print()
    print(
        "| posterior noise (CPU) | per-sample generators (before) ms | Philox v1 ms | Philox v2 ms "
        "| Philox v3 (now) ms | v2 / before | now / before |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in [_parse_batch(b) for b in args.posterior.split(",") if b.strip()]:
        t = measure_posterior(shape, args.warmup, args.reps)
        rows.append({"table": "posterior", "batch": "x".join(map(str, shape)), **t})
        before = t["per_sample_generator"]
        print(
            f"| {'x'.join(map(str, shape))} | {1e3 * before:.2f} | {1e3 * t['philox_v1']:.2f} "
            f"| {1e3 * t['philox_v2']:.2f} | {1e3 * t['philox_v3']:.2f} | {t['philox_v2'] / before:.2f}x "
            f"| {t['philox_v3'] / before:.2f}x |",
            flush=True,
        )
    print()
    print("| LatentSource.load (CPU) | before version 3 ms | now ms | now / before |")
    print("|---|---:|---:|---:|")
    for shape in [_parse_batch(b) for b in args.posterior.split(",") if b.strip()]:
        t = measure_load(shape, args.warmup, args.reps)
        rows.append({"table": "load", "batch": "x".join(map(str, shape)), **t})
        print(
            f"| {'x'.join(map(str, shape))} | {1e3 * t['previous_load']:.2f} | {1e3 * t['load']:.2f} "
            f"| {t['load'] / t['previous_load']:.2f}x |",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
