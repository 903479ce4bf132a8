"""The ``sit-lightning`` command: LightningCLI over :class:`SiTModule` plus ``precompute-latents``.

    sit-lightning fit --config configs/sit_xl_linear.yaml            # train
    sit-lightning fit --config configs/sit_b_gvp.yaml --print_config  # the full resolved config
    sit-lightning validate --config ... --ckpt_path last.ckpt
    sit-lightning precompute-latents IMAGE_ROOT OUTPUT_DIR --image_size 256

``model:`` holds the arguments of :class:`~sit_lightning.module.SiTModule`; ``data:`` any
LightningDataModule by ``class_path`` (``sit_lightning.data.LatentDataModule`` or
``sit_lightning.data.DigitsDataModule``); ``trainer:`` the Lightning Trainer (precision, strategy,
devices, callbacks such as :class:`~sit_lightning.callbacks.EMACallback`). Every choice is typed,
so a typo fails at parse time with the list of valid values.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .module import ConfigurationError, SiTModule

__all__ = ["PRECOMPUTE_SUBCOMMAND", "SiTLightningCLI", "main"]

#: Subcommand that encodes images to latent shards (not a Trainer method, so dispatched before LightningCLI).
PRECOMPUTE_SUBCOMMAND = "precompute-latents"
_DESCRIPTION = "SiT (Scalable Interpolant Transformers): train, validate and sample with PyTorch Lightning."
_PRECOMPUTE_HELP = (
    "Encode an ImageFolder tree into VAE latent shards (resumable; see --help of the subcommand)."
)


class SiTLightningCLI(LightningCLI):
    """LightningCLI whose ``--help`` also lists ``precompute-latents`` (run by :func:`main`)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The module's default objective (None -> TrainingObjective()) spelled out, so that --print_config
        # shows the path, prediction, weighting and time sampler in full.
        parser.set_defaults({"model.objective": {"class_path": "sit_lightning.objective.TrainingObjective"}})

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        subcommands = getattr(parser, "_subcommands_action", None)
        if subcommands is None:  # jsonargparse internals changed: the dispatch in main() still works
            return
        from jsonargparse import ArgumentParser

        from .data.precompute import precompute_latents

        precompute_parser = ArgumentParser(description=_PRECOMPUTE_HELP)
        precompute_parser.add_function_arguments(precompute_latents, as_positional=True)
        subcommands.add_subcommand(PRECOMPUTE_SUBCOMMAND, precompute_parser, help=_PRECOMPUTE_HELP)


def main(args: list[str] | None = None) -> int:
    """Run the ``sit-lightning`` command line.

    Args:
        args: the arguments after the program name (``None``: ``sys.argv[1:]``), e.g.
            ``["fit", "--config", "configs/digits.yaml", "--trainer.max_steps", "3"]``.

    Returns:
        the exit status (0). Parse errors exit through ``SystemExit`` with jsonargparse's message; a data
        set that does not fit the model, or a schedule shorter than ``trainer.max_steps``, exits with
        status 2 and a one-line message.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == PRECOMPUTE_SUBCOMMAND:
        from .data.precompute import precompute_latents_main

        return precompute_latents_main(argv[1:])
    try:
        SiTLightningCLI(
            SiTModule,
            LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "sit-lightning", "description": _DESCRIPTION},
            args=args,  # None: LightningCLI reads sys.argv itself (and does not warn about both)
        )
    except ConfigurationError as err:
        print(f"sit-lightning: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
