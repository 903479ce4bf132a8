"""Probability-flow ODE sampler: ``dx/dt = v(x, t)`` from noise (t0) to data (t1), or back.

Fixed-step methods are written here so that each step costs exactly its stated NFE and a sample
never depends on its batch-mates (the reproducible choice). ``steps`` is the number of intervals
of the time grid:

==========  =====================================================  ===========
method      scheme                                                 NFE
==========  =====================================================  ===========
euler       ``x + h v(x, t)``                                      ``steps``
midpoint    ``x + h v(x + h/2 k1, t + h/2)``                       ``2 steps``
heun        Heun's 2nd order: Euler predictor, trapezoid corrector  ``2 steps``
rk4         classic Runge-Kutta 4                                  ``4 steps``
rk4_38      Kutta's 3/8 rule (= torchdiffeq's ``rk4``)             ``4 steps``
==========  =====================================================  ===========

The released code passes ``num_steps`` grid *points* to torchdiffeq, so its fixed-step runs have
``num_steps - 1`` intervals: released ``heun2`` with ``num_steps=126`` = our ``heun`` with
``steps=125`` = 250 NFE (the paper's ODE setting); released ``rk4`` = our ``rk4_38``.

Adaptive methods (``dopri5, bosh3, adaptive_heun, dopri8, fehlberg2``) go through torchdiffeq with
``atol``/``rtol``; the field counts their NFE. Their step-size control uses one error norm for the
whole batch, so a sample depends on which samples share its batch; ``steps``, ``grid`` and
``shift`` do not apply to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from .field import VectorField
from .grids import GridName, default_interval, time_grid
from .result import SampleResult

OdeMethod = Literal[
    "euler", "midpoint", "heun", "rk4", "rk4_38", "dopri5", "bosh3", "adaptive_heun", "dopri8", "fehlberg2"
]
ODE_METHODS: tuple[str, ...] = get_args(OdeMethod)
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "bosh3", "adaptive_heun", "dopri8", "fehlberg2")

__all__ = ["ADAPTIVE_METHODS", "FIXED_STEP_NFE", "ODE_METHODS", "OdeMethod", "ode_step", "sample_ode"]

Velocity = Callable[[Tensor, float], Tensor]


def _euler(v: Velocity, x: Tensor, t: float, h: float) -> Tensor:
    return x + h * v(x, t)


def _midpoint(v: Velocity, x: Tensor, t: float, h: float) -> Tensor:
    k1 = v(x, t)
    return x + h * v(x + 0.5 * h * k1, t + 0.5 * h)


def _heun(v: Velocity, x: Tensor, t: float, h: float) -> Tensor:
    k1 = v(x, t)
    k2 = v(x + h * k1, t + h)
    return x + 0.5 * h * (k1 + k2)


def _rk4(v: Velocity, x: Tensor, t: float, h: float) -> Tensor:
    k1 = v(x, t)
    k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = v(x + h * k3, t + h)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _rk4_38(v: Velocity, x: Tensor, t: float, h: float) -> Tensor:
    # Same stage order and arithmetic as torchdiffeq's rk4_alt_step_func (the released "rk4").
    k1 = v(x, t)
    k2 = v(x + h * k1 / 3, t + h / 3)
    k3 = v(x + h * (k2 - k1 / 3), t + 2 * h / 3)
    k4 = v(x + h * (k1 - k2 + k3), t + h)
    return x + (k1 + 3 * (k2 + k3) + k4) * h * 0.125


_STEPS: dict[str, Callable[[Velocity, Tensor, float, float], Tensor]] = {
    "euler": _euler,
    "midpoint": _midpoint,
    "heun": _heun,
    "rk4": _rk4,
    "rk4_38": _rk4_38,
}
#: Network evaluations per step of each fixed-step method.
FIXED_STEP_NFE: dict[str, int] = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "rk4_38": 4}


def ode_step(field: VectorField, x: Tensor, t: float, t_next: float, method: str = "heun") -> Tensor:
    """One fixed step of ``method`` from ``(x, t)`` to time ``t_next`` (``FIXED_STEP_NFE[method]`` NFE)."""
    if method not in _STEPS:
        raise ValueError(f"fixed-step method must be one of {tuple(_STEPS)}; got {method!r}")
    return _STEPS[method](field.velocity, x, t, t_next - t)


@torch.no_grad()
def sample_ode(
    field: VectorField,
    noise: Tensor,
    *,
    method: OdeMethod = "heun",
    steps: int = 125,
    t0: float | None = None,
    t1: float | None = None,
    grid: GridName = "uniform",
    shift: float = 1.0,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    reverse: bool = False,
    return_trajectory: bool = False,
) -> SampleResult:
    """Integrate the probability-flow ODE ``dx/dt = v(x, t)`` (SiT paper eq. 4 / Alg. 1).

    Args:
        field: the velocity field (:class:`~sit_lightning.sampling.field.ModelField` or any
            :class:`VectorField`).
        noise: ``(N, ...)`` starting state: noise at ``t0`` (or data at ``t1`` when ``reverse``).
        method: one of :data:`ODE_METHODS` (see the module table).
        steps: number of grid intervals for fixed-step methods (NFE = steps x stages).
        t0, t1: noise-end and data-end times. ``None`` takes the path's own default for the field's
            ``prediction`` (velocity if it has none), which the path declares
            (:func:`~sit_lightning.sampling.grids.default_interval`): Linear/GVP velocity 0 and 1,
            score/noise/data 1e-3 and 1 - 1e-3; VP 0 and 1 - 1e-3. Pass ``objective.sample_interval()``
            to follow a training objective.
        grid: ``uniform | shifted`` (fixed-step methods only).
        shift: the shifted grid's ``s`` (``s < 1``: more steps near noise).
        atol, rtol: tolerances of adaptive methods.
        reverse: integrate data -> noise (``t1 -> t0``), e.g. to encode data into noise. The grid is
            the forward grid reversed, so a reverse run retraces a forward one.
        return_trajectory: also return the state at every grid time.

    Returns:
        :class:`SampleResult` with ``samples`` ``(N, ...)`` (same dtype as ``noise``), the NFE spent,
        the times and, on request, the trajectory.
    """
    if method not in ODE_METHODS:
        raise ValueError(f"method must be one of {ODE_METHODS}; got {method!r}")
    start, end = _interval(field, t0, t1)
    if reverse:
        start, end = end, start
    nfe_before = field.nfe
    if method in ADAPTIVE_METHODS:
        return _sample_adaptive(field, noise, method, start, end, atol, rtol, return_trajectory, nfe_before)

    times = time_grid(t0=min(start, end), t1=max(start, end), steps=steps, grid=grid, shift=shift)
    if reverse:
        times = times.flip(0)
    step = _STEPS[method]
    x = noise
    states = [x] if return_trajectory else None
    grid_values = times.tolist()
    for t, t_next in zip(grid_values[:-1], grid_values[1:], strict=True):
        x = step(field.velocity, x, t, t_next - t)
        if states is not None:
            states.append(x)
    trajectory = torch.stack(states) if states is not None else None
    return SampleResult(samples=x, nfe=field.nfe - nfe_before, times=times, trajectory=trajectory)


def _interval(field: VectorField, t0: float | None, t1: float | None) -> tuple[float, float]:
    default_t0, default_t1 = default_interval(field.interpolant, getattr(field, "prediction", "velocity"))
    start = default_t0 if t0 is None else float(t0)
    end = default_t1 if t1 is None else float(t1)
    if not (0.0 <= start < end <= 1.0):
        raise ValueError(f"need 0 <= t0 < t1 <= 1 (t0 noise, t1 data); got t0={start}, t1={end}")
    return start, end


def integrate_adaptive(
    fn: Callable[[Tensor, Tensor], Tensor],
    state: Tensor,
    start: float,
    end: float,
    *,
    method: str,
    atol: float,
    rtol: float,
) -> tuple[Tensor, Tensor]:
    """torchdiffeq's adaptive ``method`` for ``d state / dt = fn(t, state)`` from ``start`` to ``end``.

    Returns ``(times, path)``: the two end times and the states there (``path[-1]`` is the result).
    ``step_t`` makes the solver land on the end time instead of stepping past it and interpolating
    back, so ``fn`` is never evaluated outside the interval (VP's sigma is NaN beyond t = 1).
    """
    from torchdiffeq import odeint  # lazy: only adaptive methods need it

    if not (atol > 0 and rtol > 0):
        raise ValueError(f"atol and rtol must be > 0; got atol={atol}, rtol={rtol}")
    times = torch.tensor([start, end], dtype=state.dtype, device=state.device)
    path = odeint(fn, state, times, method=method, atol=atol, rtol=rtol, options={"step_t": times[1:]})
    return times, path


def _sample_adaptive(
    field: VectorField,
    noise: Tensor,
    method: str,
    start: float,
    end: float,
    atol: float,
    rtol: float,
    return_trajectory: bool,
    nfe_before: int,
) -> SampleResult:
    times, path = integrate_adaptive(
        lambda t, x: field.velocity(x, t), noise, start, end, method=method, atol=atol, rtol=rtol
    )
    return SampleResult(
        samples=path[-1],
        nfe=field.nfe - nfe_before,
        times=times.to(torch.float64),
        trajectory=path if return_trajectory else None,
    )
