"""Post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3): power-function EMA tracks and their snapshots.

After optimizer step ``t`` (1-based) each track ``i`` applies

    track_i <- beta_t track_i + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma_i + 1)

(one ``torch._foreach_lerp_`` per track, float32, all parameters of the LightningModule), so that
after step ``t`` the track is the power-function EMA of relative width ``sigma_rel_i`` of the weights
``theta_1 .. theta_t`` (:mod:`sit_lightning.posthoc_ema`). A step the module skipped as non-finite
is folded in like any other (its ``theta_t`` is ``theta_{t-1}``): leaving it out would break that
identity. Every ``snapshot_every`` steps rank 0 writes each track (not the raw weights) to
``snapshot_dir/phema-<step>-<sigma_rel>.safetensors``, atomically.
After training, ``sit-lightning posthoc-ema SNAPSHOT_DIR OUTPUT --sigma_rel S`` synthesises the EMA of
any width ``S`` from those files. See docs/training.md, "Post-hoc EMA".

The tracks are part of the callback's checkpoint state, so ``--ckpt_path`` resumes them exactly (and
the checkpoint grows by one float32 copy of the weights per track: 5.4 GB for SiT-XL with two; every
device holds the same).

Single device and DDP only: under DDP every rank updates an identical full copy and rank 0 writes.
FSDP2 (DTensor parameters) is refused at setup and again at the start of training
(:data:`FSDP2_REFUSAL`): the tracks here are full float32 copies that rank 0 writes, and tracks sharded
like :class:`EMACallback`'s (each rank averaging and snapshotting its own shard, the synthesis reading
the shards) are not built. This callback does not replace :class:`EMACallback`, which is the EMA validation and
sampling use during training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from ..posthoc_ema import (
    DEFAULT_SIGMA_RELS,
    power_ema_beta,
    save_snapshot,
    sigma_rel_to_gamma,
    snapshot_name,
)

__all__ = ["DEFAULT_SNAPSHOT_EVERY", "FSDP2_REFUSAL", "POSTHOC_EMA_FOLDER", "PostHocEMACallback"]

#: Steps between snapshots: 20 snapshots over the paper's 400K-step runs (108 GB for SiT-XL, two tracks).
DEFAULT_SNAPSHOT_EVERY = 20_000
#: Folder under the trainer's log dir that holds the snapshots when ``snapshot_dir`` is None.
POSTHOC_EMA_FOLDER = "posthoc_ema"
#: Why an FSDP2 run stops (one line; docs/training.md, "Post-hoc EMA").
FSDP2_REFUSAL = (
    "PostHocEMACallback does not support FSDP2 (the parameters are sharded DTensors): its tracks are full "
    "float32 copies of the weights on every rank, written by rank 0, and sharded tracks are not built; "
    "train with strategy ddp, or leave this callback out (EMACallback is sharded under FSDP2)"
)


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


class PostHocEMACallback(Callback):
    """Keeps power-function EMA tracks of the module's parameters and snapshots them for post-hoc EMA.

    Args:
        sigma_rels: the widths of the tracks, each in ``(0, 0.2887]`` (EDM2: 0.05 and 0.10). Each costs
            one float32 copy of the weights on every device and in every checkpoint.
        snapshot_every: write a snapshot of every track after each multiple of this many optimizer steps
            (make ``max_steps`` a multiple so that the end of training has one).
        snapshot_dir: where the snapshots go; ``None``: ``<trainer.log_dir>/posthoc_ema``.
    """

    def __init__(
        self,
        sigma_rels: tuple[float, ...] = DEFAULT_SIGMA_RELS,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        snapshot_dir: str | None = None,
    ) -> None:
        sigma_rels = tuple(float(s) for s in sigma_rels)
        if not sigma_rels:
            raise ValueError("sigma_rels must name at least one track")
        names = [snapshot_name(0, s) for s in sigma_rels]
        if len(set(names)) != len(names):
            raise ValueError(f"sigma_rels must differ (in 6 significant digits); got {sigma_rels}")
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1; got {snapshot_every}")
        self.sigma_rels = sigma_rels
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in sigma_rels)  # raises on a sigma_rel out of range
        self.snapshot_every = int(snapshot_every)
        self.snapshot_dir = snapshot_dir
        self._directory: Path | None = None
        self._names: list[str] | None = None
        self._tracks: list[list[Tensor]] | None = None  # per sigma_rel, per parameter
        self._pending: dict[str, Any] | None = None
        self._step: int | None = None  # optimizer steps the tracks have averaged

    # ---- state -------------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        """The snapshot folder (known from ``setup`` on)."""
        if self._directory is None:
            raise RuntimeError("the snapshot folder is known once the trainer has set the callback up")
        return self._directory

    @property
    def step(self) -> int | None:
        """The optimizer steps the tracks have averaged (None before training)."""
        return self._step

    def tracks(self) -> dict[float, dict[str, Tensor]]:
        """sigma_rel -> (parameter name -> float32 track tensor), on the parameters' device."""
        if self._tracks is None or self._names is None:
            raise RuntimeError("the tracks are not initialised yet (training has not started)")
        return {
            s: dict(zip(self._names, track, strict=True))
            for s, track in zip(self.sigma_rels, self._tracks, strict=True)
        }

    def _ensure(self, pl_module: pl.LightningModule, step: int) -> None:
        """Create the tracks from a restored checkpoint or, failing that, from the current weights."""
        if self._tracks is not None:
            return
        named = list(pl_module.named_parameters())
        self._names = [name for name, _ in named]
        if self._pending is None:
            if step > 0:
                rank_zero_warn(
                    f"PostHocEMACallback starts at step {step} without state of its own: its tracks take the "
                    f"weights of step {step} for the average of steps 1..{step}, which the synthesis assumes"
                    " they are; snapshots of this run are exact only for runs that had the callback from step 0"
                )
            self._tracks = [[p.detach().float().clone() for _, p in named] for _ in self.sigma_rels]
            self._step = step
            return
        stored = self._pending["tracks"]
        for track in stored:
            missing = sorted(set(self._names) - set(track))
            unexpected = sorted(set(track) - set(self._names))
            if missing or unexpected:
                raise ValueError(
                    f"post-hoc EMA state does not match the model: missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)"
                )
        self._tracks = [
            [track[name].to(device=p.device, dtype=torch.float32).clone() for name, p in named]
            for track in stored
        ]
        self._step = int(self._pending["step"])
        self._pending = None

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule, step: int) -> None:
        """Fold the weights after optimizer step ``step`` (1-based) into every track."""
        self._ensure(pl_module, step - 1)
        assert self._tracks is not None
        params = [p.detach() for p in pl_module.parameters()]
        params = [p if p.dtype == torch.float32 else p.float() for p in params]
        for gamma, track in zip(self.gammas, self._tracks, strict=True):
            torch._foreach_lerp_(track, params, 1.0 - power_ema_beta(step, gamma))
        self._step = step

    def save_snapshots(self) -> list[Path]:
        """Write every track at the current step to the snapshot folder (atomically); returns the files."""
        assert self._step is not None
        return [
            save_snapshot(tensors, self.directory, self._step, sigma_rel)
            for sigma_rel, tensors in self.tracks().items()
        ]

    # ---- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if any(_is_dtensor(p) for p in pl_module.parameters()):
            raise ValueError(FSDP2_REFUSAL)
        if self.snapshot_dir is not None:
            self._directory = Path(self.snapshot_dir)
        else:
            self._directory = Path(trainer.log_dir or trainer.default_root_dir) / POSTHOC_EMA_FOLDER

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A sharded strategy may wrap the parameters only after setup: check them again.
        if any(_is_dtensor(p) for p in pl_module.parameters()):
            raise ValueError(FSDP2_REFUSAL)
        self._ensure(pl_module, trainer.global_step)
        if self._step != trainer.global_step:
            raise ValueError(
                f"post-hoc EMA tracks are at step {self._step} but training resumes at step "
                f"{trainer.global_step}: they belong to another checkpoint"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._step:  # gradient accumulation: no optimizer step yet
            return
        self.update(pl_module, step)
        if step % self.snapshot_every == 0 and trainer.is_global_zero:
            self.save_snapshots()

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The tracks (CPU float32, by parameter name, in the order of ``sigma_rels``) and their step."""
        if self._tracks is None:
            return dict(self._pending) if self._pending is not None else {}
        tracks = [
            {name: t.detach().cpu().clone() for name, t in track.items()} for track in self.tracks().values()
        ]
        return {"sigma_rels": list(self.sigma_rels), "step": self._step, "tracks": tracks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        stored = tuple(float(s) for s in state_dict["sigma_rels"])
        if stored != self.sigma_rels:
            raise ValueError(
                f"the checkpoint's post-hoc EMA tracks have sigma_rels {stored}, this callback {self.sigma_rels}"
            )
        self._pending = dict(state_dict)
        self._tracks = None
