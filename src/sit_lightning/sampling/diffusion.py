"""Diffusion coefficients ``w_t`` of the sampling SDE (SiT paper Sec. 2.3, eqs. 13-14).

The SDE, forward in our time (t = 0 noise, t = 1 data), is

    dX = [v(X, t) + (w_t / 2) s(X, t)] dt + sqrt(w_t) dW,

with ``v`` the ODE velocity and ``s`` the score. Every ``w_t >= 0`` gives the same marginals as
the ODE. The released code writes the noise as ``sqrt(2 D) dW``, so **w = 2 D** (its ``D`` is the
"diffusion" it computes). Each coefficient here is ``norm`` times a base form, except
:class:`Decreasing`, whose released form puts the norm inside a square (kept, so that
:func:`from_released` maps exactly).

======================  ===========================================  ==========================
ours (name)             ``w_t`` (norm = n)                            released form, norm -> ours
======================  ===========================================  ==========================
constant                ``n``                                        constant, n -> 2n
w_kl                    ``n w_KL(t)`` (eq. 13, interpolant.w_kl)      SBDM, n -> n
sigma                   ``n sigma_t``                                sigma, n -> 2n
linear                  ``n (1 - t)``                                linear, n -> 2n
decreasing              ``(n cos(pi t) + 1)^2 / 2``                  decreasing, n -> n
increasing_decreasing   ``n sin^2(pi t)``                            increasing-decreasing, n -> 2n
w_kl_eta                ``n w_KL L_t / (L_t + 2 eta w_KL^2)`` (14)   (not released)
======================  ===========================================  ==========================

Strategy classes can be chosen by ``class_path`` in a YAML config; strings go through
:func:`make_diffusion` and the :data:`DIFFUSIONS` registry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ..interpolants import Interpolant

__all__ = [
    "DIFFUSIONS",
    "RELEASED_FORMS",
    "Constant",
    "Decreasing",
    "DiffusionCoefficient",
    "IncreasingDecreasing",
    "LinearDecay",
    "SigmaDiffusion",
    "WKL",
    "WKLEta",
    "from_released",
    "make_diffusion",
]


class DiffusionCoefficient(ABC):
    """Strategy for ``w_t``: ``norm * base(t)``.

    To add one, subclass, set ``name`` and implement :meth:`base` as an elementwise function of
    ``t`` (it may use the interpolant's schedules).

    Args:
        norm: finite scale ``>= 0``.
    """

    name: ClassVar[str] = "custom"

    def __init__(self, norm: float = 1.0) -> None:
        if not (math.isfinite(norm) and norm >= 0):
            raise ValueError(f"{type(self).__name__} norm must be a finite number >= 0; got {norm!r}")
        self.norm = float(norm)

    @abstractmethod
    def base(self, t: Tensor, interpolant: Interpolant) -> Tensor:
        """The form at ``norm = 1``."""

    def __call__(self, t: Tensor, interpolant: Interpolant) -> Tensor:
        """``w_t`` at ``t`` (a tensor of any shape), same shape as ``t``."""
        return self.norm * self.base(t, interpolant)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm={self.norm})"


class Constant(DiffusionCoefficient):
    """``w_t = norm``."""

    name = "constant"

    def base(self, t: Tensor, interpolant: Interpolant) -> Tensor:
        return torch.ones_like(t)


class WKL(DiffusionCoefficient):
    """``w_t = norm * w_KL(t)``, paper eq. 13 (released "SBDM" ``D`` times 2); infinite at alpha = 0."""

    name = "w_kl"

    def base(self, t: Tensor, interpolant: Interpolant) -> Tensor:
        return interpolant.w_kl(t)


class SigmaDiffusion(DiffusionCoefficient):
    """``w_t = norm * sigma_t``."""

    name = "sigma"

    def base(self, t: Tensor, interpolant: Interpolant) -> Tensor:
        return interpolant.sigma(t)


class LinearDecay(DiffusionCoefficient):
    """``w_t = norm * (1 - t)``."""

    name = "linear"

    def base(self, t: Tensor, interpolant: Interpolant) -> Tensor:
        return 1 - t


class Decreasing(DiffusionCoefficient):
    """``w_t = (norm cos(pi t) + 1)^2 / 2``: twice the released ``0.25 (norm cos(pi t) + 1)^2``.

    The norm stays inside the square, as released, so ``from_released("decreasing", n)`` is exact.
    """

    name = "decreasing"

    def base(self, t: Tensor, interpolant: Interpolant) -> Tensor:
        return 0.5 * (torch.cos(math.pi * t) + 1) ** 2

    def __call__(self, t: Tensor, interpolant: Interpolant) -> Tensor:
        return 0.5 * (self.norm * torch.cos(math.pi * t) + 1) ** 2


class IncreasingDecreasing(DiffusionCoefficient):
    """``w_t = norm * sin^2(pi t)``."""

    name = "increasing_decreasing"

    def base(self, t: Tensor, interpolant: Interpolant) -> Tensor:
        return torch.sin(math.pi * t) ** 2


class WKLEta(DiffusionCoefficient):
    """Paper eq. 14: ``w_t = norm * w_KL L_t / (L_t + 2 eta w_KL^2)``.

    ``L_t`` is the per-dimension mean squared error of the velocity model at time ``t`` (the
    velocity loss at ``t``), given as a table interpolated linearly and held constant beyond its
    ends. ``eta = 0`` gives ``w_KL``; for ``eta > 0`` the coefficient stays finite where ``w_KL``
    is infinite (its limit there is 0).

    Args:
        eta: ``>= 0``.
        loss_times: increasing times of the table (our convention, t = 0 noise).
        loss_values: ``L_t`` at those times, each ``> 0``.
        norm: scale ``>= 0``.
    """

    name = "w_kl_eta"

    def __init__(
        self, eta: float, loss_times: Sequence[float], loss_values: Sequence[float], norm: float = 1.0
    ) -> None:
        super().__init__(norm)
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"WKLEta eta must be a finite number >= 0; got {eta!r}")
        times = torch.as_tensor(loss_times, dtype=torch.float64).reshape(-1)
        values = torch.as_tensor(loss_values, dtype=torch.float64).reshape(-1)
        if times.numel() == 0 or times.shape != values.shape:
            raise ValueError(
                f"loss_times and loss_values must be non-empty and of equal length; got {times.numel()} "
                f"and {values.numel()}"
            )
        if times.numel() > 1 and not bool((times[1:] > times[:-1]).all()):
            raise ValueError("loss_times must be strictly increasing")
        if not bool((values > 0).all()) or not bool(torch.isfinite(values).all()):
            raise ValueError("loss_values must be finite and > 0")
        self.eta = float(eta)
        self.loss_times = times
        self.loss_values = values

    def loss_at(self, t: Tensor) -> Tensor:
        """``L_t``: the table interpolated linearly at ``t``, constant beyond its ends."""
        times = self.loss_times.to(t.device)
        values = self.loss_values.to(t.device)
        flat = t.detach().to(torch.float64).reshape(-1).clamp(times[0], times[-1])
        if times.numel() == 1:
            return values.expand_as(flat).reshape(t.shape).to(t.dtype)
        hi = torch.searchsorted(times, flat, right=True).clamp(1, times.numel() - 1)
        lo = hi - 1
        frac = (flat - times[lo]) / (times[hi] - times[lo])
        return (values[lo] + frac * (values[hi] - values[lo])).reshape(t.shape).to(t.dtype)

    def base(self, t: Tensor, interpolant: Interpolant) -> Tensor:
        w_kl = interpolant.w_kl(t)
        if self.eta == 0:
            return w_kl
        loss = self.loss_at(t)
        finite = torch.isfinite(w_kl)
        w_safe = torch.where(finite, w_kl, torch.zeros_like(w_kl))
        return torch.where(finite, w_safe * loss / (loss + 2 * self.eta * w_safe**2), torch.zeros_like(w_kl))

    def __repr__(self) -> str:
        return f"WKLEta(eta={self.eta}, table={self.loss_times.numel()} points, norm={self.norm})"


#: Name -> class for the coefficients that need no table (strings in configs and ``sample_sde``).
DIFFUSIONS: dict[str, type[DiffusionCoefficient]] = {
    cls.name: cls for cls in (Constant, WKL, SigmaDiffusion, LinearDecay, Decreasing, IncreasingDecreasing)
}

#: Released ``diffusion_form`` -> (our class, factor on the released norm). w = 2 D, except
#: SBDM (D = w_KL / 2 at norm 1, so n -> n) and decreasing (norm inside the square, n -> n).
RELEASED_FORMS: dict[str, tuple[type[DiffusionCoefficient], float]] = {
    "constant": (Constant, 2.0),
    "SBDM": (WKL, 1.0),
    "sigma": (SigmaDiffusion, 2.0),
    "linear": (LinearDecay, 2.0),
    "decreasing": (Decreasing, 1.0),
    "increasing-decreasing": (IncreasingDecreasing, 2.0),
}


def make_diffusion(diffusion: DiffusionCoefficient | str, norm: float = 1.0) -> DiffusionCoefficient:
    """A coefficient from an instance (``norm`` must then stay 1) or a name in :data:`DIFFUSIONS`."""
    if isinstance(diffusion, DiffusionCoefficient):
        if norm != 1.0:
            raise ValueError(
                f"norm={norm} given with a DiffusionCoefficient instance; set the norm on the instance "
                f"({diffusion!r})"
            )
        return diffusion
    if isinstance(diffusion, str) and diffusion in DIFFUSIONS:
        return DIFFUSIONS[diffusion](norm=norm)
    if diffusion == WKLEta.name:
        raise ValueError("w_kl_eta needs eta and a loss table: pass WKLEta(eta, loss_times, loss_values)")
    raise ValueError(
        f"diffusion must be a DiffusionCoefficient or one of {tuple(DIFFUSIONS)}; got {diffusion!r}"
    )


def from_released(form: str, norm: float = 1.0) -> DiffusionCoefficient:
    """Our coefficient for the released ``diffusion_form`` and ``diffusion_norm`` (exact: ``w = 2 D``).

    Accepts the released CLI spellings (``constant, SBDM, sigma, linear, decreasing,
    increasing-decreasing``).
    """
    if form not in RELEASED_FORMS:
        raise ValueError(f"released diffusion_form must be one of {tuple(RELEASED_FORMS)}; got {form!r}")
    cls, factor = RELEASED_FORMS[form]
    return cls(norm=factor * norm)
