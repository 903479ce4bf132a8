"""Exact mid-epoch resume with a real Lightning Trainer: the resumed run sees exactly the remaining keys."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sit_lightning.data import DigitsDataModule

GLOBAL_BATCH = 256  # 1500 training digits -> 5 steps per epoch
TOTAL_STEPS = 8  # crosses the epoch boundary after step 5


class KeyRecorder(pl.LightningModule):
    """A tiny model that records the keys of every training batch it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.keys: list[list[int]] = []
        self.val_keys: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.keys.append(batch["key"].tolist())
        logits = self.layer(batch["x"].flatten(1))
        return torch.nn.functional.cross_entropy(logits, batch["y"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_keys.append(batch["key"].tolist())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["val_keys"] = list(self.val_keys)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class EpochEndCheckpoint(ModelCheckpoint):
    """A third checkpoint trigger: Lightning needs a distinct state key per ModelCheckpoint."""

    @property
    def state_key(self) -> str:
        return "epoch-end-" + super().state_key


def _trainer(root: Path, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_steps=TOTAL_STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks or [],
        default_root_dir=root,
        # validation batches also pass the datamodule's batch hook: they must not move the train position
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[list[int]], Path]:
    root = tmp_path_factory.mktemp("resume")
    checkpoints = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    # the default trigger with mid-epoch validation: a checkpoint after each validation
    after_val = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{step}-val")
    epoch_end = EpochEndCheckpoint(
        dirpath=root / "ckpt", save_top_k=-1, filename="{step}-epoch", save_on_train_epoch_end=True
    )
    model = KeyRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(root, [checkpoints, after_val, epoch_end]).fit(
            model, datamodule=DigitsDataModule(global_batch_size=GLOBAL_BATCH)
        )
    return model.keys, root / "ckpt"


def test_uninterrupted_stream_covers_each_epoch_once(uninterrupted: tuple[list[list[int]], Path]) -> None:
    keys, _ = uninterrupted
    flat = [k for batch in keys for k in batch]
    assert len(keys) == TOTAL_STEPS
    # keys are the positions in the run's sample stream: 5 whole batches per epoch, then epoch 1
    assert flat == list(range(TOTAL_STEPS * GLOBAL_BATCH))


def test_validation_ran_with_fixed_keys(uninterrupted: tuple[list[list[int]], Path]) -> None:
    _, ckpt_dir = uninterrupted
    val_keys = torch.load(ckpt_dir / "step=8.ckpt", weights_only=False)["val_keys"]
    assert len(val_keys) >= 3 and all(k == list(range(GLOBAL_BATCH)) for k in val_keys)


@pytest.mark.parametrize(
    ("resume_step", "suffix"),
    [(3, ""), (5, ""), (4, "-val"), (5, "-epoch")],
    ids=["mid-epoch", "last-batch-of-epoch", "after-validation", "on-train-epoch-end"],
)
def test_resume_sees_exactly_the_remaining_keys(
    uninterrupted: tuple[list[list[int]], Path], resume_step: int, suffix: str, tmp_path: Path
) -> None:
    keys, ckpt_dir = uninterrupted
    model = KeyRecorder()
    # two workers on resume: neither the worker count nor the restart may change the stream
    datamodule = DigitsDataModule(global_batch_size=GLOBAL_BATCH, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path).fit(
            model, datamodule=datamodule, ckpt_path=ckpt_dir / f"step={resume_step}{suffix}.ckpt"
        )
    assert model.keys == keys[resume_step:]
    assert datamodule.consumed_steps == TOTAL_STEPS


def test_checkpoint_holds_the_consumed_position(uninterrupted: tuple[list[list[int]], Path]) -> None:
    _, ckpt_dir = uninterrupted
    checkpoint = torch.load(ckpt_dir / "step=3.ckpt", weights_only=False)
    state = {"version": 1, "next_step": 3, "num_samples": 1500, "global_batch_size": GLOBAL_BATCH}
    assert checkpoint["DigitsDataModule"] == state
    # the fit loop also saves the train loader's state (Lightning's resumable-loader protocol)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [state]
