"""Time grids for fixed-step samplers, and the default sampling interval of a path.

A grid of ``steps`` intervals has ``steps + 1`` points from ``t0`` (noise end) to ``t1`` (data end).

- ``uniform``: ``linspace(t0, t1, steps + 1)``.
- ``shifted``: ``t = t0 + (t1 - t0) f_s(u)`` on uniform ``u`` in [0, 1] with
  ``f_s(u) = s u / (1 + (s - 1) u)``. ``s < 1`` puts more steps near the noise end (t = 0);
  LightningDiT's timestep shift 0.3 is ``s = 0.3`` in this convention. ``s = 1`` is uniform.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from ..interpolants import Interpolant, Prediction, TimeInterval

GridName = Literal["uniform", "shifted"]
GRIDS: tuple[str, ...] = get_args(GridName)

__all__ = ["GRIDS", "GridName", "default_interval", "shift_time", "time_grid"]


def shift_time(u: Tensor, shift: float) -> Tensor:
    """``f_s(u) = s u / (1 + (s - 1) u)``, a monotone map of [0, 1] onto itself fixing 0 and 1."""
    _check_shift(shift)
    return shift * u / (1 + (shift - 1) * u)


def time_grid(
    t0: float,
    t1: float,
    steps: int,
    grid: GridName = "uniform",
    shift: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(steps + 1,)`` times from ``t0`` to ``t1`` (``t1 < t0`` gives a reversed grid).

    Args:
        t0, t1: first and last time.
        steps: number of intervals (>= 1).
        grid: ``uniform | shifted``.
        shift: ``s > 0`` of the shifted grid; must stay 1 for ``uniform`` (a shift is never silently
            ignored).
        dtype: dtype of the grid (float64 by default; the field casts ``t`` to the state's dtype).
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}; got {grid!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
        raise ValueError(f"need finite t0 != t1; got t0={t0}, t1={t1}")
    _check_shift(shift)
    if grid == "uniform" and shift != 1.0:
        raise ValueError(f"shift={shift} needs grid='shifted' (grid='uniform' has no shift)")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if grid == "shifted":
        u = shift_time(u, shift)
    times = t0 + (t1 - t0) * u
    times[0], times[-1] = t0, t1  # exact ends, whatever the rounding of the map
    return times.to(dtype)


def default_interval(interpolant: Interpolant, prediction: Prediction = "velocity") -> TimeInterval:
    """The path's default sampling interval ``(t0, t1)`` for a prediction type.

    ``interpolant.interval(interpolant.default_eps(prediction).sample_eps)``: the path declares both
    (:class:`~sit_lightning.interpolants.Interpolant`). For the built-in paths these are the released
    code's: Linear/GVP velocity (0, 1); Linear/GVP score/noise/data (1e-3, 1 - 1e-3); VP (0, 1 - 1e-3),
    the same as :meth:`TrainingObjective.sample_interval` with its default ``sample_eps``.
    """
    return interpolant.interval(interpolant.default_eps(prediction).sample_eps)


def _check_shift(shift: float) -> None:
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0; got {shift!r}")
