"""Random draws keyed by (seed, stream, step, sample index), independent of ranks, workers and batch size.

Training results must not depend on the number of GPUs or data workers, and sample grids / FID
samples must not depend on the batch size. So every random draw that belongs to one sample -- its
time, its noise, its label dropout, its flip, its posterior sample, its sampling noise -- is a pure
function of ``(seed, stream, step, index)`` rather than the next number of a per-rank stream.
``stream`` is a short name that keeps different kinds of draws independent.

How: the counter-based generator Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011; the generator behind torch's and JAX's GPU random numbers), written in plain int64
torch ops so that a whole batch is drawn at once on whatever device its keys live on, with no host
round trip and no per-sample Python loop (on the CPU, where that is the data workers, the same
generator runs in numpy's uint64 arithmetic, which is about twice as fast there; both paths are tested
to give the same words):

- key (2 x 32 bits): a BLAKE2b hash of ``(seed, stream, step)``, computed once per call on the host;
- counter (4 x 32 bits): ``(block, index mod 2^32, index div 2^32, 0)`` where ``block`` counts the
  groups of four 32-bit words of one sample's draw;
- uniforms: the top 24 bits of a word times ``2^-24`` (exact float32 values in [0, 1));
- normals: Box-Muller on pairs of words, each word a uniform ``(w + 1/2) 2^-32`` in (0, 1), computed in
  float64 and rounded once to the requested dtype.

The integer words are bit-identical on every device. Normals go through ``log``, ``sqrt`` and
``cos``/``sin`` in float64, whose last bit may differ between CPU and CUDA libraries; after rounding to
float32 the two agree except, rarely, in the last bit.

``keyed_generator`` (a ``torch.Generator`` seeded by the same hash) remains for the few draws made
once per epoch or run, such as the shuffle permutation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["keyed_seed", "keyed_generator", "keyed_bits", "keyed_randn", "keyed_rand", "philox4x32"]

_MASK63 = (1 << 63) - 1
_MASK32 = 0xFFFFFFFF
# Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011, Random123).
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10

Words = tuple[Tensor, Tensor, Tensor, Tensor]


def keyed_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed from a base seed, a stream name and integer keys (stable across runs and machines)."""
    payload = ":".join([str(int(seed)), stream, *(str(int(k)) for k in keys)]).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") & _MASK63


def keyed_generator(seed: int, stream: str, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`keyed_seed`."""
    g = torch.Generator(device="cpu")
    g.manual_seed(keyed_seed(seed, stream, *keys))
    return g


def _round_keys(key: tuple[int, int], rounds: int) -> list[tuple[int, int]]:
    """The key of each Philox round: the 32-bit key, bumped by the Weyl increments between rounds."""
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    keys = []
    for _ in range(rounds):
        keys.append((k0, k1))
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return keys


def _mulhilo_(a: Tensor, m: int, hi: Tensor, lo: Tensor, scratch: Tensor) -> None:
    """Write the high and low 32 bits of ``a * m`` into ``hi`` and ``lo`` (int64 ``a`` in [0, 2^32)).

    The 64-bit product does not fit an int64, so the 32-bit constant ``m`` is split into 16-bit
    halves: each partial product is below 2^48 and nothing overflows. In place, into preallocated
    buffers: the generator is a long chain of elementwise ops, and fresh tensors would dominate.
    """
    torch.mul(a, m & 0xFFFF, out=scratch)  # p_lo < 2^48
    torch.mul(a, m >> 16, out=hi)  # p_hi < 2^48
    torch.bitwise_and(hi, 0xFFFF, out=lo).bitwise_left_shift_(16).add_(scratch).bitwise_and_(_MASK32)
    hi.add_(scratch.bitwise_right_shift_(16)).bitwise_right_shift_(16)  # (p_hi + p_lo >> 16) >> 16


def philox4x32(counter: Words, key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> Words:
    """Philox4x32-``rounds`` of a broadcastable counter (four int64 tensors holding 32-bit words).

    ``key`` is two 32-bit integers. Returns the four output words as new int64 tensors in
    [0, 2^32) of the broadcast shape; the inputs are not modified. Matches the Random123
    known-answer vectors (``tests/test_randomness.py``).
    """
    c0, c1, c2, c3 = (w.to(torch.int64).contiguous().clone() for w in torch.broadcast_tensors(*counter))
    s0, s1, s2, s3 = (torch.empty_like(c0) for _ in range(4))
    for k0, k1 in _round_keys(key, rounds):
        _mulhilo_(c0, _PHILOX_M[0], hi=s0, lo=s1, scratch=s2)  # c0 is free afterwards
        _mulhilo_(c2, _PHILOX_M[1], hi=s3, lo=c0, scratch=s2)
        s3.bitwise_xor_(c1).bitwise_xor_(k0)  # hi1 ^ c1 ^ k0
        s0.bitwise_xor_(c3).bitwise_xor_(k1)  # hi0 ^ c3 ^ k1
        # (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the old c1, c2, c3 become scratch
        c0, c1, c2, c3, s0, s1, s3 = s3, c0, s0, s1, c1, c2, c3
    return c0, c1, c2, c3


def _philox4x32_numpy(
    counter: np.ndarray, key: tuple[int, int], out: np.ndarray, rounds: int = PHILOX_ROUNDS
) -> None:
    """Philox4x32 of ``counter`` (``(n, 4)`` uint64 words) into ``out`` (``(n, 4)`` uint64), on the CPU.

    The same generator as :func:`philox4x32`, for the host: numpy's uint64 holds a 32 x 32-bit
    product exactly, so a multiply-high-low is one multiply, one shift and one mask (about half the
    work of the int64 torch version). Tested to equal it word for word.
    """
    m0, m1 = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1])
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    c0, c1, c2, c3 = (np.ascontiguousarray(counter[:, j]) for j in range(4))
    p0, p1 = np.empty_like(c0), np.empty_like(c0)
    for k0, k1 in _round_keys(key, rounds):
        np.multiply(c0, m0, out=p0)
        np.multiply(c2, m1, out=p1)
        # new c0 = hi1 ^ c1 ^ k0 (into c0's buffer), c2 = hi0 ^ c3 ^ k1 (into c2's), c1 = lo1, c3 = lo0
        np.right_shift(p1, shift, out=c0)
        np.bitwise_xor(c0, c1, out=c0)
        np.bitwise_xor(c0, np.uint64(k0), out=c0)
        np.right_shift(p0, shift, out=c2)
        np.bitwise_xor(c2, c3, out=c2)
        np.bitwise_xor(c2, np.uint64(k1), out=c2)
        np.bitwise_and(p1, mask, out=c1)
        np.bitwise_and(p0, mask, out=c3)
    for j, word in enumerate((c0, c1, c2, c3)):
        out[:, j] = word


#: On the CPU the generator (numpy) runs over chunks of this many counters, which stay in cache
#: (about 2.5x faster than one pass over a large batch); other devices take the batch in one pass.
CPU_CHUNK = 1 << 14


def _index_tensor(indices: Sequence[int] | Tensor | np.ndarray, device) -> Tensor:
    if isinstance(indices, Tensor):
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"keyed draws need integer sample indices; got a tensor of dtype {indices.dtype}")
        out = indices.reshape(-1)
        return out.to(device=out.device if device is None else device, dtype=torch.int64)
    array = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices))
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"keyed draws need integer sample indices; got {array.dtype} values")
    return torch.as_tensor(array.reshape(-1).astype(np.int64), device=device)


def keyed_bits(
    n_words: int,
    seed: int,
    stream: str,
    step: int,
    indices: Sequence[int] | Tensor | np.ndarray,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """``(len(indices), n_words)`` int64 tensor of random 32-bit words; row ``i`` depends only on
    ``(seed, stream, step, indices[i])``.

    Drawn on ``device``; if it is None, on the device of ``indices`` when that is a tensor, else on
    the CPU. Word ``j`` of a row is word ``j % 4`` of the Philox block ``j // 4``, so a longer draw
    extends a shorter one.
    """
    if n_words < 0:
        raise ValueError(f"n_words must be >= 0; got {n_words}")
    idx = _index_tensor(indices, device)
    n_rows, n_blocks = len(idx), -(-n_words // 4)
    key = keyed_seed(seed, stream, step)
    key_words = (key & _MASK32, key >> 32)
    # counter of (row, block): (block, index mod 2^32, index div 2^32, 0), flattened row-major;
    # word j of a row is word j % 4 of its block j // 4
    if idx.device.type == "cpu":
        rows = idx.numpy().view(np.uint64)  # two's complement bits: distinct indices, distinct counters
        counter = np.zeros((n_rows, n_blocks, 4), dtype=np.uint64)
        counter[..., 0] = np.arange(n_blocks, dtype=np.uint64)
        counter[..., 1] = (rows & np.uint64(_MASK32))[:, None]
        counter[..., 2] = (rows >> np.uint64(32))[:, None]
        counter = counter.reshape(-1, 4)
        words = np.empty_like(counter)
        for start in range(0, len(counter), CPU_CHUNK):
            end = start + CPU_CHUNK
            _philox4x32_numpy(counter[start:end], key_words, words[start:end])
        return torch.from_numpy(words.view(np.int64)).reshape(n_rows, 4 * n_blocks)[:, :n_words]
    return _keyed_bits_torch(idx, n_blocks, key_words)[:, :n_words]


def _keyed_bits_torch(idx: Tensor, n_blocks: int, key_words: tuple[int, int]) -> Tensor:
    """``keyed_bits`` in torch ops on the device of ``idx`` (the GPU path; tested on the CPU to equal it)."""
    n_rows = len(idx)
    block = torch.arange(n_blocks, device=idx.device, dtype=torch.int64).expand(n_rows, n_blocks).reshape(-1)
    row = idx.unsqueeze(1).expand(n_rows, n_blocks).reshape(-1)
    counter = (block, row & _MASK32, (row >> 32) & _MASK32, torch.zeros_like(block))
    return torch.stack(philox4x32(counter, key_words), dim=-1).reshape(n_rows, 4 * n_blocks)


def keyed_randn(
    shape: Sequence[int],
    seed: int,
    stream: str,
    step: int,
    indices: Sequence[int] | Tensor | np.ndarray,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(len(indices), *shape)`` standard normals; row ``i`` depends only on (seed, stream, step, indices[i]).

    Device rule as :func:`keyed_bits`.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    n_pairs = -(-numel // 2)
    words = keyed_bits(2 * n_pairs, seed, stream, step, indices, device=device)
    # pair p of a row is (words 2p, 2p + 1): a radius from the first, an angle from the second
    u = words.to(torch.float64).add_(0.5).mul_(2.0**-32).view(len(words), n_pairs, 2)  # in (0, 1)
    radius = u[..., 0].log().mul_(-2.0).sqrt_()
    angle = u[..., 1].mul(2.0 * math.pi)
    z = torch.empty(u.shape, device=u.device, dtype=dtype)
    z[..., 0] = angle.cos().mul_(radius)
    z[..., 1] = angle.sin_().mul_(radius)
    return z.view(len(words), 2 * n_pairs)[:, :numel].reshape(len(words), *shape)


def keyed_rand(
    shape: Sequence[int],
    seed: int,
    stream: str,
    step: int,
    indices: Sequence[int] | Tensor | np.ndarray,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(len(indices), *shape)`` uniforms on [0, 1) (multiples of 2^-24), keyed like :func:`keyed_randn`."""
    shape = tuple(int(s) for s in shape)
    words = keyed_bits(math.prod(shape), seed, stream, step, indices, device=device)
    u = (words >> 8).to(torch.float32) * 2.0**-24
    return u.to(dtype).reshape(len(words), *shape)
