"""Writing SiT weights in the released layouts: state-dict functions, no Lightning.

Two released layouts differ only in the final layer (``final_layer.linear``, see the released
``models.py``):

- **training** (``learn_sigma=True``, what the released ``train.py`` trains and saves): ``p*p*2C``
  rows. Per token the rows are ordered ``(p_row, p_col, channel)`` with the channel fastest, and the
  released ``forward`` keeps channels ``0..C-1`` (``x.chunk(2, dim=1)``), so row ``r`` feeds an output
  channel exactly when ``r % (2C) < C``; the other half is DiT's variance head, never used by SiT.
- **sample** (``learn_sigma=False``, what the released ``sample.py --ckpt`` builds): ``p*p*C`` rows.

:func:`to_released_sample` keeps the rows with ``r % (2C) < C``; :func:`to_learn_sigma` puts the
variance half back as zeros (the adaLN-Zero initial value). Neither changes the network output (the
kept rows are the same numbers), and ``to_released_sample(to_learn_sigma(s)) == s`` exactly.

:func:`to_released_training` builds ``{"model", "ema", "args"}`` as the released ``train.py`` saves it
(its ``opt`` entry is not written); :func:`save_safetensors` and :func:`save_torch` write files
atomically. See docs/models.md, "Converting checkpoints".
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import write_atomically
from .checkpoint import (
    TORCH_SUFFIXES,
    _strip_wrapper_prefixes,
    _torch_load,
    load_released_state_dict,
)
from .config import SiTConfig

__all__ = [
    "FINAL_LINEAR_KEYS",
    "ReleasedWeights",
    "SD_VAE_DOWNSAMPLE",
    "is_learn_sigma",
    "read_released",
    "learn_sigma_rows",
    "released_args",
    "save_safetensors",
    "save_torch",
    "to_learn_sigma",
    "to_released_sample",
    "to_released_training",
]

#: The only tensors whose shape depends on ``learn_sigma``.
FINAL_LINEAR_KEYS = ("final_layer.linear.weight", "final_layer.linear.bias")
#: Pixels per latent side of the SD VAE: the released ``--image-size`` is ``8 * input_size``.
SD_VAE_DOWNSAMPLE = 8
_PATCH_KEY = "x_embedder.proj.weight"


def _channels_and_patch(state: Mapping[str, Tensor]) -> tuple[int, int]:
    missing = [key for key in (_PATCH_KEY, *FINAL_LINEAR_KEYS) if key not in state]
    if missing:
        raise ValueError(f"not a SiT state dict: missing {missing} (found {len(state)} keys)")
    _, in_channels, patch, _ = state[_PATCH_KEY].shape  # (D, C, p, p)
    return in_channels, patch


def _check_channels(state: Mapping[str, Tensor], in_channels: int | None) -> tuple[int, int]:
    found, patch = _channels_and_patch(state)
    if in_channels is not None and in_channels != found:
        raise ValueError(f"in_channels={in_channels}, but {_PATCH_KEY} has {found} input channels")
    return found, patch


def learn_sigma_rows(in_channels: int, patch_size: int) -> Tensor:
    """Boolean mask over the ``p*p*2C`` final-layer rows: True where a row feeds an output channel.

    Row ``r`` is channel ``r % (2C)`` of its patch position (channel is the fastest axis), and
    ``forward`` keeps channels ``< C``.
    """
    rows = torch.arange(patch_size * patch_size * 2 * in_channels)
    return rows % (2 * in_channels) < in_channels


def is_learn_sigma(state: Mapping[str, Tensor], in_channels: int | None = None) -> bool:
    """Whether ``state`` is in the training layout (``p*p*2C`` final rows) rather than the sample layout.

    Raises:
        ValueError: the final layer has neither ``p*p*2C`` nor ``p*p*C`` rows.
    """
    channels, patch = _check_channels(state, in_channels)
    rows = state[FINAL_LINEAR_KEYS[0]].shape[0]
    per_layout = {True: patch * patch * 2 * channels, False: patch * patch * channels}
    for flag, count in per_layout.items():
        if rows == count:
            return flag
    raise ValueError(
        f"final_layer.linear has {rows} rows; expected {per_layout[True]} (learn_sigma=True) "
        f"or {per_layout[False]} (learn_sigma=False)"
    )


def to_released_sample(state: Mapping[str, Tensor], in_channels: int | None = None) -> dict[str, Tensor]:
    """The ``learn_sigma=False`` state dict the released ``sample.py --ckpt`` loads.

    Keeps the final-layer rows ``r`` with ``r % (2C) < C`` (weight and bias); every other tensor is
    passed through (the same tensor objects). A state dict already in that layout is returned as a
    copy of the mapping. The network output is unchanged: the dropped rows are never read.

    Args:
        state: a released-layout SiT state dict.
        in_channels: latent channels C, checked against ``x_embedder.proj.weight`` (read from it if None).
    """
    if not is_learn_sigma(state, in_channels):
        return dict(state)
    channels, patch = _channels_and_patch(state)
    keep = learn_sigma_rows(channels, patch)
    out = dict(state)
    for key in FINAL_LINEAR_KEYS:
        out[key] = state[key][keep.to(state[key].device)].contiguous()
    return out


def to_learn_sigma(state: Mapping[str, Tensor], in_channels: int | None = None) -> dict[str, Tensor]:
    """The inverse of :func:`to_released_sample`: the training layout with a zero variance half.

    The rows ``r % (2C) >= C`` are zeros (SiT's adaLN-Zero initial value; ``forward`` never reads
    them), so the output is unchanged and ``to_released_sample(to_learn_sigma(s))`` equals ``s``.
    A state dict already in the training layout is returned as a copy of the mapping.
    """
    if is_learn_sigma(state, in_channels):
        return dict(state)
    channels, patch = _channels_and_patch(state)
    keep = learn_sigma_rows(channels, patch)
    out = dict(state)
    for key in FINAL_LINEAR_KEYS:
        half = state[key]
        full = half.new_zeros((keep.numel(), *half.shape[1:]))
        full[keep.to(half.device)] = half
        out[key] = full
    return out


def released_args(config: SiTConfig) -> argparse.Namespace:
    """The settings of the released ``train.py`` that the architecture fixes, as its ``args``.

    ``model`` is the preset name (None for an architecture outside the presets), ``image_size`` the
    pixel side with the SD VAE and ``num_classes`` the real classes. Settings the weights do not
    record (data path, seed, path type, ...) are left out rather than guessed.
    """
    return argparse.Namespace(
        model=config.preset_name,
        image_size=config.input_size * SD_VAE_DOWNSAMPLE,
        num_classes=config.num_classes,
    )


def to_released_training(
    model: Mapping[str, Tensor],
    ema: Mapping[str, Tensor] | None = None,
    *,
    args: argparse.Namespace | None = None,
) -> dict[str, Any]:
    """A checkpoint as the released ``train.py`` saves it: ``{"model", "ema", "args"}``.

    Both state dicts are put in the training layout (``learn_sigma=True``, :func:`to_learn_sigma`);
    ``ema=None`` stores ``model`` as the EMA too. ``opt`` is not written (the released resume never
    restored it; see docs/models.md). ``args`` is pickled as an ``argparse.Namespace``, which
    :func:`~sit_lightning.models.load_released_state_dict` reads with exactly that class allowed.

    Raises:
        ValueError: ``model`` and ``ema`` do not have the same keys and shapes.
    """
    ema = model if ema is None else ema
    shapes = {k: tuple(v.shape) for k, v in model.items()}
    if shapes != {k: tuple(v.shape) for k, v in ema.items()}:
        ema_shapes = {k: tuple(v.shape) for k, v in ema.items()}
        differ = sorted(k for k in shapes.keys() | ema_shapes.keys() if shapes.get(k) != ema_shapes.get(k))
        raise ValueError(f"model and ema weights differ in keys or shapes: {differ[:5]}")
    checkpoint: dict[str, Any] = {"model": to_learn_sigma(model), "ema": to_learn_sigma(ema)}
    checkpoint["args"] = args if args is not None else argparse.Namespace()
    return checkpoint


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically (a reader never sees a half-written file)."""
    return write_atomically(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(state: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write a state dict as ``.safetensors``, atomically; tensors are made contiguous and unshared."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


@dataclass(frozen=True)
class ReleasedWeights:
    """The weights of a released file: ``model`` (the only set of a bare file) and ``ema`` if present."""

    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None


def read_released(path: str | Path, map_location: str | torch.device = "cpu") -> ReleasedWeights:
    """Both sets of weights of a released training checkpoint, or the one set of a bare file.

    Reads the file once, as :func:`~sit_lightning.models.load_released_state_dict` does (weights only,
    ``argparse.Namespace`` allowed, ``module.`` / ``_orig_mod.`` removed). A bare state dict or a
    ``.safetensors`` file gives ``ema=None``.

    Raises:
        ValueError: an unknown suffix, or a file that holds neither a state dict nor a checkpoint
            with ``model`` and ``ema`` state dicts.
    """
    path = Path(path)
    if path.suffix.lower() not in TORCH_SUFFIXES:  # .safetensors, or a suffix the loader refuses clearly
        return ReleasedWeights(load_released_state_dict(path, map_location=map_location), None)
    loaded = _torch_load(path, map_location)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict or checkpoint dict")
    if all(isinstance(value, Tensor) for value in loaded.values()):
        return ReleasedWeights(_strip_wrapper_prefixes(dict(loaded)), None)
    sets = {}
    for which in ("model", "ema"):
        weights = loaded.get(which)
        if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
            raise ValueError(
                f"{path} is neither a state dict nor a released training checkpoint with 'model' and "
                f"'ema' state dicts; its top-level keys are {sorted(map(str, loaded))}"
            )
        sets[which] = _strip_wrapper_prefixes(dict(weights))
    return ReleasedWeights(sets["model"], sets["ema"])
