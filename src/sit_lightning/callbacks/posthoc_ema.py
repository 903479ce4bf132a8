"""Post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3): power-function EMA tracks and their snapshots.

After optimizer step ``t`` (1-based) each track ``i`` applies

    track_i <- beta_t track_i + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma_i + 1)

(one ``torch._foreach_lerp_`` per track, float32, all parameters of the LightningModule), so that
after step ``t`` the track is the power-function EMA of relative width ``sigma_rel_i`` of the weights
``theta_1 .. theta_t`` (:mod:`sit_lightning.posthoc_ema`). A step the module skipped as non-finite
is folded in like any other (its ``theta_t`` is ``theta_{t-1}``): leaving it out would break that
identity. Every ``snapshot_every`` steps each track (not the raw weights) is written to
``snapshot_dir`` atomically. After training, ``sit-lightning posthoc-ema SNAPSHOT_DIR OUTPUT --sigma_rel S``
synthesises the EMA of any width ``S`` from those files. See docs/training.md, "Post-hoc EMA".

Single device and DDP: every rank updates an identical full copy, rank 0 writes
``phema-<step>-<sigma_rel>.safetensors``. FSDP2 (``fully_shard``; the parameters are DTensors): each
rank keeps the tracks of its own local shards only (no gather, ever) and writes them itself,
``phema-<step>-<sigma_rel>-rank<r>-of-<w>.safetensors`` with each shard's place in its full tensor
(:func:`~sit_lightning.posthoc_ema.save_snapshot_shard`); the synthesis reassembles them.

The tracks are part of the callback's checkpoint state, so ``--ckpt_path`` resumes them exactly (and
the checkpoint grows by one float32 copy of the weights per track: 5.4 GB for SiT-XL with two). Under
FSDP2 they are stored like :class:`EMACallback`'s EMA: in a sharded checkpoint (a DCP folder) each
rank's track shards go beside the weights as DTensors under ``checkpoint["state_dict"]["_phema.<i>." +
name]`` (:data:`SHARDED_TRACKS_PREFIX`, ``i`` the index in ``sigma_rels``), and a resume at any world
size reads only its own slices; in a single file they are gathered to full tensors. This callback does
not replace :class:`EMACallback`, which is the EMA validation and sampling use during training.
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
    ShardPlace,
    power_ema_beta,
    save_snapshot,
    save_snapshot_shard,
    sigma_rel_to_gamma,
    snapshot_name,
)
from .ema import (
    _DCP_STATE_DICT,
    _check_names,
    _dtensor_type,
    _local,
    _local_slice,
    _saves_sharded,
    _sharded_source,
    _sharded_targets,
    _ShardedEMA,
)

__all__ = [
    "DEFAULT_SNAPSHOT_EVERY",
    "POSTHOC_EMA_FOLDER",
    "SHARDED_TRACKS_FIELD",
    "SHARDED_TRACKS_PREFIX",
    "PostHocEMACallback",
]

#: Steps between snapshots: 20 snapshots over the paper's 400K-step runs (108 GB for SiT-XL, two tracks).
DEFAULT_SNAPSHOT_EVERY = 20_000
#: Folder under the trainer's log dir that holds the snapshots when ``snapshot_dir`` is None.
POSTHOC_EMA_FOLDER = "posthoc_ema"
#: Key prefix of the track shards in a sharded (DCP folder) checkpoint's ``state_dict``: ``_phema.<i>.<name>``.
SHARDED_TRACKS_PREFIX = "_phema."
#: Field of the callback's state naming that prefix (present only in a sharded checkpoint's state).
SHARDED_TRACKS_FIELD = "tracks_prefix"


def _is_sharded(params: list[Tensor]) -> bool:
    """Whether the parameters are FSDP2's DTensors (each rank then holds its own shards)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params)


def _place(param: Tensor) -> ShardPlace:
    """Where this rank's local shard of ``param`` sits in the full tensor (a plain tensor: all of it)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor):
        return ShardPlace(tuple(param.shape), (0,) * param.dim())
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    # what torch.distributed.checkpoint records for a DTensor's chunk (torch.chunk semantics, as FSDP2)
    local_shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    if tuple(local_shape) != tuple(_local(param).shape):
        raise RuntimeError(
            f"the local shard of a parameter of shape {tuple(param.shape)} is {tuple(_local(param).shape)}, "
            f"not the {tuple(local_shape)} its placements {param.placements} give"
        )
    return ShardPlace(tuple(param.shape), tuple(int(o) for o in offset))


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
        self._module_ref: pl.LightningModule | None = None  # the parameters, for the sharded layout
        self._restoring: tuple[Path | None, pl.LightningModule] | None = None  # set by on_load_checkpoint

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
        """sigma_rel -> (parameter name -> float32 track tensor), on the parameters' device.

        Under FSDP2 each tensor is this rank's local shard of the track.
        """
        if self._tracks is None or self._names is None:
            raise RuntimeError("the tracks are not initialised yet (training has not started)")
        return {
            s: dict(zip(self._names, track, strict=True))
            for s, track in zip(self.sigma_rels, self._tracks, strict=True)
        }

    def _ensure(self, pl_module: pl.LightningModule, step: int) -> None:
        """Create the tracks from a restored checkpoint or, failing that, from the current weights."""
        self._module_ref = pl_module
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
            self._tracks = [[_local(p).detach().float().clone() for _, p in named] for _ in self.sigma_rels]
            self._step = step
            return
        stored = self._pending["tracks"]
        for track in stored:
            _check_names(self._names, track, "post-hoc EMA state")
        # full tensors (a single-file checkpoint of any run): this rank's part of each (all of it unsharded)
        self._tracks = [
            [_local_slice(track[name], p).float().clone() for name, p in named] for track in stored
        ]
        self._step = int(self._pending["step"])
        self._pending = None

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule, step: int) -> None:
        """Fold the weights after optimizer step ``step`` (1-based) into every track."""
        self._ensure(pl_module, step - 1)
        assert self._tracks is not None
        params = [_local(p).detach() for p in pl_module.parameters()]
        params = [p if p.dtype == torch.float32 else p.float() for p in params]
        for gamma, track in zip(self.gammas, self._tracks, strict=True):
            torch._foreach_lerp_(track, params, 1.0 - power_ema_beta(step, gamma))
        self._step = step

    def save_snapshots(self) -> list[Path]:
        """Write every track at the current step to the snapshot folder (atomically); returns the files.

        Unsharded: one file per track (call it on one rank). FSDP2: this rank's shard file of each track
        (call it on every rank).
        """
        assert self._step is not None
        params = [p for _, p in self._module_ref.named_parameters()] if self._module_ref is not None else []
        if not _is_sharded(params):
            return [
                save_snapshot(tensors, self.directory, self._step, sigma_rel)
                for sigma_rel, tensors in self.tracks().items()
            ]
        import torch.distributed as dist

        assert self._names is not None
        places = {name: _place(p) for name, p in zip(self._names, params, strict=True)}
        rank, world_size = dist.get_rank(), dist.get_world_size()
        return [
            save_snapshot_shard(tensors, places, self.directory, self._step, sigma_rel, rank, world_size)
            for sigma_rel, tensors in self.tracks().items()
        ]

    # ---- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module_ref = pl_module
        if self.snapshot_dir is not None:
            self._directory = Path(self.snapshot_dir)
        else:
            self._directory = Path(trainer.log_dir or trainer.default_root_dir) / POSTHOC_EMA_FOLDER

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        if step % self.snapshot_every == 0 and (
            trainer.is_global_zero or _is_sharded(list(pl_module.parameters()))
        ):
            self.save_snapshots()  # FSDP2: every rank writes its own shards

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The tracks (float32, by parameter name, in the order of ``sigma_rels``) and their step.

        Unsharded: CPU copies. FSDP2: per track a mapping over the live shards that gathers each full
        tensor when read (collective, as ``EMACallback.state_dict``); :meth:`on_save_checkpoint` puts the
        shards into a sharded checkpoint instead, or gathers them for a single file.
        """
        if self._tracks is None:
            return dict(self._pending) if self._pending is not None else {}
        assert self._names is not None
        params = dict(self._module_ref.named_parameters()) if self._module_ref is not None else {}
        tracks: list[Any]
        if _is_sharded(list(params.values())):
            tracks = [
                _ShardedEMA(dict(zip(self._names, track, strict=True)), params) for track in self._tracks
            ]
        else:
            tracks = [
                {name: t.detach().cpu().clone() for name, t in track.items()}
                for track in self.tracks().values()
            ]
        return {"sigma_rels": list(self.sigma_rels), "step": self._step, "tracks": tracks}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if not isinstance(state, dict) or not any(
            isinstance(t, _ShardedEMA) for t in state.get("tracks") or ()
        ):
            return
        if _saves_sharded(trainer):
            # DCP writes each rank's shards with the weights; meta.pt gets no tensor of the tracks
            for i, track in enumerate(state["tracks"]):
                checkpoint["state_dict"].update(
                    {f"{SHARDED_TRACKS_PREFIX}{i}.{name}": t for name, t in track.dtensors().items()}
                )
            state["tracks"] = None
            state[SHARDED_TRACKS_FIELD] = SHARDED_TRACKS_PREFIX
        else:
            state["tracks"] = [dict(track) for track in state["tracks"]]  # gathered on every rank, in order

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning calls this just before load_state_dict, which needs the folder of a sharded state
        self._restoring = (Path(trainer.ckpt_path) if trainer.ckpt_path else None, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restoring, self._restoring = self._restoring, None
        if not state_dict:
            return
        stored = tuple(float(s) for s in state_dict["sigma_rels"])
        if stored != self.sigma_rels:
            raise ValueError(
                f"the checkpoint's post-hoc EMA tracks have sigma_rels {stored}, this callback {self.sigma_rels}"
            )
        prefix = state_dict.get(SHARDED_TRACKS_FIELD)
        if prefix is None:
            self._pending = dict(state_dict)
            self._tracks = None
            return
        folder, pl_module = _sharded_source(
            restoring,
            lambda folder: (
                f"these post-hoc EMA tracks are sharded (the checkpoint's '{prefix}<i>.*' state_dict entries of a "
                f"DCP folder), but they are restored from {folder}; resume from the checkpoint folder with an "
                "FSDP2 strategy"
            ),
        )
        self._read_sharded(folder, prefix, pl_module, int(state_dict["step"]))

    def _read_sharded(self, folder: Path, prefix: str, pl_module: pl.LightningModule, step: int) -> None:
        """Read the track shards of this rank from the DCP folder (collective; DCP reshards another world size)."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        named = list(pl_module.named_parameters())
        names = [name for name, _ in named]
        stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        targets: dict[str, Tensor] = {}
        for i, sigma_rel in enumerate(self.sigma_rels):
            what, tensors = f"post-hoc EMA track {sigma_rel}", "post-hoc EMA tensors"
            targets.update(_sharded_targets(stored, f"{prefix}{i}.", named, folder, what, tensors))
        dcp_load({_DCP_STATE_DICT: targets}, checkpoint_id=str(folder))
        self._module_ref = pl_module
        self._names = names
        self._tracks = [
            [_local(targets[f"{prefix}{i}.{name}"]) for name in names] for i in range(len(self.sigma_rels))
        ]
        self._step = step
        self._pending = None
