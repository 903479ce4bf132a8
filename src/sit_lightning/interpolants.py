"""Interpolants: the continuous-time paths between noise and data that SiT trains on.

Time convention (the one used everywhere in this package, and by the released SiT code):

    t = 0 is noise, t = 1 is data,
    x_t = alpha_t * x_1 + sigma_t * x_0,   x_0 ~ N(0, I) (noise),  x_1 ~ data,

with ``alpha_0 = 0, sigma_0 = 1`` and ``alpha_1 = 1, sigma_1 = 0`` for the Linear and GVP paths (the VP
path only approaches these ends). Samplers integrate forward in time, from t = 0 (noise) to t = 1 (data).
The SiT paper (arXiv 2401.08740) writes the same paths with time reversed (its t = 1 - ours).

An interpolant is two schedules, ``alpha(t)`` and ``sigma(t)``. Their time derivatives default to
autograd, so a new path needs only the two schedules (see :class:`Interpolant`); the built-in paths
give closed forms.

A path also owns its endpoint policy: which times the objective and the samplers may use
(:meth:`Interpolant.interval`, clipped by ``eps``) and the released defaults of that ``eps``
(:meth:`Interpolant.default_eps`). Nothing outside this module asks which path it has.

Every quantity a model can predict is a linear function of the pair ``(x_t, v)``, because
``(x_t, v) = M(t) (x_1, x_0)`` with ``M = [[alpha, sigma], [d_alpha, d_sigma]]``:

- velocity ``v = E[d_alpha x_1 + d_sigma x_0 | x_t]``,
- noise ``eps = E[x_0 | x_t]``,
- score ``s = grad log p_t(x_t) = -eps / sigma_t``,
- data ``x_1_hat = E[x_1 | x_t]``.

:meth:`Interpolant.convert` maps any of them to any other through ``(x_1_hat, eps)``; the
determinant ``alpha * d_sigma - d_alpha * sigma`` is nonzero on (0, 1) for every monotone path.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Literal, NamedTuple, get_args

import torch
from torch import Tensor

Prediction = Literal["velocity", "score", "noise", "data"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)

VP_BETA_MIN = 0.1
VP_BETA_MAX = 20.0
#: Upper bound (excluded) of a clip ``eps``: the interval ``[eps, 1 - eps]`` must not be empty.
MAX_EPS = 0.5

__all__ = [
    "GVP",
    "INTERPOLANTS",
    "VP",
    "DefaultEps",
    "Interpolant",
    "Linear",
    "PathCoefficients",
    "PREDICTIONS",
    "Prediction",
    "TimeInterval",
    "broadcast_time",
    "make_interpolant",
]


class PathCoefficients(NamedTuple):
    """Schedules and their time derivatives at ``t``, each shaped like the ``t`` that was given."""

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


class DefaultEps(NamedTuple):
    """Default clip of the time interval: ``train_eps`` for training, ``sample_eps`` for sampling."""

    train_eps: float
    sample_eps: float


class TimeInterval(NamedTuple):
    """A time interval ``[t0, t1]``: ``t0`` at the noise end, ``t1`` at the data end."""

    t0: float
    t1: float


def broadcast_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Shape a time (scalar or per-sample ``(N,)``) to broadcast against ``x`` of shape ``(N, ...)``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},); got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


class Interpolant(ABC):
    """Base class of all paths ``x_t = alpha(t) x_1 + sigma(t) x_0`` (t = 0 noise, t = 1 data).

    To add a path, subclass and implement :meth:`alpha` and :meth:`sigma` as elementwise torch
    functions of ``t``. Derivatives come from autograd unless :meth:`d_alpha` / :meth:`d_sigma` are
    overridden with closed forms. Example::

        class Cosine2(Interpolant):
            name = "cosine2"
            def alpha(self, t): return torch.sin(0.5 * torch.pi * t) ** 2
            def sigma(self, t): return torch.cos(0.5 * torch.pi * t) ** 2

    Everything else (training targets, conversions between predictions, the SDE coefficient
    ``w_KL``) is derived from the two schedules, and the samplers and objective accept the
    subclass unchanged.

    Ends. A path also states, as class attributes, how its ends behave; the objective, the ODE and
    SDE samplers and the likelihood take their default time intervals from them (through
    :meth:`default_eps` and :meth:`interval`) and never ask which path they have. The defaults are
    Linear's, right for any path with ``alpha_0 = 0, sigma_0 = 1`` and finite derivatives at both
    ends:

    - ``velocity_eps``, ``converted_eps``: the default ``(train_eps, sample_eps)`` of a velocity
      model, and of a score, noise or data model (whose conversion to velocity divides by
      ``alpha_t`` or ``sigma_t``, infinite at an end where that is 0);
    - ``clips_noise_end``: whether ``eps`` clips t = 0 too (False when ``alpha_0 > 0``, so t = 0 is
      usable as it is): the interval is ``[eps, 1 - eps]`` if True, else ``[0, 1 - eps]``;
    - ``singular_at_data``: True when the velocity is infinite at t = 1 (``d_sigma`` diverges as
      ``sigma -> 0``, as for VP); then ``t1 = 1`` is refused where a caller could ask for it (the
      likelihood), and both default eps must be > 0.

    A path whose ends behave like VP's, without being a :class:`VP`::

        class ExpVP(Interpolant):
            name = "exp_vp"
            velocity_eps = converted_eps = DefaultEps(train_eps=1e-5, sample_eps=1e-3)
            clips_noise_end = False   # alpha_0 = exp(-5) > 0: t = 0 is usable as it is
            singular_at_data = True   # sigma ~ sqrt(10 (1 - t)) near t = 1: d_sigma is infinite there
            def alpha(self, t): return torch.exp(-5 * (1 - t))
            def sigma(self, t): return torch.sqrt(1 - torch.exp(-10 * (1 - t)))

    The built-in values are the released SiT code's (arXiv 2401.08740; defaults from
    ``create_transport`` in the released ``transport/__init__.py``, ends from
    ``Transport.check_interval`` in ``transport/transport.py``): Linear/GVP velocity (0, 0),
    Linear/GVP score/noise (1e-3, 1e-3), VP (1e-5, 1e-3) for every prediction.
    """

    name: ClassVar[str] = "custom"
    #: Default ``(train_eps, sample_eps)`` of a velocity model on this path.
    velocity_eps: ClassVar[DefaultEps] = DefaultEps(train_eps=0.0, sample_eps=0.0)
    #: Default ``(train_eps, sample_eps)`` of a score, noise or data model on this path.
    converted_eps: ClassVar[DefaultEps] = DefaultEps(train_eps=1e-3, sample_eps=1e-3)
    #: Whether ``eps`` clips the noise end too (False: ``alpha_0 > 0`` makes t = 0 usable as it is).
    clips_noise_end: ClassVar[bool] = True
    #: Whether the velocity is infinite at t = 1, so that no computation may evaluate it there.
    singular_at_data: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for attr in ("velocity_eps", "converted_eps"):
            value = getattr(cls, attr)
            try:
                eps = DefaultEps(*(float(e) for e in value))
            except (TypeError, ValueError):
                raise TypeError(
                    f"{cls.__name__}.{attr} must be a pair (train_eps, sample_eps); got {value!r}"
                ) from None
            # a singular data end must be clipped, or the defaults would evaluate the velocity at t = 1
            low_ok = min(eps) > 0.0 if cls.singular_at_data else min(eps) >= 0.0
            if not (low_ok and max(eps) < MAX_EPS):
                allowed = (
                    f"(0, {MAX_EPS}) since singular_at_data" if cls.singular_at_data else f"[0, {MAX_EPS})"
                )
                raise TypeError(f"{cls.__name__}.{attr} entries must be in {allowed}; got {value!r}")
            setattr(cls, attr, eps)

    # ---- ends --------------------------------------------------------------------------------
    def default_eps(self, prediction: Prediction) -> DefaultEps:
        """The default ``(train_eps, sample_eps)`` of a model of this ``prediction`` type on this path."""
        _check_prediction(prediction, "prediction")
        return self.velocity_eps if prediction == "velocity" else self.converted_eps

    def interval(self, eps: float) -> TimeInterval:
        """``(t0, t1)`` clipped by ``eps``: ``[eps, 1 - eps]``, or ``[0, 1 - eps]`` without ``clips_noise_end``.

        Args:
            eps: the clip, in [0, 0.5).
        """
        eps = float(eps)
        if not 0.0 <= eps < MAX_EPS:
            raise ValueError(f"eps must be in [0, {MAX_EPS}); got {eps}")
        return TimeInterval(eps if self.clips_noise_end else 0.0, 1.0 - eps)

    # ---- schedules -------------------------------------------------------------------------
    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Data coefficient ``alpha_t`` (0 at noise, 1 at data)."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise coefficient ``sigma_t`` (1 at noise, 0 at data)."""

    def d_alpha(self, t: Tensor) -> Tensor:
        """``d alpha_t / dt``; autograd by default."""
        return _elementwise_derivative(self.alpha, t)

    def d_sigma(self, t: Tensor) -> Tensor:
        """``d sigma_t / dt``; autograd by default."""
        return _elementwise_derivative(self.sigma, t)

    def coefficients(self, t: Tensor) -> PathCoefficients:
        """All four coefficients at ``t`` as a named tuple."""
        return PathCoefficients(self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t))

    # ---- training pairs ---------------------------------------------------------------------
    def interpolate(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> Tensor:
        """``x_t = alpha_t x_1 + sigma_t x_0`` for per-sample ``t`` of shape ``(N,)``."""
        tb = broadcast_time(t, x_1)
        return self.alpha(tb) * x_1 + self.sigma(tb) * x_0

    def velocity(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> Tensor:
        """Conditional velocity ``d x_t / dt = d_alpha_t x_1 + d_sigma_t x_0``."""
        tb = broadcast_time(t, x_1)
        return self.d_alpha(tb) * x_1 + self.d_sigma(tb) * x_0

    # ---- SDE coefficient ------------------------------------------------------------------
    def w_kl(self, t: Tensor) -> Tensor:
        """Paper eq. 13 in our time: ``w_KL = 2 sigma (d_alpha sigma / alpha - d_sigma)``.

        It is twice the released code's "SBDM" diffusion ``D``, and infinite at ``alpha = 0``
        (t = 0 for Linear and GVP).
        """
        a, s, da, ds = self.coefficients(t)
        return 2.0 * s * (da * s / a - ds)

    # ---- conversions ----------------------------------------------------------------------
    def convert(
        self,
        prediction: Tensor,
        x_t: Tensor,
        t: Tensor | float,
        source: Prediction,
        target: Prediction,
    ) -> Tensor:
        """Convert a model output at ``(x_t, t)`` from one prediction type to another.

        Args:
            prediction: ``(N, ...)`` the model output, of kind ``source``.
            x_t: ``(N, ...)`` the state it was evaluated at.
            t: scalar or ``(N,)`` time in [0, 1] (0 = noise).
            source, target: one of ``velocity | score | noise | data``.

        Returns:
            ``(N, ...)`` the same field expressed as ``target``.
        """
        _check_prediction(source, "source prediction")
        _check_prediction(target, "target prediction")
        if source == target:
            return prediction
        a, s, da, ds = self.coefficients(broadcast_time(t, x_t))
        # Step 1: (x_1_hat, eps) from (x_t, prediction); only what the target needs is formed.
        if source == "velocity":
            det = a * ds - da * s
            eps = (a * prediction - da * x_t) / det
            if target == "noise":
                return eps
            if target == "score":
                return -eps / s
            return (ds * x_t - s * prediction) / det  # data
        if source == "score":
            eps = -s * prediction
        elif source == "noise":
            eps = prediction
        else:  # data
            x_1 = prediction
            eps = (x_t - a * x_1) / s
            if target == "velocity":
                return da * x_1 + ds * eps
            return eps if target == "noise" else -eps / s
        # source is score or noise: eps known
        if target == "noise":
            return eps
        if target == "score":
            return -eps / s
        if target == "data":
            return (x_t - s * eps) / a
        # velocity = d_alpha/alpha x_t + (d_sigma - d_alpha sigma / alpha) eps
        return (da / a) * x_t + (ds - da * s / a) * eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_prediction(value: str, what: str) -> None:
    if value not in PREDICTIONS:
        raise ValueError(f"{what} must be one of {PREDICTIONS}; got {value!r}")


def _elementwise_derivative(fn, t: Tensor) -> Tensor:
    """d fn(t) / dt for an elementwise ``fn``, by autograd, usable under ``torch.no_grad``."""
    with torch.enable_grad():
        t_ = t.detach().requires_grad_(True)
        y = fn(t_)
        (grad,) = torch.autograd.grad(y.sum(), t_, create_graph=torch.is_grad_enabled() and t.requires_grad)
    return grad


class Linear(Interpolant):
    """Linear path (rectified flow): ``alpha_t = t``, ``sigma_t = 1 - t``."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def sigma(self, t: Tensor) -> Tensor:
        return 1 - t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)


class GVP(Interpolant):
    """Generalised variance-preserving path: ``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)``."""

    name = "gvp"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class VP(Interpolant):
    """Variance-preserving path of the VP-SDE (score-based diffusion), in our time direction.

    With ``s = 1 - t`` (the SDE's own time) and ``beta(s) = beta_min + s (beta_max - beta_min)``:
    ``log alpha_t = -s^2 (beta_max - beta_min) / 4 - s beta_min / 2`` and ``sigma_t = sqrt(1 - alpha_t^2)``.
    ``alpha_0 = exp(-5.025) ~ 0.00657`` for the defaults, so t = 0 is not exactly pure noise, and
    ``d_sigma`` is singular at t = 1 where ``sigma = 0``.
    """

    name = "vp"
    # released: (1e-5, 1e-3) whatever the prediction; t = 0 is usable, t = 1 is singular
    velocity_eps = converted_eps = DefaultEps(train_eps=1e-5, sample_eps=1e-3)
    clips_noise_end = False
    singular_at_data = True

    def __init__(self, beta_min: float = VP_BETA_MIN, beta_max: float = VP_BETA_MAX) -> None:
        if not 0 <= beta_min < beta_max:
            raise ValueError(
                f"VP needs 0 <= beta_min < beta_max; got beta_min={beta_min}, beta_max={beta_max}"
            )
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        """``beta`` of the VP-SDE at our time ``t`` (i.e. at SDE time ``1 - t``)."""
        return self.beta_min + (1 - t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        s = 1 - t
        return -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def d_log_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * self.beta(t)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        return self.alpha(t) * self.d_log_alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        # sigma^2 = 1 - alpha^2  =>  sigma d_sigma = -alpha d_alpha
        return -torch.exp(2 * self.log_alpha(t)) * self.d_log_alpha(t) / self.sigma(t)

    def w_kl(self, t: Tensor) -> Tensor:
        # Closed form of the base formula: 2 sigma (d_alpha sigma/alpha - d_sigma) = beta_t; finite at t = 0.
        return self.beta(t)

    def __repr__(self) -> str:
        return f"VP(beta_min={self.beta_min}, beta_max={self.beta_max})"


#: The built-in paths by name (each class's ``name``); :func:`make_interpolant` builds from it.
INTERPOLANTS: dict[str, type[Interpolant]] = {cls.name: cls for cls in (Linear, GVP, VP)}


def make_interpolant(path: Interpolant | str) -> Interpolant:
    """An :class:`Interpolant` from an instance or a name in :data:`INTERPOLANTS` (case-insensitive)."""
    if isinstance(path, Interpolant):
        return path
    if isinstance(path, str) and path.lower() in INTERPOLANTS:
        return INTERPOLANTS[path.lower()]()
    raise ValueError(f"path must be an Interpolant or one of {tuple(INTERPOLANTS)}; got {path!r}")
