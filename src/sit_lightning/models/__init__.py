"""SiT networks (no Lightning here): the architecture record and its presets, the network, cost
formulas and the released-checkpoint loader."""

from .checkpoint import load_released_sit, load_released_state_dict, sit_from_state_dict
from .config import PRESET_FIELDS, SIT_PRESETS, SiTConfig, SiTPreset
from .cost import forward_flops, num_parameters
from .sit import SiT, SiT_models, build_sit, sincos_pos_embed_2d, timestep_embedding

__all__ = [
    "PRESET_FIELDS",
    "SIT_PRESETS",
    "SiT",
    "SiTConfig",
    "SiTPreset",
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
