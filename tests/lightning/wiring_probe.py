"""A callback the CLI tests add through ``--trainer.callbacks``: it writes down what the CLI wired."""

from __future__ import annotations

import json

from lightning.pytorch import Callback


class WiringProbe(Callback):
    """At ``setup``, writes the checkpoint writer's class and the callbacks' classes to ``path`` (JSON)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def setup(self, trainer, pl_module, stage: str) -> None:
        record = {
            "checkpoint_io": type(trainer.strategy.checkpoint_io).__name__,
            "callbacks": [type(c).__name__ for c in trainer.callbacks],
        }
        with open(self.path, "w") as handle:
            json.dump(record, handle)
