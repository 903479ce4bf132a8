"""sit-lightning: SiT (Scalable Interpolant Transformers) as PyTorch Lightning modules.

The math layers (``models``, ``interpolants``, ``objective``, ``sampling``) import without
Lightning. The Lightning pieces are re-exported lazily, so ``from sit_lightning import SiTModule``
works while ``import sit_lightning.models`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it (imported on first access). This is the surface an
# integrator needs; everything else is reached through its module (sit_lightning.sampling.sde, ...).
_LAZY = {
    # the network
    "SiT": "sit_lightning.models",
    "SiTConfig": "sit_lightning.models",
    "SiT_models": "sit_lightning.models",
    "build_sit": "sit_lightning.models",
    "load_released_sit": "sit_lightning.models",
    # paths and the training objective
    "Interpolant": "sit_lightning.interpolants",
    "Linear": "sit_lightning.interpolants",
    "GVP": "sit_lightning.interpolants",
    "VP": "sit_lightning.interpolants",
    "TrainingObjective": "sit_lightning.objective",
    "UniformTimeSampler": "sit_lightning.objective",
    "LogitNormalTimeSampler": "sit_lightning.objective",
    # samplers
    "ModelField": "sit_lightning.sampling",
    "ClassifierFreeGuidance": "sit_lightning.sampling",
    "sample_ode": "sit_lightning.sampling",
    "sample_sde": "sit_lightning.sampling",
    "likelihood": "sit_lightning.sampling",
    "SamplerSettings": "sit_lightning.sampling",
    # the Lightning pieces
    "SiTModule": "sit_lightning.module",
    "LatentDataModule": "sit_lightning.data",
    "DigitsDataModule": "sit_lightning.data",
    "EMACallback": "sit_lightning.callbacks",
    "SampleGridCallback": "sit_lightning.callbacks",
    "FIDCallback": "sit_lightning.callbacks",
    "ThroughputCallback": "sit_lightning.callbacks",
    "TrainingPlotsCallback": "sit_lightning.callbacks",
    "PreemptionCallback": "sit_lightning.callbacks",
    "AtomicModelCheckpoint": "sit_lightning.checkpoint_io",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sit_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
