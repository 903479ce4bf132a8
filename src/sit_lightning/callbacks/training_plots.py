"""The training loss curve and the validation loss profile ``L_t`` as PNG files beside the sample grid.

At every logging step (``trainer.log_every_n_steps``) the callback keeps the value of the logged
training loss (``train/loss``: what the loggers receive at that step) from ``trainer.callback_metrics``,
as a detached tensor; it reads them to the host together when it draws. Other steps cost one integer
test. At the end of training (and every ``every_n_steps`` optimizer steps when set) rank 0 draws, with
Pillow (:mod:`sit_lightning.evaluation.plots`):

- ``<log_dir>/samples/loss_curve.png``: the logged loss against the optimizer step;
- ``<log_dir>/samples/loss_profile.png``: the module's latest validation loss profile ``L_t``
  (``SiTModule.loss_profile``: the velocity loss at the bin centres of ``t``; docs/training.md), when a
  validation has run.

Steps on the x axis count optimizer steps taken (the sample grid's ``step0000400`` names the same
moment); Lightning's loggers write them one lower. The recorded curve is part of the callback's
checkpoint state, so a resumed run draws the whole of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ..evaluation.plots import PLOT_SIZE, Series, line_plot, save_plot
from .sample_grid import log_dir_of

__all__ = ["LOSS_CURVE_FILE", "LOSS_PROFILE_FILE", "TrainingPlotsCallback"]

LOSS_CURVE_FILE = "loss_curve.png"
LOSS_PROFILE_FILE = "loss_profile.png"


class TrainingPlotsCallback(Callback):
    """Draw the logged training loss and the validation ``L_t`` as PNGs in the sample grid's folder.

    Args:
        every_n_steps: also redraw every this many optimizer steps; 0 draws only at the end of training.
        metric: the logged training metric to plot.
        folder: the PNGs' folder inside the run's folder (the logger's ``log_dir``, else
            ``default_root_dir``); ``samples`` is the sample grid's.
        width: width of each PNG in pixels.
        height: height of each PNG in pixels.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        metric: str = "train/loss",
        folder: str = "samples",
        width: int = PLOT_SIZE[0],
        height: int = PLOT_SIZE[1],
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0; got {every_n_steps}")
        if width < 1 or height < 1:
            raise ValueError(f"width and height must be >= 1; got {width} x {height}")
        self.every_n_steps = int(every_n_steps)
        self.metric = metric
        self.folder = folder
        self.size = (int(width), int(height))
        self.steps: list[int] = []  # optimizer steps of the recorded values
        self._values: list[torch.Tensor | float] = []  # detached tensors until a drawing reads them
        self.profile_step: int | None = None  # the optimizer step of the latest validation
        self.paths: dict[str, Path] = {}  # what was written last: "loss_curve" / "loss_profile" -> PNG
        self._drawn_step: int | None = None

    @property
    def losses(self) -> list[float]:
        """The recorded values of :attr:`metric`, one per entry of :attr:`steps` (reads them to the host)."""
        held = [i for i, v in enumerate(self._values) if isinstance(v, torch.Tensor)]
        if held:  # one host read for all of them
            read = torch.stack([self._values[i].float().reshape(()) for i in held]).tolist()
            for i, value in zip(held, read, strict=True):
                self._values[i] = value
        return [float(v) for v in self._values]

    # ---- recording --------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        every = trainer.log_every_n_steps
        # Lightning logs the batch that makes the step count a multiple of log_every_n_steps; under
        # gradient accumulation the batches after it see the same count, so keep the first one only
        if every > 0 and step > 0 and step % every == 0 and (not self.steps or step > self.steps[-1]):
            value = trainer.callback_metrics.get(self.metric)
            if value is not None:
                self.steps.append(step)
                self._values.append(value.detach() if isinstance(value, torch.Tensor) else float(value))
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._drawn_step:
            self.draw(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.profile_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end: before FIDCallback's report (on_fit_end) names the files, whatever the order
        if trainer.global_step != self._drawn_step:
            self.draw(trainer, pl_module)

    # ---- drawing ----------------------------------------------------------------------------------
    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Path]:
        """Write the PNGs there is data for (rank 0) and return their paths (empty on other ranks)."""
        self._drawn_step = trainer.global_step
        if trainer.global_rank != 0:
            return {}
        folder = log_dir_of(trainer) / self.folder
        if self.steps:
            every = trainer.log_every_n_steps
            plot = line_plot(
                [Series(self.metric, self.steps, self.losses)],
                title=f"training loss ({self.metric}, logged every {every} steps)",
                x_label="optimizer step",
                y_label="loss",
                size=self.size,
            )
            self.paths["loss_curve"] = save_plot(plot, folder / LOSS_CURVE_FILE)
        profile = getattr(pl_module, "loss_profile", None)  # SiTModule.loss_profile: None before a validation
        if profile is not None:
            after = "" if self.profile_step is None else f", validation after {self.profile_step} steps"
            plot = line_plot(
                [Series("L_t", profile.times.tolist(), profile.values.tolist())],
                title=f"validation loss profile L_t (velocity loss per time bin{after})",
                x_label="t (0 = noise, 1 = data)",
                y_label="L_t",
                size=self.size,
                x_range=(0.0, 1.0),
            )
            self.paths["loss_profile"] = save_plot(plot, folder / LOSS_PROFILE_FILE)
        return dict(self.paths)

    # ---- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "losses": self.losses, "profile_step": self.profile_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state_dict.get("steps", [])]
        self._values = [float(v) for v in state_dict.get("losses", [])]
        self.profile_step = state_dict.get("profile_step")
