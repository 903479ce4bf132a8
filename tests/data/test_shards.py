"""Latent shard format: round trip, atomic resumable writes, validation errors, normalisation, statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sit_lightning.data.shards import (
    SD_VAE_SCALE,
    LatentShards,
    LatentShardWriter,
    merge_shard_parts,
    validate_shards,
)

SHAPE = (4, 3, 2)  # (C, H, W), deliberately not square


def _moments(n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    mean, mean_flip = rng.normal(size=(2, n, *SHAPE)).astype(np.float32)
    std, std_flip = rng.uniform(0.1, 0.5, size=(2, n, *SHAPE)).astype(np.float32)
    labels = rng.integers(0, 3, size=n)
    return mean, std, mean_flip, std_flip, labels


def _write(path: Path, data: tuple[np.ndarray, ...], chunks: list[int], shard_size: int = 5) -> Path:
    writer = LatentShardWriter(
        path, SHAPE, shard_size=shard_size, vae_id="test-vae", class_names=["a", "b", "c"]
    )
    start = 0
    for c in chunks:
        writer.add(*(a[start : start + c] for a in data))
        start += c
    writer.close()
    return path


def test_round_trip_across_shard_boundaries(tmp_path: Path) -> None:
    data = _moments(12)
    _write(tmp_path, data, chunks=[3, 4, 5])  # shards of 5, 5, 2
    index = json.loads((tmp_path / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [5, 5, 2] and index["count"] == 12
    assert index["latent_shape"] == list(SHAPE) and index["scale_factor"] == SD_VAE_SCALE
    shards = LatentShards(tmp_path)
    assert len(shards) == 12 and shards.latent_shape == SHAPE and shards.num_classes == 3
    record = shards[7]
    for got, want in zip(record[:4], (a[7] for a in data[:4]), strict=True):
        np.testing.assert_array_equal(got, want)
    assert record.label == data[4][7]
    order = np.array([11, 0, 6, 5, 4, 10])  # unsorted, across all shards
    m = shards.moments(order)
    np.testing.assert_array_equal(m[:, 0, 0], data[0][order])  # [plain][mean]
    np.testing.assert_array_equal(m[:, 0, 1], data[1][order])  # [plain][std]
    np.testing.assert_array_equal(m[:, 1, 0], data[2][order])  # [flip][mean]
    np.testing.assert_array_equal(m[:, 1, 1], data[3][order])  # [flip][std]
    np.testing.assert_array_equal(shards.labels, data[4])


def test_interrupted_writer_resumes_after_last_complete_shard(tmp_path: Path) -> None:
    data = _moments(12)
    writer = LatentShardWriter(tmp_path, SHAPE, shard_size=5, vae_id="v", class_names=["a", "b", "c"])
    writer.add(*(a[:11] for a in data))  # two shards on disk, one sample buffered; then a "crash"
    del writer
    assert not (tmp_path / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="precompute-latents has not finished"):
        LatentShards(tmp_path)
    resumed = LatentShardWriter(tmp_path, SHAPE, shard_size=5, vae_id="v", class_names=["a", "b", "c"])
    assert resumed.num_written == 10
    resumed.add(*(a[10:] for a in data))
    resumed.close()
    shards = LatentShards(tmp_path)
    np.testing.assert_array_equal(shards.moments(np.arange(12))[:, 1, 1], data[3])
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileExistsError, match="already complete"):
        LatentShardWriter(tmp_path, SHAPE, shard_size=5, vae_id="v", class_names=["a", "b", "c"])


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    LatentShardWriter(tmp_path, SHAPE, shard_size=5, vae_id="v", class_names=["a"])
    with pytest.raises(ValueError, match="shard_size"):
        LatentShardWriter(tmp_path, SHAPE, shard_size=6, vae_id="v", class_names=["a"])


def test_missing_and_truncated_shards_are_named(tmp_path: Path) -> None:
    _write(tmp_path / "ok", _moments(12), chunks=[12])
    missing = tmp_path / "ok" / "moments-000001.npy"
    saved = missing.read_bytes()
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="moments-000001.npy is missing"):
        LatentShards(tmp_path / "ok")
    missing.write_bytes(saved[:-100])
    expected, found = len(saved), len(saved) - 100
    with pytest.raises(
        ValueError, match=f"moments-000001.npy is truncated.*expected {expected} bytes, found {found}"
    ):
        LatentShards(tmp_path / "ok")
    missing.write_bytes(saved)
    assert len(LatentShards(tmp_path / "ok")) == 12


def test_shape_mismatch_between_index_and_file(tmp_path: Path) -> None:
    _write(tmp_path, _moments(6), chunks=[6])
    index = json.loads((tmp_path / "index.json").read_text())
    index["latent_shape"] = [4, 2, 3]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index expects float32 \(5, 2, 2, 4, 2, 3\)"):
        LatentShards(tmp_path)


def test_normalisations_invert(tmp_path: Path) -> None:
    _write(tmp_path, _moments(6), chunks=[6])
    shards = LatentShards(tmp_path)
    z = torch.randn(3, *SHAPE, dtype=torch.float64)
    torch.testing.assert_close(shards.normalize(z), z * SD_VAE_SCALE)
    mean, std = [0.5, -1.0, 2.0, 0.0], [1.0, 2.0, 0.5, 4.0]
    merge_shard_parts(
        tmp_path / "merged", [tmp_path], normalization="channel", channel_mean=mean, channel_std=std
    )
    channel = LatentShards(tmp_path / "merged")
    want = (z - torch.tensor(mean, dtype=z.dtype).view(-1, 1, 1)) / torch.tensor(std, dtype=z.dtype).view(
        -1, 1, 1
    )
    torch.testing.assert_close(channel.normalize(z), want)
    torch.testing.assert_close(channel.denormalize(channel.normalize(z)), z)
    with pytest.raises(ValueError, match="normalization='gauss' is not one of"):
        merge_shard_parts(tmp_path / "merged", [tmp_path], normalization="gauss")  # type: ignore[arg-type]


def test_validation_statistics_are_those_of_posterior_samples(tmp_path: Path) -> None:
    data = _moments(40, seed=1)
    _write(tmp_path, data, chunks=[40], shard_size=16)
    report = validate_shards(tmp_path, chunk=7)
    assert report.count == 40
    # Monte Carlo: many posterior samples over both flips must have these per-channel moments
    rng = np.random.default_rng(2)
    mean = np.concatenate([data[0], data[2]]).astype(np.float64)
    std = np.concatenate([data[1], data[3]]).astype(np.float64)
    z = mean + std * rng.normal(size=(2000, *mean.shape))  # (2000, 80, C, H, W)
    np.testing.assert_allclose(report.channel_mean, z.mean(axis=(0, 1, 3, 4)), atol=2e-3)
    np.testing.assert_allclose(report.channel_std, z.std(axis=(0, 1, 3, 4)), rtol=2e-3)


def test_validation_rejects_non_finite_values(tmp_path: Path) -> None:
    data = _moments(10)
    data[2][6, 1, 0, 1] = np.nan
    _write(tmp_path, data, chunks=[10])
    with pytest.raises(ValueError, match="non-finite moments at image 6"):
        validate_shards(tmp_path, chunk=4)


def test_merged_parts_keep_order(tmp_path: Path) -> None:
    data = _moments(13)
    _write(tmp_path / "part-000", tuple(a[:6] for a in data), chunks=[6], shard_size=4)
    _write(tmp_path / "part-001", tuple(a[6:] for a in data), chunks=[7], shard_size=4)
    merge_shard_parts(tmp_path, [tmp_path / "part-000", tmp_path / "part-001"])
    shards = LatentShards(tmp_path)
    assert len(shards) == 13
    assert (
        json.loads((tmp_path / "index.json").read_text())["shards"][2]["moments"]
        == "part-001/moments-000000.npy"
    )
    np.testing.assert_array_equal(shards.moments(np.arange(13))[:, 0, 0], data[0])
    np.testing.assert_array_equal(shards.labels, data[4])
