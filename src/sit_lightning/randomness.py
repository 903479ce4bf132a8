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
generator runs in numpy's uint64 arithmetic, several times faster there; both paths are tested to give
the same words):

- key (2 x 32 bits): a BLAKE2b hash of ``(seed, stream, step)``, computed once per call on the host;
- counter (4 x 32 bits): ``(block, index mod 2^32, index div 2^32, 0)`` where ``block`` counts the
  groups of four 32-bit words of one sample's draw;
- uniforms: the top 24 bits of a word times ``2^-24`` (exact float32 values in [0, 1));
- normals: Box-Muller on pairs of words ``(w_2p, w_2p+1)`` (words ``0, 1`` and ``2, 3`` of a block): a
  radius ``sqrt(-2 log u)`` from ``u = (w_2p + 1/2) 2^-32`` in (0, 1) and an angle ``2 pi w_2p+1 2^-32``,
  giving elements ``2p`` (cos) and ``2p + 1`` (sin). Two versions of this conversion exist
  (``NORMAL_VERSIONS``), on the same words:

  - version 1 (the default of :func:`keyed_randn`): in float64, rounded once to the requested dtype;
  - version 2 (``version=2``; the data workers' posterior samples until version 3): in float32, with
    the word rounded to float32 first. About 3x cheaper on the CPU; differs from version 1 by float32
    rounding (at most about 2e-5, tested), so it is a different stream for exact reproduction and resumes.

Version 3 (``version=3``; the data workers' posterior samples now) keeps the keys and changes the
words, for speed on the CPU: Philox4x64-10 (the 64-bit member of the same family, same paper) under the
key ``(K, 0)``, ``K`` the same BLAKE2b hash of ``(seed, stream, step)``, with counters
``(block + 1, index, 0, 0)``, computed in C by numpy's ``Philox`` bit generator (tested word for word
against a plain Python definition, :func:`philox4x64_reference`, and its published known-answer
vector). A row of ``n`` normals takes ``P = ceil(n / 2)`` 64-bit words, read as ``2P`` 32-bit values;
the first ``P`` give the radii and the last ``P`` the angles of float32 Box-Muller, cosines filling the
first half of the row and sines the second (:func:`_randn_v3_numpy`). So a longer row does not extend
a shorter one. It is drawn on the CPU (other devices get a copy): it exists for the data workers, where
it costs less than one seeded ``torch.Generator`` per sample did, which version 1 and 2 did not
(docs/performance.md). Seeding per-sample ``torch.Generator`` objects instead is no option: torch's CPU
generator keeps only the low 32 bits of a seed, so among ``10^8`` keys (ImageNet for 80 epochs) about a
million pairs would share their noise.

The integer words are bit-identical on every device. Normals go through ``log``, ``sqrt`` and
``cos``/``sin``, whose last bit may differ between libraries (CPU numpy, CPU torch, CUDA): version 1
agrees after rounding to float32 except, rarely, in the last bit; version 2 within a few float32 ulps;
version 3 runs only numpy's float32 functions, whose last bit may depend on the CPU's vector units.

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

__all__ = [
    "NORMAL_VERSIONS",
    "keyed_seed",
    "keyed_generator",
    "keyed_bits",
    "keyed_randn",
    "keyed_rand",
    "philox4x32",
    "philox4x64_reference",
]

_MASK63 = (1 << 63) - 1
_MASK32 = 0xFFFFFFFF
# Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011, Random123).
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
#: The random streams of normals (see the module docstring): 1 = float64 Box-Muller, 2 = float32, both on
#: Philox4x32 words; 3 = float32 Box-Muller on Philox4x64 words (the CPU's fastest, the data workers').
NORMAL_VERSIONS = (1, 2, 3)

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


#: On the CPU the generator (numpy) runs over tiles of about this many counters, which stay in cache
#: (several times faster than one pass over a large batch); other devices take the batch in one pass.
CPU_CHUNK = 1 << 14

_U32, _S32 = np.uint64(_MASK32), np.uint64(32)
_M0, _M1 = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1])


def _philox_tiles(rows: np.ndarray, n_blocks: int, key: tuple[int, int]):
    """Philox4x32-10 of the counters ``(block, row mod 2^32, row div 2^32, 0)`` of every (row, block), on the CPU.

    Yields ``(r0, r1, b0, b1, P, Q)`` per tile of rows ``[r0, r1)`` and blocks ``[b0, b1)``: ``P`` and
    ``Q`` are ``(r1 - r0) * (b1 - b0)`` uint64 holding the block's output words packed as
    ``P = w0 << 32 | w1`` and ``Q = w2 << 32 | w3``, row-major; they are overwritten by the next tile.

    Exactly :func:`philox4x32` (tested word for word), computed with less work:

    - the first two rounds are computed once per row and once per block, not per counter: with a
      counter ``(block, lo, hi, 0)``, round 1 multiplies only ``block`` and ``hi``, round 2 only words
      that depend on the row alone or on the block alone, so after two rounds each word is
      ``f(row) ^ g(block)``, one broadcast xor per tile;
    - rounds 3-10 keep each pair of words packed in one uint64 (``c0 << 32 | c1``): one round is a shift
      and a multiply (``c0 * m`` is a full 64-bit product), a shift, and two xors per pair, and the next
      round's key is xored into the low half ahead of time (it is the half shifted up next round).
    """
    ks = [(np.uint64(a), np.uint64(b)) for a, b in _round_keys(key, PHILOX_ROUNDS)]
    block = np.arange(n_blocks, dtype=np.uint64)
    lo, hi = rows & _U32, rows >> _S32
    p0, p1 = block * _M0, hi * _M1  # round 1: block-only and row-only products
    c0, c1 = (p1 >> _S32) ^ lo ^ ks[0][0], p1 & _U32  # per row
    c2, c3 = (p0 >> _S32) ^ ks[0][1], p0 & _U32  # per block
    p0, p1 = c0 * _M0, c2 * _M1  # round 2: row-only and block-only products
    # after round 2: P = ((hi(p1) ^ c1 ^ k0) << 32 | lo(p1)) ^ k0', Q = ((hi(p0) ^ c3 ^ k1) << 32 | lo(p0)) ^ k1'
    # (k' the key of round 3, pre-xored into the low half): a per-block part xor a per-row part
    p_block = (((p1 >> _S32) ^ ks[1][0]) << _S32) | ((p1 & _U32) ^ ks[2][0])
    p_row = c1 << _S32
    q_block = ((c3 ^ ks[1][1]) << _S32) | ks[2][1]
    q_row = p0
    rows_per_tile = max(1, CPU_CHUNK // max(n_blocks, 1))
    blocks_per_tile = min(n_blocks, CPU_CHUNK)
    cap = rows_per_tile * blocks_per_tile
    P, Q, HP, HQ = np.empty((4, cap), dtype=np.uint64)
    for r0 in range(0, len(rows), rows_per_tile):
        r1 = min(len(rows), r0 + rows_per_tile)
        for b0 in range(0, n_blocks, blocks_per_tile):
            b1 = min(n_blocks, b0 + blocks_per_tile)
            n = (r1 - r0) * (b1 - b0)
            p, q, hp, hq = P[:n], Q[:n], HP[:n], HQ[:n]
            np.bitwise_xor(p_block[None, b0:b1], p_row[r0:r1, None], out=p.reshape(r1 - r0, b1 - b0))
            np.bitwise_xor(q_block[None, b0:b1], q_row[r0:r1, None], out=q.reshape(r1 - r0, b1 - b0))
            for r in range(2, PHILOX_ROUNDS):
                np.right_shift(p, _S32, hp)
                np.multiply(hp, _M0, hp)  # c0 * m0 = hi0 << 32 | lo0
                np.right_shift(q, _S32, hq)
                np.multiply(hq, _M1, hq)  # c2 * m1 = hi1 << 32 | lo1
                # (c0, c1) <- (hi1 ^ c1 ^ k0, lo1) and (c2, c3) <- (hi0 ^ c3 ^ k1, lo0), c1 ^ k0 already in p
                np.left_shift(p, _S32, p)
                np.bitwise_xor(p, hq, p)
                np.left_shift(q, _S32, q)
                np.bitwise_xor(q, hp, q)
                if r + 1 < PHILOX_ROUNDS:
                    np.bitwise_xor(p, ks[r + 1][0], p)
                    np.bitwise_xor(q, ks[r + 1][1], q)
            yield r0, r1, b0, b1, p, q


_ANGLE32 = np.float32(2.0 * math.pi * 2.0**-32)


def _randn_v2_numpy(rows: np.ndarray, n_blocks: int, key: tuple[int, int]) -> np.ndarray:
    """``(len(rows), 4 * n_blocks)`` float32 normals of version 2 (float32 Box-Muller), tile by tile."""
    out = np.empty((len(rows), n_blocks, 2, 2), dtype=np.float32)  # (row, block, pair, cos/sin)
    cap = max(1, CPU_CHUNK // max(n_blocks, 1)) * min(n_blocks, CPU_CHUNK)
    words = np.empty((2, 2, cap), dtype=np.uint32)  # (pair, radius/angle word, counter)
    f = np.empty((2, 2, cap), dtype=np.float32)
    trig = np.empty((2, 2, cap), dtype=np.float32)  # (pair, cos/sin, counter)
    for r0, r1, b0, b1, p, q in _philox_tiles(rows, n_blocks, key):
        n = len(p)
        w, x, cs = words[:, :, :n], f[:, :, :n], trig[:, :, :n]
        for pair, packed in enumerate((p, q)):
            np.copyto(w[pair, 1], packed, casting="unsafe")  # the low word (w1, w3): the angle
            np.right_shift(packed, _S32, packed)
            np.copyto(w[pair, 0], packed, casting="unsafe")  # the high word (w0, w2): the radius
        np.copyto(x, w, casting="unsafe")  # uint32 -> float32, rounded to nearest
        radius, angle = x[:, 0], x[:, 1]
        np.add(radius, np.float32(0.5), radius)
        np.multiply(radius, np.float32(2.0**-32), radius)  # u in (0, 1]
        np.log(radius, radius)
        np.multiply(radius, np.float32(-2.0), radius)
        np.sqrt(radius, radius)
        np.multiply(angle, _ANGLE32, angle)
        np.cos(angle, cs[:, 0])
        np.sin(angle, cs[:, 1])
        z = out[r0:r1, b0:b1].reshape(n, 2, 2).transpose(1, 2, 0)  # (pair, cos/sin, counter) view
        np.multiply(cs, radius[:, None, :], z)
    return out.reshape(len(rows), 4 * n_blocks)


# ---- version 3: Philox4x64-10 words (numpy's C generator), float32 Box-Muller on halves of a row ----

#: Philox4x64 round multipliers and Weyl key increments (Salmon et al. 2011, Random123): the reference
#: definition of version 3's words, which numpy's ``Philox`` bit generator computes in C (tested against it).
PHILOX64_M = (0xD2E7470EE14C6C93, 0xCA5A826395121157)
PHILOX64_W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)
_MASK64 = (1 << 64) - 1


def philox4x64_reference(
    counter: Sequence[int], key: Sequence[int], rounds: int = PHILOX_ROUNDS
) -> list[int]:
    """Philox4x64-``rounds`` of one counter (4 x 64 bits) under ``key`` (2 x 64 bits), in Python integers.

    The definition of version 3's words, slow and plain; :func:`_philox4x64_rows` computes the same
    words with numpy's C implementation and is tested against this function.
    """
    c = [int(x) & _MASK64 for x in counter]
    k0, k1 = int(key[0]) & _MASK64, int(key[1]) & _MASK64
    for _ in range(rounds):
        p0, p1 = PHILOX64_M[0] * c[0], PHILOX64_M[1] * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k0, p1 & _MASK64, (p0 >> 64) ^ c[3] ^ k1, p0 & _MASK64]
        k0, k1 = (k0 + PHILOX64_W[0]) & _MASK64, (k1 + PHILOX64_W[1]) & _MASK64
    return c


class _Philox4x64Rows:
    """Rows of Philox4x64-10 words under one key: row ``i``'s word ``j`` is word ``j % 4`` of the block
    with counter ``(j // 4 + 1, i, 0, 0)`` (``i`` as a 64-bit two's complement integer).

    numpy's ``Philox`` bit generator computes the blocks in C; it adds one to the counter before each
    block, so a state with counter ``(0, i, 0, 0)`` and an empty buffer starts the row at block 1.
    """

    def __init__(self, key: int) -> None:
        self._bits = np.random.Philox(key=np.array([key & _MASK64, 0], dtype=np.uint64))
        self._state = self._bits.state
        self._counter = np.zeros(4, dtype=np.uint64)
        self._state["state"]["counter"] = self._counter
        self._empty = len(self._state["buffer"])  # buffer position "past the end": no words buffered

    def fill(self, rows: np.ndarray, out: np.ndarray) -> None:
        """``out[r] =`` the first ``out.shape[1]`` words of row ``rows[r]`` (``out`` uint64, C-contiguous)."""
        n_words = out.shape[1]
        for r, row in enumerate(rows):
            self._counter[1] = row
            self._state["buffer_pos"] = self._empty
            self._bits.state = self._state
            out[r] = self._bits.random_raw(n_words)


def _philox4x64_rows(rows: np.ndarray, n_words: int, key: int) -> np.ndarray:
    """``(len(rows), n_words)`` uint64 words of version 3 (see :class:`_Philox4x64Rows`)."""
    out = np.empty((len(rows), n_words), dtype=np.uint64)
    _Philox4x64Rows(key).fill(rows, out)
    return out


#: Version 3 converts about this many pairs at a time (tiles of whole rows; the fastest of 2^12 .. 2^16
#: on a 2-core x86 machine with 1 thread).
V3_TILE_PAIRS = 1 << 15


def _randn_v3_numpy(rows: np.ndarray, numel: int, key: int) -> np.ndarray:
    """``(len(rows), numel)`` float32 normals of version 3, tile by tile (see the module docstring).

    Row ``r`` takes ``P = ceil(numel / 2)`` words, i.e. the 32-bit values ``v_0 .. v_2P-1`` (``v_2j`` the
    low half of word ``j``, ``v_2j+1`` its high half); pair ``p`` is ``(v_p, v_P+p)``: element ``p`` is
    ``r_p cos a_p`` and element ``P + p`` is ``r_p sin a_p``, with ``r_p = sqrt(-2 log((v_p + 1/2) 2^-32))``
    and ``a_p = v_P+p 2 pi 2^-32``, every step in float32 (each value rounded to float32 first).
    """
    n_pairs = -(-numel // 2)
    out = np.empty((len(rows), 2 * n_pairs), dtype=np.float32)
    rows_per_tile = max(1, min(len(rows), V3_TILE_PAIRS // n_pairs))
    words = np.empty((rows_per_tile, n_pairs), dtype=np.uint64)
    radius_buf = np.empty((rows_per_tile, n_pairs), dtype=np.float32)
    angle_buf = np.empty((rows_per_tile, n_pairs), dtype=np.float32)
    source = _Philox4x64Rows(key)
    for r0 in range(0, len(rows), rows_per_tile):
        r1 = min(len(rows), r0 + rows_per_tile)
        w, radius, angle = words[: r1 - r0], radius_buf[: r1 - r0], angle_buf[: r1 - r0]
        source.fill(rows[r0:r1], w)
        values = w.astype("<u8", copy=False).view("<u4")  # v_2j = low half of word j (a view, no copy)
        # each uint32 is rounded to float32 as it is read (one pass for the cast and the first op)
        np.add(values[:, :n_pairs], np.float32(0.5), out=radius, dtype=np.float32, casting="unsafe")
        np.multiply(radius, np.float32(2.0**-32), radius)  # u in (0, 1]: log(u) <= 0, never NaN
        np.log(radius, radius)
        np.multiply(radius, np.float32(-2.0), radius)
        np.sqrt(radius, radius)
        np.multiply(values[:, n_pairs:], _ANGLE32, out=angle, dtype=np.float32, casting="unsafe")
        cos_half, sin_half = out[r0:r1, :n_pairs], out[r0:r1, n_pairs:]
        np.cos(angle, cos_half)
        np.multiply(cos_half, radius, cos_half)
        np.sin(angle, angle)
        np.multiply(angle, radius, sin_half)
    return out[:, :numel]


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
        words = np.empty((n_rows, n_blocks, 2, 2), dtype=np.uint32)  # (row, block, pair, high/low word)
        for r0, r1, b0, b1, p, q in _philox_tiles(rows, n_blocks, key_words):
            tile = words[r0:r1, b0:b1].reshape(-1, 2, 2)
            for pair, packed in enumerate((p, q)):
                np.copyto(tile[:, pair, 1], packed, casting="unsafe")  # low word
                np.copyto(tile[:, pair, 0], packed >> _S32, casting="unsafe")  # high word
        return torch.from_numpy(words.reshape(n_rows, 4 * n_blocks)[:, :n_words].astype(np.int64))
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
    version: int = 1,
) -> Tensor:
    """``(len(indices), *shape)`` standard normals; row ``i`` depends only on (seed, stream, step, indices[i]).

    Device rule as :func:`keyed_bits`. ``version`` chooses the random stream (one of
    ``NORMAL_VERSIONS``, see the module docstring): 1 is Box-Muller in float64 rounded once to
    ``dtype``, 2 is Box-Muller in float32 (then cast to ``dtype``), the same words and pairs; 3 is float32
    Box-Muller on Philox4x64 words, drawn on the CPU and then moved to the device.
    """
    if version not in NORMAL_VERSIONS:
        raise ValueError(f"keyed_randn version must be one of {NORMAL_VERSIONS}; got {version!r}")
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if version == 3:
        idx = _index_tensor(indices, "cpu")  # drawn on the CPU (numpy's C Philox), then moved
        rows = idx.numpy().view(np.uint64)
        z = torch.from_numpy(_randn_v3_numpy(rows, numel, keyed_seed(seed, stream, step)))
        target = device if device is not None else (indices.device if isinstance(indices, Tensor) else "cpu")
        return z.to(device=target, dtype=dtype).reshape(len(idx), *shape)
    if version == 2:
        n_blocks = -(-numel // 4)
        idx = _index_tensor(indices, device)
        if idx.device.type == "cpu":
            key = keyed_seed(seed, stream, step)
            rows = idx.numpy().view(np.uint64)
            z = torch.from_numpy(_randn_v2_numpy(rows, n_blocks, (key & _MASK32, key >> 32)))
        else:
            z = _box_muller_float32(keyed_bits(4 * n_blocks, seed, stream, step, idx))
        return z[:, :numel].to(dtype).reshape(len(idx), *shape)
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


def _box_muller_float32(words: Tensor) -> Tensor:
    """Version-2 normals of ``(n, 2k)`` int64 words in torch ops (the GPU path), the float32 ops of
    :func:`_randn_v2_numpy` in the same order."""
    w = words.to(torch.float32).view(len(words), -1, 2)  # exact integers rounded to float32
    radius = w[..., 0].add(0.5).mul_(2.0**-32).log_().mul_(-2.0).sqrt_()
    angle = w[..., 1].mul(float(_ANGLE32))
    return torch.stack([angle.cos().mul_(radius), angle.sin().mul_(radius)], dim=-1).view(len(words), -1)


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
