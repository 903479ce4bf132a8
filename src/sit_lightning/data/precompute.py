"""``sit-lightning precompute-latents``: an ImageFolder tree -> VAE posterior moments -> latent shards.

Each image is centre-cropped (ADM) and encoded twice, as is and horizontally flipped, with diffusers'
``AutoencoderKL``; the posterior mean and std of both are stored (see :mod:`sit_lightning.data.shards`).
One process per visible GPU (``torch.multiprocessing`` spawn) encodes a contiguous slice of the sorted
image list into its own ``part-XXX`` folder; the parts are then merged into one index in image order,
and a final pass reads every shard back (counts, finite values) and records per-channel statistics.
Interrupted runs resume: each part keeps its complete shards and encodes only the rest.

For REPA (docs/data.md, "What REPA reads") it can also store, beside the moments, the centre-cropped
image as uint8 (``store_images``; unflipped: the reader flips it with its latent) and/or a frozen
encoder's features of the unflipped image as float16 (``repa_encoder``; runs that read them train
without flips).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sit_lightning.data.images import ImageFolderScan, load_image, scan_image_folder, to_model_input
from sit_lightning.data.shards import (
    DEFAULT_SHARD_SIZE,
    INDEX_FILE,
    SD_VAE_SCALE,
    LatentShards,
    LatentShardWriter,
    Normalization,
    StorageDtype,
    merge_shard_parts,
    read_npy_header,
    validate_shards,
    write_json_atomic,
)
from sit_lightning.repa import REPA_ENCODER_RESOLUTION, RepaConfig, build_encoder, encode_images

__all__ = ["PrecomputeResult", "precompute_latents", "precompute_latents_main"]

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the released SiT training default (--vae ema)
PLAN_FILE = "precompute.json"  # what a resumed run must agree with
PART_PREFIX = "part-"
SUBCOMMAND = "precompute-latents"

Devices = int | Literal["auto", "cpu"] | list[str]


@dataclass(frozen=True)
class PrecomputeResult:
    """What ``precompute_latents`` wrote."""

    output_dir: str
    count: int
    num_classes: int
    latent_shape: tuple[int, int, int]
    num_processes: int
    resumed_images: int  # images found already encoded in complete shards (0 for a fresh run)
    channel_mean: list[float]
    channel_std: list[float]


@dataclass(frozen=True)
class _PartJob:
    """Everything one encoding process needs (picklable for spawn)."""

    rank: int
    device: str
    paths: list[str]
    labels: list[int]
    part_dir: str
    vae: str
    image_size: int
    batch_size: int
    shard_size: int
    num_workers: int
    class_names: list[str]
    dtype: StorageDtype
    scale_factor: float
    progress: bool
    store_images: bool = False
    repa: RepaConfig | None = None  # the encoder whose features are stored, or None


class _CroppedImages(Dataset):
    def __init__(self, paths: list[str], labels: list[int], image_size: int) -> None:
        self.paths, self.labels, self.image_size = paths, labels, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return load_image(self.paths[i], self.image_size), self.labels[i]


def _resolve_devices(devices: Devices) -> list[str]:
    if devices == "cpu":
        return ["cpu"]
    if isinstance(devices, list):
        if not devices or not all(isinstance(d, str) and d.split(":")[0] in ("cpu", "cuda") for d in devices):
            raise ValueError(f"devices={devices!r}: a list must name torch devices such as 'cuda:0' or 'cpu'")
        return list(devices)
    available = torch.cuda.device_count()
    if devices == "auto":
        return [f"cuda:{i}" for i in range(available)] or ["cpu"]
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        if devices > available:
            raise ValueError(f"devices={devices} but only {available} CUDA device(s) are visible")
        return [f"cuda:{i}" for i in range(devices)]
    raise ValueError(f"devices={devices!r} is not a positive int, 'auto' or 'cpu'")


def _load_vae(vae: str, device: str) -> Any:
    from diffusers import AutoencoderKL  # heavy: imported only when encoding

    model = AutoencoderKL.from_pretrained(vae)
    return model.to(device).eval().requires_grad_(False)


def _latent_shape(vae_model: Any, image_size: int) -> tuple[int, int, int]:
    factor = 2 ** (len(vae_model.config.block_out_channels) - 1)
    if image_size % factor != 0:
        raise ValueError(
            f"image_size={image_size} is not a multiple of the VAE's downsampling factor {factor}"
        )
    return (int(vae_model.config.latent_channels), image_size // factor, image_size // factor)


def _encode_part(job: _PartJob) -> None:
    """Encode one slice of the image list into ``job.part_dir`` (resuming after its complete shards)."""
    from tqdm.auto import tqdm

    if (Path(job.part_dir) / INDEX_FILE).exists():
        return  # this part finished in an earlier run
    vae = _load_vae(job.vae, job.device)
    encoder = _encoder(job)
    feature_shape = None
    if encoder is not None:
        assert job.repa is not None
        probe = torch.zeros(1, 3, job.image_size, job.image_size, dtype=torch.uint8, device=job.device)
        feature_shape = tuple(encode_images(encoder, probe, job.repa.encoder_resolution).shape[1:])
    writer = LatentShardWriter(
        job.part_dir,
        _latent_shape(vae, job.image_size),
        shard_size=job.shard_size,
        vae_id=job.vae,
        class_names=job.class_names,
        scale_factor=job.scale_factor,
        dtype=job.dtype,
        image_size=job.image_size,
        image_shape=(3, job.image_size, job.image_size) if job.store_images else None,
        feature_shape=feature_shape,
        feature_encoder=None if job.repa is None else job.repa.encoder,
    )
    done = writer.num_written
    images = _CroppedImages(job.paths[done:], job.labels[done:], job.image_size)
    loader = DataLoader(images, batch_size=job.batch_size, num_workers=job.num_workers, shuffle=False)
    bar = tqdm(
        total=len(job.paths),
        initial=done,
        desc=f"encode part {job.rank}",
        position=job.rank,
        disable=not job.progress,
        unit="img",
    )
    with torch.no_grad():
        for pixels, labels in loader:
            x = to_model_input(pixels).to(job.device)  # (n, 3, S, S) in [-1, 1]
            both = torch.cat([x, torch.flip(x, dims=[-1])])  # one encoder call for plain and flipped
            posterior = vae.encode(both).latent_dist
            mean, std = posterior.mean.float().chunk(2), posterior.std.float().chunk(2)
            image = pixels.permute(0, 3, 1, 2).contiguous()  # (n, 3, S, S) uint8, unflipped
            features = None
            if encoder is not None:
                assert job.repa is not None
                features = encode_images(encoder, image.to(job.device), job.repa.encoder_resolution).half()
            writer.add(
                mean[0],
                std[0],
                mean[1],
                std[1],
                labels,
                images=image if job.store_images else None,
                features=features,
            )
            bar.update(len(labels))
    bar.close()
    writer.close()


def _encoder(job: _PartJob) -> torch.nn.Module | None:
    """The frozen encoder of ``job.repa`` on the job's device (its own patch grid: no network here)."""
    if job.repa is None:
        return None
    return build_encoder(job.repa, grid_size=None).to(job.device)


def _spawned_worker(rank: int, jobs: list[_PartJob]) -> None:
    if jobs[rank].device.startswith("cuda"):
        torch.cuda.set_device(jobs[rank].device)
    _encode_part(jobs[rank])


def _plan(scan: ImageFolderScan, settings: dict[str, Any], output: Path, overwrite: bool) -> dict[str, Any]:
    """Write or check the run plan: a resumed run must see the same images and settings."""
    listing = "\n".join(
        f"{p.relative_to(scan.root)}\t{label}" for p, label in zip(scan.paths, scan.labels, strict=True)
    )
    files_sha256 = hashlib.sha256(listing.encode()).hexdigest()
    plan = {"count": len(scan), "class_names": scan.class_names, "files_sha256": files_sha256, **settings}
    path = output / PLAN_FILE
    if path.exists() and not overwrite:
        previous = json.loads(path.read_text())
        if previous != plan:
            changed = sorted(k for k in plan.keys() | previous.keys() if plan.get(k) != previous.get(k))
            raise ValueError(
                f"{output} holds a run with other settings or images (differs in {changed}); "
                "rerun with the same arguments to resume, or pass overwrite=True"
            )
    else:
        write_json_atomic(path, plan)
    return plan


def _clear(output: Path) -> None:
    """Remove what an earlier run wrote (only our own files)."""
    for entry in output.glob(f"{PART_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry)
    for name in (INDEX_FILE, PLAN_FILE):
        (output / name).unlink(missing_ok=True)


def precompute_latents(
    image_root: str,
    output_dir: str,
    *,
    vae: str = DEFAULT_VAE,
    image_size: int = 256,
    batch_size: int = 32,
    shard_size: int = DEFAULT_SHARD_SIZE,
    devices: Devices = "auto",
    num_workers: int = 4,
    normalization: Normalization = "scale",
    scale_factor: float = SD_VAE_SCALE,
    dtype: StorageDtype = "float32",
    overwrite: bool = False,
    progress: bool = True,
    store_images: bool = False,
    repa_encoder: str | None = None,
    repa_encoder_init_args: dict[str, Any] | None = None,
    repa_encoder_weights: str | None = None,
    repa_encoder_resolution: int = REPA_ENCODER_RESOLUTION,
) -> PrecomputeResult:
    """Encode an ImageFolder tree into latent shards (resumable).

    Args:
        image_root: ``root/<class>/<image>``; labels follow the sorted class folder names.
        output_dir: the shard folder to write (``index.json`` appears when everything is done).
        vae: ``AutoencoderKL.from_pretrained`` id or local folder.
        image_size: side of the ADM centre crop in pixels (256 -> 32x32 latents with the SD VAE).
        batch_size: images per encoder call per process (each is encoded plain and flipped).
        shard_size: images per shard file.
        devices: ``"auto"`` = every visible GPU (one process each) or the CPU without one; an int = the
            first n GPUs; ``"cpu"``; or a list of torch devices, one process each (``["cuda:0", "cuda:2"]``).
        num_workers: image-decoding worker processes per encoding process.
        normalization: what training applies: ``"scale"`` (``z * scale_factor``) or ``"channel"``
            (per-channel standardisation with the statistics measured here).
        scale_factor: the latent scale (SD VAE: 0.18215).
        dtype: storage dtype of the moments.
        overwrite: discard an earlier (complete or partial) run in ``output_dir``.
        progress: show a progress bar per process.
        store_images: also store each centre-cropped image, unflipped, as uint8 ``(3, S, S)`` (192 KiB
            per image at 256 px; 0.23 TiB for ImageNet-1k train), for REPA with an online encoder
            (``LatentDataModule(repa_inputs="image")`` flips it with its latent).
        repa_encoder: also store a frozen encoder's ``(T, C)`` float16 features of each unflipped image
            (``model.repa.encoder``'s import path, e.g. ``dinov2.hub.backbones.dinov2_vitb14``; 384 KiB per
            image for DINOv2-B at 224 px, 0.46 TiB for ImageNet-1k train), for REPA without an encoder
            in training (``repa_inputs="features"``, which needs ``flip=false``).
        repa_encoder_init_args: its keyword arguments (``{pretrained: false}`` for DINOv2's hub functions).
        repa_encoder_weights: a local file of its weights (as ``model.repa.encoder_weights``).
        repa_encoder_resolution: the side it sees (bicubic resize; 224 for DINOv2 as REPA).

    Returns:
        What was written, with the measured per-channel statistics of the unscaled latents.
    """
    repa = None
    if repa_encoder is not None:
        repa = RepaConfig(
            encoder=repa_encoder,
            encoder_init_args=dict(repa_encoder_init_args or {}),
            encoder_weights=repa_encoder_weights,
            encoder_resolution=repa_encoder_resolution,
        )
    elif repa_encoder_weights is not None or repa_encoder_init_args:
        raise ValueError("repa_encoder_weights / repa_encoder_init_args need repa_encoder")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear(output)
    scan = scan_image_folder(image_root)
    device_list = _resolve_devices(devices)
    settings = {
        "vae": vae,
        "image_size": image_size,
        "shard_size": shard_size,
        "dtype": dtype,
        "scale_factor": scale_factor,
        "num_processes": len(device_list),
    }
    if store_images:  # only when set, so that runs begun before these options still resume
        settings["store_images"] = True
    if repa is not None:
        settings["repa_encoder"] = repa.as_dict()
    _plan(scan, settings, output, overwrite)
    n, num_parts = len(scan), len(device_list)
    bounds = [r * n // num_parts for r in range(num_parts + 1)]
    part_dirs = [output / f"{PART_PREFIX}{r:03d}" for r in range(num_parts)]
    resumed = sum(_complete_images(p, shard_size) for p in part_dirs)
    jobs = [
        _PartJob(
            rank=r,
            device=device_list[r],
            paths=[str(p) for p in scan.paths[bounds[r] : bounds[r + 1]]],
            labels=scan.labels[bounds[r] : bounds[r + 1]],
            part_dir=str(part_dirs[r]),
            vae=vae,
            image_size=image_size,
            batch_size=batch_size,
            shard_size=shard_size,
            num_workers=num_workers,
            class_names=scan.class_names,
            dtype=dtype,
            scale_factor=scale_factor,
            progress=progress,
            store_images=store_images,
            repa=repa,
        )
        for r in range(num_parts)
    ]
    if num_parts == 1:
        _spawned_worker(0, jobs)
    else:
        # CUDA cannot be used in a forked child; CPU-only processes fork, which skips re-importing torch
        cpu_only = all(d.startswith("cpu") for d in device_list)
        start_method = "fork" if cpu_only and "fork" in mp.get_all_start_methods() else "spawn"
        torch.multiprocessing.start_processes(
            _spawned_worker, args=(jobs,), nprocs=num_parts, join=True, start_method=start_method
        )

    # merge, then read everything back and record the statistics (channel normalisation needs them)
    merge_shard_parts(output, part_dirs, normalization="scale")
    report = validate_shards(output)
    if report.count != n:
        raise RuntimeError(f"{output} holds {report.count} latents for {n} images")
    merge_shard_parts(
        output,
        part_dirs,
        normalization=normalization,
        channel_mean=report.channel_mean,
        channel_std=report.channel_std,
    )
    shards = LatentShards(output)
    return PrecomputeResult(
        output_dir=str(output),
        count=len(shards),
        num_classes=shards.num_classes,
        latent_shape=shards.latent_shape,
        num_processes=num_parts,
        resumed_images=resumed,
        channel_mean=report.channel_mean,
        channel_std=report.channel_std,
    )


def _complete_images(part_dir: Path, shard_size: int) -> int:
    """Images already in complete shards of a part (as a resumed writer will count them)."""
    index = part_dir / INDEX_FILE
    if index.exists():
        return int(json.loads(index.read_text())["count"])
    if not part_dir.is_dir():
        return 0
    return sum(
        shard_size for m in part_dir.glob("moments-*.npy") if read_npy_header(m).shape[0] == shard_size
    )


def precompute_latents_main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``sit-lightning precompute-latents IMAGE_ROOT OUTPUT_DIR [--vae ...]``.

    ``argv`` holds the arguments after the subcommand name; ``None`` reads ``sys.argv[1:]`` without a
    leading ``precompute-latents``. Options are the keyword arguments of :func:`precompute_latents`
    (``--help`` prints their documentation); a typo in a ``Literal`` choice fails at parse time.
    """
    from jsonargparse import auto_cli

    if argv is None:
        argv = sys.argv[1:]
        if argv[:1] == [SUBCOMMAND]:
            argv = argv[1:]
    result = auto_cli(precompute_latents, args=argv, prog=f"sit-lightning {SUBCOMMAND}", allow_abbrev=False)
    print(json.dumps(asdict(result), indent=1))
    return 0
