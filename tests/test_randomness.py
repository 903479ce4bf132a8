"""Keyed draws: Philox4x32-10 bit for bit, rows keyed only by (seed, stream, step, index), and their laws.

The statistical checks use bounds of 5 standard errors (or the matching Kolmogorov-Smirnov critical
value) on a fixed seed: they are deterministic, and a broken generator (a lost word, a reused
counter, a wrong Box-Muller) fails them by a wide margin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sit_lightning.randomness import (
    _keyed_bits_torch,
    _philox4x32_numpy,
    keyed_bits,
    keyed_rand,
    keyed_randn,
    keyed_seed,
    philox4x32,
)

# Random123's known-answer vectors for Philox4x32-10 (tests/kat_vectors of the Random123 release):
# counter words, key words, output words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
M32 = 0xFFFFFFFF


def philox_python(counter, key, rounds=10):
    """Philox4x32 on Python integers, written from the paper's round function (the test's reference)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0), p1 & M32, ((p0 >> 32) ^ c3 ^ k1), p0 & M32
    return c0, c1, c2, c3


def _words(*values: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor([v], dtype=torch.int64) for v in values)


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT)
def test_philox_matches_the_random123_known_answers(counter, key, expected) -> None:
    assert tuple(int(w) for w in philox4x32(_words(*counter), key)) == expected
    assert philox_python(counter, key) == expected


def test_philox_matches_the_reference_on_random_counters_and_keys() -> None:
    """Vectorised int64 arithmetic (16-bit split products) against Python's exact integers."""
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(300, 4), dtype=np.int64)
    key = tuple(int(k) for k in rng.integers(0, 2**32, size=2))
    out = philox4x32(tuple(torch.from_numpy(counters[:, j].copy()) for j in range(4)), key)
    got = torch.stack(out, dim=1).tolist()
    assert got == [list(philox_python(tuple(int(c) for c in row), key)) for row in counters]


def test_keyed_bits_are_philox_of_the_documented_counter() -> None:
    key = keyed_seed(3, "s", 9)
    index = 2**32 + 7  # both halves of a 64-bit index are used
    bits = keyed_bits(10, 3, "s", 9, [index])[0].tolist()
    blocks = [philox_python((b, index & M32, index >> 32, 0), (key & M32, key >> 32)) for b in range(3)]
    assert bits == [w for block in blocks for w in block][:10]


def test_the_host_and_device_paths_give_the_same_words() -> None:
    """The CPU draws use numpy uint64 arithmetic, other devices int64 torch ops: the same words."""
    indices = torch.tensor([0, 1, 7, 2**32 + 3, 2**40, -1, -(2**33)])
    key = keyed_seed(11, "paths", 4)
    for n_words in (1, 4, 9, 64):
        n_blocks = -(-n_words // 4)
        host = keyed_bits(n_words, 11, "paths", 4, indices)
        device_path = _keyed_bits_torch(indices, n_blocks, (key & M32, key >> 32))[:, :n_words]
        assert torch.equal(host, device_path)
    rng = np.random.default_rng(1)
    counters = rng.integers(0, 2**32, size=(500, 4), dtype=np.uint64)
    words = np.empty_like(counters)
    _philox4x32_numpy(counters, (123, 456), words)
    torch_words = philox4x32(
        tuple(torch.from_numpy(counters[:, j].astype(np.int64)) for j in range(4)), (123, 456)
    )
    assert np.array_equal(words.astype(np.int64), torch.stack(torch_words, dim=1).numpy())


def test_rows_depend_only_on_their_own_key() -> None:
    full = keyed_randn((3, 4), seed=7, stream="noise", step=2, indices=range(10))
    subset = keyed_randn((3, 4), seed=7, stream="noise", step=2, indices=[8, 1, 5])
    assert torch.equal(subset, full[[8, 1, 5]])
    # a tensor, a numpy array and a list of the same indices give the same draw
    assert torch.equal(keyed_randn((3, 4), 7, "noise", 2, torch.tensor([8, 1, 5])), subset)
    assert torch.equal(keyed_randn((3, 4), 7, "noise", 2, np.array([8, 1, 5])), subset)
    # any change of seed, stream or step changes the draw
    for other in (
        keyed_randn((3, 4), seed=8, stream="noise", step=2, indices=[8]),
        keyed_randn((3, 4), seed=7, stream="flip", step=2, indices=[8]),
        keyed_randn((3, 4), seed=7, stream="noise", step=3, indices=[8]),
    ):
        assert not torch.equal(other[0], full[8])
    assert keyed_seed(0, "a", 1, 2) != keyed_seed(0, "a", 2, 1)
    assert keyed_seed(0, "a", 1, 2) < 2**63


def test_large_and_negative_indices_are_distinct_keys() -> None:
    indices = [5, 5 + 2**32, 2**40 + 5, -5, -1, 2**63 - 1]
    rows = keyed_bits(8, 0, "k", 0, indices)
    assert len({tuple(r) for r in rows.tolist()}) == len(indices)


def test_a_longer_draw_extends_a_shorter_one() -> None:
    """Element j of a row does not depend on the row's length (so shapes can grow without reshuffling)."""
    short = keyed_randn((5,), 1, "z", 0, [3, 4])
    long = keyed_randn((2, 4), 1, "z", 0, [3, 4]).reshape(2, -1)
    assert torch.equal(long[:, :5], short)
    assert torch.equal(keyed_rand((3,), 1, "u", 0, [3]), keyed_rand((7,), 1, "u", 0, [3])[:, :3])


def test_shapes_dtypes_and_bad_indices() -> None:
    assert keyed_rand((2,), 0, "u", 0, []).shape == (0, 2)
    assert keyed_randn((), 0, "u", 0, [1, 2]).shape == (2,)
    assert keyed_randn((2, 3), 0, "u", 0, [1], dtype=torch.float64).dtype == torch.float64
    z64 = keyed_randn((4,), 0, "z", 0, [1], dtype=torch.float64)
    assert torch.equal(keyed_randn((4,), 0, "z", 0, [1]), z64.float())  # one rounding, from float64
    u = keyed_rand((1000,), 0, "u", 0, [1])
    assert torch.equal(u, torch.round(u * 2**24) / 2**24)  # exact multiples of 2^-24
    with pytest.raises(TypeError, match="integer sample indices.*float32"):
        keyed_randn((2,), 0, "z", 0, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="integer sample indices"):
        keyed_rand((2,), 0, "z", 0, [0.5])


def test_draws_are_made_on_the_device_of_the_indices_without_a_host_round_trip() -> None:
    """On the meta device nothing can be copied to the host: a per-sample Python loop would fail."""
    keys = torch.arange(16, device="meta")
    assert keyed_randn((4, 8, 8), 0, "z", 3, keys).device.type == "meta"
    assert keyed_rand((), 0, "u", 3, keys).device.type == "meta"
    assert keyed_randn((2,), 0, "z", 3, [1, 2], device="meta").device.type == "meta"


def _ks_statistic(samples: np.ndarray, cdf) -> float:
    x = np.sort(samples)
    f = cdf(x)
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - f).max(), (f - np.arange(n) / n).max()))


def _ks_bound(n: int) -> float:
    return 1.95 / math.sqrt(n)  # Kolmogorov critical value at alpha = 0.001


def test_uniforms_are_uniform_with_balanced_bits() -> None:
    n_rows, n_cols = 2_000, 100
    u = keyed_rand((n_cols,), seed=0, stream="u", step=0, indices=range(n_rows), dtype=torch.float64)
    flat = u.reshape(-1).numpy()
    n = flat.size
    assert flat.min() >= 0 and flat.max() < 1
    assert _ks_statistic(flat, lambda x: x) < _ks_bound(n)
    assert abs(flat.mean() - 0.5) < 5 / math.sqrt(12 * n)
    # every one of the 32 bits of a word is a fair coin
    bits = keyed_bits(64, 0, "bits", 0, range(4_000)).reshape(-1)
    shares = torch.stack([((bits >> b) & 1).double().mean() for b in range(32)])
    assert (shares - 0.5).abs().max() < 5 * 0.5 / math.sqrt(bits.numel())


def test_normals_follow_the_standard_normal_law() -> None:
    z = keyed_randn((50,), seed=0, stream="z", step=0, indices=range(4_000), dtype=torch.float64)
    flat = z.reshape(-1).numpy()
    n = flat.size
    phi = np.vectorize(lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2))))
    assert _ks_statistic(flat, phi) < _ks_bound(n)
    assert abs(flat.mean()) < 5 / math.sqrt(n)
    assert abs(flat.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((flat**3).mean()) < 5 * math.sqrt(15 / n)  # skewness 0, variance of z^3 is 15
    assert abs((flat**4).mean() - 3) < 5 * math.sqrt(96 / n)  # kurtosis 3, variance of z^4 is 96
    tail = float((np.abs(flat) > 3).mean())
    p = math.erfc(3 / math.sqrt(2))
    assert abs(tail - p) < 5 * math.sqrt(p * (1 - p) / n)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])


def test_neighbouring_draws_are_uncorrelated() -> None:
    """Adjacent elements (Box-Muller partners), indices, steps, streams and seeds are independent."""
    n = 40_000
    bound = 5 / math.sqrt(n)
    z = keyed_randn((4,), 0, "z", 0, range(n), dtype=torch.float64)
    assert abs(_correlation(z[:, 0], z[:, 1])) < bound  # cos and sin of one pair
    assert abs(_correlation(z[:, 0] ** 2, z[:, 1] ** 2)) < bound  # one radius, independent squares
    assert abs(_correlation(z[:, 1], z[:, 2])) < bound  # across pairs of one block
    assert abs(_correlation(z[:-1, 0], z[1:, 0])) < bound  # neighbouring indices
    others = [
        keyed_randn((4,), 0, "z", 1, range(n), dtype=torch.float64),  # next step
        keyed_randn((4,), 0, "z2", 0, range(n), dtype=torch.float64),  # other stream
        keyed_randn((4,), 1, "z", 0, range(n), dtype=torch.float64),  # other seed
    ]
    for other in others:
        assert abs(_correlation(z, other)) < 5 / math.sqrt(z.numel())
    # uniforms of one word each, paired over 2-D cells: a chi-square test of joint uniformity
    u = keyed_rand((2,), 0, "pairs", 0, range(n), dtype=torch.float64)
    cells = torch.bincount((u[:, 0] * 10).long() * 10 + (u[:, 1] * 10).long(), minlength=100).double()
    chi2 = float(((cells - n / 100) ** 2 / (n / 100)).sum())
    assert chi2 < 99 + 5 * math.sqrt(2 * 99)  # 99 degrees of freedom


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_the_cpu_draws() -> None:
    keys = torch.arange(1000) * 7919
    assert torch.equal(keyed_bits(37, 5, "s", 2, keys.cuda()).cpu(), keyed_bits(37, 5, "s", 2, keys))
    assert torch.equal(keyed_rand((37,), 5, "s", 2, keys.cuda()).cpu(), keyed_rand((37,), 5, "s", 2, keys))
    z_gpu = keyed_randn((37,), 5, "s", 2, keys.cuda()).cpu()
    z_cpu = keyed_randn((37,), 5, "s", 2, keys)
    ulp = torch.finfo(torch.float32).eps * z_cpu.abs().clamp_min(1)
    assert ((z_gpu - z_cpu).abs() <= ulp).all()
