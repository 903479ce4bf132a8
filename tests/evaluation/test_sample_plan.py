"""Keyed evaluation samples: independent of batch size and world size; labels; image grids."""

from __future__ import annotations

import pytest
import torch

from sit_lightning.evaluation.images import image_grid, to_uint8
from sit_lightning.evaluation.sample_plan import generate, rank_share, sample_labels
from sit_lightning.models import SiTConfig
from sit_lightning.module import SiTModule
from tiny_digits import DIGITS_ARCH


@pytest.fixture(scope="module")
def tiny_module() -> SiTModule:
    module = SiTModule(arch=SiTConfig(**DIGITS_ARCH))
    # the final layer starts at zero (a constant field); give it weights so samples differ per label
    with torch.no_grad():
        for p in module.network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return module


def test_samples_do_not_depend_on_batch_size(tiny_module):
    indices = torch.arange(3, 19)  # 16 samples, not starting at 0
    labels = sample_labels(indices, 10, "balanced", seed=0)
    kw = dict(seed=5, steps=3, method="euler")
    by7 = generate(tiny_module.sample, indices, labels, batch_size=7, **kw)
    by16 = generate(tiny_module.sample, indices, labels, batch_size=16, **kw)
    torch.testing.assert_close(by7, by16, rtol=1e-5, atol=1e-6)
    # a subset keeps its samples: sample i is a function of (seed, i) only
    subset = generate(tiny_module.sample, indices[5:9], labels[5:9], batch_size=2, **kw)
    torch.testing.assert_close(subset, by16[5:9], rtol=1e-5, atol=1e-6)
    # and another seed gives other samples
    other = generate(tiny_module.sample, indices, labels, batch_size=16, seed=6, steps=3, method="euler")
    assert (other - by16).abs().max() > 1e-2


def test_rank_shares_cover_every_index_once_with_equal_lengths():
    total, world = 23, 4
    shares = [rank_share(total, r, world) for r in range(world)]
    assert len({len(s.indices) for s in shares}) == 1  # same batch count on every rank (FSDP)
    valid = torch.cat([s.indices[s.valid] for s in shares])
    assert sorted(valid.tolist()) == list(range(total))
    with pytest.raises(ValueError, match="rank"):
        rank_share(10, 4, 4)


def test_labels_balanced_and_uniform():
    balanced = sample_labels(torch.arange(2000), 10, "balanced", seed=0)
    assert torch.bincount(balanced).tolist() == [200] * 10
    uniform = sample_labels(torch.arange(2000), 10, "uniform", seed=0)
    counts = torch.bincount(uniform, minlength=10)
    assert counts.min() > 140 and counts.max() < 260  # ~200 +- 4 sigma
    # keyed: a label depends on its index, not on which other indices are drawn with it
    assert sample_labels(torch.arange(5, 9), 10, "uniform", seed=0).tolist() == uniform[5:9].tolist()
    assert not torch.equal(sample_labels(torch.arange(2000), 10, "uniform", seed=1), uniform)
    with pytest.raises(ValueError, match="balanced"):
        sample_labels([0], 10, "balnced", seed=0)


def test_grid_layout_and_pixel_mapping():
    images = torch.arange(5 * 2 * 3 * 3).reshape(5, 2, 3, 3)
    grid = image_grid(images, nrow=2, padding=1)
    assert grid.shape == (2, 3 * 4 + 1, 2 * 4 + 1)
    for i in range(5):
        top, left = 1 + (i // 2) * 4, 1 + (i % 2) * 4
        assert torch.equal(grid[:, top : top + 3, left : left + 3], images[i])
    assert (grid[:, 9:12, 5:8] == 0).all()  # the unused last cell stays padding
    pixels = to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]))
    assert pixels.tolist() == [0, 0, 128, 255, 255]
