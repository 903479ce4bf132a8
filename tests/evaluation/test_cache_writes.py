"""Cache files written by several processes at once (DDP ranks) never crash a writer or tear a file."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import torch

from sit_lightning.evaluation.fid import feature_statistics, load_statistics, save_statistics


def _hammer(path: str, rounds: int) -> None:
    stats = feature_statistics(torch.arange(12.0, dtype=torch.float64).reshape(4, 3))
    for _ in range(rounds):
        save_statistics(stats, path)


def test_concurrent_writers_of_one_cache_file(tmp_path: Path) -> None:
    path = tmp_path / "fid_stats-shared.pt"
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_hammer, args=(str(path), 200)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    expected = feature_statistics(torch.arange(12.0, dtype=torch.float64).reshape(4, 3))
    assert torch.equal(load_statistics(path).feature_sum, expected.feature_sum)
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"
