"""Latent shards: a folder of fixed-size ``.npy`` shards of VAE posterior moments, and its JSON index.

Layout of a shard folder (``index.json`` is written last, atomically, so its presence means "complete")::

    index.json
    moments-000000.npy   (n, 2, 2, C, H, W)  [flip][mean, std]  UNSCALED VAE posterior moments
    labels-000000.npy    (n,) int64
    images-000000.npy    (n, 3, S, S) uint8     the centre-cropped image, unflipped (optional)
    features-000000.npy  (n, T, C) float16      a frozen encoder's features of that image (optional)
    ...

``[flip]`` is 0 for the image as is and 1 for the horizontally flipped image, so training draws a fresh
posterior sample and a random flip at every step, as on-the-fly encoding would (the released SiT code
calls ``vae.encode(x).latent_dist.sample() * 0.18215`` on a randomly flipped image every step), at no VAE
cost. The reader applies the normalisation recorded in the index: ``z * scale_factor`` (the SD-VAE
convention) or per-channel ``(z - channel_mean) / channel_std``. A merged folder (one part per encoding
process) lists shard paths relative to the folder, e.g. ``part-001/moments-000003.npy``.

The optional images and features are what REPA aligns to (docs/data.md, "What REPA reads"): the image
is stored once, as is, because flipping it is exact (the reader flips it with its latent); the
features are of the unflipped image only, so runs that read them train without flips.

Index fields: ``format``, ``version``, ``latent_shape`` [C, H, W], ``dtype``, ``count``, ``vae``,
``image_size``, ``normalization`` ("scale" | "channel"), ``scale_factor``, ``channel_mean``,
``channel_std`` (per-channel statistics of the unscaled posterior samples, or null), ``class_names``,
``shard_size``, ``shards`` [{``moments``, ``labels``, ``count``, and ``images`` / ``features`` when
present}]; optional (absent in folders written before them): ``image_shape`` [3, S, S] or null,
``feature_shape`` [T, C] or null, ``feature_encoder`` (what made the features) or null.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import torch
from torch import Tensor

from ..atomic import write_atomically
from ..errors import DataError, DataNotFoundError
from ..evaluation.images import SD_VAE_SCALE  # the one definition; re-exported here

__all__ = [
    "SD_VAE_SCALE",
    "DEFAULT_SHARD_SIZE",
    "INDEX_FILE",
    "Normalization",
    "StorageDtype",
    "LatentRecord",
    "LatentShardWriter",
    "LatentShards",
    "ShardReport",
    "merge_shard_parts",
    "read_npy_header",
    "validate_shards",
    "write_json_atomic",
]

DEFAULT_SHARD_SIZE = 4096  # images per shard: 4096 x 64 KiB (4x32x32 float32 x 4 moments) = 256 MiB at 256 px
INDEX_FILE = "index.json"
WRITER_FILE = "writer.json"  # settings of a writer, so a resumed writer refuses different ones
FORMAT_NAME = "sit-lightning/latent-shards"
FORMAT_VERSION = 1
FLIP_AXIS_SIZE = 2  # [plain, horizontally flipped]
MOMENT_AXIS_SIZE = 2  # [mean, std]
IMAGE_DTYPE = np.dtype(np.uint8)  # the clean image as pixels: 256 x 256 x 3 = 192 KiB per image
FEATURE_DTYPE = np.dtype(np.float16)  # encoder features: 256 x 768 x 2 B = 384 KiB per image (DINOv2-B)
#: Shard files beside the moments, and the index field of each one's per-image shape.
EXTRA_KINDS: dict[str, str] = {"images": "image_shape", "features": "feature_shape"}
_EXTRA_DTYPES = {"images": IMAGE_DTYPE, "features": FEATURE_DTYPE}
ShardKind = Literal["moments", "labels", "images", "features"]
#: How to make a shard folder, for the message when one is missing.
PRECOMPUTE_HINT = (
    "sit-lightning precompute-latents IMAGE_ROOT {path} --vae stabilityai/sd-vae-ft-ema --image_size 256"
)

Normalization = Literal["scale", "channel"]
StorageDtype = Literal["float32", "float16"]


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (:func:`~sit_lightning.atomic.write_atomically`: a reader never sees half a file)."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, array, allow_pickle=False)

    write_atomically(path, write)


class NpyHeader(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    data_offset: int


def read_npy_header(path: Path) -> NpyHeader:
    """Shape, dtype and data offset of a ``.npy`` file, without reading its data."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(f)
        return NpyHeader(tuple(shape), np.dtype(dtype), f.tell())


def _check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Raise a :class:`DataError` naming ``path`` when it is missing, of another shape/dtype or truncated."""
    if not path.is_file():
        raise DataNotFoundError(f"latent shard {path} is missing (listed in the index)")
    try:
        header = read_npy_header(path)
    except (ValueError, OSError) as err:
        raise DataError(f"latent shard {path} has no valid .npy header: {err}") from err
    if header.shape != shape or header.dtype != dtype:
        raise DataError(
            f"latent shard {path} holds {header.dtype} {header.shape}, the index expects {dtype} {shape}"
        )
    expected = header.data_offset + int(np.prod(shape)) * dtype.itemsize
    found = path.stat().st_size
    if found != expected:
        raise DataError(
            f"latent shard {path} is truncated or padded: expected {expected} bytes, found {found}"
        )


def _moments_shape(count: int, latent_shape: Sequence[int]) -> tuple[int, ...]:
    return (count, FLIP_AXIS_SIZE, MOMENT_AXIS_SIZE, *latent_shape)


def _shard_names(number: int) -> tuple[str, str]:
    return f"moments-{number:06d}.npy", f"labels-{number:06d}.npy"


def _extra_name(kind: str, number: int) -> str:
    return f"{kind}-{number:06d}.npy"


class LatentRecord(NamedTuple):
    """One image: unscaled posterior moments ``(C, H, W)`` of the plain and flipped image, and its label."""

    mean: np.ndarray
    std: np.ndarray
    mean_flip: np.ndarray
    std_flip: np.ndarray
    label: int


class LatentShardWriter:
    """Writes posterior moments into fixed-size shards; atomic and resumable.

    Every full shard is written through a temporary file and ``os.replace``; ``close()`` writes the last,
    partial shard and then ``index.json``. A writer opened on a folder that holds complete shards but no
    index continues after the last complete full shard: :attr:`num_written` tells the caller how many
    samples to skip.

    Args:
        output_dir: the shard folder (created).
        latent_shape: ``(C, H, W)`` of one latent.
        shard_size: images per shard.
        vae_id: the VAE the moments come from (hub id or path), recorded in the index.
        class_names: label ``i`` is ``class_names[i]``.
        scale_factor: multiplier the reader applies when ``normalization="scale"``.
        channel_mean: per-channel mean of the unscaled latents (``normalization="channel"``).
        channel_std: per-channel std of the unscaled latents (``normalization="channel"``).
        normalization: what the reader applies by default.
        dtype: storage dtype of the moments. float16 halves the disk but rounds the mean to 2^-11
            relative, which can exceed a small posterior std: float32 by default.
        image_size: the side of the centre-cropped images that were encoded (recorded only).
        image_shape: ``(3, S, S)``: also store each (unflipped) image as uint8; ``add`` then takes ``images``.
        feature_shape: ``(T, C)``: also store a frozen encoder's features of each unflipped image as
            float16; ``add`` then takes ``features``.
        feature_encoder: what made the features (recorded only).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        latent_shape: Sequence[int],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        vae_id: str,
        class_names: Sequence[str],
        scale_factor: float | None = SD_VAE_SCALE,
        channel_mean: Sequence[float] | None = None,
        channel_std: Sequence[float] | None = None,
        normalization: Normalization = "scale",
        dtype: StorageDtype = "float32",
        image_size: int | None = None,
        image_shape: Sequence[int] | None = None,
        feature_shape: Sequence[int] | None = None,
        feature_encoder: str | None = None,
    ) -> None:
        if image_shape is not None and (len(image_shape) != 3 or int(image_shape[0]) != 3):
            raise ValueError(f"image_shape must be (3, H, W), got {tuple(image_shape)}")
        if feature_shape is not None and len(feature_shape) != 2:
            raise ValueError(f"feature_shape must be (T, C), got {tuple(feature_shape)}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape must be (C, H, W), got {tuple(latent_shape)}")
        if dtype not in get_args(StorageDtype):
            raise ValueError(f"dtype={dtype!r} is not one of {get_args(StorageDtype)}")
        _check_normalization(normalization, scale_factor, channel_mean, channel_std, int(latent_shape[0]))
        self.output_dir = Path(output_dir)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.shard_size = shard_size
        self.dtype = np.dtype(dtype)
        self.meta: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "latent_shape": list(self.latent_shape),
            "dtype": dtype,
            "vae": vae_id,
            "image_size": image_size,
            "normalization": normalization,
            "scale_factor": scale_factor,
            "channel_mean": None if channel_mean is None else [float(v) for v in channel_mean],
            "channel_std": None if channel_std is None else [float(v) for v in channel_std],
            "class_names": list(class_names),
            "shard_size": shard_size,
            "image_shape": None if image_shape is None else [int(v) for v in image_shape],
            "feature_shape": None if feature_shape is None else [int(v) for v in feature_shape],
            "feature_encoder": feature_encoder,
        }
        #: The extra kinds this writer stores, with the per-image shape of each.
        self.extras: dict[str, tuple[int, ...]] = {
            kind: tuple(self.meta[field])
            for kind, field in EXTRA_KINDS.items()
            if self.meta[field] is not None
        }
        if (self.output_dir / INDEX_FILE).exists():
            raise FileExistsError(
                f"{self.output_dir / INDEX_FILE} exists: the shard folder is already complete"
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._check_writer_settings()
        self._shards: list[dict[str, Any]] = []
        self._resume()
        self._buffer: list[np.ndarray] = []
        self._label_buffer: list[np.ndarray] = []
        self._extra_buffers: dict[str, list[np.ndarray]] = {kind: [] for kind in self.extras}
        self._buffered = 0
        self.closed = False

    def _check_writer_settings(self) -> None:
        settings = {k: self.meta[k] for k in ("format", "version", "latent_shape", "dtype", "shard_size")}
        # the extras only when stored, so that folders begun before they existed still resume
        settings |= {EXTRA_KINDS[kind]: list(shape) for kind, shape in self.extras.items()}
        path = self.output_dir / WRITER_FILE
        if path.exists():
            previous = json.loads(path.read_text())
            if previous != settings:
                raise ValueError(
                    f"{self.output_dir} was started with writer settings {previous}, now {settings}: "
                    "use the same settings to resume or an empty folder"
                )
        else:
            write_json_atomic(path, settings)

    def _resume(self) -> None:
        """Adopt the complete full shards a previous writer left (stops at the first missing/partial one)."""
        number = 0
        while True:
            moments_name, labels_name = _shard_names(number)
            try:
                _check_npy(
                    self.output_dir / moments_name,
                    _moments_shape(self.shard_size, self.latent_shape),
                    self.dtype,
                )
                _check_npy(self.output_dir / labels_name, (self.shard_size,), np.dtype(np.int64))
                for kind, shape in self.extras.items():
                    _check_npy(
                        self.output_dir / _extra_name(kind, number),
                        (self.shard_size, *shape),
                        _EXTRA_DTYPES[kind],
                    )
            except (FileNotFoundError, ValueError):
                return
            shard = {"moments": moments_name, "labels": labels_name, "count": self.shard_size}
            self._shards.append(shard | {kind: _extra_name(kind, number) for kind in self.extras})
            number += 1

    @property
    def num_written(self) -> int:
        """Samples in complete shards on disk (what a resumed run skips)."""
        return sum(s["count"] for s in self._shards)

    def add(
        self,
        mean: Tensor | np.ndarray,
        std: Tensor | np.ndarray,
        mean_flip: Tensor | np.ndarray,
        std_flip: Tensor | np.ndarray,
        labels: Tensor | np.ndarray,
        images: Tensor | np.ndarray | None = None,
        features: Tensor | np.ndarray | None = None,
    ) -> None:
        """Append a batch: four ``(n, C, H, W)`` unscaled moment arrays and ``(n,)`` integer labels, and
        the ``(n, 3, S, S)`` uint8 images / ``(n, T, C)`` features when the writer stores them."""
        if self.closed:
            raise RuntimeError("the writer is closed")
        given = {"images": images, "features": features}
        for kind in EXTRA_KINDS:
            if (given[kind] is None) != (kind not in self.extras):
                stored = "stores" if kind in self.extras else "does not store"
                raise ValueError(
                    f"this writer {stored} {kind}; got {kind}={'None' if given[kind] is None else '...'}"
                )
        arrays = [_as_numpy(a) for a in (mean, std, mean_flip, std_flip)]
        labels_np = _as_numpy(labels).astype(np.int64).reshape(-1)
        n = labels_np.shape[0]
        for name, a in zip(("mean", "std", "mean_flip", "std_flip"), arrays, strict=True):
            if a.shape != (n, *self.latent_shape):
                raise ValueError(f"{name} has shape {a.shape}, expected {(n, *self.latent_shape)}")
        moments = np.stack([np.stack(arrays[:2], 1), np.stack(arrays[2:], 1)], 1).astype(self.dtype)
        for kind, shape in self.extras.items():
            value = given[kind]
            array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            if array.shape != (n, *shape):
                raise ValueError(f"{kind} has shape {array.shape}, expected {(n, *shape)}")
            if kind == "images" and array.dtype != IMAGE_DTYPE:
                raise ValueError(f"images must be uint8 pixels, got {array.dtype}")
            self._extra_buffers[kind].append(array.astype(_EXTRA_DTYPES[kind]))
        self._buffer.append(moments)  # (n, 2, 2, C, H, W)
        self._label_buffer.append(labels_np)
        self._buffered += n
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        moments = np.concatenate(self._buffer)
        labels = np.concatenate(self._label_buffer)
        number = len(self._shards)
        moments_name, labels_name = _shard_names(number)
        # labels and extras first: a shard counts as complete only once its moments file exists as well
        _save_npy_atomic(self.output_dir / labels_name, labels[:count])
        shard = {"moments": moments_name, "labels": labels_name, "count": count}
        for kind, buffer in self._extra_buffers.items():
            extra = np.concatenate(buffer)
            _save_npy_atomic(self.output_dir / _extra_name(kind, number), np.ascontiguousarray(extra[:count]))
            self._extra_buffers[kind] = [extra[count:]]
            shard[kind] = _extra_name(kind, number)
        _save_npy_atomic(self.output_dir / moments_name, np.ascontiguousarray(moments[:count]))
        self._shards.append(shard)
        self._buffer, self._label_buffer = [moments[count:]], [labels[count:]]
        self._buffered -= count

    def close(self) -> Path:
        """Write the last partial shard and the index; returns the index path."""
        if self._buffered:
            self._flush(self._buffered)
        self.closed = True
        index = {**self.meta, "count": self.num_written, "shards": self._shards}
        path = self.output_dir / INDEX_FILE
        write_json_atomic(path, index)
        return path


def _as_numpy(a: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().to("cpu", torch.float32 if a.is_floating_point() else torch.int64).numpy()
    return np.asarray(a)


def _check_normalization(
    normalization: str,
    scale_factor: float | None,
    channel_mean: Sequence[float] | None,
    channel_std: Sequence[float] | None,
    channels: int,
) -> None:
    if normalization not in get_args(Normalization):
        raise ValueError(f"normalization={normalization!r} is not one of {get_args(Normalization)}")
    if normalization == "scale" and (scale_factor is None or scale_factor <= 0):
        raise ValueError(f"normalization='scale' needs a positive scale_factor, got {scale_factor}")
    if normalization == "channel":
        if channel_mean is None or channel_std is None:
            raise ValueError("normalization='channel' needs channel_mean and channel_std")
        if len(channel_mean) != channels or len(channel_std) != channels or min(channel_std) <= 0:
            raise ValueError(
                f"channel_mean/channel_std must hold {channels} values with std > 0, "
                f"got {list(channel_mean)} / {list(channel_std)}"
            )


class LatentShards:
    """Memory-mapped reader of a shard folder; validates the index against the files on construction.

    Args:
        path: the shard folder (holding ``index.json``).

    Raises:
        DataNotFoundError: no folder, no index, or a listed shard is missing; the message says how to make
            the shards (a ``FileNotFoundError`` and a ``ConfigurationError``: the CLI prints it as one line).
        DataError: a shard has another shape/dtype than the index says or is truncated, or a label is
            outside ``[0, num_classes)`` (the message names the labels file and the row).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            make = PRECOMPUTE_HINT.format(path=self.path)
            if not self.path.exists():
                raise DataNotFoundError(
                    f"latent shard folder {str(self.path)!r} does not exist; make the shards with: {make}"
                )
            raise DataNotFoundError(
                f"{index_path} not found: not a latent shard folder, or precompute-latents has not finished; "
                f"make or complete the shards with: {make}"
            )
        self.index: dict[str, Any] = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT_NAME or self.index.get("version") != FORMAT_VERSION:
            raise DataError(
                f"{index_path}: format {self.index.get('format')!r} version {self.index.get('version')!r}, "
                f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        self.latent_shape: tuple[int, int, int] = tuple(self.index["latent_shape"])  # type: ignore[assignment]
        self.dtype = np.dtype(self.index["dtype"])
        self.class_names: list[str] = list(self.index["class_names"])
        _check_normalization(
            self.index["normalization"],
            self.index.get("scale_factor"),
            self.index.get("channel_mean"),
            self.index.get("channel_std"),
            self.latent_shape[0],
        )
        counts = [int(s["count"]) for s in self.index["shards"]]
        if sum(counts) != int(self.index["count"]):
            raise DataError(
                f"{index_path}: shard counts sum to {sum(counts)}, index count is {self.index['count']}"
            )
        #: The extra kinds the folder holds (``images``, ``features``), with the per-image shape of each.
        self.extras: dict[str, tuple[int, ...]] = {
            kind: tuple(int(v) for v in self.index[field])
            for kind, field in EXTRA_KINDS.items()
            if self.index.get(field) is not None
        }
        for shard, count in zip(self.index["shards"], counts, strict=True):
            _check_npy(self.path / shard["moments"], _moments_shape(count, self.latent_shape), self.dtype)
            _check_npy(self.path / shard["labels"], (count,), np.dtype(np.int64))
            for kind, shape in self.extras.items():
                if kind not in shard:
                    raise DataError(
                        f"{index_path}: {EXTRA_KINDS[kind]} is set but a shard lists no {kind} file"
                    )
                _check_npy(self.path / shard[kind], (count, *shape), _EXTRA_DTYPES[kind])
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.labels = (
            np.concatenate([np.load(self.path / s["labels"]) for s in self.index["shards"]])
            if counts
            else np.zeros((0,), np.int64)
        )
        self._check_labels()
        self._memmaps: dict[str, list[np.ndarray]] = {}  # opened lazily, per process (never pickled)

    def _check_labels(self) -> None:
        """Every label in ``[0, num_classes)``: one pass over the labels, which are read anyway."""
        bound = max(self.num_classes, 1)  # an index without class names holds one (unconditional) class
        bad = np.nonzero((self.labels < 0) | (self.labels >= bound))[0]
        if bad.size:
            index = int(bad[0])
            file, row = self.locate(index, "labels")
            raise DataError(
                f"{file}: label {int(self.labels[index])} at row {row} (sample {index}) is outside "
                f"[0, {bound}) ({bad.size} of {len(self.labels)} labels out of range): the index lists "
                f"{self.num_classes} class_names; make the shards again with precompute-latents"
            )

    def locate(self, index: int, kind: ShardKind = "moments") -> tuple[Path, int]:
        """The shard file (``kind``: moments, labels, images, features) holding sample ``index``, and its row."""
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.path / self.index["shards"][shard][kind], int(index - self._starts[shard])

    # ----------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return int(self.index["count"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def vae_id(self) -> str:
        return str(self.index["vae"])

    @property
    def normalization(self) -> Normalization:
        return self.index["normalization"]

    @property
    def scale_factor(self) -> float | None:
        return self.index.get("scale_factor")

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(3, S, S)`` of the stored images, or None when the folder holds none."""
        return self.extras.get("images")  # type: ignore[return-value]

    @property
    def feature_shape(self) -> tuple[int, int] | None:
        """``(T, C)`` of the stored encoder features, or None when the folder holds none."""
        return self.extras.get("features")  # type: ignore[return-value]

    # ----------------------------------------------------------------- data
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_memmaps"] = {}  # data-loader workers reopen the files instead of copying the data
        return state

    def _arrays(self, kind: str = "moments") -> list[np.ndarray]:
        if kind not in self._memmaps:
            self._memmaps[kind] = [np.load(self.path / s[kind], mmap_mode="r") for s in self.index["shards"]]
        return self._memmaps[kind]

    def moments(
        self, indices: np.ndarray | Sequence[int], flips: np.ndarray | Sequence[bool] | None = None
    ) -> np.ndarray:
        """``(n, 2, 2, C, H, W)`` float32 unscaled moments ``[flip][mean, std]`` of the images ``indices``.

        With ``flips`` (one bool per index), only the moments of that flip are read: ``(n, 2, C, H, W)``
        ``[mean, std]``, equal to ``moments(indices)[arange(n), flips]`` and half the bytes.
        """
        shape = _moments_shape(0, self.latent_shape)[1:]
        if flips is None:
            return self._gather("moments", indices, shape, np.dtype(np.float32))
        flips = np.asarray(flips, dtype=bool).reshape(-1)
        if len(flips) != len(np.asarray(indices).reshape(-1)):
            raise ValueError(
                f"flips needs one bool per index: {len(flips)} for {len(np.asarray(indices))} indices"
            )
        return self._gather("moments", indices, shape[1:], np.dtype(np.float32), flips.astype(np.int64))

    def images(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """``(n, 3, S, S)`` uint8 centre-cropped images (unflipped) ``indices``; the folder must hold them."""
        if self.image_shape is None:
            raise DataError(
                f"{self.path} holds no images (precompute-latents --store_images true makes them)"
            )
        return self._gather("images", indices, self.image_shape, IMAGE_DTYPE)

    def features(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """``(n, T, C)`` float16 encoder features of the unflipped images ``indices``; the folder must hold them."""
        if self.feature_shape is None:
            raise DataError(
                f"{self.path} holds no encoder features (precompute-latents --repa_encoder makes them)"
            )
        return self._gather("features", indices, self.feature_shape, FEATURE_DTYPE)

    def _gather(
        self,
        kind: str,
        indices: np.ndarray | Sequence[int],
        shape: Sequence[int],
        dtype: np.dtype,
        second: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows ``indices`` of the ``kind`` arrays; with ``second``, row ``i``'s entry ``second[i]`` only."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices out of range [0, {len(self)})")
        out = np.empty((len(indices), *shape), dtype)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        arrays = self._arrays(kind)
        for shard in np.unique(shard_of):
            rows = np.nonzero(shard_of == shard)[0]
            local = indices[rows] - self._starts[shard]
            order = np.argsort(local)  # ascending offsets read the memmap front to back
            if second is None:
                out[rows[order]] = arrays[shard][local[order]]
            else:
                out[rows[order]] = arrays[shard][local[order], second[rows[order]]]
        return out

    def __getitem__(self, index: int) -> LatentRecord:
        m = self.moments([index])[0]
        return LatentRecord(m[0, 0], m[0, 1], m[1, 0], m[1, 1], int(self.labels[index]))

    # ----------------------------------------------------------------- normalisation
    def _channel_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (-1, 1, 1)
        mean = torch.tensor(self.index["channel_mean"], dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.index["channel_std"], dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize(self, z: Tensor, *, in_place: bool = False) -> Tensor:
        """Unscaled VAE latents ``(..., C, H, W)`` -> the model's data space ``x_1``.

        ``in_place=True`` overwrites ``z`` (same operations, same values) and returns it.
        """
        if self.normalization == "scale":
            return z.mul_(self.scale_factor) if in_place else z * self.scale_factor
        mean, std = self._channel_stats(z)
        return z.sub_(mean).div_(std) if in_place else (z - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: model samples -> latents for ``vae.decode``."""
        if self.normalization == "scale":
            return x / self.scale_factor
        mean, std = self._channel_stats(x)
        return x * std + mean


@dataclass(frozen=True)
class ShardReport:
    """Result of :func:`validate_shards`: count and per-channel statistics of the unscaled posterior samples."""

    count: int
    channel_mean: list[float]
    channel_std: list[float]


def validate_shards(path: str | os.PathLike, *, chunk: int = 1024) -> ShardReport:
    """Read every shard of a folder: shapes and sizes (via :class:`LatentShards`), finite values (moments
    and encoder features), ``std >= 0``, labels in range; returns the per-channel mean and std of ``z = mean + std * n``
    over images, both flips and positions (``Var z = E[mean^2 + std^2] - (E mean)^2``)."""
    shards = LatentShards(path)
    channels = shards.latent_shape[0]
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    per_image = FLIP_AXIS_SIZE * shards.latent_shape[1] * shards.latent_shape[2]
    for start in range(0, len(shards), chunk):
        m = shards.moments(np.arange(start, min(start + chunk, len(shards)))).astype(np.float64)
        if not np.isfinite(m).all():
            bad = start + int(np.nonzero(~np.isfinite(m).reshape(len(m), -1).all(1))[0][0])
            file, row = shards.locate(bad)
            raise DataError(f"{path}: non-finite moments at image {bad} ({file}, row {row})")
        if (m[:, :, 1] < 0).any():
            raise DataError(f"{path}: negative posterior std in images {start}..{start + len(m) - 1}")
        total += m[:, :, 0].sum(axis=(0, 1, 3, 4))
        total_sq += (m[:, :, 0] ** 2 + m[:, :, 1] ** 2).sum(axis=(0, 1, 3, 4))
        if shards.feature_shape is not None:  # float16 features overflow to inf above 65504
            f = shards.features(np.arange(start, start + len(m)))
            finite = np.isfinite(f).reshape(len(f), -1).all(1)
            if not finite.all():
                bad = start + int(np.nonzero(~finite)[0][0])
                file, row = shards.locate(bad, "features")
                raise DataError(f"{path}: non-finite encoder features at image {bad} ({file}, row {row})")
    if len(shards.labels) and (shards.labels.min() < 0 or shards.labels.max() >= max(shards.num_classes, 1)):
        raise DataError(f"{path}: labels outside [0, {shards.num_classes})")
    n = max(len(shards) * per_image, 1)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    return ShardReport(len(shards), mean.tolist(), std.tolist())


def merge_shard_parts(
    output_dir: str | os.PathLike,
    part_dirs: Sequence[str | os.PathLike],
    *,
    normalization: Normalization | None = None,
    channel_mean: Sequence[float] | None = None,
    channel_std: Sequence[float] | None = None,
) -> Path:
    """Write one index over complete part folders (each with its own index), in the given order.

    Shard paths become relative to ``output_dir``; metadata must agree between parts. ``normalization``
    and the channel statistics, when given, replace the parts' values.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    parts = [json.loads((Path(p) / INDEX_FILE).read_text()) for p in part_dirs]
    if not parts:
        raise ValueError("no part folders to merge")
    shared = ("format", "version", "latent_shape", "dtype", "vae", "image_size", "class_names", "shard_size")
    shared += ("image_shape", "feature_shape", "feature_encoder")  # absent (None) in older parts
    for p, meta in zip(part_dirs, parts, strict=True):
        for key in shared:
            if meta.get(key) != parts[0].get(key):
                raise ValueError(
                    f"part {p} has {key}={meta.get(key)!r}, the first part has {parts[0].get(key)!r}"
                )
    index = {k: v for k, v in parts[0].items() if k not in ("shards", "count")}
    if channel_mean is not None:
        index["channel_mean"] = [float(v) for v in channel_mean]
    if channel_std is not None:
        index["channel_std"] = [float(v) for v in channel_std]
    if normalization is not None:
        index["normalization"] = normalization
    _check_normalization(
        index["normalization"],
        index.get("scale_factor"),
        index.get("channel_mean"),
        index.get("channel_std"),
        int(index["latent_shape"][0]),
    )
    shards = []
    for p, meta in zip(part_dirs, parts, strict=True):
        rel = os.path.relpath(Path(p), root)
        for s in meta["shards"]:
            files = [kind for kind in ("moments", "labels", *EXTRA_KINDS) if kind in s]
            shards.append({**s, **{kind: f"{rel}/{s[kind]}" for kind in files}})
    index["count"] = sum(s["count"] for s in shards)
    index["shards"] = shards
    path = root / INDEX_FILE
    write_json_atomic(path, index)
    return path
