"""The data workers' posterior noise: keyed normals of version 3 (float32 Box-Muller on Philox4x64 words),
and of version 2 (float32 Box-Muller on Philox4x32 words), which checkpoints made before version 3 resume.

Their law (moments, Kolmogorov-Smirnov, tails, independence across partners, pairs and keys), their keys
(same key, same bits, whatever the batch), version 3's words against a plain definition of Philox4x64-10
and its published known answers, version 2's numpy path against the torch path that other devices run,
its distance to version 1, and the version a resumed checkpoint carries. Statistical bounds are 5
standard errors (or the KS critical value at alpha = 0.001) on fixed seeds: deterministic, and a lost
word, a reused counter or a wrong Box-Muller fails them by a wide margin.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sit_lightning import randomness
from sit_lightning.data import LatentDataModule, LatentShardWriter
from sit_lightning.data.latent_datamodule import POSTERIOR_NORMALS_VERSION
from sit_lightning.errors import ConfigurationError
from sit_lightning.randomness import (
    _box_muller_float32,
    _keyed_bits_torch,
    keyed_bits,
    keyed_randn,
    keyed_seed,
)

M32 = 0xFFFFFFFF
ULP = torch.finfo(torch.float32).eps


def _v2(shape, seed, stream, step, indices, **kwargs) -> torch.Tensor:
    return keyed_randn(shape, seed, stream, step, indices, version=2, **kwargs)


def _v3(shape, seed, stream, step, indices, **kwargs) -> torch.Tensor:
    return keyed_randn(shape, seed, stream, step, indices, version=3, **kwargs)


def _ks_statistic(samples: np.ndarray) -> float:
    x = np.sort(samples)
    f = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - f).max(), (f - np.arange(n) / n).max()))


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.reshape(-1).double(), b.reshape(-1).double()]))[0, 1])


@pytest.mark.parametrize("version", [2, 3])
def test_float32_normals_follow_the_standard_normal_law(version: int) -> None:
    draw = {2: _v2, 3: _v3}[version]
    flat = draw((4, 8, 8), 0, "data.posterior", 0, range(1_000)).reshape(-1).double().numpy()
    n = flat.size  # 256,000
    assert np.isfinite(flat).all()
    assert _ks_statistic(flat[::4]) < 1.95 / math.sqrt(n // 4)
    assert abs(flat.mean()) < 5 / math.sqrt(n)
    assert abs(flat.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((flat**3).mean()) < 5 * math.sqrt(15 / n)
    assert abs((flat**4).mean() - 3) < 5 * math.sqrt(96 / n)
    for cut in (2.0, 3.0):  # the tails, where a float32 radius could lose mass
        p = math.erfc(cut / math.sqrt(2))
        assert abs(float((np.abs(flat) > cut).mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_version_2_normals_are_independent_across_partners_pairs_and_keys() -> None:
    n = 40_000
    bound = 5 / math.sqrt(n)
    z = _v2((8,), 0, "z", 0, range(n))
    assert abs(_correlation(z[:, 0], z[:, 1])) < bound  # cos and sin of one pair
    assert abs(_correlation(z[:, 0] ** 2, z[:, 1] ** 2)) < bound  # one radius, independent squares
    assert abs(_correlation(z[:, 1], z[:, 2])) < bound  # the two pairs of one block
    assert abs(_correlation(z[:, 3], z[:, 4])) < bound  # neighbouring blocks
    assert abs(_correlation(z[:-1, 0], z[1:, 0])) < bound  # neighbouring keys
    for other in (
        _v2((8,), 0, "z", 1, range(n)),
        _v2((8,), 0, "z2", 0, range(n)),
        _v2((8,), 1, "z", 0, range(n)),
    ):
        assert abs(_correlation(z, other)) < 5 / math.sqrt(z.numel())  # next step, other stream, seed


def test_a_key_draws_the_same_bits_whatever_its_batch() -> None:
    full = _v2((4, 6, 6), 7, "data.posterior", 0, range(40))
    assert torch.equal(_v2((4, 6, 6), 7, "data.posterior", 0, range(40)), full)  # same key, same bits
    picked = [31, 2, 17, 2, 39]
    assert torch.equal(_v2((4, 6, 6), 7, "data.posterior", 0, picked), full[picked])
    assert torch.equal(_v2((4, 6, 6), 7, "data.posterior", 0, torch.tensor(picked)), full[picked])
    # element j comes from block j // 4 only: a longer row extends a shorter one
    assert torch.equal(_v2((150,), 7, "data.posterior", 0, picked)[:, :144], full[picked].reshape(5, -1))
    assert not torch.equal(_v2((4, 6, 6), 8, "data.posterior", 0, picked), full[picked])


def test_tiles_do_not_change_words_or_normals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows spanning several tiles, several rows per tile and ragged last tiles give the same values."""
    indices = torch.tensor([0, 5, 2**32 + 3, 2**40, -1, -(2**33), 2**63 - 1])
    reference_bits = keyed_bits(4 * 37, 3, "s", 9, indices)
    reference = _v2((145,), 3, "s", 9, indices)
    for chunk in (1, 16, 50, 100):
        monkeypatch.setattr(randomness, "CPU_CHUNK", chunk)
        assert torch.equal(keyed_bits(4 * 37, 3, "s", 9, indices), reference_bits)
        assert torch.equal(_v2((145,), 3, "s", 9, indices), reference)


def test_the_numpy_path_equals_the_torch_path_of_other_devices() -> None:
    """Words bit for bit; normals within 4 float32 ulps of max(|z|, 1) (log, cos and sin of two libraries)."""
    indices = torch.arange(300) * 7919 + 2**33
    key = keyed_seed(5, "data.posterior", 0)
    words = _keyed_bits_torch(indices, 64, (key & M32, key >> 32))
    assert torch.equal(keyed_bits(256, 5, "data.posterior", 0, indices), words)
    numpy_path = _v2((256,), 5, "data.posterior", 0, indices)
    torch_path = _box_muller_float32(words)
    assert ((numpy_path - torch_path).abs() <= 4 * ULP * numpy_path.abs().clamp_min(1)).all()


def test_version_2_is_version_1_up_to_float32_rounding() -> None:
    v1 = keyed_randn((4, 16, 16), 2, "data.posterior", 0, range(200), dtype=torch.float64)
    v2 = _v2((4, 16, 16), 2, "data.posterior", 0, range(200), dtype=torch.float64)
    assert (v2 - v1).abs().max() < 2e-5
    assert not torch.equal(v2, v1.float().double())  # a different stream for exact reproduction
    with pytest.raises(ValueError, match=r"version must be one of \(1, 2, 3\); got 4"):
        keyed_randn((2,), 0, "z", 0, [1], version=4)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("latents")
    ones = np.ones((8, 4, 4, 4), np.float32)
    writer = LatentShardWriter(path, (4, 4, 4), shard_size=8, vae_id="test", class_names=["a", "b"])
    writer.add(ones, ones, -ones, ones, np.arange(8) % 2)
    writer.close()
    return path


def test_the_posterior_draws_version_3_and_a_resume_keeps_the_checkpoints_version(shard_dir: Path) -> None:
    def datamodule() -> LatentDataModule:
        return LatentDataModule(str(shard_dir), num_workers=0, pin_memory=False, global_batch_size=4, seed=3)

    def batch(dm: LatentDataModule) -> torch.Tensor:
        return dm.train_source().load(np.arange(8), keys)["x"]

    def expected(noise: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        mean = torch.where(flipped, -1.0, 1.0).view(-1, 1, 1, 1)  # std 1 either way
        return (mean + 1.0 * noise) * dm.train_source().shards.scale_factor

    keys = np.arange(100, 108)
    dm = datamodule()
    x = batch(dm)
    flipped = x.flatten(1).mean(1) < 0
    v1 = keyed_randn((4, 4, 4), 3, "data.posterior", 0, keys)
    v2 = _v2((4, 4, 4), 3, "data.posterior", 0, keys)
    v3 = _v3((4, 4, 4), 3, "data.posterior", 0, keys)
    assert torch.equal(x, expected(v3, flipped))
    assert not torch.equal(x, expected(v1, flipped)) and not torch.equal(x, expected(v2, flipped))
    assert POSTERIOR_NORMALS_VERSION == 3 and dm.state_dict()["posterior_normals_version"] == 3

    # a checkpoint of version 2 resumes with version 2; one from before the version was saved drew
    # version 1, and resumes with it
    old_state = {k: v for k, v in dm.state_dict().items() if k != "posterior_normals_version"}
    for state, version, noise in ((old_state, 1, v1), ({**old_state, "posterior_normals_version": 2}, 2, v2)):
        for setup_first in (True, False):
            resumed = datamodule()
            if setup_first:
                resumed.train_source()
            resumed.load_state_dict(state)
            assert torch.equal(batch(resumed), expected(noise, flipped))
            assert resumed.state_dict()["posterior_normals_version"] == version
    with pytest.raises(ConfigurationError, match=r"posterior noise version 9 is not one of \(1, 2, 3\)"):
        datamodule().load_state_dict({**old_state, "posterior_normals_version": 9})


# ------------------------------------------------------------------------------------------------ version 3

M64 = (1 << 64) - 1
#: Philox4x64-10 known-answer vectors of Random123 (kat_vectors): counter, key -> output.
PHILOX4X64_10_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B, 0x7E68B68AEC7BA23B)),
    (
        (M64, M64, M64, M64),
        (M64, M64),
        (0x87B092C3013FE90B, 0x438C3C67BE8D0224, 0x9CC7D7C69CD777B6, 0xA09CAEBF594F0BA0),
    ),
    (
        (0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89),
        (0x452821E638D01377, 0xBE5466CF34E90C6C),
        (0xA528F45403E61D95, 0x38C72DBD566E9788, 0xA5A1610E72FD18B5, 0x57BD43B5E52B7FE6),
    ),
]
V3_INDICES = [0, 5, 2**32 + 3, 2**40, -1, -(2**33), 2**63 - 1]


def _reference_words(index: int, n_words: int, key: int) -> list[int]:
    """Version 3's words of one row, from the plain definition: counters (block + 1, index, 0, 0), key (K, 0)."""
    words: list[int] = []
    block = 1
    while len(words) < n_words:
        words += randomness.philox4x64_reference((block, index & M64, 0, 0), (key, 0))
        block += 1
    return words[:n_words]


def test_the_philox4x64_reference_gives_the_published_known_answers() -> None:
    for counter, key, expected in PHILOX4X64_10_KAT:
        assert tuple(randomness.philox4x64_reference(counter, key)) == expected
    assert randomness.philox4x64_reference((0, 0, 0, 0), (0, 0), rounds=9) != list(PHILOX4X64_10_KAT[0][2])


def test_version_3_words_are_philox4x64_10_of_the_documented_counters() -> None:
    """numpy's C Philox, as the data workers run it, against the plain definition, word for word."""
    key = keyed_seed(5, "data.posterior", 0)
    rows = np.array(V3_INDICES, dtype=np.int64).view(np.uint64)
    for n_words in (1, 4, 9):  # part of a block, one block, a block and more
        words = randomness._philox4x64_rows(rows, n_words, key)
        assert words.dtype == np.uint64 and words.shape == (len(rows), n_words)
        for row, index in zip(words, V3_INDICES, strict=True):
            assert [int(w) for w in row] == _reference_words(index, n_words, key)


def _v3_from_reference(index: int, numel: int, key: int) -> np.ndarray:
    """Version 3's normals of one row in float64 from the reference words (float32-rounded values and angle
    step, as documented): what the float32 pipeline approximates."""
    n_pairs = -(-numel // 2)
    words = _reference_words(index, n_pairs, key)
    values = [v for w in words for v in (w & 0xFFFFFFFF, w >> 32)]  # v_2j low half, v_2j+1 high half
    rounded = np.array(values, dtype=np.float64).astype(np.float32).astype(np.float64)
    radius = np.sqrt(-2 * np.log((rounded[:n_pairs] + 0.5) * 2.0**-32))
    angle = rounded[n_pairs:] * float(randomness._ANGLE32)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:numel]


def test_version_3_normals_are_float32_box_muller_of_the_reference_words() -> None:
    """Radii from the first half of a row's 32-bit values, angles from the second; cosines first."""
    key = keyed_seed(2, "data.posterior", 7)
    for numel in (1, 7, 64, 301):
        z = _v3((numel,), 2, "data.posterior", 7, V3_INDICES).double().numpy()
        expected = np.stack([_v3_from_reference(i, numel, key) for i in V3_INDICES])
        assert z.shape == expected.shape
        # float32 rounding of u, log, the radius, the angle, cos and sin: a few ulps of max(|z|, 1)
        assert (np.abs(z - expected) <= 16 * float(ULP) * np.maximum(np.abs(expected), 1)).all()
        assert np.abs(z - expected).max() > 0 or numel == 1  # computed in float32, not copied from float64


def test_version_3_normals_are_independent_across_partners_halves_and_keys() -> None:
    n = 40_000
    bound = 5 / math.sqrt(n)
    z = _v3((8,), 0, "z", 0, range(n))  # P = 4: radii from v_0..v_3, angles from v_4..v_7
    assert abs(_correlation(z[:, 0], z[:, 4])) < bound  # cos and sin of one pair
    assert abs(_correlation(z[:, 0] ** 2, z[:, 4] ** 2)) < bound  # one radius, independent squares
    assert abs(_correlation(z[:, 0], z[:, 1])) < bound  # radii from the two halves of one word
    assert abs(_correlation(z[:, 0] ** 2, z[:, 2] ** 2)) < bound  # radii from neighbouring words
    assert abs(_correlation(z[:, 3], z[:, 7])) < bound  # the last pair
    assert abs(_correlation(z[:-1, 0], z[1:, 0])) < bound  # neighbouring keys
    for other in (
        _v3((8,), 0, "z", 1, range(n)),
        _v3((8,), 0, "z2", 0, range(n)),
        _v3((8,), 1, "z", 0, range(n)),
        _v2((8,), 0, "z", 0, range(n)),  # the same keys in version 2: other words
    ):
        assert abs(_correlation(z, other)) < 5 / math.sqrt(z.numel())


def test_version_3_a_key_draws_the_same_values_whatever_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    full = _v3((4, 6, 6), 7, "data.posterior", 0, range(40))
    assert full.shape == (40, 4, 6, 6) and full.dtype == torch.float32
    assert torch.equal(_v3((4, 6, 6), 7, "data.posterior", 0, range(40)), full)
    picked = [31, 2, 17, 2, 39]
    assert torch.equal(_v3((4, 6, 6), 7, "data.posterior", 0, picked), full[picked])
    assert torch.equal(_v3((4, 6, 6), 7, "data.posterior", 0, torch.tensor(picked)), full[picked])
    assert torch.equal(_v3((4, 6, 6), 7, "data.posterior", 0, np.array(picked)), full[picked])
    assert torch.equal(
        _v3((4, 6, 6), 7, "data.posterior", 0, picked, dtype=torch.float64), full[picked].double()
    )
    assert not torch.equal(_v3((4, 6, 6), 8, "data.posterior", 0, picked), full[picked])
    assert _v3((4, 6, 6), 7, "data.posterior", 0, []).shape == (0, 4, 6, 6)
    for pairs_per_tile in (1, 18, 50, 100_000):  # a row per tile, rows split unevenly, all in one tile
        monkeypatch.setattr(randomness, "V3_TILE_PAIRS", pairs_per_tile)
        assert torch.equal(_v3((4, 6, 6), 7, "data.posterior", 0, range(40)), full)


def test_torch_cpu_generators_keep_only_32_bits_of_a_seed() -> None:
    """Why version 3 is not one seeded torch.Generator per sample: 2^32 streams for ~10^8 keys collide."""
    a = torch.randn(8, generator=torch.Generator().manual_seed(12345))
    assert torch.equal(a, torch.randn(8, generator=torch.Generator().manual_seed(12345 + 2**32)))


# ------------------------------------------------------------------------------------------- the data path


@pytest.mark.parametrize("normalization", ["scale", "channel"])
@pytest.mark.parametrize("sample_posterior", [True, False])
def test_a_batch_is_the_posterior_formula_of_the_drawn_flip_bit_for_bit(
    tmp_path: Path, normalization: str, sample_posterior: bool
) -> None:
    """load() reads only the drawn flip's moments and works in place: the same values as mean + std * noise
    of the full moments, then normalize, computed the plain way; the batch is its own contiguous memory."""
    rng = np.random.default_rng(0)
    shape = (3, 4, 4)
    means = rng.standard_normal((2, 37, *shape), dtype=np.float32)
    stds = rng.uniform(0.05, 0.5, (2, 37, *shape)).astype(np.float32)
    stats = (
        {"channel_mean": [0.3, -0.2, 0.1], "channel_std": [1.5, 0.7, 2.0]}
        if normalization == "channel"
        else {}
    )
    writer = LatentShardWriter(
        tmp_path, shape, shard_size=10, vae_id="t", class_names=["a"], normalization=normalization, **stats
    )
    writer.add(means[0], stds[0], means[1], stds[1], np.zeros(37, np.int64))
    writer.close()
    dm = LatentDataModule(
        str(tmp_path),
        num_workers=0,
        pin_memory=False,
        global_batch_size=4,
        seed=11,
        sample_posterior=sample_posterior,
    )
    source = dm.train_source()
    rows = np.array([36, 3, 17, 3, 25, 0, 9, 30])  # across shards, out of order, a repeat
    keys = np.arange(500, 508)
    x = source.load(rows, keys)["x"]

    full = torch.from_numpy(source.shards.moments(rows))  # (b, 2 flips, 2, C, H, W)
    flipped = randomness.keyed_rand((), 11, "data.flip", 0, keys) < 0.5
    assert 0 < int(flipped.sum()) < len(rows)  # both flips drawn
    chosen = full[torch.arange(len(rows)), flipped.long()]
    assert torch.equal(torch.from_numpy(source.shards.moments(rows, flips=flipped.numpy())), chosen)
    mean, std = chosen[:, 0], chosen[:, 1]
    z = mean + std * _v3(shape, 11, "data.posterior", 0, keys) if sample_posterior else mean
    assert torch.equal(x, source.shards.normalize(z))
    assert x.is_contiguous() and x.dtype == torch.float32 and x.shape == (len(rows), *shape)
    assert x.untyped_storage().nbytes() == x.numel() * 4  # no other buffer behind it
    with pytest.raises(ValueError, match="one bool per index: 2 for 8 indices"):
        source.shards.moments(rows, flips=[True, False])
