"""Loading released SiT weights and checkpoints written by the released ``train.py``.

Accepted files:

- ``.pt`` / ``.pth`` holding a bare state dict (the published ``SiT-XL-2-256x256.pt``, which is the
  EMA model), or a training checkpoint ``{"model", "ema", "opt", "args"}`` from the released
  ``train.py`` (``which`` picks ``ema`` (default) or ``model``);
- ``.safetensors`` holding a state dict.

Pickled files are read with ``torch.load(weights_only=True)``. A training checkpoint pickles its
``args`` as an ``argparse.Namespace``, which ``weights_only`` refuses; then, and only then, the file is
read again with exactly that one class allowed. Arbitrary pickles are never executed
(``weights_only=False`` is never used).

The architecture is read from the tensor shapes: depth, width, patch size, channels, MLP ratio,
token count (image size), label rows (classes + null) and final-layer rows (``learn_sigma``). Only
the number of heads is invisible in the weights; it comes from the matching preset (or ``num_heads``).
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from .config import SIT_PRESETS, SiTConfig
from .sit import SiT

__all__ = [
    "CheckpointLayout",
    "UntrustedCheckpointError",
    "Which",
    "load_released_sit",
    "load_released_state_dict",
    "read_layout",
    "refused_type",
    "sit_from_state_dict",
]

Which = Literal["ema", "model"]
WHICH: tuple[str, ...] = get_args(Which)
TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
#: Prefixes added by DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: The released models were trained with this label dropout; a null label row implies it.
RELEASED_CLASS_DROPOUT = 0.1
#: Keys whose shapes determine the architecture.
_LAYOUT_KEYS = (
    "pos_embed",
    "x_embedder.proj.weight",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "blocks.0.mlp.fc1.weight",
)
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def _strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove ``module.`` / ``_orig_mod.`` (in any nesting) when every key carries the prefix."""
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
                changed = True
    return state_dict


class UntrustedCheckpointError(pickle.UnpicklingError, ValueError):
    """A pickled file names a type outside the loader's allow-list; nothing from it was run."""


def refused_type(error: pickle.UnpicklingError) -> str:
    """The global or object that torch's weights-only unpickler refused, as named in its message."""
    found = re.search(r"GLOBAL (\S+)|(?:but got|unrecognized function) (<[^>]*>|\S+)", str(error))
    return next(filter(None, found.groups())) if found else "an object"


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            # The released train.py pickles its argparse.Namespace of settings next to the weights.
            # Allow exactly that class (it sets attributes, nothing else); any other global still fails.
            if "argparse.Namespace" not in str(error):
                raise
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UntrustedCheckpointError(
            f"refused to load {path}: it names {refused_type(error)}, which is not among the types released "
            "SiT weights hold (tensors, plain data, argparse.Namespace) and could run code when unpickled; "
            "nothing was run. Only if you trust the file: torch.load(path, weights_only=False)"
        ) from None


def load_released_state_dict(
    path: str | Path, *, which: Which = "ema", map_location: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Read a SiT state dict from a released weight file or a released training checkpoint.

    Args:
        path: ``.pt`` / ``.pth`` (bare state dict, or ``{"model", "ema", "opt", "args"}``) or
            ``.safetensors``.
        which: for a training checkpoint, the EMA weights (``"ema"``, what the paper evaluates) or
            the raw trained weights (``"model"``). A bare state dict holds one set of weights and is
            returned whatever ``which`` says.
        map_location: device for the tensors.

    Returns:
        The state dict, with a ``module.`` / ``_orig_mod.`` prefix removed.

    Raises:
        ValueError: unknown suffix or ``which``, a checkpoint without the requested entry, or a
            file that does not hold a mapping of names to tensors.
        UntrustedCheckpointError: (a ``ValueError``) the pickle names a type outside tensors, plain
            data and ``argparse.Namespace``: a possible code payload, of which nothing is run.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        device = str(map_location) if isinstance(map_location, torch.device) else map_location
        loaded: Any = load_file(str(path), device=device)
    elif suffix in TORCH_SUFFIXES:
        loaded = _torch_load(path, map_location)
    else:
        raise ValueError(
            f"cannot read {path.name!r}: expected a suffix in "
            f"{(*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)}, got {suffix!r}"
        )
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict or checkpoint dict")
    if not all(isinstance(value, Tensor) for value in loaded.values()):
        # A training checkpoint: pick the requested set of weights.
        if which not in loaded:
            raise ValueError(
                f"{path} is a checkpoint dict without {which!r} weights; "
                f"its top-level keys are {sorted(loaded)}"
            )
        loaded = loaded[which]
        if not isinstance(loaded, Mapping) or not all(isinstance(value, Tensor) for value in loaded.values()):
            raise ValueError(f"{path}[{which!r}] is not a mapping of parameter names to tensors")
    return _strip_wrapper_prefixes(dict(loaded))


@dataclass(frozen=True)
class CheckpointLayout:
    """The architecture a SiT state dict implies (everything but the number of heads)."""

    depth: int
    hidden_size: int
    patch_size: int
    in_channels: int
    mlp_hidden: int
    num_tokens: int
    label_rows: int
    final_rows: int


def read_layout(state_dict: Mapping[str, Tensor]) -> CheckpointLayout:
    """Read the architecture from the tensor shapes of a released-layout state dict.

    Works on meta tensors too (only shapes are used).

    Raises:
        ValueError: a key the layout needs is missing (the message lists them).
    """
    missing = [key for key in _LAYOUT_KEYS if key not in state_dict]
    if missing:
        raise ValueError(f"not a SiT state dict: missing {missing} (found {len(state_dict)} keys)")
    patch = state_dict["x_embedder.proj.weight"]
    hidden, in_channels, p, _ = patch.shape
    depth = 1 + max(int(match.group(1)) for key in state_dict if (match := _BLOCK_KEY.match(key)))
    return CheckpointLayout(
        depth=depth,
        hidden_size=hidden,
        patch_size=p,
        in_channels=in_channels,
        mlp_hidden=state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        num_tokens=state_dict["pos_embed"].shape[1],
        label_rows=state_dict["y_embedder.embedding_table.weight"].shape[0],
        final_rows=state_dict["final_layer.linear.weight"].shape[0],
    )


def _resolve_heads(layout: CheckpointLayout, preset: str | None, num_heads: int | None) -> int:
    found = f"depth={layout.depth}, hidden_size={layout.hidden_size}, patch_size={layout.patch_size}"
    if preset is not None:
        if preset not in SIT_PRESETS:
            raise ValueError(f"unknown SiT preset {preset!r}; choose one of {', '.join(SIT_PRESETS)}")
        config = SIT_PRESETS[preset]
        expected = f"depth={config.depth}, hidden_size={config.hidden_size}, patch_size={config.patch_size}"
        if expected != found:
            raise ValueError(f"checkpoint does not fit {preset}: expected {expected}, found {found}")
        if num_heads is not None and num_heads != config.num_heads:
            raise ValueError(f"{preset} has num_heads={config.num_heads}, got num_heads={num_heads}")
        return config.num_heads
    if num_heads is not None:
        return num_heads
    for config in SIT_PRESETS.values():
        if (config.depth, config.hidden_size, config.patch_size) == (
            layout.depth,
            layout.hidden_size,
            layout.patch_size,
        ):
            return config.num_heads
    raise ValueError(
        f"checkpoint ({found}) matches no preset; pass num_heads (it is not stored in the weights)"
    )


def _resolve_input_size(layout: CheckpointLayout, input_size: int | None) -> int:
    grid = math.isqrt(layout.num_tokens)
    if grid * grid != layout.num_tokens:
        raise ValueError(f"pos_embed has {layout.num_tokens} tokens, not a square patch grid")
    found_size = grid * layout.patch_size
    if input_size is None:
        return found_size
    expected_tokens = (input_size // layout.patch_size) ** 2
    if input_size % layout.patch_size or expected_tokens != layout.num_tokens:
        raise ValueError(
            f"input_size={input_size} with patch_size={layout.patch_size} expects pos_embed of "
            f"{expected_tokens} tokens, found {layout.num_tokens} (input_size={found_size}, "
            f"{found_size * 8} px with the SD VAE)"
        )
    return input_size


def _resolve_learn_sigma(layout: CheckpointLayout, learn_sigma: bool | None) -> bool:
    per_channel = layout.patch_size**2
    rows = {True: per_channel * layout.in_channels * 2, False: per_channel * layout.in_channels}
    found = [flag for flag, count in rows.items() if count == layout.final_rows]
    if not found:
        raise ValueError(
            f"final_layer.linear has {layout.final_rows} rows; expected {rows[True]} (learn_sigma=True) "
            f"or {rows[False]} (learn_sigma=False)"
        )
    if learn_sigma is not None and learn_sigma != found[0]:
        raise ValueError(
            f"learn_sigma={learn_sigma} expects final_layer.linear with {rows[learn_sigma]} rows, "
            f"found {layout.final_rows} (learn_sigma={found[0]})"
        )
    return found[0]


def _resolve_classes(layout: CheckpointLayout, num_classes: int | None) -> tuple[int, float]:
    if num_classes is None:  # the released layout: classes + one null row
        return layout.label_rows - 1, RELEASED_CLASS_DROPOUT
    if layout.label_rows == num_classes + 1:
        return num_classes, RELEASED_CLASS_DROPOUT
    if layout.label_rows == num_classes:
        return num_classes, 0.0
    raise ValueError(
        f"num_classes={num_classes} expects a label table of {num_classes + 1} rows (with the null class) "
        f"or {num_classes} (without), found {layout.label_rows}"
    )


def sit_from_state_dict(
    state_dict: Mapping[str, Tensor],
    preset: str | None = None,
    *,
    input_size: int | None = 32,
    num_classes: int | None = None,
    learn_sigma: bool | None = None,
    num_heads: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SiT:
    """Build the :class:`SiT` a released-layout state dict describes and load it with ``strict=True``.

    Every setting left as ``None`` is read from the tensor shapes; every setting given is checked
    against them, so a mismatch fails here with a message naming the expected and the found shapes,
    not as a size error inside ``load_state_dict`` (released issue #10). Arguments as in
    :func:`load_released_sit`; ``device`` may be ``"meta"``.
    """
    layout = read_layout(state_dict)
    heads = _resolve_heads(layout, preset, num_heads)
    classes, class_dropout_prob = _resolve_classes(layout, num_classes)
    if layout.mlp_hidden % layout.hidden_size:
        raise ValueError(
            f"MLP width {layout.mlp_hidden} is not a multiple of "
            f"hidden_size={layout.hidden_size}; unsupported"
        )
    with torch.device("meta"):  # no time spent initialising weights that are overwritten next
        config = SiTConfig(
            input_size=_resolve_input_size(layout, input_size),
            patch_size=layout.patch_size,
            in_channels=layout.in_channels,
            hidden_size=layout.hidden_size,
            depth=layout.depth,
            num_heads=heads,
            mlp_ratio=layout.mlp_hidden / layout.hidden_size,
            class_dropout_prob=class_dropout_prob,
            num_classes=classes,
            learn_sigma=_resolve_learn_sigma(layout, learn_sigma),
        )
        model = SiT(config)
    converted = {
        key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device=device)
        for key, value in state_dict.items()
    }
    # assign=True adopts the loaded tensors (the meta model has no storage); requires_grad is kept
    # from the model, so pos_embed stays frozen.
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def load_released_sit(
    path: str | Path,
    preset: str | None = None,
    *,
    input_size: int | None = 32,
    num_classes: int | None = None,
    learn_sigma: bool | None = None,
    num_heads: int | None = None,
    which: Which = "ema",
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SiT:
    """Load a released SiT weight file (or released training checkpoint) as a ready :class:`SiT`.

    Example: ``load_released_sit("SiT-XL-2-256x256.pt", "SiT-XL/2")``, or for the 512 px model
    ``load_released_sit("SiT-XL-2-512x512.pt", "SiT-XL/2", input_size=64)``.

    Args:
        path: see :func:`load_released_state_dict`.
        preset: e.g. ``"SiT-XL/2"``; checked against depth, width and patch size. ``None``: take the
            preset that matches the weights (for its number of heads), else ``num_heads`` is required.
        input_size: latent side (32 for 256 px, 64 for 512 px); ``None`` reads it from ``pos_embed``.
        num_classes: real classes; ``None`` assumes the released layout (label table = classes + null).
        learn_sigma: ``None`` reads it from the final layer (p*p*2C rows: True, p*p*C rows: False).
        num_heads: only for architectures outside the presets (heads are not stored in the weights).
        which: ``"ema"`` (default) or ``"model"`` for training checkpoints.
        map_location: device of the returned model.
        dtype: floating-point dtype of the returned model.

    Returns:
        The model in eval mode. ``class_dropout_prob`` is 0.1 (the released value) when the label
        table has a null row, else 0.

    Raises:
        ValueError: the weights do not fit the preset, image size, class count or learn_sigma given,
            naming the expected and the found shapes; or the file is not a SiT checkpoint.
    """
    state_dict = load_released_state_dict(path, which=which, map_location=map_location)
    return sit_from_state_dict(
        state_dict,
        preset,
        input_size=input_size,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        num_heads=num_heads,
        device=map_location,
        dtype=dtype,
    )
