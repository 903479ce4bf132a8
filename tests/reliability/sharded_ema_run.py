"""Run by tests/reliability/test_sharded_ema.py: FSDP2 runs that save and resume a sharded EMA.

Usage:
    python -m torch.distributed.run --nproc_per_node 2 sharded_ema_run.py two WORKDIR
    python sharded_ema_run.py one WORKDIR      (afterwards: one process resumes the 2-process folder)

``two`` (2 processes, gloo): STEPS straight (``straight2.pt``); STEPS/2 with a sharded checkpoint
``half.ckpt/`` (the EMA as saved: ``saved_ema.pt``; DTensor gathers while saving: ``save_gathers.pt``);
a resume of it for the rest (``resumed2.pt``, its EMA as restored: ``restored2_ema.pt``).
``one`` (1 process, FSDP2 on a 1-rank mesh): the resume of ``half.ckpt/`` (``resumed1.pt``,
``restored1_ema.pt``). Files are written by rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sit_lightning.callbacks import EMACallback
from sit_lightning.checkpoint_io import AtomicModelParallelStrategy
from sit_lightning.module import SiTModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lightning"))

from lightning_toy import (  # noqa: E402
    EMA_DECAY,
    TEST_ADAM_EPS,
    TEST_LR,
    TINY_MODEL,
    RandomLatentsDataModule,
    final_state,
    trainer_kwargs,
)

STEPS = 4
HALF = "half"


class RestoredEMA(pl.Callback):
    """Keeps the full EMA as the run starts, i.e. as restored from the checkpoint (collective)."""

    def __init__(self, ema: EMACallback) -> None:
        self.ema = ema
        self.restored: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restored = dict(self.ema.state_dict()["ema"])


def _fit(world: int, max_steps: int, workdir: Path, *, save: bool = False, resume: bool = False) -> tuple:
    module = SiTModule(
        **TINY_MODEL,
        optimizer=lambda params: torch.optim.AdamW(params, lr=TEST_LR, eps=TEST_ADAM_EPS, weight_decay=0.0),
    )
    ema = EMACallback(decay=EMA_DECAY)
    probe = RestoredEMA(ema)
    callbacks: list[Any] = [ema, probe]
    if save:
        callbacks.append(ModelCheckpoint(workdir, filename=HALF, every_n_train_steps=max_steps))
    trainer = pl.Trainer(
        **trainer_kwargs(
            max_steps=max_steps,
            callbacks=callbacks,
            strategy=AtomicModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
            devices=world,
            enable_checkpointing=save,
        )
    )
    ckpt = str(workdir / f"{HALF}.ckpt") if resume else None
    trainer.fit(module, RandomLatentsDataModule(), ckpt_path=ckpt)
    return module, ema, trainer, probe


def _save(obj: Any, path: Path, trainer: Any) -> None:
    if trainer.global_rank == 0:
        torch.save(obj, path)


def _state(module: Any, trainer: Any, ema: Any) -> dict:
    state = final_state(module, trainer, ema)
    state.pop("meta")
    return state


def two(workdir: Path) -> None:
    from torch.distributed.tensor import DTensor

    module, ema, trainer, _ = _fit(2, STEPS, workdir)
    _save(_state(module, trainer, ema), workdir / "straight2.pt", trainer)

    # Count every DTensor gather while a checkpoint is written: the sharded EMA needs none.
    gathers, saving = [0], [False]
    full_tensor, save_checkpoint = DTensor.full_tensor, pl.Trainer.save_checkpoint

    def counted_full_tensor(self: Any, *args: Any, **kwargs: Any) -> Any:
        gathers[0] += saving[0]
        return full_tensor(self, *args, **kwargs)

    def flagged_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        saving[0] = True
        try:
            return save_checkpoint(self, *args, **kwargs)
        finally:
            saving[0] = False

    DTensor.full_tensor, pl.Trainer.save_checkpoint = counted_full_tensor, flagged_save
    try:
        module, ema, trainer, _ = _fit(2, STEPS // 2, workdir, save=True)
    finally:
        DTensor.full_tensor, pl.Trainer.save_checkpoint = full_tensor, save_checkpoint
    gathered = torch.tensor(gathers[0])
    torch.distributed.all_reduce(gathered)
    _save(gathered, workdir / "save_gathers.pt", trainer)
    _save(
        dict(ema.state_dict()["ema"]), workdir / "saved_ema.pt", trainer
    )  # the save was after the last step

    module, ema, trainer, probe = _fit(2, STEPS, workdir, resume=True)
    _save(probe.restored, workdir / "restored2_ema.pt", trainer)
    _save(_state(module, trainer, ema), workdir / "resumed2.pt", trainer)


def one(workdir: Path) -> None:
    module, ema, trainer, probe = _fit(1, STEPS, workdir, resume=True)
    _save(probe.restored, workdir / "restored1_ema.pt", trainer)
    _save(_state(module, trainer, ema), workdir / "resumed1.pt", trainer)


def main() -> None:
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    torch.use_deterministic_algorithms(True)
    {"two": two, "one": one}[mode](workdir)


if __name__ == "__main__":
    main()
