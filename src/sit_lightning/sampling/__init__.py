"""Sampling: ODE and SDE integrators over a model seen as a velocity/score field.

Time convention: t = 0 is noise, t = 1 is data; samplers go forward from t0 (noise) to t1 (data).
Nothing here imports Lightning.
"""

from .field import FunctionField, ModelField, VectorField, VelocityScore, time_vector
from .result import SampleResult

__all__ = [
    "FunctionField",
    "ModelField",
    "SampleResult",
    "VectorField",
    "VelocityScore",
    "time_vector",
]
