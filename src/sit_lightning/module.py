"""SiTModule: the LightningModule that wires a SiT network, a training objective and the samplers.

It does no math of its own: the loss is :meth:`TrainingObjective.loss`, the samplers live in
:mod:`sit_lightning.sampling`. What it owns is *where the randomness comes from*: every draw that
belongs to a training sample (its time ``t``, its noise ``x_0``, its label dropout) is keyed by
``(seed, stream, global_step, batch["key"])`` through :mod:`sit_lightning.randomness`, so a run gives
the same numbers on 1 or 64 processes, with any number of data workers, and after a resume.

The ``__init__`` signature is the ``model:`` section of the YAML configs (LightningCLI).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .data.contract import TrainingData, require
from .errors import ConfigurationError, ShapeMismatchError  # defined low so that data/ raises them too
from .models import SIT_PRESETS, SiT, SiTConfig, SiTPreset
from .objective import TrainingObjective
from .randomness import keyed_rand, keyed_randn
from .repa import HiddenCapture, RepaConfig, RepaProjector, build_encoder, encode_images, repa_loss
from .sampling import ModelField, SampleResult, SamplerSettings, WKLEta
from .sampling.presets import SamplerPresetName, sampler_preset

__all__ = [
    "ConfigurationError",
    "LossProfile",
    "SiTModule",
    "SiTPreset",
    "ShapeMismatchError",
    "TrainingDraws",
    "migrate_hparams",
    "PAPER_LR",
    "PAPER_BETAS",
    "PAPER_WEIGHT_DECAY",
    "PaperAdamW",
    "MAX_CONSECUTIVE_NONFINITE",
    "NonFiniteSteps",
    "NonFiniteTrainingError",
]

#: The paper's optimizer (App. E; released train.py): AdamW, lr 1e-4, no weight decay, default betas.
PAPER_LR = 1e-4
PAPER_WEIGHT_DECAY = 0.0
PAPER_BETAS = (0.9, 0.999)
#: Number of equal bins on [0, 1] of the validation loss profile L_t (bin centres are the times).
LOSS_PROFILE_BINS = 20
#: Consecutive optimizer steps with a non-finite loss or gradient (each skipped) before training stops.
MAX_CONSECUTIVE_NONFINITE = 10

# Stream names of the keyed draws: changing one changes every run's numbers.
_STREAM_TIME = "train_time"
_STREAM_NOISE = "train_noise"
_STREAM_LABEL_DROP = "train_label_drop"
_STREAM_VAL_NOISE = "val_noise"
_STREAM_VAL_TIME = "val_time"
_STREAM_SAMPLE = "sample"


class PaperAdamW(torch.optim.AdamW):
    """AdamW with the paper's defaults (lr 1e-4, no weight decay, betas (0.9, 0.999)), fused on CUDA.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (constant in the paper).
        betas: Adam's moment decays.
        eps: Adam's denominator guard.
        weight_decay: decoupled weight decay.
        fused: the fused CUDA kernel; None picks it when every parameter is a plain CUDA tensor
            (sharded DTensor parameters use the default multi-tensor kernel).
    """

    def __init__(
        self,
        params: Any,
        lr: float = PAPER_LR,
        betas: tuple[float, float] = PAPER_BETAS,
        eps: float = 1e-8,
        weight_decay: float = PAPER_WEIGHT_DECAY,
        fused: bool | None = None,
    ) -> None:
        params = list(params)
        if fused is None:
            tensors = [
                p for group in params for p in (group["params"] if isinstance(group, dict) else [group])
            ]
            fused = bool(tensors) and all(
                p.is_cuda and type(p) in (torch.Tensor, torch.nn.Parameter) for p in tensors
            )
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)


class TrainingDraws(NamedTuple):
    """The random inputs of one training batch, each row keyed by its sample key.

    Attributes:
        t: ``(N,)`` times on the objective's training interval.
        x_0: ``(N, C, H, W)`` standard normal noise.
        drop_labels: ``(N,)`` bool, True where the label is replaced by the null class.
    """

    t: Tensor
    x_0: Tensor
    drop_labels: Tensor


class LossProfile(NamedTuple):
    """The validation loss as a function of time, ``L_t`` (the table the ``w_KL,eta`` SDE needs).

    Attributes:
        times: ``(B,)`` bin-centre times on [0, 1] (0 = noise, 1 = data).
        values: ``(B,)`` per-dimension mean squared error of the model's velocity against the
            conditional velocity ``d_alpha x_1 + d_sigma x_0`` at each time (the velocity loss
            ``L_v`` at ``t``; score and noise models are converted to velocity first, as the paper does).
    """

    times: Tensor
    values: Tensor


class NonFiniteTrainingError(ConfigurationError):
    """Training stopped after too many consecutive optimizer steps with a non-finite loss or gradient."""


class NonFiniteSteps:
    """Skips optimizer steps whose gradients are not finite, the same on every rank; counts the skips.

    One number decides a step: the total 2-norm of the gradients (all of them, before clipping). Under
    DDP the gradients are already all-reduced, so a NaN on one rank is a NaN on all; under FSDP2 the
    norm of the DTensor gradients is reduced over the shards. So every rank takes the same decision
    without further communication. A skipped step leaves the weights, the optimizer state (Adam's
    moments and step count) and, through :attr:`last_finite`, the EMA untouched:

    - ``torch.optim.Adam`` / ``AdamW`` with ``fused=True`` (``PaperAdamW`` on plain CUDA weights) skip
      on the device: the flag is handed to the fused kernel as ``found_inf`` (GradScaler's mechanism),
      which leaves parameters, moments and step counters alone. No host sync.
    - any other optimizer: the flag is read on the host (one device->host sync per step; free on CPU)
      and a bad step's gradients are dropped (``grad = None``), which every torch optimizer skips.
    - under a ``GradScaler`` (``16-mixed``) the scaler skips non-finite steps itself; they are counted.

    Args:
        max_consecutive: stop (:class:`NonFiniteTrainingError`) after this many bad steps in a row.
    """

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1; got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.skips: Tensor | None = None  # 0-d int64 on the gradients' device: bad steps so far
        self._consecutive: Tensor | None = None  # the current run of bad steps
        self._longest: Tensor | None = None  # the longest run of bad steps (read at check time)
        self._host_consecutive = 0  # host-decided steps only
        self._armed: torch.optim.Optimizer | None = None
        self.on_device = False  # whether the latest step was decided on the device
        #: the latest optimizer step's flag: None before any, a bool when decided on the host, a 0-d
        #: bool tensor when decided on the device (an EMA scales its update by it: no host sync)
        self.last_finite: bool | Tensor | None = None

    @staticmethod
    def grad_norm(parameters: Sequence[Tensor]) -> Tensor:
        """The total 2-norm of the gradients of ``parameters``, a plain 0-d float32 tensor on their device."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        full_tensor = getattr(norm, "full_tensor", None)  # DTensor gradients (FSDP2): reduced over shards
        return (full_tensor() if full_tensor is not None else norm).float()

    @staticmethod
    def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` honours ``found_inf`` exactly (torch's fused Adam / AdamW kernels)."""
        return isinstance(optimizer, torch.optim.Adam) and all(g.get("fused") for g in optimizer.param_groups)

    def guard(self, optimizer: torch.optim.Optimizer, finite: Tensor, scaler_skips: bool) -> None:
        """Count the step and make the coming ``optimizer.step()`` a no-op when ``finite`` is False.

        Call between the backward pass and ``optimizer.step()`` (Lightning: inside the closure).
        """
        bad = (~finite).long()
        if self.skips is None or self.skips.device != bad.device:
            self.skips, self._consecutive, self._longest = (torch.zeros_like(bad) for _ in range(3))
        self.skips += bad
        self._consecutive = (self._consecutive + 1) * bad
        self._longest = torch.maximum(self._longest, self._consecutive)
        self.on_device = scaler_skips or self.skips_on_device(optimizer)
        if self.on_device:
            self.last_finite = finite
            if not scaler_skips:  # the scaler sets found_inf itself
                optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
                self._armed = optimizer
            return
        self.last_finite = bool(finite)  # the host sync of optimizers that cannot skip on the device
        self._host_consecutive = 0 if self.last_finite else self._host_consecutive + 1
        if not self.last_finite:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def release(self) -> None:
        """After ``optimizer.step()``: take the flag back from the optimizer."""
        if self._armed is not None:
            with contextlib.suppress(AttributeError):
                del self._armed.found_inf  # type: ignore[attr-defined]
            self._armed = None

    def stop_if_diverged(self, step: int, read_device_count: bool) -> None:
        """Raise :class:`NonFiniteTrainingError` after ``max_consecutive`` bad steps in a row.

        Host-decided steps are checked every step; device-decided ones only when ``read_device_count``
        (one sync: the caller passes True at the logging cadence and at the last step).
        """
        if self.on_device:
            if not read_device_count or self._longest is None:
                return
            run = int(self._longest)
        else:
            run = self._host_consecutive
        if run >= self.max_consecutive:
            total = int(self.skips) if self.skips is not None else run
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: {run} consecutive optimizer steps had a non-finite loss or "
                f"gradient (model.max_consecutive_nonfinite: {self.max_consecutive}; {total} skipped in all); "
                "skipped steps change no weights, optimizer state or EMA, so every checkpoint holds finite "
                "weights. Lower the learning rate, clip gradients (trainer.gradient_clip_val) or check the "
                "data for NaN/Inf"
            )


class SiTModule(LightningModule):
    """SiT training, validation and sampling as a LightningModule.

    Args:
        arch: the network: a preset name (``SiT-{S,B,L,XL}/{2,4,8}``: the released architecture at
            256 px on ImageNet, i.e. 4x32x32 latents, 1000 classes, ``learn_sigma``, label dropout 0.1)
            or a complete :class:`~sit_lightning.models.SiTConfig` for anything else (other latent
            sizes, class counts, widths). In YAML a config is a mapping of its fields; the fields
            left out take the SiT-XL/2-at-256-px defaults.
        grad_checkpointing: recompute each block in the backward pass (saves activation memory).
        objective: interpolant x prediction x loss weighting x time sampler. Default: Linear path,
            velocity prediction, uniform time (the paper's best setting).
        optimizer: ``params -> Optimizer``; default :class:`PaperAdamW` (the paper's AdamW, lr 1e-4,
            fused on CUDA).
        lr_scheduler: ``optimizer -> LRScheduler``; None keeps the paper's constant learning rate.
        seed: base seed of every keyed draw and of the weight initialisation.
        compile: ``torch.compile`` the network (after FSDP sharding when used).
        loss_profile_bins: number of bins on [0, 1] of the validation loss profile.
        max_consecutive_nonfinite: an optimizer step whose gradients are not finite (NaN/Inf loss or
            gradient) is skipped on every rank alike; after this many in a row training stops with
            :class:`NonFiniteTrainingError` (see :class:`NonFiniteSteps`; docs/training.md).
        repa: REPA (representation alignment, Yu et al. ICLR 2025; :class:`~sit_lightning.repa.RepaConfig`):
            ``loss_weight`` times the REPA loss of the tokens after block ``encoder_depth`` is added to the
            objective's loss in training. Its projector is a trained submodule (averaged by the EMA like
            every parameter); the frozen encoder is not a submodule (no state dict, optimizer or EMA
            entry) and is built when training starts. Batches carry ``image`` (uint8 RGB) or
            ``repa_features``. None (default): no REPA, training exactly as without it.
    """

    def __init__(
        self,
        arch: SiTPreset | SiTConfig = "SiT-B/2",
        grad_checkpointing: bool = False,
        objective: TrainingObjective | None = None,
        optimizer: OptimizerCallable = PaperAdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        compile: bool = False,
        loss_profile_bins: int = LOSS_PROFILE_BINS,
        max_consecutive_nonfinite: int = MAX_CONSECUTIVE_NONFINITE,
        repa: RepaConfig | None = None,
    ) -> None:
        super().__init__()
        config = _arch_config(arch)
        if loss_profile_bins < 1:
            raise ValueError(f"loss_profile_bins must be >= 1; got {loss_profile_bins}")
        repa = RepaConfig.from_value(repa) if repa is not None else None
        if repa is not None and repa.encoder_depth > config.depth:
            raise ValueError(
                f"repa.encoder_depth {repa.encoder_depth} is deeper than the network ({config.depth} blocks)"
            )
        # The objective is kept (load_from_checkpoint rebuilds it); the optimizer callables are not state.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if isinstance(arch, SiTConfig):  # plain data in the checkpoint and in hparams.yaml
            self.hparams["arch"] = dataclasses.asdict(arch)
        if repa is not None:
            self.hparams["repa"] = repa.as_dict()
        self.config = config
        # Weights depend on `seed` only, not on the global RNG state or on which rank builds them:
        # FSDP2 shards the tensors each rank initialised, so all ranks must build the same ones.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = SiT(config, grad_checkpointing=grad_checkpointing)
            # drawn after the network's weights, so that the network's are the same with REPA or without
            self.repa_projector = (
                RepaProjector(config.hidden_size, repa.projector_dim, repa.feature_dim) if repa else None
            )
        self.repa = repa
        # In a list, not an attribute nn.Module sees: the frozen encoder (86M parameters for DINOv2
        # ViT-B) stays out of state_dict(), parameters() (so the optimizer and the EMA) and checkpoints.
        self._repa_encoder: list[torch.nn.Module] = []
        self.objective = objective if objective is not None else TrainingObjective()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.seed = int(seed)
        self.compile_network = compile
        self._compiled = False
        self.latent_shape = config.latent_shape
        self._profile_times = (torch.arange(loss_profile_bins, dtype=torch.float64) + 0.5) / loss_profile_bins
        self._profile: LossProfile | None = None
        self._profile_sum: Tensor | None = None
        self._profile_count: Tensor | None = None
        self._nonfinite = NonFiniteSteps(max_consecutive_nonfinite)

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the data against the network before any step runs."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None:  # None: fit() was given bare data loaders, nothing to check against
            data = require(
                datamodule,
                TrainingData,
                for_what="SiTModule (to check the data against the network before the first step)",
            )
            self.check_data(latent_shape=data.latent_shape, num_classes=data.num_classes)
            if stage == "fit":
                self.check_repa_inputs(getattr(datamodule, "repa_inputs", None))
        # The network's label-range check reads label values: one host-device sync per forward, which
        # stalls an asynchronous GPU loop. Labels from our datamodules are checked when written, and
        # an out-of-range label still fails inside nn.Embedding.
        if self.device.type == "cuda":
            self.network.check_label_range = False
        if (
            stage == "fit"
            and self.repa is not None
            and self.repa.encoder is not None
            and not self._repa_encoder
        ):
            self._repa_encoder.append(build_encoder(self.repa, self.config.grid_size))  # fails before step 1

    def on_fit_start(self) -> None:
        for encoder in self._repa_encoder:  # not a submodule: Lightning does not move it
            encoder.to(self.device)

    def check_repa_inputs(self, repa_inputs: str | None) -> None:
        """Raise :class:`ConfigurationError` if the datamodule's ``repa_inputs`` cannot feed this module's REPA.

        ``repa_inputs``: what a :class:`~sit_lightning.data.LatentDataModule` adds to each batch
        (``"none"``, ``"image"``, ``"features"``), or None for a datamodule that does not say (nothing to
        check: the first training batch then tells). Checked at setup, so a mismatch fails before step 1.
        """
        if repa_inputs is None:
            return
        if self.repa is None:
            if repa_inputs != "none":
                rank_zero_warn(
                    f"data.repa_inputs is {repa_inputs!r} but model.repa is null: the datamodule reads "
                    "what REPA would align with and nothing uses it; set data.repa_inputs: none"
                )
            return
        if repa_inputs == "none":
            raise ConfigurationError(
                "model.repa is set but data.repa_inputs is 'none': REPA needs the clean image "
                "(repa_inputs: image, with model.repa.encoder) or precomputed encoder features "
                "(repa_inputs: features)"
            )
        if repa_inputs == "image" and self.repa.encoder is None:
            raise ConfigurationError(
                "data.repa_inputs is 'image' but model.repa.encoder is null: set model.repa.encoder to the "
                "frozen encoder that turns images into features, or use repa_inputs: features"
            )

    def check_data(self, latent_shape: Sequence[int] | None = None, num_classes: int | None = None) -> None:
        """Raise :class:`ShapeMismatchError` if data of this shape / class count cannot feed the network.

        Args:
            latent_shape: ``(C, H, W)`` of one training sample, or None to skip.
            num_classes: number of classes in the data, or None to skip.
        """
        if latent_shape is not None and tuple(int(s) for s in latent_shape) != self.latent_shape:
            raise ShapeMismatchError(
                f"the data's latent shape {tuple(latent_shape)} does not fit the model, which expects "
                f"(in_channels, input_size, input_size) = {self.latent_shape}; set model.arch.in_channels "
                f"and model.arch.input_size to match the data (e.g. input_size: 32 for 256 px, 64 for 512 px)"
            )
        if num_classes is not None and int(num_classes) > self.network.num_classes:
            raise ShapeMismatchError(
                f"the data has {num_classes} classes but the model's label table has {self.network.num_classes}; "
                f"set model.arch.num_classes: {num_classes}"
            )

    def configure_model(self) -> None:
        """Shard the network with FSDP2 under ``ModelParallelStrategy`` (each block, then the root).

        Under DDP or a single device nothing is sharded. Also compiles the network when asked.
        """
        mesh = self._device_mesh
        if mesh is not None and not _is_fully_sharded(self.network):  # configure_model runs per stage
            from torch.distributed.fsdp import fully_shard

            dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            for block in self.network.blocks:
                fully_shard(block, mesh=dp_mesh)
            fully_shard(self.network, mesh=dp_mesh)
            if self.repa_projector is not None:  # its gradients are reduced over ranks like the network's
                fully_shard(self.repa_projector, mesh=dp_mesh)
        if self.compile_network and not self._compiled:
            self.network.compile()  # in place: parameter names (and checkpoints) stay the same
            self._compiled = True

    def configure_optimizers(self) -> Any:
        """The injected optimizer and scheduler, or the paper's constant-LR AdamW."""
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        self._check_schedule_length(scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _check_schedule_length(self, scheduler: Any) -> None:
        """A schedule of fixed length (``OneCycleLR``'s ``total_steps``) must cover ``trainer.max_steps``.

        Otherwise torch fails only when the schedule runs out, deep inside a long run.
        """
        total = getattr(scheduler, "total_steps", None)
        if not isinstance(total, int) or self._trainer is None:
            return
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 0 or max_steps > total:
            raise ConfigurationError(
                f"the learning-rate schedule {type(scheduler).__name__} lasts total_steps={total} optimizer "
                f"steps but trainer.max_steps is {max_steps}; set trainer.max_steps <= {total} or raise "
                f"the schedule's total_steps to trainer.max_steps"
            )

    # ---- training ------------------------------------------------------------------------------
    def training_draws(self, batch: dict[str, Tensor], step: int) -> TrainingDraws:
        """Time, noise and label dropout of a batch, each row keyed by ``(seed, step, batch["key"])``.

        Row ``i`` depends only on the seed, the optimizer step and ``batch["key"][i]``, never on the
        rank, the worker or the other samples of the batch.
        """
        x_1, keys = batch["x"], batch["key"]
        device = x_1.device  # drawn where the batch is: no host round trip, no per-sample loop
        t = self._keyed_times(_STREAM_TIME, step, keys, device)
        x_0 = keyed_randn(x_1.shape[1:], self.seed, _STREAM_NOISE, step, keys, device=device)
        u = keyed_rand((), self.seed, _STREAM_LABEL_DROP, step, keys, device=device)
        drop = u < self.network.class_dropout_prob
        return TrainingDraws(t=t.to(x_1.dtype), x_0=x_0.to(x_1.dtype), drop_labels=drop)

    def _keyed_times(self, stream: str, step: int, keys: Tensor, device: torch.device) -> Tensor:
        """``(N,)`` float32 times of the objective's time sampler, row ``i`` keyed by ``keys[i]``."""
        draw = keyed_rand if self.objective.time_sampler.base == "uniform" else keyed_randn
        return self.objective.time_from_base(draw((), self.seed, stream, step, keys, device=device))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        draws = self.training_draws(batch, self.global_step)
        model = self.network if self.repa is None else HiddenCapture(self.network, self.repa.encoder_depth)
        out = self.objective.loss(
            model, batch["x"], t=draws.t, x_0=draws.x_0, y=batch["y"], drop_labels=draws.drop_labels
        )
        loss = out.loss.mean()
        if isinstance(model, HiddenCapture):
            alignment = self.repa_loss(model.hidden, batch)
            self.log("train/repa_loss", alignment)
            loss = loss + self.repa.loss_weight * alignment
        # No host-device sync outside logging steps (docs/performance.md, "Syncs per training step"):
        # the logger reads device tensors only every log_every_n_steps, but the progress bar reads its
        # metrics on every step, so it gets a CPU copy of the loss, made at logging steps only; the
        # learning rate is logged as a CPU tensor (a float would be copied to the device every step).
        self.log("train/loss", loss.detach())
        if _logs_this_step(self._trainer):
            self.log("loss", loss.detach().float().cpu(), prog_bar=True, logger=False)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/lr", lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float64))
        return loss

    def repa_loss(self, hidden: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """The batch mean of :func:`~sit_lightning.repa.repa_loss` of ``(N, T, D)`` hidden tokens.

        The target features are ``batch["repa_features"]`` when the batch has them (precomputed),
        else the frozen encoder's features of ``batch["image"]``.
        """
        if self.repa is None or self.repa_projector is None:
            raise ConfigurationError("this module was built without repa")
        return repa_loss(self.repa_projector(hidden), self.repa_targets(batch)).mean()

    def repa_targets(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``(N, T, C)`` REPA target features of a batch: precomputed, or encoded from the clean images."""
        assert self.repa is not None
        if "repa_features" in batch:
            return batch["repa_features"]
        if "image" in batch and self.repa.encoder is not None:
            if not self._repa_encoder:  # training_step called outside Trainer.fit
                self._repa_encoder.append(build_encoder(self.repa, self.config.grid_size))
            encoder = self._repa_encoder[0]
            image = batch["image"]
            if next(encoder.parameters(), image).device != image.device:
                encoder.to(image.device)
            return encode_images(encoder, image, self.repa.encoder_resolution)
        wanted = "'repa_features' (precomputed) or 'image'" if self.repa.encoder else "'repa_features'"
        raise ConfigurationError(
            f"REPA needs {wanted} in every training batch, but the batch has {sorted(batch)}"
            + ("" if self.repa.encoder else " (model.repa.encoder is null: features must be precomputed)")
            + "; see docs/training.md, 'REPA'"
        )

    @property
    def last_step_finite(self) -> bool | Tensor | None:
        """Whether the latest optimizer step was applied (False: skipped as non-finite; see :class:`NonFiniteSteps`).

        A bool when the skip was decided on the host, a 0-d bool tensor when on the device (read it
        without syncing: an EMA multiplies its update weight by it), None before the first step.
        """
        return self._nonfinite.last_finite

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Every optimizer step: the gradient norm, the non-finite skip, then ``trainer.gradient_clip_val``.

        The norm is computed once and serves the skip, the log and norm clipping, as a plain tensor
        (FSDP2 DTensor gradients reduced over the shards), so clipping works under FSDP2 too.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = self._nonfinite.grad_norm(params)  # before clipping
        finite = torch.isfinite(grad_norm)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self._nonfinite.guard(optimizer, finite, scaler_skips=scaler is not None)
        # logged at Lightning's cadence (log_every_n_steps): tensors, no host sync here
        self.log("train/grad_norm", grad_norm)
        self.log("train/nonfinite_skips", self._nonfinite.skips.float())
        if not gradient_clip_val:
            return
        if scaler is not None:  # the scaler's own checks (e.g. a fused optimizer cannot be clipped)
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif gradient_clip_algorithm in (None, "norm"):
            with_grads = [p for p in params if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(with_grads, gradient_clip_val, grad_norm)
        else:
            torch.nn.utils.clip_grad_value_([p for p in params if p.grad is not None], gradient_clip_val)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Lightning's step (the closure runs backward and :meth:`configure_gradient_clipping`), then the stop check.

        Device-decided skips are counted on the device and read every ``trainer.log_every_n_steps``
        steps and at the last step; a run of ``max_consecutive_nonfinite`` bad steps then stops training
        here, before any callback (checkpoints included) sees the step.
        """
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            self._nonfinite.release()
        step = self.trainer.global_step + 1  # counted when this hook returns; checkpoints name it so
        every = self.trainer.log_every_n_steps
        last = 0 <= self.trainer.max_steps <= step  # max_steps -1: no step limit
        self._nonfinite.stop_if_diverged(step, read_device_count=last or (every > 0 and step % every == 0))

    # ---- validation: loss and loss profile L_t -------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        bins = len(self._profile_times)
        self._profile_sum = torch.zeros(bins, dtype=torch.float64, device=self.device)
        self._profile_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x_1, y, keys = batch["x"], batch["y"], batch["key"]
        # The plain objective at keyed times (comparable across runs), then L_t at fixed bin centres.
        t = self._keyed_times(_STREAM_VAL_TIME, 0, keys, x_1.device)
        x_0 = keyed_randn(x_1.shape[1:], self.seed, _STREAM_VAL_NOISE, 0, keys, device=x_1.device).to(
            x_1.dtype
        )
        loss = self.objective.loss(self.network, x_1, t=t, x_0=x_0, y=y).loss.mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(keys))
        interpolant = self.objective.interpolant
        for k, t_k in enumerate(self._profile_times.tolist()):
            x_0 = keyed_randn(x_1.shape[1:], self.seed, _STREAM_VAL_NOISE, k + 1, keys, device=x_1.device).to(
                x_1.dtype
            )
            t_vec = torch.full((len(keys),), t_k, device=x_1.device, dtype=x_1.dtype)
            x_t = interpolant.interpolate(x_0, x_1, t_vec)
            out = self.network(x_t, t_vec, y).float()
            velocity = interpolant.convert(
                out, x_t.float(), t_vec.float(), self.objective.prediction, "velocity"
            )
            err = (velocity - interpolant.velocity(x_0.float(), x_1.float(), t_vec.float())).pow(2)
            self._profile_sum[k] += err.flatten(1).mean(dim=1).sum().double()
        self._profile_count += len(keys)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._profile_sum is None or self.trainer.sanity_checking:
            return
        total = self.trainer.strategy.reduce(self._profile_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._profile_count, reduce_op="sum")
        if float(count) == 0:
            return
        values = (total / count).float().cpu()
        self._profile = LossProfile(times=self._profile_times.float().clone(), values=values)
        for t_k, v in zip(self._profile.times.tolist(), values.tolist(), strict=True):
            self.log(f"val/loss_t/{t_k:.3f}", v, rank_zero_only=True)

    @property
    def loss_profile(self) -> LossProfile | None:
        """The latest validation loss profile ``L_t`` (None before the first validation)."""
        return self._profile

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._profile is not None:
            checkpoint["loss_profile"] = {"times": self._profile.times, "values": self._profile.values}

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path | IO,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> SiTModule:
        """Lightning's ``load_from_checkpoint``, without running code from the file, also for 0.1 files.

        By default (``weights_only`` None or True) the file is read with ``torch.load(weights_only=True)``
        plus the classes a checkpoint written from Python holds (its ``TrainingObjective``; see
        :mod:`sit_lightning.trusted_loading`); a file naming any other type fails with a one-line
        :class:`~sit_lightning.trusted_loading.UntrustedCheckpointError` and nothing in it runs.
        ``weights_only=False`` unpickles everything: only for files you trust.

        Checkpoints of sit-lightning 0.1 stored the network as a preset plus overrides (``arch``,
        ``depth``, ``hidden_size``...); the network must be built from the migrated ``arch``
        (:func:`migrate_hparams`) before the weights load, so the stored hyperparameters are read and
        migrated first.
        """
        from .trusted_loading import refusing_untrusted

        trusted = weights_only is not False
        with refusing_untrusted(checkpoint_path) if trusted else contextlib.nullcontext():
            if "arch" not in kwargs and hparams_file is None:
                stored = _stored_hparams(checkpoint_path, trusted)
                if _is_legacy(stored):
                    kwargs["arch"] = migrate_hparams(stored)["arch"]
            return super().load_from_checkpoint(
                checkpoint_path,
                map_location=map_location,
                hparams_file=hparams_file,
                strict=strict,
                weights_only=trusted,
                **kwargs,
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, Mapping) and _is_legacy(hparams):
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = hparams = migrate_hparams(hparams)
        if isinstance(hparams, Mapping) and "arch" in hparams:
            stored = _arch_config(hparams["arch"])
            if stored != self.config:
                raise ConfigurationError(
                    f"the checkpoint's network is {stored}, but this module was built as {self.config}; "
                    "build the module with the checkpoint's arch (SiTModule.load_from_checkpoint does)"
                )
        stored = checkpoint.get("loss_profile")
        if stored is not None:
            self._profile = LossProfile(times=stored["times"].float(), values=stored["values"].float())

    # ---- sampling ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self, use_ema: bool = True, ema: WeightAverage | None = None) -> Iterator[None]:
        """Within the block the module's parameters hold averaged (EMA) weights; restored exactly after.

        Args:
            use_ema: False leaves the live weights in place.
            ema: the average to swap in (anything with ``swap(module)``, e.g. an ``EMACallback``);
                default: the one among the attached trainer's callbacks (:func:`find_weight_average`).
                Without either the live weights stay.
        """
        if use_ema and ema is None:
            ema = find_weight_average(self._trainer)
        if use_ema and ema is not None:
            with ema.swap(self):
                yield
        else:
            yield

    def network_state_dict(self, use_ema: bool = True) -> dict[str, Tensor]:
        """The network's weights in the released SiT layout (no ``network.`` prefix), EMA by default.

        ``SiT(...).load_state_dict(module.network_state_dict(), strict=True)`` loads them, as does the
        released code when ``learn_sigma=True``. Single device / DDP (under FSDP2 use a full state dict).
        """
        with self.ema_weights(use_ema):
            return {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    def sample_noise(self, indices: Sequence[int] | Tensor, seed: int | None = None) -> Tensor:
        """``(N, C, H, W)`` starting noise; row ``i`` depends only on ``(seed, indices[i])``."""
        seed = self.seed if seed is None else seed
        return keyed_randn(self.latent_shape, seed, _STREAM_SAMPLE, 0, indices, device=self.device)

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | Sequence[int],
        settings: SamplerSettings | SamplerPresetName | None = None,
        *,
        noise: Tensor | None = None,
        seed: int | None = None,
        indices: Sequence[int] | Tensor | None = None,
        use_ema: bool = True,
        ema: WeightAverage | None = None,
        guide: Callable[..., Tensor] | None = None,
        **keywords: Any,
    ) -> SampleResult:
        """Draw latents as :class:`~sit_lightning.sampling.SamplerSettings` say (EMA weights by default).

        Every random number is keyed by ``(seed, indices[i])``: the starting noise and, for the SDE,
        the noise of every step. So sample ``i`` is the same whatever batch or rank draws it.

        Args:
            labels: ``(N,)`` class labels.
            settings: sampler, method, steps, grid, SDE diffusion, guidance (default: ``SamplerSettings()``,
                the Heun ODE with 125 steps), or a preset's name (``"released-sde-cfg1.5"``,
                ``sit_lightning.sampling.presets``). An ODE without ``t0``/``t1`` runs on the objective's
                ``sample_interval()``; ``diffusion='w_kl_eta'`` uses :attr:`loss_profile` as ``L_t``.
            noise: ``(N, C, H, W)`` starting noise at t0; default: keyed noise (see :meth:`sample_noise`).
            seed: seed of the keyed draws; default: the module's seed.
            indices: ``(N,)`` global sample indices of the keyed draws; default ``0..N-1``.
            use_ema: sample with the averaged weights (see :meth:`ema_weights`).
            ema: the averaged weights; default: the attached trainer's ``EMACallback``.
            guide: autoguidance: a weaker network ``(x, t, y) -> output`` guiding with
                ``settings.cfg_scale`` instead of the null class (used as given: no EMA swap).
            **keywords: instead of ``settings``, its fields by name (``steps=16, method="heun"``;
                None leaves a field at its default), the keyword form of earlier versions.

        Returns:
            the sampler's :class:`~sit_lightning.sampling.SampleResult` (``.samples`` are latents at t1,
            ``.nfe`` the network evaluations).

        Raises:
            ValueError: for keywords that are not settings, keywords given with ``settings``, or
                ``w_kl_eta`` before a validation has written the loss profile.
        """
        if keywords:
            if settings is not None:
                raise ValueError(
                    f"pass either settings or its fields as keywords, not both; got settings and {sorted(keywords)} "
                    "(use dataclasses.replace(settings, ...))"
                )
            allowed = [f.name for f in dataclasses.fields(SamplerSettings)]
            unknown = sorted(set(keywords) - set(allowed))
            if unknown:
                raise ValueError(f"unknown sampler settings {unknown}; the settings are {allowed}")
            settings = SamplerSettings(**{k: v for k, v in keywords.items() if v is not None})
        settings = SamplerSettings() if settings is None else settings
        if isinstance(settings, str):
            settings = sampler_preset(settings)
        if settings.sampler == "ode" and (settings.t0 is None or settings.t1 is None):
            t0, t1 = self.objective.sample_interval()
            t0 = t0 if settings.t0 is None else settings.t0
            t1 = t1 if settings.t1 is None else settings.t1
            settings = dataclasses.replace(settings, t0=t0, t1=t1)
        loss_table = None
        if settings.diffusion == WKLEta.name and settings.sampler == "sde":
            if self.loss_profile is None:
                raise ValueError("diffusion='w_kl_eta' needs a loss profile L_t: run a validation first")
            loss_table = (self.loss_profile.times.tolist(), self.loss_profile.values.tolist())
        seed = self.seed if seed is None else int(seed)
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        indices = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices).reshape(-1).cpu()
        if len(indices) != len(labels):
            raise ValueError(f"indices has {len(indices)} entries but labels has {len(labels)}")
        noise = self.sample_noise(indices, seed) if noise is None else noise
        # the state is integrated in the weights' dtype (float32, or bf16 for a bf16-true model)
        noise = noise.to(device=self.device, dtype=next(self.network.parameters()).dtype)

        def normals(k: int, shape: tuple[int, ...]) -> Tensor:  # SDE step k: keyed like the noise
            return keyed_randn(shape[1:], seed, _STREAM_SAMPLE, k + 1, indices, device=self.device)

        was_training = self.network.training
        self.network.eval()
        try:
            with self.ema_weights(use_ema, ema):
                null_class = None if guide is not None else self.network.num_classes
                net = settings.guided(self.network, null_class=null_class, guide=guide)
                field = ModelField(net, self.objective.interpolant, self.objective.prediction, y=labels)
                sde = settings.sampler == "sde"
                return settings.sample(field, noise, normals=normals if sde else None, loss_table=loss_table)
        finally:
            self.network.train(was_training)


class WeightAverage(Protocol):
    """Averaged weights that can stand in for a module's own (``EMACallback`` is one)."""

    def swap(self, module: LightningModule) -> contextlib.AbstractContextManager[Any]:
        """Within the block ``module``'s parameters hold the averaged weights."""
        ...


def find_weight_average(trainer: Any) -> WeightAverage | None:
    """The callback of ``trainer`` that holds averaged weights (has ``swap(module)``), or None.

    Raises:
        ValueError: when several callbacks offer averaged weights (which one to sample is ambiguous).
    """
    callbacks = getattr(trainer, "callbacks", None) or []
    found = [cb for cb in callbacks if callable(getattr(cb, "swap", None))]
    if len(found) > 1:
        names = [type(cb).__name__ for cb in found]
        raise ValueError(f"several callbacks hold averaged weights: {names}; pass ema= to choose one")
    return found[0] if found else None


def _logs_this_step(trainer: Any) -> bool:
    """Whether Lightning writes the logs at this training step (every ``trainer.log_every_n_steps``)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def _arch_config(arch: str | SiTConfig | Mapping[str, Any]) -> SiTConfig:
    """The :class:`SiTConfig` of ``arch``: a preset name, a config, or a config's fields as a mapping."""
    if isinstance(arch, SiTConfig):
        return arch
    if isinstance(arch, str):
        if arch not in SIT_PRESETS:
            raise ValueError(
                f"unknown arch {arch!r}; choose one of {', '.join(SIT_PRESETS)} or give a SiTConfig"
            )
        return SIT_PRESETS[arch]
    if isinstance(arch, Mapping):  # hparams read back from a checkpoint or hparams.yaml
        return SiTConfig(**arch)
    raise ValueError(f"arch must be a preset name or a SiTConfig; got {type(arch).__name__} {arch!r}")


#: Hyperparameters of sit-lightning 0.1 that are now fields of ``arch`` (a SiTConfig).
_LEGACY_ARCH_FIELDS = (
    "input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob",
    "depth", "hidden_size", "num_heads", "patch_size",
)  # fmt: skip


def _is_legacy(hparams: Mapping[str, Any]) -> bool:
    return any(key in hparams for key in _LEGACY_ARCH_FIELDS)


def migrate_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters of a sit-lightning 0.1 checkpoint in today's form.

    0.1 stored ``arch`` as a preset name, ``input_size``, ``in_channels``, ``num_classes``,
    ``learn_sigma`` and ``class_dropout_prob`` beside it, and ``depth`` / ``hidden_size`` /
    ``num_heads`` / ``patch_size`` as overrides of the preset (None: the preset's). Today ``arch`` is
    one :class:`~sit_lightning.models.SiTConfig`, stored as the mapping of its fields. Other keys pass
    through unchanged; hyperparameters already in today's form are returned as they are.
    """
    if not _is_legacy(hparams):
        return dict(hparams)
    preset = _arch_config(hparams.get("arch", "SiT-B/2"))
    fields = dataclasses.asdict(preset)
    fields.update({k: hparams[k] for k in _LEGACY_ARCH_FIELDS if hparams.get(k) is not None})
    migrated = {k: v for k, v in hparams.items() if k not in _LEGACY_ARCH_FIELDS}
    migrated["arch"] = dataclasses.asdict(SiTConfig(**fields))
    return migrated


def _stored_hparams(checkpoint_path: str | Path | IO, weights_only: bool | None) -> Mapping[str, Any]:
    """The hyperparameters stored in a Lightning checkpoint (read memory-mapped when it is a file)."""
    key = LightningModule.CHECKPOINT_HYPER_PARAMS_KEY
    if isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_file():
        checkpoint = torch.load(
            checkpoint_path, map_location="cpu", mmap=True, weights_only=weights_only is not False
        )
        return checkpoint.get(key, {})
    if hasattr(checkpoint_path, "seek"):  # a file object: read it, then rewind it for Lightning
        position = checkpoint_path.tell()
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=weights_only is not False)
        checkpoint_path.seek(position)
        return checkpoint.get(key, {})
    return {}  # a remote path: Lightning reads it; 0.1 checkpoints must be local files


def _is_fully_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
