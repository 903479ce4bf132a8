"""The ``sit-lightning`` command: LightningCLI over :class:`SiTModule` plus ``precompute-latents``.

    sit-lightning fit --config configs/sit_xl_linear.yaml            # train
    sit-lightning fit --config configs/sit_b_gvp.yaml --print_config  # the full resolved config
    sit-lightning validate --config ... --ckpt_path last.ckpt
    sit-lightning precompute-latents IMAGE_ROOT OUTPUT_DIR --image_size 256
    sit-lightning convert last.ckpt sit.pt --to released-sample   # see convert_cli.py

``model:`` holds the arguments of :class:`~sit_lightning.module.SiTModule`; ``data:`` any
LightningDataModule by ``class_path`` (``sit_lightning.data.LatentDataModule`` or
``sit_lightning.data.DigitsDataModule``); ``trainer:`` the Lightning Trainer (precision, strategy,
devices, callbacks such as :class:`~sit_lightning.callbacks.EMACallback`). Every choice is typed,
so a typo fails at parse time with the list of valid values.

A config file may build on others with a top-level ``base:`` key, a path relative to the file or a
list of them (``configs/base/`` holds the shared ImageNet settings). :func:`main` turns
``--config FILE`` into ``--config BASE ... --config FILE``, bases first and recursively, so the file
overrides its bases key by key (a list such as ``trainer.callbacks`` is replaced whole, as
jsonargparse does for any repeated ``--config``). ``--print_config`` and the saved ``config.yaml``
show the merged result without ``base``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionSubCommands
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from .callbacks.preemption import PreemptionCallback
from .checkpoint_io import AtomicCheckpointIO
from .module import ConfigurationError, SiTModule
from .trusted_loading import trusted_globals

__all__ = [
    "BASE_KEY",
    "CONVERT_SUBCOMMAND",
    "PRECOMPUTE_SUBCOMMAND",
    "STANDALONE_SUBCOMMANDS",
    "SiTLightningCLI",
    "StandaloneCommand",
    "expand_config_bases",
    "main",
]

#: Subcommand that encodes images to latent shards (not a Trainer method, so dispatched before LightningCLI).
PRECOMPUTE_SUBCOMMAND = "precompute-latents"
#: Subcommand that converts checkpoints to and from the released layouts (dispatched before LightningCLI too).
CONVERT_SUBCOMMAND = "convert"
#: Top-level key of a config file that names the config file(s) it builds on.
BASE_KEY = "base"
_CONFIG_FLAGS = ("-c", "--config")
_DESCRIPTION = (
    "SiT (Scalable Interpolant Transformers): train, validate and sample with PyTorch Lightning. "
    f"A config file may name the configs it builds on with a top-level '{BASE_KEY}:' key "
    "(a path relative to the file, or a list of paths); see docs/training.md."
)
_PRECOMPUTE_HELP = (
    "Encode an ImageFolder tree into VAE latent shards (resumable; see --help of the subcommand)."
)
_SAMPLE_HELP = "Sample a checkpoint into an ADM-evaluator .npz on every device (resumable; see --help of the subcommand)."
_CONVERT_HELP = (
    "Convert checkpoints: Lightning .ckpt -> released train.py / sample.py layouts or .safetensors, "
    "released files -> a checkpoint fit can start from (see --help of the subcommand)."
)
_FID_HELP = (
    "FID of an .npz or PNG folder of samples against a reference (ADM .npz, images, statistics), "
    "with Inception (IS too) or the digits judge, and conditional accuracy (see --help of the subcommand)."
)
_POSTHOC_EMA_HELP = (
    "Synthesise the EMA of any width (sigma_rel) from PostHocEMACallback snapshots, as a state dict "
    "(EDM2 post-hoc EMA; see --help of the subcommand)."
)


@dataclass(frozen=True)
class StandaloneCommand:
    """A subcommand that is not a Trainer method: :func:`main` runs it before LightningCLI.

    Attributes:
        module: the module that defines it (imported only when it runs or ``--help`` lists it).
        entry: ``entry(argv) -> exit status`` in that module.
        function: the function whose signature is the subcommand's arguments (for ``--help``).
        help: one line for ``sit-lightning --help``.
    """

    module: str
    entry: str
    function: str
    help: str

    def run(self, argv: list[str]) -> int:
        return getattr(importlib.import_module(self.module), self.entry)(argv)

    def signature(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), self.function)


#: Every subcommand besides fit / validate / test / predict: one entry each.
STANDALONE_SUBCOMMANDS: dict[str, StandaloneCommand] = {
    PRECOMPUTE_SUBCOMMAND: StandaloneCommand(
        "sit_lightning.data.precompute", "precompute_latents_main", "precompute_latents", _PRECOMPUTE_HELP
    ),
    CONVERT_SUBCOMMAND: StandaloneCommand(
        "sit_lightning.convert_cli", "convert_main", "convert_checkpoint", _CONVERT_HELP
    ),
    "sample": StandaloneCommand("sit_lightning.sample_cli", "sample_main", "sample_images", _SAMPLE_HELP),
    "fid": StandaloneCommand("sit_lightning.fid_cli", "fid_main", "measure_fid", _FID_HELP),
    "posthoc-ema": StandaloneCommand(
        "sit_lightning.posthoc_ema", "posthoc_ema_main", "synthesize_posthoc_ema", _POSTHOC_EMA_HELP
    ),
}


class SiTArgumentParser(LightningArgumentParser):
    """A LightningArgumentParser that keeps the action returned by :meth:`add_subcommands`.

    LightningCLI adds its Trainer subcommands to that action and drops it; keeping it lets
    :meth:`SiTLightningCLI.setup_parser` add ``precompute-latents`` through public API only.
    """

    subcommands_action: ActionSubCommands | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # an abbreviated flag (--trainer.max_ste) is a typo, not a request: refuse it (argparse accepts it)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_subcommands(self, *args: Any, **kwargs: Any) -> ActionSubCommands:
        self.subcommands_action = super().add_subcommands(*args, **kwargs)
        return self.subcommands_action


class SiTLightningCLI(LightningCLI):
    """LightningCLI whose configs may hold ``base:`` and whose ``--help`` lists ``precompute-latents``."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        # main() has already put the bases before the file; here the key only has to be accepted.
        # A suppressed help keeps it out of --help, --print_config and the saved config.yaml, whose
        # merged content no longer needs its bases.
        parser.add_argument(
            f"--{BASE_KEY}", type=str | list[str] | None, default=None, help=argparse.SUPPRESS
        )
        return parser

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        subcommands = getattr(self.parser, "subcommands_action", None)
        if not add_subcommands or subcommands is None:  # a parser_class without SiTArgumentParser's hook
            return
        from jsonargparse import ArgumentParser

        # Listed for --help only: main() dispatches these before LightningCLI sees them.
        for name, command in STANDALONE_SUBCOMMANDS.items():
            sub = ArgumentParser(description=command.help)
            sub.add_function_arguments(command.signature(), as_positional=True)
            subcommands.add_subcommand(name, sub, help=command.help)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The module's default objective (None -> TrainingObjective()) spelled out, so that --print_config
        # shows the path, prediction, weighting and time sampler in full.
        parser.set_defaults({"model.objective": {"class_path": "sit_lightning.objective.TrainingObjective"}})
        # Always present, whatever trainer.callbacks a config lists: SIGTERM / SIGUSR1 save last.ckpt at
        # the next step boundary and exit with PREEMPTED_EXIT_STATUS (docs/training.md, "Preemption").
        parser.add_lightning_class_args(PreemptionCallback, "preemption")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Checkpoints are written atomically unless the config chose its own CheckpointIO
        # (docs/training.md, "Checkpoints are atomic"). ModelParallelStrategy writes its shards itself:
        # configs/strategy_fsdp2.yaml selects AtomicModelParallelStrategy for that.
        strategy = trainer.strategy
        if (
            not isinstance(strategy, ModelParallelStrategy)
            and type(strategy.checkpoint_io) is TorchCheckpointIO
        ):
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def _load_yaml(text: str) -> Any:
    """``text`` as YAML, or None where it is not YAML (jsonargparse reports that, naming the file and line)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _read_bases(config: Path) -> list[str]:
    """The paths under ``base:`` in ``config``, as written (empty when it has none)."""
    content = _load_yaml(config.read_text())
    bases = content.get(BASE_KEY) if isinstance(content, dict) else None
    if bases is None:
        return []
    if isinstance(bases, str):
        return [bases]
    if isinstance(bases, list) and bases and all(isinstance(base, str) for base in bases):
        return bases
    raise ConfigurationError(f"{config}: '{BASE_KEY}' must be a path or a list of paths, got {bases!r}")


def _with_bases(config: Path, chain: tuple[Path, ...], order: list[Path]) -> None:
    """Append the bases of ``config`` (depth first, each file once) and then ``config`` to ``order``."""
    if config.resolve() in [link.resolve() for link in chain]:
        cycle = " -> ".join(str(link) for link in (*chain, config))
        raise ConfigurationError(f"config bases form a cycle: {cycle}")
    for base in _read_bases(config):
        base_path = Path(os.path.normpath(config.parent / base))
        if not base_path.is_file():
            raise ConfigurationError(
                f"{config}: {BASE_KEY} file {base!r} does not exist (looked for {base_path})"
            )
        _with_bases(base_path, (*chain, config), order)
    if config.resolve() not in [done.resolve() for done in order]:  # a base shared by two bases: once, first
        order.append(config)


def expand_config_bases(argv: list[str]) -> list[str]:
    """Replace each ``--config FILE`` by ``--config BASE ... --config FILE``, bases first.

    ``base:`` (a path relative to the file, or a list of paths) is read recursively, depth first: a base's own
    bases come before it, bases listed later override earlier ones, the file overrides them all, and a file
    reached twice within one ``--config`` is applied once, at its first place.

    Args:
        argv: the command line after the program name, e.g. ``["fit", "--config", "configs/sit_b_gvp.yaml"]``.

    Returns:
        ``argv`` with every config file's bases spelled out as ``--config`` arguments before it.

    Raises:
        ConfigurationError: a base file does not exist, the bases form a cycle, ``base:`` is neither a path nor
            a list of paths, or ``--base`` is given on the command line (it is a key of config files).
    """
    expanded: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == f"--{BASE_KEY}" or token.startswith(f"--{BASE_KEY}="):
            raise ConfigurationError(
                f"'{BASE_KEY}' is a key of config files, not an option: give each config with --config instead"
            )
        if token in _CONFIG_FLAGS and index + 1 < len(argv):
            value, index = argv[index + 1], index + 2
        elif token.startswith("--config="):
            value, index = token.split("=", 1)[1], index + 1
        else:
            expanded.append(token)
            index += 1
            continue
        if not Path(value).is_file():  # a YAML string, or a missing file that jsonargparse reports
            inline = _load_yaml(value)
            if isinstance(inline, dict) and BASE_KEY in inline:
                raise ConfigurationError(
                    f"'{BASE_KEY}' is read from config files only, not from --config {value!r}"
                )
            expanded += ["--config", value]
            continue
        order: list[Path] = []
        _with_bases(Path(value), (), order)
        for path in order:
            expanded += ["--config", str(path)]
    return expanded


def main(args: list[str] | None = None) -> int:
    """Run the ``sit-lightning`` command line.

    Args:
        args: the arguments after the program name (``None``: ``sys.argv[1:]``), e.g.
            ``["fit", "--config", "configs/digits.yaml", "--trainer.max_steps", "3"]``.

    Returns:
        the exit status (0). Parse errors exit through ``SystemExit`` with jsonargparse's message; a data
        set that does not fit the model, a schedule shorter than ``trainer.max_steps``, or a config whose
        ``base:`` is missing or circular exits with status 2 and a one-line message.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in STANDALONE_SUBCOMMANDS:
        return STANDALONE_SUBCOMMANDS[argv[0]].run(argv[1:])
    try:
        expanded = expand_config_bases(argv)
        if args is None:
            # LightningCLI reads sys.argv itself when args is None (and warns when it is given both)
            sys.argv[1:] = expanded
        # fit --ckpt_path and load_from_checkpoint read checkpoints weights-only, with the plain-data
        # classes our own checkpoints hold allowed (sit_lightning.trusted_loading; docs/training.md).
        with trusted_globals():
            _run_cli(args, expanded)
    except Exception as err:
        # One line, status 2, for what the user fixes in the inputs: our ConfigurationError (also when a
        # data-loader worker raised it), Lightning's own MisconfigurationException (e.g. trainer.max_steps
        # < -1), and a folder that cannot be written (no permission, read-only, full). Anything else is a bug:
        # its traceback is kept.
        import errno

        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from .errors import one_line_message

        unwritable = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR)
        cause = err
        while cause.__cause__ is not None and not isinstance(cause, ConfigurationError):
            cause = cause.__cause__  # jsonargparse re-raises a class's error as its own, "from" the original
        if isinstance(cause, ConfigurationError):
            message = one_line_message(cause)
        elif isinstance(err, MisconfigurationException):
            message = one_line_message(err)
        elif isinstance(err, pickle.UnpicklingError):  # fit/validate --ckpt_path refused a type (nothing ran)
            from .models.checkpoint import refused_type

            message = (
                f"the checkpoint holds {refused_type(err)}, which sit-lightning does not load (nothing from the "
                "file was run); if you trust the file, see docs/training.md, 'Which files are trusted'"
            )
        elif isinstance(err, OSError) and err.errno in unwritable:
            message = (
                f"cannot write {err.filename!r}: {err.strerror}; choose a writable folder with room to spare"
            )
        else:
            raise
        print(f"sit-lightning: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


def _run_cli(args: list[str] | None, expanded: list[str]) -> None:
    SiTLightningCLI(
        SiTModule,
        LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "sit-lightning", "description": _DESCRIPTION},
        parser_class=SiTArgumentParser,
        args=None if args is None else expanded,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
