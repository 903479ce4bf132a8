"""Post-hoc EMA math (sit_lightning.posthoc_ema, EDM2 Sec. 3 / App. C): closed forms against sums, the
synthesis against EMAs tracked directly, and the snapshot files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sit_lightning.posthoc_ema import (
    MAX_SIGMA_REL,
    ShardPlace,
    gamma_to_sigma_rel,
    list_snapshots,
    power_ema_beta,
    profile_fit_error,
    profile_inner_products,
    save_snapshot,
    save_snapshot_shard,
    shard_name,
    sigma_rel_to_gamma,
    synthesis_coefficients,
    synthesize,
)

TRACKED = (0.05, 0.10)
TOY_STEPS = 1000
TOY_EVERY = 50  # 20 snapshots per track
TOY_DIM = 16


def test_gamma_and_sigma_rel_round_trip_on_the_cubic() -> None:
    for sigma_rel in (0.01, 0.05, 0.07, 0.10, 0.2, 0.28, MAX_SIGMA_REL):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma >= 0.0
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
        q = sigma_rel**-2  # the cubic of EDM2 Eq. 126
        assert gamma**3 + 7 * gamma**2 + (16 - q) * gamma + (12 - q) == pytest.approx(
            0.0, abs=1e-7 * q * gamma
        )
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # the values EDM2 trains with
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-9)  # the uniform average
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            sigma_rel_to_gamma(bad)


def test_the_beta_schedule_is_exactly_the_profile_integrated_over_each_step() -> None:
    """ema_t = sum_k w_k theta_k with w_k = (k^(g+1) - (k-1)^(g+1)) / t^(g+1): no approximation to correct."""
    gamma, t = sigma_rel_to_gamma(0.07), 60
    weights = np.zeros(t)
    for step in range(1, t + 1):  # the update rule applied to one-hot weights
        beta = power_ema_beta(step, gamma)
        weights *= beta
        weights[step - 1] += 1.0 - beta
    k = np.arange(1, t + 1, dtype=np.float64)
    np.testing.assert_allclose(
        weights, (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1), rtol=1e-12
    )
    assert power_ema_beta(1, gamma) == 0.0


def test_inner_products_match_quadrature() -> None:
    def profile(tau: np.ndarray, t: float, gamma: float) -> np.ndarray:
        return (gamma + 1) * tau**gamma / t ** (gamma + 1)

    cases = [(300.0, 0.05, 1000.0, 0.10), (1000.0, 0.05, 300.0, 0.10), (700.0, 0.07, 700.0, 0.2)]
    for t_a, s_a, t_b, s_b in cases:
        g_a, g_b = sigma_rel_to_gamma(s_a), sigma_rel_to_gamma(s_b)
        closed = profile_inner_products([t_a], [g_a], [t_b], [g_b])[0, 0]
        tau = np.linspace(0.0, min(t_a, t_b), 1_000_001)  # the product is 0 beyond the shorter profile
        numeric = np.trapezoid(profile(tau, t_a, g_a) * profile(tau, t_b, g_b), tau)
        assert closed == pytest.approx(numeric, rel=1e-5)


def _snapshot_grid(last: int, every: int) -> tuple[list[int], list[float]]:
    steps = list(range(every, last + 1, every))
    return [s for s in steps for _ in TRACKED], [sigma for _ in steps for sigma in TRACKED]


@pytest.mark.parametrize("target_step", [TOY_STEPS, TOY_STEPS // 2])
def test_coefficients_select_a_tracked_profile(target_step: int) -> None:
    steps, sigmas = _snapshot_grid(target_step, target_step // 20)  # 20 snapshots of each track
    for tracked in TRACKED:
        x = synthesis_coefficients(steps, sigmas, target_step, tracked)
        selected = np.array(
            [float(t == target_step and s == tracked) for t, s in zip(steps, sigmas, strict=True)]
        )
        assert np.abs(x - selected).max() < 1e-6
        assert profile_fit_error(steps, sigmas, x, target_step, tracked) < 1e-6


def _toy_path(step: int) -> torch.Tensor:
    """A known weight trajectory: drifts, oscillations and a plateau, different per coordinate."""
    u = step / TOY_STEPS
    i = torch.arange(TOY_DIM, dtype=torch.float64)
    return torch.sin(2 * math.pi * (1 + i / 4) * u + i) + (i - 7) * u**2 + math.exp(-10 * u) * i / 8


def _track(sigma_rel: float, every: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The power EMA of the toy path tracked with the training update (float64), and its snapshots."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    ema = torch.zeros(TOY_DIM, dtype=torch.float64)
    snapshots = {}
    for step in range(1, TOY_STEPS + 1):
        ema.lerp_(_toy_path(step), 1.0 - power_ema_beta(step, gamma))
        if every and step % every == 0:
            snapshots[step] = ema.clone()
    return ema, snapshots


def test_synthesised_ema_matches_a_directly_tracked_one(tmp_path: Path) -> None:
    """Snapshot files of the 0.05 and 0.10 tracks -> the EMA of 0.07 within 5% of ||EMA(0.05) - EMA(0.10)||."""
    finals = {}
    for sigma_rel in TRACKED:
        finals[sigma_rel], snapshots = _track(sigma_rel, every=TOY_EVERY)
        for step, ema in snapshots.items():
            save_snapshot({"theta": ema.float()}, tmp_path, step, sigma_rel)
    files = list_snapshots(tmp_path)
    assert len(files) == 2 * TOY_STEPS // TOY_EVERY
    spread = (finals[0.05] - finals[0.10]).norm()
    assert spread > 0.1  # the two tracks differ: the tolerance below is not vacuous
    for target in (0.06, 0.07, 0.085):
        direct, _ = _track(target)
        synthesis = synthesize(files, target)
        assert synthesis.step == TOY_STEPS and len(synthesis.snapshots) == len(files)
        error = (synthesis.weights["theta"].double() - direct).norm()
        assert error < 0.05 * spread, (target, float(error / spread))
        assert synthesis.fit_error < 0.05
    # an earlier target step uses the snapshots up to it only
    assert synthesize(files, 0.07, step=500).snapshots[-1].step == 500
    with pytest.raises(ValueError, match="has no snapshot"):
        synthesize(files, 0.07, step=501)


def test_the_released_decay_is_a_narrow_profile_that_late_snapshots_cannot_reach() -> None:
    """Constant decay 0.9999 over T steps has sigma_rel ~ 1e4 / T; at 7M steps 20 snapshots miss it."""
    for total, expected in ((400_000, 0.025), (7_000_000, 0.00143)):
        k = np.arange(
            max(1, total - 200_000), total + 1, dtype=np.float64
        )  # 0.9999^2e5 = 2e-9: the rest is 0
        w = 0.9999 ** (total - k)
        w /= w.sum()
        mean = (w * k).sum()
        assert math.sqrt((w * (k - mean) ** 2).sum()) / total == pytest.approx(expected, rel=0.01)
    steps, sigmas = _snapshot_grid(7_000_000, 350_000)
    x = synthesis_coefficients(steps, sigmas, 7_000_000, 0.00143)
    assert profile_fit_error(steps, sigmas, x, 7_000_000, 0.00143) > 0.5


def test_snapshots_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_snapshot({"w": torch.ones(3)}, tmp_path, 10, 0.05)
    assert path.name == "phema-000000010-0.05.safetensors"
    renames = []
    real_replace = __import__("os").replace

    def recording_replace(src, dst):  # noqa: ANN001
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr("sit_lightning.atomic.os.replace", recording_replace)  # the one atomic writer
    save_snapshot({"w": 2 * torch.ones(3)}, tmp_path, 10, 0.05)
    assert renames == [(tmp_path / (path.name + ".tmp"), path)]  # staged beside it, then renamed onto it

    def torn_write(tensors, filename, metadata=None):  # noqa: ANN001
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_snapshot({"w": 3 * torch.ones(3)}, tmp_path, 10, 0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no .tmp left, the old file intact
    (snapshot,) = list_snapshots(tmp_path)
    assert (snapshot.step, snapshot.sigma_rel) == (10, 0.05)
    assert torch.equal(synthesize([snapshot], 0.05).weights["w"], 2 * torch.ones(3))


def test_the_module_loads_without_lightning() -> None:
    import subprocess
    import sys

    code = "import sys, sit_lightning.posthoc_ema; print(any(m.startswith('lightning') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _write_shards(
    tensors: dict[str, torch.Tensor], folder: Path, step: int, sigma_rel: float, world: int
) -> None:
    """One-file-per-rank snapshot files of ``tensors``, split along dim 0 as FSDP2 does (torch.chunk)."""
    for rank in range(world):
        local, places = {}, {}
        for name, full in tensors.items():
            rows = -(-full.shape[0] // world)
            start = min(rank * rows, full.shape[0])
            local[name] = full[start : start + rows]
            places[name] = ShardPlace(tuple(full.shape), (start,) + (0,) * (full.dim() - 1))
        save_snapshot_shard(local, places, folder, step, sigma_rel, rank, world)


def test_sharded_snapshots_are_reassembled_into_the_one_file_synthesis(tmp_path: Path) -> None:
    """Shards of 3 ranks (one of them empty) placed by their offsets give what one file per snapshot gives."""
    g = torch.Generator().manual_seed(0)
    snapshots = {
        (step, sigma): {"w": torch.randn(5, 3, generator=g), "b": torch.randn(2, generator=g)}
        for step in (10, 20)
        for sigma in TRACKED
    }
    for (step, sigma), tensors in snapshots.items():
        save_snapshot(tensors, tmp_path / "whole", step, sigma)
        _write_shards(tensors, tmp_path / "sharded", step, sigma, world=3)  # "b": rows 1 + 1 + 0
    whole, sharded = list_snapshots(tmp_path / "whole"), list_snapshots(tmp_path / "sharded")
    assert [len(s.files) for s in sharded] == [3] * 4 and [len(s.files) for s in whole] == [1] * 4
    for sigma_rel in (0.05, 0.07):
        mine, theirs = synthesize(sharded, sigma_rel), synthesize(whole, sigma_rel)
        assert mine.weights.keys() == theirs.weights.keys()
        assert all(torch.equal(mine.weights[k], theirs.weights[k]) for k in mine.weights)
    assert torch.equal(
        synthesize(sharded, 0.10).weights["w"], snapshots[(20, 0.10)]["w"]
    )  # nonzero: selected
    # a world-size-2 run's file for a snapshot the 3-rank run also wrote: which run's is it?
    _write_shards(snapshots[(10, 0.05)], tmp_path / "sharded", 10, 0.05, world=2)
    with pytest.raises(ValueError, match=r"mixes shard files of runs with \[2, 3\] ranks"):
        list_snapshots(tmp_path / "sharded")
    save_snapshot(snapshots[(10, 0.05)], tmp_path / "whole_and_sharded", 10, 0.05)
    _write_shards(snapshots[(10, 0.05)], tmp_path / "whole_and_sharded", 10, 0.05, world=2)
    with pytest.raises(ValueError, match="both a one-file and a sharded snapshot of step 10"):
        list_snapshots(tmp_path / "whole_and_sharded")


def test_shards_that_do_not_tile_their_tensor_are_refused(tmp_path: Path) -> None:
    full = torch.arange(12.0).reshape(4, 3)
    with pytest.raises(ValueError, match="does not fit its full shape"):
        save_snapshot_shard({"w": full[2:]}, {"w": ShardPlace((4, 3), (3, 0))}, tmp_path, 1, 0.05, 0, 2)
    for rank, offset in ((0, 0), (1, 1)):  # rows 0-1 and 1-2: row 1 twice, row 3 never
        save_snapshot_shard(
            {"w": full[:2]}, {"w": ShardPlace((4, 3), (offset, 0))}, tmp_path, 1, 0.05, rank, 2
        )
    with pytest.raises(ValueError, match="overlaps another rank's"):
        synthesize(list_snapshots(tmp_path), 0.05)
    save_snapshot_shard({"w": full[2:3]}, {"w": ShardPlace((4, 3), (2, 0))}, tmp_path, 1, 0.05, 1, 2)
    with pytest.raises(ValueError, match="leave 3 of its 12 elements uncovered"):
        synthesize(list_snapshots(tmp_path), 0.05)


def test_the_callback_shards_its_tracks_under_fsdp2(tmp_path: Path) -> None:
    """DTensor parameters (a 1-rank FSDP2 mesh): the tracks are the local shards, the snapshots shard files.

    (Two ranks, resume and the command: tests/reliability/test_posthoc_sharded.py.)
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from sit_lightning.callbacks.posthoc_ema import PostHocEMACallback

    class _Module(torch.nn.Module):  # the parameters are all the callback reads
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(weight)

    class _Trainer:
        log_dir = str(tmp_path)
        default_root_dir = str(tmp_path)
        global_step = 0
        is_global_zero = True

    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = _Module(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
        callback = PostHocEMACallback(snapshot_every=2)
        trainer = _Trainer()
        callback.setup(trainer, sharded, "fit")  # type: ignore[arg-type]
        callback.on_train_start(trainer, sharded)  # type: ignore[arg-type]
        for step in (1, 2):
            with torch.no_grad():
                sharded.weight.to_local().fill_(float(step))
            trainer.global_step = step
            callback.on_train_batch_end(trainer, sharded, None, None, 0)  # type: ignore[arg-type]
        track = callback.tracks()[0.05]["weight"]
        assert isinstance(sharded.weight, DTensor) and not isinstance(track, DTensor)
        names = sorted(p.name for p in (tmp_path / "posthoc_ema").iterdir())
        assert names == sorted(shard_name(2, s, 0, 1) for s in TRACKED)
        (snapshot, _) = list_snapshots(tmp_path / "posthoc_ema")
        assert snapshot.shards == (snapshot.path,) and snapshot.sigma_rel == 0.05
        assert torch.equal(synthesize([snapshot], 0.05).weights["weight"], track)
        beta = power_ema_beta(2, sigma_rel_to_gamma(0.05))  # the track: theta_1 = 1, then theta_2 = 2
        assert torch.allclose(track, torch.full((4, 3), beta + (1.0 - beta) * 2.0), rtol=1e-6, atol=0.0)
    finally:
        dist.destroy_process_group()
