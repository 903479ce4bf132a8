"""FID: torchmetrics wiring and our cached statistics against an independent scipy computation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from sit_lightning.evaluation.fid import (
    FeatureStatistics,
    FIDScorer,
    feature_statistics,
    frechet_distance,
    load_statistics,
    make_fid_metric,
    save_statistics,
)

DIM = 4  # images (N, 1, 2, 2) whose flattened pixels are the features


class FlattenFeatures(nn.Module):
    """The identity feature map (features = pixels), so the feature Gaussians are known exactly."""

    num_features = DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double()


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The closed-form Frechet distance of the two sample Gaussians, computed with scipy's sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.fixture()
def sets() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    real = (torch.randn(600, DIM, generator=g, dtype=torch.float64) @ mix).reshape(-1, 1, 2, 2)
    # shifted, rescaled and rotated: every term of the FID formula is non-zero
    fake = (torch.randn(500, DIM, generator=g, dtype=torch.float64) @ (0.7 * mix.T) + 0.5).reshape(
        -1, 1, 2, 2
    )
    return real, fake


def test_fid_of_a_set_against_itself_is_zero(sets):
    real, _ = sets
    scorer = FIDScorer(FlattenFeatures(), feature_statistics(real.flatten(1)))
    scorer.update(real)
    assert abs(scorer.compute()) < 1e-6


def test_fid_equals_closed_form_frechet_distance(sets):
    real, fake = sets
    expected = scipy_frechet(real.flatten(1).numpy(), fake.flatten(1).numpy())
    assert expected > 1.0  # the test is not vacuous
    scorer = FIDScorer(FlattenFeatures(), FIDScorer.statistics_of(FlattenFeatures(), real))
    # in two updates: the metric accumulates across batches
    scorer.update(fake[:200])
    scorer.update(fake[200:])
    assert scorer.compute() == pytest.approx(expected, rel=1e-6)
    # the floor's path (statistics only, no torchmetrics) gives the same number
    got = frechet_distance(feature_statistics(fake.flatten(1)), feature_statistics(real.flatten(1)))
    assert got == pytest.approx(expected, rel=1e-6)
    # reset forgets the generated set but keeps the reference
    scorer.reset()
    scorer.update(real)
    assert abs(scorer.compute()) < 1e-6


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_statistics_round_trip(tmp_path, sets, suffix):
    real, _ = sets
    stats = feature_statistics(real.flatten(1))
    loaded = load_statistics(save_statistics(stats, tmp_path / f"ref{suffix}"))
    assert loaded.num_samples == stats.num_samples
    torch.testing.assert_close(loaded.mean, stats.mean)
    torch.testing.assert_close(loaded.covariance, stats.covariance)
    np.testing.assert_allclose(
        stats.covariance.numpy(), np.cov(real.flatten(1).numpy(), rowvar=False), rtol=1e-10
    )


def test_adm_npz_without_count_loads_mean_and_covariance(tmp_path):
    mu, sigma = np.arange(3.0), np.diag([1.0, 2.0, 3.0])
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=mu, sigma=sigma)
    stats = load_statistics(tmp_path / "VIRTUAL_ref.npz")
    np.testing.assert_allclose(stats.mean.numpy(), mu)
    np.testing.assert_allclose(stats.covariance.numpy(), sigma, atol=1e-9)


def test_reference_statistics_are_cached_per_data(tmp_path, sets):
    real, fake = sets
    first = FIDScorer.cached_statistics(FlattenFeatures(), real, tmp_path, "toy")
    files = list(tmp_path.glob("fid_stats-toy-*.pt"))
    assert len(files) == 1
    # the second call reads the file: corrupt it and see the corrupted numbers come back
    stored = torch.load(files[0], weights_only=True)
    stored["num_samples"] = 7
    torch.save(stored, files[0])
    assert FIDScorer.cached_statistics(FlattenFeatures(), real, tmp_path, "toy").num_samples == 7
    assert first.num_samples == len(real)
    # other images -> another key, not the stale file
    other = FIDScorer.cached_statistics(FlattenFeatures(), fake, tmp_path, "toy")
    assert other.num_samples == len(fake)
    assert len(list(tmp_path.glob("fid_stats-toy-*.pt"))) == 2


def test_from_mean_cov_reproduces_the_moments():
    mean, cov = (
        torch.tensor([1.0, -2.0], dtype=torch.float64),
        torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64),
    )
    stats = FeatureStatistics.from_mean_cov(mean, cov, 10)
    torch.testing.assert_close(stats.mean, mean)
    torch.testing.assert_close(stats.covariance, cov)


def test_custom_extractor_needs_num_features():
    with pytest.raises(ValueError, match="num_features"):
        make_fid_metric(nn.Flatten())
    with pytest.raises(ValueError, match="inception"):
        make_fid_metric("incpetion")


def test_inception_without_torch_fidelity_names_the_extra():
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed: the missing-extra message cannot be triggered")
    with pytest.raises(ImportError, match=r"sit-lightning\[fid\]"):
        make_fid_metric("inception")


class DeviceProbe(nn.Module):
    """An extractor whose weight sits on another device ("meta" stands in for a GPU on a CPU machine):
    it records the device of every input and returns fixed CPU features or logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.num_features = width
        self.weight = nn.Parameter(torch.empty(width, device="meta"))
        self.seen: list[torch.device] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.device)
        n = x.shape[0]
        return torch.arange(n * self.num_features, dtype=torch.float64).reshape(n, -1) % 7


def test_statistics_and_accuracy_send_each_batch_to_the_extractors_device():
    # Found on an H100: the floor statistics of the CPU train split went into a GPU extractor.
    from sit_lightning.callbacks.fid import conditional_accuracy

    images = torch.zeros(10, 1, 2, 2)
    probe = DeviceProbe(DIM)
    stats = FIDScorer.statistics_of(probe, images, batch_size=4)
    assert probe.seen == [torch.device("meta")] * 3
    rows = [i for n in (4, 4, 2) for i in range(n)]  # row index within each batch of 4
    expected = feature_statistics(
        torch.stack([torch.arange(DIM * i, DIM * i + DIM) % 7 for i in rows]).double()
    )
    torch.testing.assert_close(stats.mean, expected.mean)
    torch.testing.assert_close(stats.covariance, expected.covariance)

    judge = DeviceProbe(3)  # logits of row i (within its batch) = (3i, 3i+1, 3i+2) % 7: argmax is known
    labels = torch.tensor([int(torch.arange(3 * i, 3 * i + 3).remainder(7).argmax()) for i in rows])
    labels[:3] = (labels[:3] + 1) % 3  # three wrong
    assert conditional_accuracy(judge, images, labels, batch_size=4) == pytest.approx(0.7)
    assert judge.seen == [torch.device("meta")] * 3
