"""Keyed draws: each row depends only on (seed, stream, step, its index), and has the right law."""

from __future__ import annotations

import math

import torch

from sit_lightning.randomness import keyed_rand, keyed_randn, keyed_seed


def test_rows_depend_only_on_their_own_key() -> None:
    full = keyed_randn((3, 4), seed=7, stream="noise", step=2, indices=range(10))
    subset = keyed_randn((3, 4), seed=7, stream="noise", step=2, indices=[8, 1, 5])
    assert torch.equal(subset, full[[8, 1, 5]])
    # any change of seed, stream or step changes the draw
    for other in (
        keyed_randn((3, 4), seed=8, stream="noise", step=2, indices=[8]),
        keyed_randn((3, 4), seed=7, stream="flip", step=2, indices=[8]),
        keyed_randn((3, 4), seed=7, stream="noise", step=3, indices=[8]),
    ):
        assert not torch.equal(other[0], full[8])
    assert keyed_seed(0, "a", 1, 2) != keyed_seed(0, "a", 2, 1)
    assert keyed_seed(0, "a", 1, 2) < 2**63


def test_laws_of_the_draws() -> None:
    n = 20_000
    z = keyed_randn((), seed=0, stream="z", step=0, indices=range(n), dtype=torch.float64)
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / n)
    u = keyed_rand((), seed=0, stream="u", step=0, indices=range(n), dtype=torch.float64)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 4 / math.sqrt(12 * n)
    assert keyed_rand((2,), 0, "u", 0, []).shape == (0, 2)
