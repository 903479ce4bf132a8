"""The ``sit-lightning convert`` command: Lightning checkpoints and released SiT files, both ways.

    sit-lightning convert last.ckpt 0400000.pt --to released-train      # {"model", "ema", "args"}
    sit-lightning convert last.ckpt sit.pt --to released-sample         # what released sample.py --ckpt loads
    sit-lightning convert last.ckpt sit.safetensors --to safetensors
    sit-lightning convert SiT-XL-2-256x256.pt init.ckpt --to lightning-init
    sit-lightning fit --config configs/sit_xl_linear.yaml --ckpt_path init.ckpt   # fine-tune from it

Inputs: a Lightning checkpoint (``.ckpt``: the ``network.`` weights of ``state_dict`` and the EMA of
the :class:`~sit_lightning.callbacks.EMACallback` state in ``callbacks``; also a sharded FSDP2
checkpoint folder, consolidated in memory by :func:`consolidate`) or a released file (``.pt``
/ ``.pth``: a bare state dict or a released ``train.py`` checkpoint; ``.safetensors``). The state-dict
work is :mod:`sit_lightning.models.convert`; this module reads and writes the files. A Lightning
checkpoint is a dict read with ``torch.load``; Lightning itself is imported only to stamp its version
on a ``lightning-init`` file. See docs/models.md, "Converting checkpoints".
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from .models import SIT_PRESETS, SiT, SiTConfig, sit_from_state_dict
from .models.checkpoint import SAFETENSORS_SUFFIX, TORCH_SUFFIXES, Which
from .models.convert import (
    is_learn_sigma,
    read_released,
    released_args,
    save_safetensors,
    save_torch,
    to_released_sample,
    to_released_training,
)

__all__ = [
    "CONVERT_SUBCOMMAND",
    "ConvertResult",
    "ConvertTarget",
    "consolidate",
    "consolidate_checkpoint",
    "convert_checkpoint",
    "convert_main",
]

#: Subcommand name (dispatched by ``sit-lightning``'s ``main`` before LightningCLI).
CONVERT_SUBCOMMAND = "convert"
ConvertTarget = Literal["released-train", "released-sample", "safetensors", "lightning-init"]
TARGETS: tuple[str, ...] = get_args(ConvertTarget)
LIGHTNING_SUFFIX = ".ckpt"
#: Attribute name of the network inside SiTModule: its keys in a Lightning ``state_dict``.
NETWORK_PREFIX = "network."
#: ``EMACallback.state_key`` (its class name): where Lightning stores the callback's state.
EMA_STATE_KEY = "EMACallback"
#: ``callbacks.ema.SHARDED_EMA_PREFIX`` / ``SHARDED_EMA_FIELD`` (this layer may not import callbacks): in a
#: sharded checkpoint the EMA tensors are ``state_dict`` entries under the prefix the field names.
SHARDED_EMA_PREFIX = "_ema."
SHARDED_EMA_FIELD = "ema_prefix"
#: ``PostHocEMACallback.state_key`` and ``callbacks.posthoc_ema.SHARDED_TRACKS_FIELD``: in a sharded
#: checkpoint its tracks are ``state_dict`` entries ``<prefix><i>.<name>`` (``i`` the track's index).
POSTHOC_STATE_KEY = "PostHocEMACallback"
SHARDED_TRACKS_FIELD = "tracks_prefix"
#: Files that make a folder a sharded (DCP) Lightning checkpoint: the DCP index and Lightning's ``meta.pt``.
_DCP_INDEX = ".metadata"
_LIGHTNING_META = "meta.pt"
#: Suffixes each target may be written to.
_OUTPUT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "released-train": TORCH_SUFFIXES,
    "released-sample": TORCH_SUFFIXES,
    "safetensors": (SAFETENSORS_SUFFIX,),
    "lightning-init": (LIGHTNING_SUFFIX,),
}
#: Targets that hold one set of weights (``which`` picks it); the others carry the trained and EMA sets.
_SINGLE_SET = ("released-sample", "safetensors")


@dataclass(frozen=True)
class SourceWeights:
    """What a checkpoint holds: the trained weights, the EMA (None if it has none), the architecture."""

    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    config: SiTConfig
    kind: Literal["lightning", "released"]
    hyper_parameters: dict[str, Any]


@dataclass(frozen=True)
class ConvertResult:
    """One conversion: the file written, its format and the weights it holds."""

    output: Path
    to: ConvertTarget
    weights: str
    learn_sigma: bool
    arch: str


def _load_lightning_file(path: Path) -> Any:
    """The checkpoint dict, read weights-only with sit_lightning's allow-list of checkpoint classes."""
    from .trusted_loading import load_checkpoint

    return load_checkpoint(path)


def _arch_of(hparams: Mapping[str, Any]) -> SiTConfig | None:
    arch = hparams.get("arch")
    if any(key in hparams for key in ("depth", "hidden_size", "input_size", "num_classes")):
        from .module import migrate_hparams  # a sit-lightning 0.1 checkpoint

        arch = migrate_hparams(hparams)["arch"]
    if isinstance(arch, str) and arch in SIT_PRESETS:
        return SIT_PRESETS[arch]
    if isinstance(arch, Mapping):
        return SiTConfig(**arch)
    return None


def _check_fits(config: SiTConfig, state: Mapping[str, Tensor], path: Path, what: str) -> None:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SiT(config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise ValueError(f"{path}: the {what} weights do not fit the stored arch {config}: {differ[:5]}")


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded FSDP2 checkpoint folder (DCP shards, their index and ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / _DCP_INDEX).is_file() and (path / _LIGHTNING_META).is_file()


def _move_sharded_ema(checkpoint: dict[str, Any]) -> None:
    """Move the EMA (and post-hoc EMA tracks) of a consolidated sharded checkpoint from ``state_dict`` into
    their callback states, in place, so that ``state_dict`` holds only the module's weights (what
    ``SiTModule.load_from_checkpoint`` loads strictly) and the states look as a single-file save writes them.
    """
    state_dict = checkpoint.get("state_dict")
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not isinstance(state, dict):
            continue
        if str(key).startswith(EMA_STATE_KEY):
            prefix = state.pop(SHARDED_EMA_FIELD, None)
            if prefix is None or not isinstance(state_dict, dict):
                continue
            names = [k for k in state_dict if k.startswith(prefix)]
            state["ema"] = {k.removeprefix(prefix): state_dict.pop(k) for k in names}
        elif str(key).startswith(POSTHOC_STATE_KEY):
            prefix = state.pop(SHARDED_TRACKS_FIELD, None)
            if prefix is None or not isinstance(state_dict, dict):
                continue
            tracks: list[dict[str, Tensor]] = [{} for _ in state.get("sigma_rels") or ()]
            for k in [k for k in state_dict if k.startswith(prefix)]:
                index, _, name = k.removeprefix(prefix).partition(".")
                tracks[int(index)][name] = state_dict.pop(k)
            state["tracks"] = tracks


def consolidate(folder: str | Path) -> dict[str, Any]:
    """A sharded FSDP2 checkpoint folder as one checkpoint dict, in the single-file layout.

    The DCP shards are read in full into CPU memory (Lightning's consolidation, trusted classes as for a
    file); the EMA entries of ``state_dict`` move into the ``EMACallback`` state as full tensors, so
    ``state_dict`` holds only the module's weights. Optimizer states stay as DCP stores them
    (``optimizer_0``, keyed by parameter name): the result is for ``sample`` / ``convert``, not for a resume.

    Raises:
        ValueError: ``folder`` is not a sharded checkpoint folder.
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    from .trusted_loading import refusing_untrusted

    folder = Path(folder)
    if not is_sharded_checkpoint(folder):
        raise ValueError(
            f"{folder} is not a sharded checkpoint folder (no {_DCP_INDEX} and {_LIGHTNING_META})"
        )
    with refusing_untrusted(folder / _LIGHTNING_META):
        checkpoint = _load_distributed_checkpoint(folder)
    _move_sharded_ema(checkpoint)
    return checkpoint


def consolidate_checkpoint(folder: str | Path, output: str | Path) -> Path:
    """Write the sharded checkpoint ``folder`` as the one file ``output`` (atomically); see :func:`consolidate`."""
    return save_torch(consolidate(folder), output)


def read_lightning(path: str | Path) -> SourceWeights:
    """The network and EMA weights (released layout, no ``network.`` prefix) of a SiTModule checkpoint.

    ``path``: a ``.ckpt`` file or a sharded FSDP2 checkpoint folder (consolidated in memory).

    Raises:
        ValueError: the file is not a Lightning checkpoint of a SiTModule, or its stored arch does not
            fit its weights.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        checkpoint = consolidate(path)
    else:
        checkpoint = _load_lightning_file(path)
        if isinstance(checkpoint, dict):
            _move_sharded_ema(checkpoint)  # a folder consolidated by Lightning's own tool
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not any(k.startswith(NETWORK_PREFIX) for k in state):
        keys = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not a Lightning checkpoint of a SiTModule (no 'state_dict' with "
            f"'{NETWORK_PREFIX}*' keys; found {keys}); released files end in .pt, .pth or .safetensors"
        )
    model = {k.removeprefix(NETWORK_PREFIX): v for k, v in state.items() if k.startswith(NETWORK_PREFIX)}
    callbacks = checkpoint.get("callbacks") or {}
    ema_states = [
        v
        for k, v in callbacks.items()
        if str(k).startswith(EMA_STATE_KEY) and isinstance(v, Mapping) and v.get("ema")
    ]
    if len(ema_states) > 1:
        raise ValueError(f"{path} holds {len(ema_states)} EMACallback states; convert needs exactly one")
    ema = None
    if ema_states:
        ema_state = ema_states[0]["ema"]
        ema = {
            k.removeprefix(NETWORK_PREFIX): v for k, v in ema_state.items() if k.startswith(NETWORK_PREFIX)
        }
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    config = _arch_of(hparams)
    if config is None:  # no usable arch stored: read it from the shapes (released conventions)
        config = sit_from_state_dict(model, input_size=None, device="meta").config
    _check_fits(config, model, path, "network")
    if ema is not None:
        _check_fits(config, ema, path, "EMA")
    return SourceWeights(model, ema, config, "lightning", hparams)


def read_source(path: str | Path, *, num_heads: int | None = None) -> SourceWeights:
    """Read a Lightning ``.ckpt`` or a released ``.pt`` / ``.pth`` / ``.safetensors`` file.

    ``num_heads`` is needed only for a released file whose architecture is no preset.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        if num_heads is not None:
            raise ValueError(f"num_heads applies to released files; {path.name} stores its arch")
        return read_lightning(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file (nor a sharded checkpoint folder)")
    if path.suffix.lower() == LIGHTNING_SUFFIX:
        if num_heads is not None:
            raise ValueError(f"num_heads applies to released files; {path.name} stores its arch")
        return read_lightning(path)
    released = read_released(path)
    config = sit_from_state_dict(released.model, input_size=None, num_heads=num_heads, device="meta").config
    if released.ema is not None:
        _check_fits(config, released.ema, path, "EMA")
    return SourceWeights(released.model, released.ema, config, "released", {})


def _one_set(source: SourceWeights, which: Which, path: Path) -> dict[str, Tensor]:
    if which == "model" or (source.ema is None and source.kind == "released"):
        return source.model  # a bare released file holds one set (the published files are EMA)
    if source.ema is None:
        raise ValueError(f"{path} has no EMACallback state; pass --which model for the trained weights")
    return source.ema


def _lightning_init(source: SourceWeights) -> dict[str, Any]:
    """A step-0 Lightning checkpoint: the network and EMA weights, the arch, and no optimizer state."""
    import lightning

    ema = source.model if source.ema is None else source.ema
    hparams = {**source.hyper_parameters, "arch": dataclasses.asdict(source.config)}
    return {
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "state_dict": {NETWORK_PREFIX + k: v for k, v in source.model.items()},
        "hyper_parameters": hparams,
        # Empty lists: `fit --ckpt_path` then starts a fresh optimizer and schedule at step 0.
        "optimizer_states": [],
        "lr_schedulers": [],
        "callbacks": {
            EMA_STATE_KEY: {"num_updates": 0, "ema": {NETWORK_PREFIX + k: v for k, v in ema.items()}}
        },
    }


def convert_checkpoint(
    input: str,
    output: str,
    *,
    to: ConvertTarget,
    which: Which | None = None,
    num_heads: int | None = None,
) -> ConvertResult:
    """Convert a SiT checkpoint between the Lightning and the released layouts.

    Args:
        input: a Lightning checkpoint (``.ckpt``, or a sharded FSDP2 checkpoint folder) or a released file
            (``.pt``/``.pth``: bare state dict or released train.py checkpoint; ``.safetensors``).
        output: the file to write (atomically): ``.pt``/``.pth`` for released-train and released-sample,
            ``.safetensors`` for safetensors, ``.ckpt`` for lightning-init.
        to: ``released-train``: ``{"model", "ema", "args"}`` as released train.py saves it (learn_sigma=True);
            ``released-sample``: a bare learn_sigma=False state dict, what released sample.py --ckpt loads;
            ``safetensors``: the state dict as it is; ``lightning-init``: a step-0 Lightning checkpoint that
            ``sit-lightning fit --ckpt_path`` fine-tunes from and ``SiTModule.load_from_checkpoint`` loads.
        which: for released-sample and safetensors, the EMA (``ema``, default) or the trained (``model``)
            weights. released-train and lightning-init write both sets (a file with one set gives it to both).
        num_heads: attention heads, only for a released file whose architecture is no preset.
    """
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {to!r}")
    if which is not None and to not in _SINGLE_SET:
        raise ValueError(f"--which applies to {' and '.join(_SINGLE_SET)}; {to} writes both weight sets")
    in_path, out_path = Path(input), Path(output)
    if out_path.suffix.lower() not in _OUTPUT_SUFFIXES[to]:
        raise ValueError(f"--to {to} writes {' or '.join(_OUTPUT_SUFFIXES[to])} files, got {out_path.name!r}")
    source = read_source(in_path, num_heads=num_heads)
    arch = source.config.preset_name or "custom"
    if to in _SINGLE_SET:
        chosen = which or "ema"
        state = _one_set(source, chosen, in_path)
        if to == "released-sample":
            state = to_released_sample(state)
            save_torch(state, out_path)
        else:
            save_safetensors(state, out_path)
        weights = chosen if (source.ema is not None or source.kind == "lightning") else "the file's only set"
        return ConvertResult(out_path, to, weights, is_learn_sigma(state), arch)
    if to == "released-train":
        checkpoint = to_released_training(source.model, source.ema, args=released_args(source.config))
        save_torch(checkpoint, out_path)
        return ConvertResult(out_path, to, _both(source), True, arch)
    save_torch(_lightning_init(source), out_path)
    return ConvertResult(out_path, to, _both(source), source.config.learn_sigma, arch)


def _both(source: SourceWeights) -> str:
    return "model and ema" if source.ema is not None else "one set, stored as model and ema"


def convert_main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``sit-lightning convert INPUT OUTPUT --to TARGET [--which ema|model]``.

    ``argv`` holds the arguments after the subcommand name. A bad file or option exits with status 2
    and a one-line message.
    """
    from jsonargparse import auto_cli

    from .errors import exit_in_one_line, subcommand_argv

    argv = subcommand_argv(CONVERT_SUBCOMMAND, argv)
    with exit_in_one_line(CONVERT_SUBCOMMAND, ValueError, OSError, RuntimeError, pickle.UnpicklingError):
        result = auto_cli(
            convert_checkpoint, args=argv, prog=f"sit-lightning {CONVERT_SUBCOMMAND}", allow_abbrev=False
        )
    print(
        f"wrote {result.output} ({result.to}: {result.weights}, {result.arch}, learn_sigma={result.learn_sigma})"
    )
    return 0
