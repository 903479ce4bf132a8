"""PostHocEMACallback in a tiny fit: snapshots at the right steps, written atomically; resume is exact; the
``sit-lightning posthoc-ema`` command synthesises a state dict the network loads."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_toy import TEST_ADAM_EPS, TEST_LR, TINY_MODEL, RandomLatentsDataModule, trainer_kwargs

from sit_lightning.callbacks import PostHocEMACallback
from sit_lightning.cli import main
from sit_lightning.models import load_released_sit
from sit_lightning.module import SiTModule
from sit_lightning.posthoc_ema import list_snapshots, sigma_rel_to_gamma

STEPS = 6  # 3 epochs of 2 steps (16 samples, global batch 8)
RESUME_AT = 4  # an epoch boundary
SNAPSHOT_EVERY = 2
SIGMA_RELS = (0.05, 0.10)


def _module() -> SiTModule:
    return SiTModule(
        **TINY_MODEL,
        optimizer=lambda params: torch.optim.AdamW(params, lr=TEST_LR, eps=TEST_ADAM_EPS, weight_decay=0.0),
    )


def _fit(
    workdir: Path, snapshot_dir: str | None, ckpt_path: str | None = None
) -> tuple[SiTModule, PostHocEMACallback]:
    torch.manual_seed(0)
    module = _module()
    posthoc = PostHocEMACallback(SIGMA_RELS, snapshot_every=SNAPSHOT_EVERY, snapshot_dir=snapshot_dir)
    checkpoint = ModelCheckpoint(
        workdir,
        filename="at{step}",
        auto_insert_metric_name=False,
        every_n_train_steps=RESUME_AT,
        save_top_k=-1,
    )
    trainer = pl.Trainer(
        **trainer_kwargs(
            max_steps=STEPS,
            callbacks=[posthoc, checkpoint],
            enable_checkpointing=True,
            default_root_dir=str(workdir),
        )
    )
    trainer.fit(module, RandomLatentsDataModule(), ckpt_path=ckpt_path)
    return module, posthoc


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """STEPS steps in one go, the snapshots in the default folder (<log dir>/posthoc_ema)."""
    workdir = tmp_path_factory.mktemp("straight")
    module, posthoc = _fit(workdir, snapshot_dir=None)
    return {"workdir": workdir, "module": module, "posthoc": posthoc}


def test_snapshots_of_both_tracks_at_every_multiple_of_the_spacing(straight: dict[str, Any]) -> None:
    folder = straight["workdir"] / "posthoc_ema"
    assert straight["posthoc"].directory == folder
    snapshots = list_snapshots(folder)
    expected = [(s, sigma) for s in range(SNAPSHOT_EVERY, STEPS + 1, SNAPSHOT_EVERY) for sigma in SIGMA_RELS]
    assert [(s.step, s.sigma_rel) for s in snapshots] == expected
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # staged files were renamed
    # the last snapshots hold the tracks (not the raw weights), which moved away from the weights
    from safetensors.torch import load_file

    tracks = straight["posthoc"].tracks()
    weights = dict(straight["module"].named_parameters())
    for snapshot in snapshots[-2:]:
        stored = load_file(snapshot.path)
        assert stored.keys() == tracks[snapshot.sigma_rel].keys()
        assert all(torch.equal(stored[k], tracks[snapshot.sigma_rel][k].cpu()) for k in stored)
        lag = sum((stored[k] - weights[k].detach()).norm() for k in stored)
        assert lag > 1e-3
    spread = sum((tracks[0.05][k] - tracks[0.10][k]).norm() for k in weights)
    assert spread > 1e-3
    assert straight["posthoc"].gammas == tuple(sigma_rel_to_gamma(s) for s in SIGMA_RELS)


def test_resume_gives_bit_identical_tracks_and_snapshots(straight: dict[str, Any], tmp_path: Path) -> None:
    ckpt = straight["workdir"] / f"at{RESUME_AT}.ckpt"
    assert ckpt.is_file()
    _, resumed = _fit(tmp_path, snapshot_dir=str(tmp_path / "snapshots"), ckpt_path=str(ckpt))
    assert resumed.step == straight["posthoc"].step == STEPS
    for sigma_rel, track in straight["posthoc"].tracks().items():
        other = resumed.tracks()[sigma_rel]
        differ = [k for k in track if not torch.equal(track[k], other[k])]
        assert not differ, f"track {sigma_rel} differs after resume: {differ[:5]}"
    # the resumed run writes the snapshots after the checkpoint, tensor for tensor those of the straight run
    from safetensors.torch import load_file

    after = list_snapshots(tmp_path / "snapshots")
    assert [s.step for s in after] == [STEPS, STEPS]
    for snapshot in after:
        mine = load_file(snapshot.path)
        theirs = load_file(straight["workdir"] / "posthoc_ema" / snapshot.path.name)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_command_synthesises_a_state_dict_the_network_loads(
    straight: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = str(straight["workdir"] / "posthoc_ema")
    out = tmp_path / "phema_0.05.safetensors"
    assert main(["posthoc-ema", folder, str(out), "--sigma_rel", "0.05"]) == 0
    assert f"EMA sigma_rel 0.05 at step {STEPS}" in capsys.readouterr().out
    # a tracked width: the synthesis selects that track (coefficients within 1e-6 of one-hot)
    track = {k.removeprefix("network."): v for k, v in straight["posthoc"].tracks()[0.05].items()}
    network = load_released_sit(out, input_size=None, num_heads=TINY_MODEL["arch"].num_heads)
    loaded = network.state_dict()
    assert loaded.keys() == track.keys()
    assert max((loaded[k] - track[k]).abs().max().item() for k in track) < 1e-6
    # ... and gives the outputs of the module with those weights (non-zero: the network was trained)
    reference = copy.deepcopy(straight["module"].network)
    reference.load_state_dict(loaded)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7]), torch.tensor([0, 2])
    with torch.no_grad():
        expected, got = reference.eval()(x, t, y), network(x, t, y)
    assert expected.abs().mean() > 1e-3 and torch.equal(expected, got)
    # an intermediate width, written as a bare torch state dict
    between = tmp_path / "phema_0.07.pt"
    assert main(["posthoc-ema", folder, str(between), "--sigma_rel", "0.07", "--step", "4"]) == 0
    state = torch.load(between, weights_only=True)
    assert state.keys() == track.keys()
    with pytest.raises(SystemExit) as exit_info:
        main(["posthoc-ema", folder, str(tmp_path / "x.safetensors"), "--sigma_rel", "0.07", "--step", "5"])
    assert exit_info.value.code == 2
    assert "step 5 has no snapshot" in capsys.readouterr().err


def test_bad_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        PostHocEMACallback((0.05, 0.3))
    with pytest.raises(ValueError, match="must differ"):
        PostHocEMACallback((0.05, 0.05))
    with pytest.raises(ValueError, match="snapshot_every must be >= 1"):
        PostHocEMACallback(snapshot_every=0)
