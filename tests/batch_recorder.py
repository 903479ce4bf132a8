"""A callback that records every training batch a fit sees (for end-to-end tests through the CLI)."""

from __future__ import annotations

from typing import Any, ClassVar

from lightning.pytorch import Callback


class BatchRecorder(Callback):
    """Appends ``(global_step, {"x", "y", "key"})`` of each training batch to :attr:`batches`."""

    batches: ClassVar[list[tuple[int, dict[str, Any]]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        BatchRecorder.batches.append((trainer.global_step, {k: v.detach().clone() for k, v in batch.items()}))
