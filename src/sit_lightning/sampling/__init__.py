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
from .field import FunctionField, ModelField, VectorField, VelocityScore, time_vector
from .grids import GRIDS, GridName, default_interval, shift_time, time_grid
from .guidance import ClassifierFreeGuidance, GuidanceCalls
from .likelihood import LikelihoodResult, likelihood, standard_normal_logp
from .ode import ADAPTIVE_METHODS, FIXED_STEP_NFE, ODE_METHODS, OdeMethod, ode_step, sample_ode
from .result import SampleResult
from .sde import (
    DEFAULT_LAST_STEP_SIZE,
    LAST_STEPS,
    SDE_METHODS,
    SIGMA_AT_DATA,
    LastStep,
    SdeMethod,
    last_step_update,
    sample_sde,
    sde_drift,
)

__all__ = [
    "ClassifierFreeGuidance",
    "GuidanceCalls",
    "LikelihoodResult",
    "likelihood",
    "standard_normal_logp",
    "ADAPTIVE_METHODS",
    "DEFAULT_LAST_STEP_SIZE",
    "DIFFUSIONS",
    "FIXED_STEP_NFE",
    "GRIDS",
    "LAST_STEPS",
    "ODE_METHODS",
    "RELEASED_FORMS",
    "SDE_METHODS",
    "SIGMA_AT_DATA",
    "WKL",
    "Constant",
    "Decreasing",
    "DiffusionCoefficient",
    "FunctionField",
    "GridName",
    "IncreasingDecreasing",
    "LastStep",
    "LinearDecay",
    "ModelField",
    "OdeMethod",
    "SampleResult",
    "SdeMethod",
    "SigmaDiffusion",
    "VectorField",
    "VelocityScore",
    "WKLEta",
    "default_interval",
    "from_released",
    "last_step_update",
    "make_diffusion",
    "ode_step",
    "sample_ode",
    "sample_sde",
    "sde_drift",
    "shift_time",
    "time_grid",
    "time_vector",
]
