"""Sampling: ODE and SDE integrators over a model seen as a velocity/score field.

Time convention: t = 0 is noise, t = 1 is data; samplers go forward from t0 (noise) to t1 (data).
A sampler takes a field (:class:`ModelField` wraps ``model(x, t, **kwargs)`` of any prediction
type), the starting noise and its settings, and returns a :class:`SampleResult` with the NFE spent.
Nothing here imports Lightning.
"""

from .diffusion import (
    DIFFUSIONS,
    RELEASED_FORMS,
    WKL,
    Constant,
    Decreasing,
    DiffusionCoefficient,
    IncreasingDecreasing,
    LinearDecay,
    SigmaDiffusion,
    WKLEta,
    from_released,
    make_diffusion,
)
from .field import FunctionField, ModelField, VectorField
from .grids import GRIDS, GridName, default_interval, shift_time, time_grid
from .guidance import ClassifierFreeGuidance
from .likelihood import LikelihoodResult, likelihood
from .ode import FIXED_STEP_NFE, ODE_METHODS, OdeMethod, sample_ode
from .presets import SAMPLER_PRESETS, SamplerPreset, SamplerPresetName, sampler_preset
from .result import SampleResult
from .sde import LAST_STEPS, SDE_METHODS, LastStep, SdeMethod, sample_sde
from .settings import DIFFUSION_NAMES, SAMPLERS, DiffusionName, SamplerKind, SamplerSettings

# What a user needs: the samplers and their results, the fields they integrate, guidance, the
# diffusion coefficients of the SDE, and the names of every closed choice. Step functions, drift
# formulas and constants stay in their modules (``sit_lightning.sampling.sde`` ...).
__all__ = [
    # samplers and their results
    "sample_ode",
    "sample_sde",
    "SamplerSettings",
    "SAMPLER_PRESETS",
    "SamplerPreset",
    "SamplerPresetName",
    "sampler_preset",
    "likelihood",
    "SampleResult",
    "LikelihoodResult",
    # what they integrate
    "VectorField",
    "ModelField",
    "FunctionField",
    "ClassifierFreeGuidance",
    # SDE diffusion coefficients
    "DiffusionCoefficient",
    "WKL",
    "WKLEta",
    "SigmaDiffusion",
    "Constant",
    "LinearDecay",
    "Decreasing",
    "IncreasingDecreasing",
    "make_diffusion",
    "from_released",
    # closed choices, grids and costs
    "DIFFUSIONS",
    "DIFFUSION_NAMES",
    "DiffusionName",
    "RELEASED_FORMS",
    "SAMPLERS",
    "SamplerKind",
    "ODE_METHODS",
    "OdeMethod",
    "SDE_METHODS",
    "SdeMethod",
    "LAST_STEPS",
    "LastStep",
    "GRIDS",
    "GridName",
    "FIXED_STEP_NFE",
    "time_grid",
    "shift_time",
    "default_interval",
]
