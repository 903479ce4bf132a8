"""The ``sit-lightning sample`` command: an ADM-evaluator ``.npz`` from a checkpoint, on every device.

    sit-lightning sample last.ckpt samples.npz --num_samples 50000 --settings released-ode-heun250-cfg1.5 \\
        --decoder stabilityai/sd-vae-ft-ema --latents /data/imagenet256-latents
    sit-lightning sample SiT-XL-2-256x256.pt samples.npz --num_samples 50000 \\
        --settings '{sampler: ode, method: heun, steps: 125, cfg_scale: 1.5, guidance_channels: 3}' \\
        --decoder stabilityai/sd-vae-ft-ema --batch_size 125 --precision bf16-mixed
    sit-lightning sample digits.ckpt digits.npz --num_samples 2000 --labels balanced   # pixels: no decoder

Inputs: a Lightning checkpoint (``.ckpt``; the EMA weights of its ``EMACallback`` state by default, read
as ``sit-lightning convert`` reads them) or a released file (``.pt`` / ``.pth`` state dict or train.py
checkpoint, ``.safetensors``). Sample ``i`` is keyed by ``(seed, i)`` alone (noise, SDE noise, label:
:mod:`~sit_lightning.evaluation.sample_plan`), so with a fixed-step method the file is the same on any
number of processes and with any batch size. Lightning Fabric runs one process per device (all visible
ones by default); each takes whole chunks of indices and writes them as they finish
(:mod:`~sit_lightning.evaluation.npz`), so an interrupted run resumes where it stopped. See
docs/evaluation.md, "sit-lightning sample".
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .convert_cli import LIGHTNING_SUFFIX, read_lightning, read_source
from .errors import ConfigurationError
from .evaluation.images import IdentityDecoder, LatentDecoder, make_decoder
from .evaluation.npz import RELEASED_UINT8, ChunkStore, released_uint8, sha256_file
from .evaluation.sample_plan import LabelMode, sample_labels
from .models.checkpoint import Which
from .module import SiTModule
from .objective import TrainingObjective
from .sampling import SamplerSettings

try:  # sampler presets by name, where sit_lightning.sampling.presets is present
    from .sampling.presets import SamplerPresetName, sampler_preset
except ImportError:  # pragma: no cover
    SamplerPresetName = SamplerSettings  # type: ignore[misc,assignment]
    sampler_preset = None  # type: ignore[assignment]

__all__ = ["SAMPLE_SUBCOMMAND", "SampleRun", "load_lightning_module", "sample_images", "sample_main"]

#: Subcommand name (dispatched by ``sit-lightning``'s ``main`` before LightningCLI).
SAMPLE_SUBCOMMAND = "sample"
#: Format of the run's JSON.
METADATA_FORMAT = "sit-lightning/adm-samples"
METADATA_VERSION = 1
Precision = Literal["32-true", "bf16-mixed"]
#: Samples per chunk file: the unit of resumption and of the work split between processes.
DEFAULT_CHUNK_SIZE = 1000


@dataclass(frozen=True)
class SampleRun:
    """What a ``sample`` run produced (on every rank; the files are written by rank 0).

    Attributes:
        output: the ``.npz``.
        metadata: its JSON (every setting, the checkpoint's hash, versions, the file's hash).
        num_samples: images in the file.
        made: samples this run generated (0 when the file was complete already).
        seconds: wall time of the sampling loop on this rank.
    """

    output: Path
    metadata: Path
    num_samples: int
    made: int
    seconds: float


def load_lightning_module(checkpoint: Path, which: Which = "ema", option: str = "--which") -> SiTModule:
    """A Lightning checkpoint's :class:`SiTModule`, its network holding the EMA (default) or trained weights.

    The module (objective, arch, loss profile) comes through Lightning's loader; the weights as
    ``convert`` reads them, since the EMA lives in the EMACallback's state, not in the module's
    ``state_dict``. The module samples with ``use_ema=False``: no trainer, no swap.

    Args:
        option: the flag that picks ``which`` in the caller's command line, for the error message.

    Raises:
        ConfigurationError: the EMA is asked for and the checkpoint has no EMACallback state.
    """
    module = SiTModule.load_from_checkpoint(checkpoint, map_location="cpu")
    source = read_lightning(checkpoint)
    if which == "ema" and source.ema is None:
        raise ConfigurationError(
            f"{checkpoint} has no EMACallback state; pass {option} model to use the trained weights"
        )
    module.network.load_state_dict(source.ema if which == "ema" else source.model, strict=True)
    return module


@dataclass(frozen=True)
class _Loaded:
    module: SiTModule
    kind: Literal["lightning", "released"]
    weights: str


def _load(
    checkpoint: Path, which: Which, objective: TrainingObjective | None, num_heads: int | None
) -> _Loaded:
    """The SiTModule to sample, holding the chosen weights (EMA by default)."""
    if not checkpoint.is_file():
        raise ConfigurationError(f"checkpoint {str(checkpoint)!r} does not exist or is not a file")
    if checkpoint.suffix.lower() == LIGHTNING_SUFFIX:
        if objective is not None or num_heads is not None:
            raise ConfigurationError(
                f"{checkpoint.name} stores its objective and architecture; --objective and --num_heads "
                "apply to released files"
            )
        return _Loaded(load_lightning_module(checkpoint, which), "lightning", which)
    source = read_source(checkpoint, num_heads=num_heads)
    if which == "ema" and source.ema is None:  # a bare state dict holds one set (the published files: EMA)
        weights, state = "the file's only set", source.model
    else:
        weights, state = which, source.model if which == "model" else source.ema
    module = SiTModule(arch=source.config, objective=objective)
    module.network.load_state_dict(state, strict=True)
    return _Loaded(module, "released", weights)


def _versions(decoder: LatentDecoder) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["sit-lightning", "torch", "lightning", "numpy"]
    if not isinstance(decoder, IdentityDecoder):
        names.append("diffusers")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """``torch.backends.cuda.matmul.allow_tf32 = enabled`` inside the block, as the released
    ``sample_ddp.py`` sets it (``--tf32``, default on; the cuDNN flag stays PyTorch's), restored after.

    TF32 rounds float32 matmul inputs to a 10-bit mantissa on Ampere and later GPUs; it does not touch
    CPU arithmetic.
    """
    matmul = torch.backends.cuda.matmul
    # PyTorch >= 2.9 keeps the state in fp32_precision ("none" / "ieee" / "tf32"); allow_tf32 writes it
    field = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, field)
    matmul.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        setattr(matmul, field, before)


def _describe_decoder(decoder: LatentDecoder) -> dict[str, Any]:
    if isinstance(decoder, IdentityDecoder):
        return {"kind": "none (pixel-space samples)"}
    normalization = getattr(decoder, "normalization", None)
    return {
        "kind": type(decoder).__name__,
        "pretrained": getattr(decoder, "pretrained", None),
        "normalization": None if normalization is None else normalization.describe(),
    }


def sample_images(
    checkpoint: str,
    output: str,
    *,
    num_samples: int,
    settings: SamplerSettings | SamplerPresetName = SamplerSettings(),  # noqa: B008 (frozen, validated)
    seed: int = 0,
    labels: LabelMode = "uniform",
    batch_size: int = 64,
    decoder: str | None = None,
    latents: str | None = None,
    vae_scale: float | None = None,
    decode_batch_size: int = 32,
    which: Which = "ema",
    objective: TrainingObjective | None = None,
    num_heads: int | None = None,
    precision: Precision = "32-true",
    tf32: bool = True,
    compile: bool = False,
    accelerator: str = "auto",
    devices: int | str = "auto",
    num_nodes: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    allow_batch_dependence: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> SampleRun:
    """Sample ``num_samples`` images into an ADM-evaluator ``.npz`` (and a JSON of the run beside it).

    Args:
        checkpoint: a Lightning ``.ckpt`` or a released ``.pt`` / ``.pth`` / ``.safetensors`` file.
        output: the ``.npz`` to write; ``<stem>.json`` goes beside it, ``<stem>.parts/`` holds the
            chunks while the run lasts.
        num_samples: images to make (the paper's FID uses 50,000).
        settings: the sampler: a mapping of ``SamplerSettings`` fields (``{sampler: ode, method: heun,
            steps: 125, cfg_scale: 1.5}``) or a preset name (``sit_lightning.sampling.presets``).
        seed: key of every random draw: sample ``i`` depends on ``(seed, i)`` only.
        labels: ``uniform`` (a keyed uniform draw per sample, as the released ``sample_ddp.py`` and ADM
            draw them) or ``balanced`` (label ``i % num_classes``: exact per-class counts).
        batch_size: samples per sampler call on each device (does not change the file for fixed-step
            methods).
        decoder: None for pixel-space samples (the digits); for latents a diffusers ``AutoencoderKL``
            folder or hub id (the paper: ``stabilityai/sd-vae-ft-ema``).
        latents: the latent shard folder the model was trained on: its index's normalisation (scale, or
            per-channel mean and std) is undone before decoding. Without it samples are divided by
            ``vae_scale``.
        vae_scale: the latent scale factor to undo when no ``latents`` folder is given (default
            0.18215, ``SD_VAE_SCALE``).
        decode_batch_size: images per VAE decode call.
        which: ``ema`` (default) or ``model`` weights; a bare released state dict holds one set.
        objective: released files only: the path and prediction the weights were trained with
            (default: Linear path, velocity prediction, the released default). A ``.ckpt`` stores its own.
        num_heads: released files only, for an architecture that is no preset.
        precision: ``32-true``, or ``bf16-mixed`` (autocast of the network; decoding stays float32).
        tf32: TF32 matmuls on CUDA (``torch.backends.cuda.matmul.allow_tf32``) while sampling, as the
            released ``sample_ddp.py`` (``--tf32``, default on); restored afterwards. Recorded in the JSON.
        compile: ``torch.compile`` the network.
        accelerator: Lightning accelerator (``auto``, ``cuda``, ``cpu``).
        devices: devices (processes) per node; ``auto``: every visible GPU (one process on a CPU).
            Under ``torchrun`` or SLURM give the processes per node.
        num_nodes: nodes (the output folder must be one filesystem that all of them see).
        chunk_size: samples per chunk file (the unit of resumption and of the split between processes).
        allow_batch_dependence: accept an adaptive ODE method, whose step-size control spans the batch,
            so that the samples depend on ``batch_size``.
        overwrite: replace a finished ``output`` made with other settings (and discard the chunks of an
            unfinished run with other settings).
        progress: show a progress bar (images/s) on rank 0.

    Returns:
        the :class:`SampleRun`.
    """
    from lightning.fabric import Fabric

    if isinstance(settings, str):
        if sampler_preset is None:  # pragma: no cover
            raise ConfigurationError(f"settings {settings!r}: no sampler presets in this version")
        settings = sampler_preset(settings)
    if not isinstance(settings, SamplerSettings):
        raise ConfigurationError(f"settings must be a SamplerSettings or a preset name; got {settings!r}")
    if num_samples < 1 or batch_size < 1:
        raise ConfigurationError(
            f"num_samples and batch_size must be >= 1; got {num_samples} and {batch_size}"
        )
    if settings.adaptive and not allow_batch_dependence:
        raise ConfigurationError(
            f"method {settings.method!r} is adaptive: its error norm spans the batch, so a sample depends on "
            "the batch it is drawn in and the file on --batch_size; pick a fixed-step method or pass "
            "--allow_batch_dependence true"
        )
    store = ChunkStore(Path(output), num_samples, chunk_size)
    checkpoint_path = Path(checkpoint)
    the_decoder = make_decoder(decoder, vae_scale, latents)

    with tf32_matmuls(tf32):  # the released sample_ddp.py's flag, restored for the caller
        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, precision=precision)
        fabric.launch()
        loaded = _load(checkpoint_path, which, objective, num_heads)
        module = loaded.module
        channels = module.config.in_channels
        if isinstance(the_decoder, IdentityDecoder) and channels not in (1, 3):
            raise ConfigurationError(
                f"the model makes {channels}-channel samples, latents rather than images: give --decoder "
                "(a diffusers AutoencoderKL folder or hub id, e.g. stabilityai/sd-vae-ft-ema)"
            )
        module = module.to(fabric.device).eval()
        # The labels are made here, in range; the network's check would cost a host sync per forward on a GPU.
        module.network.check_label_range = fabric.device.type != "cuda"
        if compile:
            module.network.compile()

        plan: dict[str, Any] = {
            "format": METADATA_FORMAT,
            "version": METADATA_VERSION,
            "num_samples": num_samples,
            "chunk_size": chunk_size,
            "seed": seed,
            "labels": labels,
            "num_classes": module.network.num_classes,
            "settings": dataclasses.asdict(settings),
            "checkpoint_sha256": None,  # rank 0 fills it in
            "weights": loaded.weights,
            "objective": repr(module.objective),
            "decoder": _describe_decoder(the_decoder),
            "precision": precision,
            "tf32": tf32,
            "compile": compile,
            "device_type": fabric.device.type,
            "versions": _versions(the_decoder),
        }
        if settings.adaptive:  # then the batch shapes the pixels, and a resume must keep it
            plan["batch_size"] = batch_size

        # Rank 0 reads and writes the bookkeeping; every rank learns the outcome (or the error) from it.
        state: tuple[str, Any] = ("", None)
        if fabric.global_rank == 0:
            try:
                plan["checkpoint_sha256"] = sha256_file(checkpoint_path)
                if store.is_complete(plan):
                    state = ("complete", [])
                else:
                    if store.output.exists() and not overwrite:
                        raise ConfigurationError(
                            f"{store.output} exists and was made with other settings (see {store.metadata_path.name}); "
                            "pass --overwrite true to replace it, or choose another output"
                        )
                    state = ("run", store.open(plan, discard_other=overwrite))
            except Exception as error:
                state = ("error", f"{type(error).__name__}: {error}")
        state = fabric.broadcast(state, src=0)
        plan = fabric.broadcast(plan, src=0)
        if state[0] == "error":
            raise ConfigurationError(state[1])
        pending: list[int] = state[1]
        mine = pending[fabric.global_rank :: fabric.world_size]

        total = sum(len(store.chunk_indices(k)) for k in mine)
        bar = None
        if progress and fabric.global_rank == 0 and total:
            from tqdm import tqdm

            where = "" if fabric.world_size == 1 else f" (rank 0 of {fabric.world_size})"
            bar = tqdm(total=total, unit="img", desc=f"sample{where}", dynamic_ncols=True, file=sys.stderr)
        start = time.perf_counter()
        for chunk in mine:
            indices = store.chunk_indices(chunk)
            chunk_labels = sample_labels(indices, module.network.num_classes, labels, seed)
            images = []
            for idx, lab in zip(indices.split(batch_size), chunk_labels.split(batch_size), strict=True):
                images.append(_sample_batch(fabric, module, the_decoder, settings, seed, idx, lab))
                if bar is not None:
                    bar.update(len(idx))
            store.write_chunk(chunk, np.concatenate(images), chunk_labels.numpy())
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        fabric.barrier()
        if fabric.global_rank == 0 and state[0] == "run":
            metadata = {
                **plan,
                "checkpoint": {
                    "path": str(checkpoint_path),
                    "kind": loaded.kind,
                    "arch": dataclasses.asdict(module.config),
                },
                "settings_description": settings.describe(),
                "nfe_per_image": settings.nfe_per_image(),
                "batch_size": batch_size,
                "world_size": fabric.world_size,
                "resumed_chunks": store.num_chunks - len(pending),
                "uint8": RELEASED_UINT8,
                "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            store.assemble(metadata)
        fabric.barrier()
        made = sum(len(store.chunk_indices(k)) for k in pending)
        return SampleRun(store.output, store.metadata_path, num_samples, made, seconds)


@torch.no_grad()
def _sample_batch(
    fabric: Any,
    module: SiTModule,
    decoder: LatentDecoder,
    settings: SamplerSettings,
    seed: int,
    indices: Tensor,
    labels: Tensor,
) -> np.ndarray:
    """``uint8 (n, H, W, C)`` images of the keyed ``indices``: sample (under the precision), decode, convert."""
    with fabric.autocast():
        latents = module.sample(labels, settings, seed=seed, indices=indices, use_ema=False).samples
    return released_uint8(decoder(latents.float()))


def sample_main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``sit-lightning sample CHECKPOINT OUTPUT --num_samples N [options]``.

    ``argv`` holds the arguments after the subcommand name. A bad file or option exits with status 2
    and a one-line message.
    """
    import pickle

    from jsonargparse import auto_cli

    from .errors import exit_in_one_line, subcommand_argv

    argv = subcommand_argv(SAMPLE_SUBCOMMAND, argv)
    with exit_in_one_line(SAMPLE_SUBCOMMAND, ValueError, OSError, pickle.UnpicklingError):
        run = auto_cli(
            sample_images, args=argv, prog=f"sit-lightning {SAMPLE_SUBCOMMAND}", allow_abbrev=False
        )
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        rate = f", {run.made / run.seconds:.1f} images/s on rank 0" if run.made and run.seconds > 0 else ""
        done = "made" if run.made else "already complete:"
        print(f"{done} {run.output} ({run.num_samples} images; {run.metadata.name} beside it){rate}")
    return 0
