"""Reverse-diffusion SDE sampler (SiT paper Sec. 2.3, Alg. 2), forward in our time (t = 0 noise).

    dX = f(X, t) dt + sqrt(w_t) dW,     f = v(X, t) + (w_t / 2) s(X, t),

with ``v`` the ODE velocity, ``s`` the score (both from ONE network call, via
``field.velocity_and_score``) and ``w_t`` a :mod:`~sit_lightning.sampling.diffusion` coefficient
(the released code's ``D`` is ``w / 2``).

Counting (``steps``): with a last step of size ``h``, ``steps - 1`` stochastic steps on the grid
from ``t0`` to ``t1 - h``, then the deterministic last step to ``t1``; without one, ``steps``
stochastic steps from ``t0`` to ``t1``. Euler-Maruyama costs 1 NFE per stochastic step, stochastic
Heun 2, a last step 1: Euler-Maruyama with 250 steps = 250 NFE, with or without a last step.
The released ``num_steps`` counts grid points before its last step: released ``num_steps=N`` with
a last step = our ``steps=N``; released without a last step = our ``steps=N - 1``.

Last steps (released ``__get_last_step``), at ``t_s = t1 - h``:

- ``mean``: ``x + f(x, t_s) h`` (drift with score term, no noise; paper Alg. 2);
- ``tweedie``: ``x / alpha + sigma^2 / alpha * s(x, t_s)`` (the posterior mean of the data);
- ``euler``: ``x + v(x, t_s) h`` (one ODE step);
- ``none``: no last step (then ``h`` is ignored).

Guards (where the released code returns NaN):

- ``w_t`` infinite at the start (``w_kl`` with Linear/GVP at t = 0, where alpha = 0): that step's
  diffusion is evaluated at the step's end ``t + dt`` instead (the first step then behaves like an
  Euler-Maruyama step of an Ornstein-Uhlenbeck process with rate ``~1/dt``; later steps use ``w_t``).
- Where ``sigma_t = 0`` (below :data:`SIGMA_AT_DATA`; t = 1 on Linear/GVP, reached by the Heun corrector without a last step)
  the score of a converted model is undefined; the drift is the velocity there (the score term's
  weight ``w_t / 2`` must vanish there for the SDE to end in the data anyway).
- ``w_t = 0``: the drift is the velocity (no score needed, so no ``0 x inf``).

Noise: the k-th stochastic step uses standard normals from ``normals`` (a tensor indexed by step,
``normals[k]`` shaped like the state, or a callable ``(k, shape) -> Tensor``) if given, else drawn
from ``generator`` on the generator's device (CPU by default) and moved to the state's device, so
CPU and GPU runs see the same draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from .diffusion import DiffusionCoefficient, make_diffusion
from .field import VectorField
from .grids import GridName, default_interval, time_grid
from .result import SampleResult

SdeMethod = Literal["euler", "heun"]
SDE_METHODS: tuple[str, ...] = get_args(SdeMethod)
LastStep = Literal["none", "mean", "tweedie", "euler"]
LAST_STEPS: tuple[str, ...] = get_args(LastStep)
#: The released default last-step size (paper: "clipping the interval by h = 0.04").
DEFAULT_LAST_STEP_SIZE = 0.04

#: Below this sigma_t the state is data (GVP's cos(pi/2) is 6e-17, not 0): the score of a converted model
#: is 0/0 there, so the drift is the velocity alone.
SIGMA_AT_DATA = 1e-8

NormalSource = Tensor | Callable[[int, tuple[int, ...]], Tensor]

__all__ = [
    "DEFAULT_LAST_STEP_SIZE",
    "LAST_STEPS",
    "LastStep",
    "SDE_METHODS",
    "SIGMA_AT_DATA",
    "SdeMethod",
    "last_step_update",
    "sample_sde",
    "sde_drift",
]


def sde_drift(field: VectorField, x: Tensor, t: float, w: float, sigma: float | None = None) -> Tensor:
    """``f = v + (w / 2) s`` at ``(x, t)``, one field call; just ``v`` where ``w = 0`` or ``sigma_t = 0``.

    ``sigma`` is ``sigma_t`` if the caller already has it (computed from the interpolant otherwise).
    """
    if sigma is None:
        sigma = float(field.interpolant.sigma(torch.tensor(t, dtype=torch.float64)))
    if w == 0.0 or sigma < SIGMA_AT_DATA:
        return field.velocity(x, t)
    v, s = field.velocity_and_score(x, t)
    return v + (0.5 * w) * s


def last_step_update(
    field: VectorField, x: Tensor, t: float, h: float, last_step: LastStep, w: float
) -> Tensor:
    """The deterministic last step from ``(x, t)`` to ``t + h`` (1 NFE), as released.

    ``mean``: ``x + f(x, t) h`` with ``f = v + (w/2) s``; ``euler``: ``x + v(x, t) h``;
    ``tweedie``: ``(x + sigma_t^2 s(x, t)) / alpha_t`` (= E[x_1 | x_t]; independent of ``h``);
    ``none``: ``x`` (no NFE). ``w`` is the diffusion coefficient at ``t``.
    """
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step must be one of {LAST_STEPS}; got {last_step!r}")
    if last_step == "none":
        return x
    t_tensor = torch.tensor(t, dtype=torch.float64)
    if last_step == "mean":
        return x + sde_drift(field, x, t, w, float(field.interpolant.sigma(t_tensor))) * h
    if last_step == "euler":
        return x + field.velocity(x, t) * h
    alpha, sigma = float(field.interpolant.alpha(t_tensor)), float(field.interpolant.sigma(t_tensor))
    _, score = field.velocity_and_score(x, t)
    return x / alpha + (sigma**2 / alpha) * score


class _Normals:
    """Standard normals for stochastic step ``k``, from recorded draws, a callable or a generator."""

    def __init__(self, normals: NormalSource | None, generator: torch.Generator | None) -> None:
        if normals is not None and generator is not None:
            raise ValueError("pass either normals or generator, not both")
        self.normals = normals
        self.generator = generator

    def __call__(self, k: int, like: Tensor) -> Tensor:
        shape = tuple(like.shape)
        if self.normals is None:
            device = self.generator.device if self.generator is not None else torch.device("cpu")
            z = torch.randn(shape, generator=self.generator, dtype=like.dtype, device=device)
        elif callable(self.normals):
            z = self.normals(k, shape)
        else:
            if k >= self.normals.shape[0]:
                raise ValueError(f"normals holds {self.normals.shape[0]} steps; step {k} needs one more")
            z = self.normals[k]
        if tuple(z.shape) != shape:
            raise ValueError(f"normals for step {k} must have shape {shape}; got {tuple(z.shape)}")
        return z.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def sample_sde(
    field: VectorField,
    noise: Tensor,
    *,
    method: SdeMethod = "euler",
    steps: int = 250,
    diffusion: DiffusionCoefficient | str = "w_kl",
    norm: float = 1.0,
    last_step: LastStep = "mean",
    last_step_size: float = DEFAULT_LAST_STEP_SIZE,
    t0: float | None = None,
    t1: float | None = None,
    grid: GridName = "uniform",
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    normals: NormalSource | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Sample the SDE ``dX = [v + (w/2) s] dt + sqrt(w) dW`` from noise at ``t0`` to data at ``t1``.

    Args:
        field: the model as a :class:`VectorField` (velocity and score from one call).
        noise: ``(N, ...)`` the state at ``t0``.
        method: ``euler`` (Euler-Maruyama, 1 NFE/step) or ``heun`` (released stochastic Heun:
            ``xhat = x + sqrt(w(t)) dW; K1 = f(xhat, t); K2 = f(xhat + dt K1, t + dt);
            x = xhat + dt/2 (K1 + K2)``, 2 NFE/step).
        steps: total steps including the last step (see the module docstring for the NFE).
        diffusion: a :class:`DiffusionCoefficient` or a name in :data:`DIFFUSIONS`
            (``constant, w_kl, sigma, linear, decreasing, increasing_decreasing``).
        norm: the norm for a named coefficient (an instance carries its own).
        last_step: ``none | mean | tweedie | euler``.
        last_step_size: ``h`` of the last step (ignored for ``none``).
        t0, t1: start (noise) and end (data). Defaults: ``t0`` from the path and the field's
            prediction (:func:`default_interval`, which the path declares); ``t1`` = 1 with a last step
            (the released code's end, never evaluated), else the path's default (VP: 1 - 1e-3).
        grid, shift: time grid of the stochastic part (see :func:`time_grid`).
        generator: source of the standard normals (drawn on its device, then moved).
        normals: recorded standard normals instead: a tensor with ``normals[k]`` shaped like
            ``noise`` for stochastic step ``k``, or a callable ``(k, shape) -> Tensor``.
        return_trajectory: also return the state at every time.

    Returns:
        :class:`SampleResult` (``times`` = the stochastic grid, plus ``t1`` if there is a last step).
    """
    if method not in SDE_METHODS:
        raise ValueError(f"method must be one of {SDE_METHODS}; got {method!r}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step must be one of {LAST_STEPS}; got {last_step!r}")
    coefficient = make_diffusion(diffusion, norm)
    interpolant = field.interpolant
    default_t0, default_t1 = default_interval(interpolant, getattr(field, "prediction", "velocity"))
    start = default_t0 if t0 is None else float(t0)
    has_last = last_step != "none"
    end = (1.0 if has_last else default_t1) if t1 is None else float(t1)
    h = float(last_step_size) if has_last else 0.0
    if has_last and not (math.isfinite(h) and 0 < h < end - start):
        raise ValueError(f"last_step_size must be in (0, t1 - t0) = (0, {end - start}); got {last_step_size}")
    if not (0.0 <= start < end <= 1.0):
        raise ValueError(f"need 0 <= t0 < t1 <= 1 (t0 noise, t1 data); got t0={start}, t1={end}")
    stochastic_steps = steps - 1 if has_last else steps
    if not isinstance(steps, int) or stochastic_steps < 1:
        raise ValueError(
            f"steps must be an integer >= {2 if has_last else 1} (last_step={last_step!r}); got {steps!r}"
        )
    times = time_grid(start, end - h, stochastic_steps, grid=grid, shift=shift)
    draw = _Normals(normals, generator)

    # w_t and sigma_t on the whole grid at once (one vectorised call instead of one per step)
    grid_values = times.tolist()
    w_grid = coefficient(times, interpolant).tolist()
    sigma_grid = interpolant.sigma(times).tolist()

    nfe_before = field.nfe
    x = noise
    states = [x] if return_trajectory else None
    for k in range(stochastic_steps):
        t, t_next = grid_values[k], grid_values[k + 1]
        dt = t_next - t
        w = w_grid[k]
        if not math.isfinite(w):  # w_KL at alpha = 0: evaluate this step's diffusion at its end
            w = w_grid[k + 1]
        dw = draw(k, x) * math.sqrt(dt)
        if method == "euler":
            x = x + sde_drift(field, x, t, w, sigma_grid[k]) * dt + math.sqrt(w) * dw
        else:
            x_hat = x + math.sqrt(w) * dw
            k1 = sde_drift(field, x_hat, t, w, sigma_grid[k])
            k2 = sde_drift(field, x_hat + dt * k1, t_next, w_grid[k + 1], sigma_grid[k + 1])
            x = x_hat + 0.5 * dt * (k1 + k2)
        if states is not None:
            states.append(x)

    if has_last:
        x = last_step_update(field, x, grid_values[-1], h, last_step, w_grid[-1])
        times = torch.cat([times, times.new_tensor([end])])
        if states is not None:
            states.append(x)
    trajectory = torch.stack(states) if states is not None else None
    return SampleResult(samples=x, nfe=field.nfe - nfe_before, times=times, trajectory=trajectory)
