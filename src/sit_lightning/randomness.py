"""Random draws keyed by (seed, stream, step, sample index), independent of ranks, workers and batch size.

Training results must not depend on the number of GPUs or data workers, and sample grids / FID
samples must not depend on the batch size. So every random draw that belongs to one sample -- its
time, its noise, its label dropout, its flip, its posterior sample, its sampling noise -- comes from a
generator seeded by a hash of ``(seed, stream, step, global_index)`` rather than from a per-rank
stream. ``stream`` is a short name that keeps different kinds of draws independent.

The draws are made on the CPU (a ``torch.Generator`` per sample: cheap next to a training step) and
moved to the requested device, so CPU and GPU runs see the same numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["keyed_seed", "keyed_generator", "keyed_randn", "keyed_rand"]

_MASK63 = (1 << 63) - 1


def keyed_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed from a base seed, a stream name and integer keys (stable across runs and machines)."""
    payload = ":".join([str(int(seed)), stream, *(str(int(k)) for k in keys)]).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") & _MASK63


def keyed_generator(seed: int, stream: str, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`keyed_seed`."""
    g = torch.Generator(device="cpu")
    g.manual_seed(keyed_seed(seed, stream, *keys))
    return g


def _indices(indices: Sequence[int] | Tensor) -> list[int]:
    if isinstance(indices, Tensor):
        return [int(i) for i in indices.reshape(-1).tolist()]
    return [int(i) for i in indices]


def _keyed_rows(
    draw,
    shape: Sequence[int],
    seed: int,
    stream: str,
    step: int,
    indices: Sequence[int] | Tensor,
    device,
    dtype,
) -> Tensor:
    """Stack one ``draw(shape, generator=...)`` per index, each from its own keyed generator."""
    rows = [
        draw(tuple(shape), generator=keyed_generator(seed, stream, step, i), dtype=torch.float32)
        for i in _indices(indices)
    ]
    out = torch.stack(rows) if rows else torch.empty((0, *shape))
    return out.to(device=device, dtype=dtype)


def keyed_randn(
    shape: Sequence[int],
    seed: int,
    stream: str,
    step: int,
    indices: Sequence[int] | Tensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(len(indices), *shape)`` standard normals; row ``i`` depends only on (seed, stream, step, indices[i])."""
    return _keyed_rows(torch.randn, shape, seed, stream, step, indices, device, dtype)


def keyed_rand(
    shape: Sequence[int],
    seed: int,
    stream: str,
    step: int,
    indices: Sequence[int] | Tensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(len(indices), *shape)`` uniforms on [0, 1), keyed like :func:`keyed_randn`."""
    return _keyed_rows(torch.rand, shape, seed, stream, step, indices, device, dtype)
