"""Checkpoints are atomic (issue 11): a crash while saving leaves the previous checkpoint, never a torn one,
and ``ckpt_path="last"`` resumes from the newest checkpoint that loads, naming the ones it skips.

The crashes are real exceptions from inside ``torch.save`` / DCP's ``save`` after part of the data
was written, as a full disk or a killed writer would leave it.
"""

from __future__ import annotations

import errno
import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sit_lightning.checkpoint_io import (
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    AtomicModelParallelStrategy,
    checkpoint_problem,
    find_resumable,
    swap_in,
)
from sit_lightning.models import SiTConfig
from sit_lightning.module import SiTModule

_TOY = str(Path(__file__).resolve().parents[1] / "lightning")
if _TOY not in sys.path:
    sys.path.append(_TOY)  # append: that folder is named `lightning` and must not shadow the package

from lightning_toy import RandomLatentsDataModule, trainer_kwargs  # noqa: E402

TINY = SiTConfig(input_size=8, in_channels=4, num_classes=3, depth=2, hidden_size=32, num_heads=2)
_REAL_TORCH_SAVE = torch.save


def _fail_on_call(n: int, real: Callable[..., Any], write_part: Callable[..., None]) -> Callable[..., Any]:
    """A stand-in for ``real`` whose n-th call writes part of its output and then fails as on a full disk."""
    calls = {"count": 0}

    def save(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1
        if calls["count"] == n:
            write_part(*args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return save


def _write_half(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    buffer = io.BytesIO()
    _REAL_TORCH_SAVE(obj, buffer)
    data = buffer.getvalue()
    if isinstance(f, (str, Path)):
        Path(f).write_bytes(data[: len(data) // 2])
    else:
        f.write(data[: len(data) // 2])


def _fit(
    max_steps: int, dirpath: Path, ckpt_path: str | None = None, strategy: Any = "auto", **kwargs: Any
) -> tuple[pl.Trainer, SiTModule]:
    module = SiTModule(arch=TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    checkpoints = AtomicModelCheckpoint(dirpath, every_n_train_steps=1, save_top_k=-1, save_last=True)
    callbacks = [checkpoints, *kwargs.pop("callbacks", [])]
    trainer = pl.Trainer(
        **trainer_kwargs(
            max_steps=max_steps, callbacks=callbacks, enable_checkpointing=True, strategy=strategy, **kwargs
        )
    )
    trainer.fit(module, RandomLatentsDataModule(), ckpt_path=ckpt_path)
    return trainer, module


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class _RecordWeights(pl.Callback):
    """Full weights and step when training starts (after a resume) and after the step ``at_step``."""

    def __init__(self, at_step: int = -1) -> None:
        self.at_step = at_step
        self.start: tuple[int, dict[str, torch.Tensor]] | None = None
        self.at: dict[str, torch.Tensor] | None = None

    def _weights(self, module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: _full(v) for k, v in module.state_dict().items()}

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.start = (trainer.global_step, self._weights(module))

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            self.at = self._weights(module)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# The single-file writer
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("previous", [True, False], ids=["over-a-checkpoint", "first-checkpoint"])
def test_a_crash_mid_write_leaves_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch, previous):
    path = tmp_path / "run" / "last.ckpt"
    if previous:
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, path)
    monkeypatch.setattr(torch, "save", _fail_on_call(1, _REAL_TORCH_SAVE, _write_half))
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, path)
    if previous:
        assert AtomicCheckpointIO().load_checkpoint(path)["step"] == 1
    else:
        assert not path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == (["last.ckpt"] if previous else [])


def test_the_temporary_lives_beside_the_checkpoint_not_in_tmpdir(tmp_path, monkeypatch):
    missing = tmp_path / "no_such_tmpdir"  # as if $TMPDIR could not hold an 11 GB XL checkpoint
    monkeypatch.setenv("TMPDIR", str(missing))
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    written = []
    monkeypatch.setattr(torch, "save", lambda obj, f: (written.append(f.name), _REAL_TORCH_SAVE(obj, f)))
    path = tmp_path / "ckpts" / "epoch=0-step=5.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3.0)}, path)
    assert written == [str(path) + ".tmp"]
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(path)["w"], torch.arange(3.0))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# ------------------------------------------------------------------------------------------------
# What counts as "does not load", and ckpt_path="last" over a folder
# ------------------------------------------------------------------------------------------------
def test_torn_files_and_folders_are_recognised(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.randn(1000)}, good)
    data = good.read_bytes()
    torn = {"truncated": data[: len(data) // 2], "empty": b"", "zero-filled": bytes(len(data))}
    for name, content in torn.items():
        (tmp_path / f"{name}.ckpt").write_bytes(content)
    assert checkpoint_problem(good) is None
    for name in torn:
        assert checkpoint_problem(tmp_path / f"{name}.ckpt"), name
    assert checkpoint_problem(tmp_path / "absent.ckpt") == "no such file"
    # an FSDP2 folder whose DCP index was never written
    (tmp_path / "sharded.ckpt").mkdir()
    torch.save({}, tmp_path / "sharded.ckpt" / "meta.pt")
    assert ".metadata" in checkpoint_problem(tmp_path / "sharded.ckpt")


def test_last_skips_the_newest_checkpoint_if_it_does_not_load_and_names_it(tmp_path):
    older, newest = tmp_path / "epoch=0-step=1.ckpt", tmp_path / "last.ckpt"
    torch.save({"step": 1}, older)
    newest.write_bytes(b"PK\x03\x04 torn")  # written after `older`, so newer
    (tmp_path / "last.ckpt.tmp").write_bytes(b"left by a killed writer")  # never a candidate
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*last\.ckpt: it does not load"):
        assert find_resumable(tmp_path) == older
    older.write_bytes(b"")  # now the newest, and torn too
    every_one = r"No checkpoint in .* loads: epoch=0-step=1\.ckpt \(.*\); last\.ckpt \(.*\)$"
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=every_one):
        find_resumable(tmp_path)  # rather than silently training from scratch over the run
    assert find_resumable(tmp_path / "empty") is None


def test_swap_in_replaces_an_old_folder_and_leaves_nothing_else(tmp_path):
    final, staging = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    for folder, content in [(final, "old"), (staging, "new")]:
        folder.mkdir()
        (folder / "shard").write_text(content)
    swap_in(staging, final)
    assert (final / "shard").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ------------------------------------------------------------------------------------------------
# Through the Trainer: a crash while checkpointing, then --ckpt_path last
# ------------------------------------------------------------------------------------------------
class _UserIO(TorchCheckpointIO):
    pass


@pytest.mark.parametrize(
    "plugins, installed",
    [([], AtomicCheckpointIO), ([AtomicCheckpointIO()], AtomicCheckpointIO), ([_UserIO()], _UserIO)],
    ids=["default", "from-python", "user-io-kept"],
)
def test_the_callback_installs_atomic_writes_unless_the_user_chose_a_checkpoint_io(
    tmp_path, plugins, installed
):
    trainer, _ = _fit(1, tmp_path, plugins=plugins)
    assert type(trainer.strategy.checkpoint_io) is installed
    if plugins:
        assert trainer.strategy.checkpoint_io is plugins[0]


def test_crash_while_checkpointing_then_resume_from_last_skips_a_torn_last(tmp_path, monkeypatch):
    # saves per step: epoch=0-step=N.ckpt, then last.ckpt; the 5th save (step 3's) dies half-written
    monkeypatch.setattr(torch, "save", _fail_on_call(5, _REAL_TORCH_SAVE, _write_half))
    with pytest.raises(OSError, match="No space left"):
        _fit(3, tmp_path)
    monkeypatch.setattr(torch, "save", _REAL_TORCH_SAVE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch=0-step=1.ckpt",
        "epoch=0-step=2.ckpt",
        "last.ckpt",
    ]
    assert all(checkpoint_problem(p) is None for p in tmp_path.iterdir())

    # a last.ckpt torn by some other writer (as Lightning's copy out of $TMPDIR can leave it)
    step_1 = torch.load(tmp_path / "epoch=0-step=1.ckpt", weights_only=False)["state_dict"]
    step_2 = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=False)["state_dict"]
    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    record = _RecordWeights()
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*last\.ckpt: it does not load"):
        trainer, _ = _fit(4, tmp_path, ckpt_path="last", callbacks=[record])
    assert record.start[0] == 2
    assert _equal(record.start[1], step_2) and not _equal(step_1, step_2)  # training moved the weights
    assert trainer.global_step == 4 and checkpoint_problem(last) is None


def test_last_without_a_dirpath_finds_the_previous_runs_version_folder(tmp_path):
    """A rerun (a requeued job) logs to a new, empty version folder; "last" looks in the earlier ones."""
    from lightning.pytorch.loggers import CSVLogger

    def run(max_steps: int, ckpt_path: str | None) -> tuple[pl.Trainer, _RecordWeights]:
        module = SiTModule(arch=TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        record = _RecordWeights()
        checkpoints = AtomicModelCheckpoint(every_n_train_steps=1, save_last=True)  # no dirpath
        kwargs = trainer_kwargs(
            max_steps=max_steps, enable_checkpointing=True, callbacks=[checkpoints, record]
        )
        kwargs["logger"] = CSVLogger(tmp_path, name="run")
        trainer = pl.Trainer(**kwargs)
        trainer.fit(module, RandomLatentsDataModule(), ckpt_path=ckpt_path)
        return trainer, record

    first, _ = run(2, None)
    saved = torch.load(tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    second, record = run(3, "last")
    assert second.logger.version == 1  # a new folder, empty when "last" was resolved
    assert record.start[0] == 2 and _equal(record.start[1], saved["state_dict"])
    assert second.global_step == 3


# ------------------------------------------------------------------------------------------------
# FSDP2 (ModelParallelStrategy): sharded folders, one process on CPU (gloo)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def process_group():
    """Lightning leaves its process group up; later tests in this process must not inherit it."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _write_part_of_a_shard(state: Any, checkpoint_id: Any = None, **kwargs: Any) -> None:
    Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
    (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a shard")


def test_fsdp2_sharded_checkpoints_are_swapped_in_whole_and_last_skips_a_torn_one(
    tmp_path, monkeypatch, process_group
):
    import torch.distributed.checkpoint as dcp

    def strategy() -> AtomicModelParallelStrategy:
        return AtomicModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)

    # saves per step: epoch=0-step=N.ckpt/, then last.ckpt/; the 3rd (step 2's) dies mid-way
    monkeypatch.setattr(dcp, "save", _fail_on_call(3, dcp.save, _write_part_of_a_shard))
    record_1 = _RecordWeights(at_step=1)
    with pytest.raises(OSError, match="No space left"):
        _fit(2, tmp_path, strategy=strategy(), callbacks=[record_1])
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt.tmp", "last.ckpt"]  # the torn one is staged
    assert all(checkpoint_problem(tmp_path / name) is None for name in ["epoch=0-step=1.ckpt", "last.ckpt"])

    (tmp_path / "last.ckpt" / ".metadata").unlink()  # torn as an in-place write leaves it
    record = _RecordWeights()
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*last\.ckpt: it does not load"):
        _fit(2, tmp_path, ckpt_path="last", strategy=strategy(), callbacks=[record])
    assert record.start[0] == 1 and _equal(record.start[1], record_1.at)
    # the staged leftover is gone; the skipped last.ckpt is kept for inspection, and Lightning, resuming
    # from a checkpoint that is not its last, names the new one last-v1.ckpt
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last-v1.ckpt", "last.ckpt"]
    assert [name for name in names if checkpoint_problem(tmp_path / name)] == ["last.ckpt"]
