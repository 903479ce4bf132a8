"""The global sample stream: independent of world size and workers, reshuffled per epoch, exact positions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sit_lightning.data.digits import DigitsSource, LabelledImages
from sit_lightning.data.stream import (
    GlobalBatchSampler,
    GlobalBatchStream,
    ResumableLoader,
    StreamPosition,
    per_device_batch_size,
)

N = 103  # not a multiple of the global batch: the remainder must be dropped
G = 12


def _global_batch(step: int, world_size: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Keys and indices of global step ``step``, concatenated over simulated ranks."""
    keys, indices = [], []
    for rank in range(world_size):
        ref = GlobalBatchSampler(N, G, rank=rank, world_size=world_size, seed=seed).batch(step)
        keys += ref.keys.tolist()
        indices += ref.indices.tolist()
    return keys, indices


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_global_batch_independent_of_world_size(world_size: int) -> None:
    for step in [0, 3, 8, 17, 25]:  # spans several epochs (8 steps per epoch)
        assert _global_batch(step, world_size) == _global_batch(step, 1)


def test_each_epoch_is_a_permutation_with_the_remainder_dropped() -> None:
    sampler = GlobalBatchSampler(N, G, seed=5)
    assert sampler.steps_per_epoch == N // G and sampler.samples_per_epoch == (N // G) * G
    for epoch in range(3):
        steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
        keys = np.concatenate([sampler.keys(s) for s in steps])
        indices = np.concatenate([sampler.batch(s).indices for s in steps])
        # keys are the positions in the run's sample stream, contiguous per epoch
        np.testing.assert_array_equal(keys, np.arange(epoch * 96, (epoch + 1) * 96))
        assert len(set(indices.tolist())) == len(indices)  # no sample twice in an epoch
        np.testing.assert_array_equal(indices, sampler.permutation(epoch)[:96])
        assert sorted(sampler.permutation(epoch).tolist()) == list(range(N))


def test_epochs_reshuffle_and_seed_matters() -> None:
    a, b = GlobalBatchSampler(N, G, seed=0), GlobalBatchSampler(N, G, seed=1)
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert not np.array_equal(a.permutation(0), b.permutation(0))
    np.testing.assert_array_equal(a.permutation(2), GlobalBatchSampler(N, G, seed=0).permutation(2))
    # validation order: the data set order
    np.testing.assert_array_equal(GlobalBatchSampler(N, G, shuffle=False).permutation(4), np.arange(N))


def test_step_of_key_inverts_keys() -> None:
    for world_size in (1, 2, 4):
        for rank in range(world_size):
            sampler = GlobalBatchSampler(N, G, rank=rank, world_size=world_size)
            for step in (0, 7, 8, 19):
                assert {sampler.step_of_key(k) for k in sampler.keys(step)} == {step}


def test_indivisible_batch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="global_batch_size=10 is not divisible by world_size=4"):
        per_device_batch_size(10, 4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 8)
    with pytest.raises(ValueError, match="rank=2 is outside"):
        GlobalBatchSampler(N, G, rank=2, world_size=2)


def _source() -> DigitsSource:
    x = torch.arange(N * 4, dtype=torch.float32).reshape(N, 1, 2, 2)
    return DigitsSource(LabelledImages(x, torch.arange(N) % 10))


def _stream_batches(num_workers: int, rank: int = 0, world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    sampler = GlobalBatchSampler(N, G, rank=rank, world_size=world_size, seed=3)
    stream = GlobalBatchStream(_source(), sampler, 2, 2 * sampler.steps_per_epoch + 1)
    return list(DataLoader(stream, batch_size=None, num_workers=num_workers))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_worker_count_does_not_change_batches() -> None:
    reference = _stream_batches(0)
    assert len(reference) == 15
    for batches in (_stream_batches(2), _stream_batches(3)):
        assert len(batches) == len(reference)
        for got, want in zip(batches, reference, strict=True):
            for name in ("x", "y", "key"):
                torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_ranks_with_workers_assemble_the_single_process_batches() -> None:
    reference = _stream_batches(0)
    per_rank = [_stream_batches(2, rank, 2) for rank in range(2)]
    for step, want in enumerate(reference):
        got = torch.cat([per_rank[r][step]["x"] for r in range(2)])
        torch.testing.assert_close(got, want["x"], rtol=0, atol=0)
        assert per_rank[1][step]["x"].shape[0] == G // 2


def test_resumable_loader_continues_where_consumption_stopped() -> None:
    sampler = GlobalBatchSampler(N, G, seed=3)
    position = StreamPosition()
    loader = ResumableLoader(
        GlobalBatchStream(_source(), sampler, 0, 0), position, num_workers=0, pin_memory=False
    )
    first = [b["key"] for b in loader]  # a whole pass moves the position to the next epoch
    assert len(first) == len(loader) == sampler.steps_per_epoch
    second = next(iter(loader))
    assert second["key"][0].item() == sampler.samples_per_epoch  # epoch 1, position 0
    position.observe(second["key"], sampler)  # consumed the first batch of epoch 1
    restored = StreamPosition()
    restored.load_state_dict(loader.state_dict())
    resumed = ResumableLoader(
        GlobalBatchStream(_source(), sampler, 0, 0), restored, num_workers=0, pin_memory=False
    )
    keys = [b["key"] for b in resumed]
    assert len(keys) == sampler.steps_per_epoch - 1
    assert keys[0][0].item() == sampler.samples_per_epoch + G
    with pytest.raises(ValueError, match="state version"):
        restored.load_state_dict({"next_step": 3})


def test_resume_with_another_batch_size_starts_the_next_epoch() -> None:
    old = GlobalBatchSampler(N, G)  # 8 steps per epoch
    saved = StreamPosition()
    saved.bind(old)
    saved.next_step = 11  # epoch 1, 3 steps in
    new = GlobalBatchSampler(N, 24)  # 4 steps per epoch
    restored = StreamPosition()
    restored.load_state_dict(saved.state_dict())  # before the loader exists, as Lightning does
    with pytest.warns(UserWarning, match="resumes at the start of epoch 2"):
        restored.bind(new)
    assert restored.next_step == 8 and new.keys(restored.next_step)[0] == 2 * new.samples_per_epoch
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loader loading the same state again does not warn twice
        restored.load_state_dict(saved.state_dict())
    assert restored.next_step == 8
    same = StreamPosition()
    same.load_state_dict(saved.state_dict())
    same.bind(GlobalBatchSampler(N, G, rank=1, world_size=4))  # another world size continues exactly
    assert same.next_step == 11
