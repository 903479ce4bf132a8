"""SiT networks (no Lightning here): the model, its presets and the released-checkpoint loader."""

from .checkpoint import load_released_sit, load_released_state_dict, sit_from_state_dict
from .sit import (
    SIT_PRESETS,
    SiT,
    SiT_models,
    SiTConfig,
    build_sit,
    forward_flops,
    num_parameters,
    sincos_pos_embed_2d,
    timestep_embedding,
)

__all__ = [
    "SIT_PRESETS",
    "SiT",
    "SiTConfig",
    "SiT_models",
    "build_sit",
    "forward_flops",
    "load_released_sit",
    "load_released_state_dict",
    "num_parameters",
    "sincos_pos_embed_2d",
    "sit_from_state_dict",
    "timestep_embedding",
]
