"""Which samples to generate, on which rank, with which label: a plan that ignores batch and world size.

Sample ``i`` of an evaluation (a grid or an FID set) is fully defined by ``(seed, i)``: its starting
noise is ``keyed_randn(..., seed, "sample", 0, [i])`` (what ``SiTModule.sample`` draws for index ``i``)
and its label is a function of ``i`` (class-balanced) or of ``(seed, i)`` (uniform). Ranks take
interleaved indices ``rank, rank + world, ...`` and cut them into batches however they like, so the
set of generated images is the same on 1 or 64 processes with any batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from ..randomness import keyed_rand

__all__ = ["LABEL_MODES", "LabelMode", "RankShare", "generate", "rank_share", "sample_labels"]

LabelMode = Literal["balanced", "uniform"]
LABEL_MODES: tuple[str, ...] = get_args(LabelMode)
#: Stream name of the keyed uniform labels.
STREAM_SAMPLE_LABEL = "sample_label"


def sample_labels(indices: Sequence[int] | Tensor, num_classes: int, mode: LabelMode, seed: int) -> Tensor:
    """``(N,)`` labels of samples ``indices``.

    Args:
        indices: global sample indices.
        num_classes: number of classes.
        mode: ``balanced``: label ``i % num_classes`` (exactly ``n / num_classes`` per class when
            ``num_classes`` divides ``n``); ``uniform``: a keyed uniform draw per index.
        seed: seed of the uniform draw.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {LABEL_MODES}; got {mode!r}")
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if mode == "balanced":
        return idx % num_classes
    u = keyed_rand((), seed, STREAM_SAMPLE_LABEL, 0, idx)
    return (u * num_classes).long().clamp_max(num_classes - 1)


class RankShare(NamedTuple):
    """One rank's part of ``range(total)``, padded so that every rank runs the same number of batches.

    Attributes:
        indices: ``(ceil(total / world),)`` global indices; padding repeats a valid index.
        valid: ``(same,)`` bool, False on padding rows (drop them from metrics).
    """

    indices: Tensor
    valid: Tensor


def rank_share(total: int, rank: int, world: int) -> RankShare:
    """Indices ``rank, rank + world, ...`` below ``total``, padded to ``ceil(total / world)``.

    Equal lengths matter under FSDP, where every forward is a collective: a rank with one batch
    fewer would hang the others.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}); got {rank}")
    per_rank = -(-total // world)
    own = torch.arange(rank, total, world, dtype=torch.long)
    pad = per_rank - len(own)
    filler = own[-1:] if len(own) else torch.zeros(1, dtype=torch.long)
    indices = torch.cat([own, filler.repeat(pad)]) if pad else own
    valid = torch.arange(per_rank) < len(own)
    return RankShare(indices, valid)


def generate(
    sample_fn: Callable[..., Any],
    indices: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    decode: Callable[[Tensor], Tensor] | None = None,
    **sample_kwargs: Any,
) -> Tensor:
    """Images of samples ``indices`` with ``labels``, ``batch_size`` at a time.

    Args:
        sample_fn: ``SiTModule.sample``-like: ``(labels, *, indices, **kw) -> result with .samples``.
        indices: ``(N,)`` global sample indices (they key the noise).
        labels: ``(N,)`` class labels.
        batch_size: samples per sampler call (does not change the result).
        decode: latents -> images; identity if None.
        **sample_kwargs: sampler settings (seed, sampler, steps, method, cfg_scale, ...).

    Returns:
        ``(N, C, H, W)`` images, in the order of ``indices``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    out = []
    for idx, lab in zip(indices.split(batch_size), labels.split(batch_size), strict=True):
        samples = sample_fn(lab, indices=idx, **sample_kwargs).samples
        out.append(decode(samples) if decode is not None else samples)
    return torch.cat(out) if out else torch.empty(0)
