"""ADM-evaluator sample files (``.npz``) and the resumable chunks a sampling run assembles them from.

The layout is what the released ``sample_ddp.py`` hands to ADM's evaluator (guided-diffusion
``evaluations/evaluator.py``): ``arr_0``, ``uint8`` ``(N, H, W, 3)``, made from decoded floats ``x`` in
[-1, 1] by the released expression ``torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(uint8)``
in float32: the cast truncates, so a pixel is ``floor(clamp(127.5 x + 128))`` (the DiT convention), not the
rounding of :func:`~sit_lightning.evaluation.images.to_uint8`. Beside it ``arr_1`` holds the ``(N,)``
``int64`` class labels (the evaluator ignores it). One-channel data (the digits) is ``(N, H, W, 1)``.

A run writes fixed ranges of global sample indices (chunk ``k`` holds samples ``k * chunk_size ...``)
into ``<stem>.parts/chunk-000000.npz`` ...; every file appears under its final name only when complete
(written as ``<name>.tmp``, fsynced, renamed). A rerun keeps the finished chunks and makes the rest;
``<stem>.parts/plan.json`` holds the settings that fix the pixels, so a rerun with other settings is
refused instead of mixing two runs. :meth:`ChunkStore.assemble` streams the chunks into the final
``.npz`` (one chunk in memory at a time), writes the JSON of the run beside it and removes the parts.
Zip members carry a fixed timestamp, so equal pixels give byte-equal files.

No Lightning here: ``sample_cli.py`` runs the sampler on every device and calls this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..atomic import STAGING_SUFFIX, fsync_directory, write_atomically
from .fid import NPZ_IMAGES, NPZ_LABELS, to_adm_uint8

__all__ = [
    "ADM_IMAGES_KEY",
    "ADM_LABELS_KEY",
    "RELEASED_UINT8",
    "AdmSamples",
    "ChunkStore",
    "PlanMismatchError",
    "check_adm_layout",
    "read_adm_npz",
    "released_uint8",
    "sha256_file",
    "write_adm_npz",
]

#: Keys of the ADM evaluator's sample batch (``np.savez`` names positional arrays so).
ADM_IMAGES_KEY = NPZ_IMAGES
ADM_LABELS_KEY = NPZ_LABELS
#: How ``arr_0`` is made, for the run's JSON.
RELEASED_UINT8 = "torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8) in float32 (truncation), NHWC"
#: Channels an ADM sample batch may have: RGB, or grey (1-channel data such as the digits).
IMAGE_CHANNELS = (1, 3)
#: Suffix of a file being written next to its final name.
PLAN_FILE = "plan.json"
_CHUNK_NAME = "chunk-{:06d}.npz"
_CHUNK_KEYS = ("images", "labels", "indices")
#: Zip members are stamped with this time (the zip format's epoch) instead of the clock.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_HASH_BLOCK = 1 << 20


def released_uint8(images: Tensor) -> np.ndarray:
    """``(N, C, H, W)`` floats in [-1, 1] -> ``(N, H, W, C)`` ``uint8`` by the released expression.

    ``clamp(127.5 * x + 128, 0, 255)`` in float32, then a cast (truncation toward zero), as the released
    ``sample_ddp.py`` does before ``np.savez`` (:func:`~sit_lightning.evaluation.fid.to_adm_uint8`, the
    map ``FIDCallback`` and ``sit-lightning fid`` score).
    """
    if images.ndim != 4 or images.dtype == torch.uint8:
        raise ValueError(f"images must be float (N, C, H, W); got {images.dtype} {tuple(images.shape)}")
    return to_adm_uint8(images).permute(0, 2, 3, 1).to("cpu").numpy()


class AdmSamples(NamedTuple):
    """An ADM sample batch: ``images`` ``uint8`` ``(N, H, W, C)`` and ``labels`` ``int64`` ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray


def check_adm_layout(images: np.ndarray, labels: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``images`` is ``uint8 (N, H, W, 1|3)`` and ``labels`` ``int64 (N,)``."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in IMAGE_CHANNELS:
        raise ValueError(
            f"ADM samples must be uint8 (N, H, W, C) with C in {IMAGE_CHANNELS}; "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"ADM labels must be int64 ({images.shape[0]},); got {labels.dtype} {tuple(labels.shape)}"
        )


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    return {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}


def _write_zip(
    file: IO[bytes], members: Iterable[tuple[str, tuple[int, ...], np.dtype, Iterable[np.ndarray]]]
) -> None:
    """An ``np.load``-able ``.npz``: member ``name.npy`` of ``shape`` and ``dtype`` from the parts, in order.

    As ``np.savez`` writes it (stored, zip64), but streamed part by part and with a fixed timestamp.
    """
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, shape, dtype, parts in members:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            with archive.open(info, "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, _npy_header(shape, dtype))
                written = 0
                for part in parts:
                    part = np.ascontiguousarray(part, dtype=dtype)
                    out.write(part.tobytes())
                    written += part.size
                if written != int(np.prod(shape)):
                    raise ValueError(
                        f"{name}: the parts hold {written} values, the shape {shape} needs {np.prod(shape)}"
                    )


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None], *, rename: bool = True) -> Path:
    """:func:`~sit_lightning.atomic.write_atomically` for a writer of an open binary file."""

    def to_file(staging: Path) -> None:
        with open(staging, "wb") as f:
            write(f)

    return write_atomically(path, to_file, rename=rename, parents=True)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    _write_atomic(path, lambda f: f.write(text.encode()))


def write_adm_npz(path: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write an ADM sample batch (``arr_0`` images, ``arr_1`` labels) atomically; same pixels, same bytes."""
    images, labels = np.asarray(images), np.asarray(labels)
    check_adm_layout(images, labels)
    members = [
        (ADM_IMAGES_KEY, images.shape, images.dtype, [images]),
        (ADM_LABELS_KEY, labels.shape, labels.dtype, [labels]),
    ]
    return _write_atomic(Path(path), lambda f: _write_zip(f, members))


def read_adm_npz(path: str | Path) -> AdmSamples:
    """Read and check an ADM sample batch; ``arr_1`` may be absent (the released files have none: -1 labels)."""
    with np.load(path) as data:
        if ADM_IMAGES_KEY not in data.files:
            raise ValueError(f"{path} has no {ADM_IMAGES_KEY!r} (keys: {data.files})")
        images = data[ADM_IMAGES_KEY]
        labels = data[ADM_LABELS_KEY] if ADM_LABELS_KEY in data.files else np.full(len(images), -1, np.int64)
    check_adm_layout(images, labels)
    return AdmSamples(images, labels)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class PlanMismatchError(ValueError):
    """A resumed run's settings differ from those its finished chunks were made with."""


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@dataclass(frozen=True)
class ChunkStore:
    """The chunk files of one output ``.npz``: ``<stem>.parts/`` beside it, and the run's JSON.

    Args:
        output: the final ``.npz``.
        num_samples: ``N``, the samples of the whole file.
        chunk_size: samples per chunk (the last may be shorter).
    """

    output: Path
    num_samples: int
    chunk_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        if self.output.suffix != ".npz":
            raise ValueError(f"the output must be a .npz file; got {str(self.output)!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {self.num_samples}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {self.chunk_size}")

    # ---- names ---------------------------------------------------------------------------------
    @property
    def parts(self) -> Path:
        """The folder of the chunk files, ``<stem>.parts/``."""
        return self.output.with_suffix(".parts")

    @property
    def metadata_path(self) -> Path:
        """The run's JSON beside the ``.npz`` (same stem)."""
        return self.output.with_suffix(".json")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_indices(self, chunk: int) -> Tensor:
        """``(n,)`` global sample indices of ``chunk``."""
        if not 0 <= chunk < self.num_chunks:
            raise ValueError(f"chunk must be in [0, {self.num_chunks}); got {chunk}")
        start = chunk * self.chunk_size
        return torch.arange(start, min(start + self.chunk_size, self.num_samples), dtype=torch.long)

    def chunk_path(self, chunk: int) -> Path:
        return self.parts / _CHUNK_NAME.format(chunk)

    # ---- state ---------------------------------------------------------------------------------
    def is_complete(self, plan: Mapping[str, Any]) -> bool:
        """Whether the ``.npz`` and its JSON exist, were made with ``plan`` and the file's hash matches."""
        if not (self.output.is_file() and self.metadata_path.is_file()):
            return False
        stored = json.loads(self.metadata_path.read_text())
        if any(stored.get(k) != v for k, v in _plain(plan).items()):
            return False
        return stored.get("npz_sha256") == sha256_file(self.output)

    def open(self, plan: Mapping[str, Any], *, discard_other: bool = False) -> list[int]:
        """Start or resume: record ``plan`` (or check it against the recorded one); the chunks still to make.

        Leftover ``*.tmp`` files of an interrupted run are removed, and a chunk file that does not hold
        what its name promises is made again.

        Args:
            plan: everything that fixes the pixels (plain JSON data).
            discard_other: delete the chunks of a run with another plan instead of refusing.

        Raises:
            PlanMismatchError: the parts folder was started with another plan (the message lists the
                differences).
        """
        plan = _plain(plan)
        plan_path = self.parts / PLAN_FILE
        if discard_other and plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
            shutil.rmtree(self.parts)
        self.parts.mkdir(parents=True, exist_ok=True)
        if plan_path.is_file():
            stored = json.loads(plan_path.read_text())
            if stored != plan:
                raise PlanMismatchError(
                    f"{self.parts} holds chunks of a run with other settings ("
                    + "; ".join(_differences(stored, plan))
                    + f"); rerun with the same settings, or delete {self.parts} to start over"
                )
        else:
            _write_json(plan_path, plan)
        for stale in self.parts.glob(f"*{STAGING_SUFFIX}"):
            stale.unlink(missing_ok=True)
        return [k for k in range(self.num_chunks) if not self._chunk_ok(k)]

    def _chunk_ok(self, chunk: int) -> bool:
        path = self.chunk_path(chunk)
        if not path.is_file():
            return False
        try:
            with np.load(path) as data:
                arrays = {key: data[key] for key in _CHUNK_KEYS}
            check_adm_layout(arrays["images"], arrays["labels"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            path.unlink(missing_ok=True)  # written by something else, or damaged after the rename
            return False
        return np.array_equal(arrays["indices"], self.chunk_indices(chunk).numpy())

    def write_chunk(self, chunk: int, images: np.ndarray, labels: np.ndarray) -> Path:
        """Write ``chunk``'s ``uint8 (n, H, W, C)`` images and ``(n,)`` labels atomically."""
        indices = self.chunk_indices(chunk).numpy()
        labels = np.asarray(labels, dtype=np.int64)
        check_adm_layout(images, labels)
        if len(images) != len(indices):
            raise ValueError(f"chunk {chunk} holds {len(indices)} samples; got {len(images)} images")
        members = [
            (key, array.shape, array.dtype, [array])
            for key, array in zip(_CHUNK_KEYS, (images, labels, indices), strict=True)
        ]
        return _write_atomic(self.chunk_path(chunk), lambda f: _write_zip(f, members))

    def _read_chunk(self, chunk: int) -> AdmSamples:
        with np.load(self.chunk_path(chunk)) as data:
            return AdmSamples(data["images"], data["labels"])

    def assemble(self, metadata: Mapping[str, Any]) -> Path:
        """Stream every chunk into the final ``.npz``, write the JSON beside it, remove the parts.

        Order: the ``.npz`` is written as ``<name>.tmp``; its hash goes into the JSON (written
        atomically); then the ``.npz`` is renamed into place and the parts are removed. An interruption
        at any point leaves either no ``.npz`` under its final name (and a rerun assembles it again) or
        a complete one with its JSON.
        """
        missing = [k for k in range(self.num_chunks) if not self.chunk_path(k).is_file()]
        if missing:
            raise RuntimeError(
                f"cannot assemble {self.output}: chunks {missing[:10]} of {self.parts} are missing"
            )
        first = self._read_chunk(0).images
        shape = (self.num_samples, *first.shape[1:])
        chunks = range(self.num_chunks)

        def images() -> Iterable[np.ndarray]:
            for k in chunks:
                part = self._read_chunk(k).images
                if part.shape[1:] != first.shape[1:]:
                    raise ValueError(f"chunk {k} has images {part.shape[1:]}, chunk 0 {first.shape[1:]}")
                yield part

        labels = np.concatenate([self._read_chunk(k).labels for k in chunks])
        members = [
            (ADM_IMAGES_KEY, shape, np.dtype(np.uint8), images()),
            (ADM_LABELS_KEY, labels.shape, labels.dtype, [labels]),
        ]
        staging = _write_atomic(self.output, lambda f: _write_zip(f, members), rename=False)
        try:
            payload = {
                **_plain(metadata),
                "npz": self.output.name,
                "npz_sha256": sha256_file(staging),
                "image_shape": list(shape[1:]),
                "class_counts": np.bincount(labels).tolist(),
            }
            _write_json(self.metadata_path, payload)
            os.replace(staging, self.output)
            fsync_directory(self.output.parent)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.output


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists), so stored and new plans compare equal."""
    return json.loads(json.dumps(value, sort_keys=True))
