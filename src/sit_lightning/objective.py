"""The SiT training objective: interpolant x prediction x loss weighting x time sampler.

For data ``x_1``, noise ``x_0 ~ N(0, I)`` and a time ``t`` drawn by the time sampler on the training
interval ``[t0, t1]``, the network sees ``x_t = alpha_t x_1 + sigma_t x_0`` and is regressed onto

===========  ===============================  ================================================
prediction   target                           per-sample loss (mean over C, H, W)
===========  ===============================  ================================================
velocity     ``d_alpha x_1 + d_sigma x_0``     ``|out - target|^2``
noise        ``x_0``                           ``lambda_t |out - x_0|^2``
score        ``-x_0 / sigma_t``                ``lambda_t |sigma_t out + x_0|^2``
===========  ===============================  ================================================

The loss weight ``lambda_t`` (score and noise models only; the SiT paper, Sec. 3.2) uses the drift
variance ``g_t = w_KL(t) / 2 = sigma_t (d_alpha_t sigma_t / alpha_t - d_sigma_t)``:

- ``none``: 1;
- ``velocity``: ``(g_t / sigma_t)^2`` (the score loss weighted to equal the velocity loss, L_s_lambda);
- ``likelihood``: ``g_t / sigma_t^2`` (the maximum-likelihood weighting).

A velocity model has only the plain loss; asking for a weighting raises ``ValueError`` instead of
being silently ignored as in the released code.

Every random draw (``t`` and ``x_0``) either comes from a ``torch.Generator`` or is passed in, so a
caller (the LightningModule) can key draws by seed, step and sample index; a time sampler is a map
of standard variates (``TimeSampler.from_base``) so that the caller can draw those variates itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from .interpolants import MAX_EPS, DefaultEps, Interpolant, TimeInterval, broadcast_time, make_interpolant

TrainPrediction = Literal["velocity", "score", "noise"]
LossWeight = Literal["none", "velocity", "likelihood"]
TRAIN_PREDICTIONS: tuple[str, ...] = get_args(TrainPrediction)
LOSS_WEIGHTS: tuple[str, ...] = get_args(LossWeight)

__all__ = [
    "LOSS_WEIGHTS",
    "LogitNormalTimeSampler",
    "LossOutput",
    "LossWeight",
    "TIME_SAMPLER_BASES",
    "TRAIN_PREDICTIONS",
    "TimeSampler",
    "TrainPrediction",
    "TrainingObjective",
    "UniformTimeSampler",
    "default_eps",
]


def default_eps(interpolant: Interpolant | str, prediction: str) -> DefaultEps:
    """The default ``(train_eps, sample_eps)`` for a path and prediction: the path's own.

    A shorthand for ``make_interpolant(interpolant).default_eps(prediction)``; the values live on
    the path (:meth:`~sit_lightning.interpolants.Interpolant.default_eps`). Released: VP (1e-5, 1e-3);
    Linear/GVP score or noise (1e-3, 1e-3); Linear/GVP velocity (0, 0).
    """
    return make_interpolant(interpolant).default_eps(prediction)


# ------------------------------------------------------------------------------------------------
# Time samplers: draw u in [0, 1]; the objective maps u onto its training interval [t0, t1].
# ------------------------------------------------------------------------------------------------
#: the kinds of standard variates a :class:`TimeSampler` can map.
TIME_SAMPLER_BASES = ("uniform", "normal")


class TimeSampler(ABC):
    """Strategy that draws training times as fractions ``u`` in [0, 1] of the training interval.

    A sampler is a map :meth:`from_base` of standard variates of one kind, named by the class
    attribute ``base``: ``"uniform"`` (U[0, 1)) or ``"normal"`` (N(0, 1)). The training module draws
    those variates keyed by sample (:mod:`sit_lightning.randomness`) and maps them, so a subclass
    only writes the map.
    """

    #: the standard variate :meth:`from_base` maps: ``"uniform"`` on [0, 1) or ``"normal"``.
    base: ClassVar[str] = "uniform"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.base not in TIME_SAMPLER_BASES:
            raise TypeError(f"{cls.__name__}.base must be one of {TIME_SAMPLER_BASES}; got {cls.base!r}")

    @abstractmethod
    def from_base(self, z: Tensor) -> Tensor:
        """Fractions ``u`` in [0, 1], elementwise, from standard variates ``z`` of kind ``base``."""

    def sample_unit(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """``(n,)`` float32 values in [0, 1]: ``from_base`` of fresh variates from ``generator``."""
        draw = torch.rand if self.base == "uniform" else torch.randn
        return self.from_base(draw(n, generator=generator, device=device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class UniformTimeSampler(TimeSampler):
    """``u ~ U[0, 1)`` (the SiT paper)."""

    def from_base(self, z: Tensor) -> Tensor:
        return z


class LogitNormalTimeSampler(TimeSampler):
    """``u = sigmoid(mean + std * z)``, ``z ~ N(0, 1)`` (SD3's logit-normal; mean > 0 favours data).

    Args:
        mean: location on the logit scale. In our time (t = 1 data) a positive mean puts more weight
            near the data end.
        std: scale on the logit scale, > 0.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"LogitNormalTimeSampler std must be a positive finite number; got {std}")
        if not math.isfinite(mean):
            raise ValueError(f"LogitNormalTimeSampler mean must be finite; got {mean}")
        self.mean = float(mean)
        self.std = float(std)

    base: ClassVar[str] = "normal"

    def from_base(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.mean + self.std * z)

    def __repr__(self) -> str:
        return f"LogitNormalTimeSampler(mean={self.mean}, std={self.std})"


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossOutput:
    """Result of :meth:`TrainingObjective.loss`.

    Attributes:
        loss: ``(N,)`` per-sample loss (mean over non-batch dims, weighted).
        t: ``(N,)`` the times used.
        x_t: ``(N, ...)`` the network input.
        prediction: ``(N, ...)`` the network output.
        target: ``(N, ...)`` the regression target of the prediction type.
    """

    loss: Tensor
    t: Tensor
    x_t: Tensor
    prediction: Tensor
    target: Tensor


ModelFn = Callable[..., Tensor]


class TrainingObjective:
    """Interpolant x prediction x loss weighting x time sampler (the SiT training loss).

    Args:
        path: the interpolant: an :class:`~sit_lightning.interpolants.Interpolant` or one of
            ``linear | gvp | vp``.
        prediction: what the network predicts: ``velocity | score | noise``.
        loss_weight: ``none | velocity | likelihood`` (score/noise models only; see module docs).
        time_sampler: how training times are drawn on ``[t0, t1]``; uniform by default.
        train_eps: clip of the training interval. ``None`` takes the path's default for the
            prediction (:meth:`Interpolant.default_eps`); a value you set is always used. The path
            says which ends it clips (:meth:`Interpolant.interval`): Linear/GVP train on
            ``[train_eps, 1 - train_eps]``, VP on ``[0, 1 - train_eps]`` (alpha_0 > 0).
        sample_eps: the same clip for sampling, reported by :meth:`sample_interval` for the samplers.
    """

    def __init__(
        self,
        path: Interpolant | str = "linear",
        prediction: TrainPrediction = "velocity",
        loss_weight: LossWeight = "none",
        time_sampler: TimeSampler | None = None,
        train_eps: float | None = None,
        sample_eps: float | None = None,
    ) -> None:
        self.interpolant = make_interpolant(path)
        if prediction not in TRAIN_PREDICTIONS:
            raise ValueError(f"prediction must be one of {TRAIN_PREDICTIONS}; got {prediction!r}")
        if loss_weight is None:
            loss_weight = "none"
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight must be one of {LOSS_WEIGHTS}; got {loss_weight!r}")
        if prediction == "velocity" and loss_weight != "none":
            raise ValueError(
                f"loss_weight={loss_weight!r} applies to score and noise models only; a velocity model "
                "has the plain velocity loss (use loss_weight='none')"
            )
        self.prediction = prediction
        self.loss_weight = loss_weight
        self.time_sampler = time_sampler if time_sampler is not None else UniformTimeSampler()
        default_train, default_sample = self.interpolant.default_eps(prediction)
        self.train_eps = _check_eps(default_train if train_eps is None else train_eps, "train_eps")
        self.sample_eps = _check_eps(default_sample if sample_eps is None else sample_eps, "sample_eps")

    # ---- intervals -------------------------------------------------------------------------
    def train_interval(self) -> TimeInterval:
        """``(t0, t1)`` on which training times are drawn: the path's interval clipped by ``train_eps``."""
        return self.interpolant.interval(self.train_eps)

    def sample_interval(self) -> TimeInterval:
        """``(t0, t1)`` for deterministic sampling (noise at t0, data at t1), clipped by ``sample_eps``."""
        return self.interpolant.interval(self.sample_eps)

    # ---- draws -----------------------------------------------------------------------------
    def sample_time(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """``(n,)`` training times on ``train_interval()``."""
        return self._on_train_interval(self.time_sampler.sample_unit(n, generator=generator, device=device))

    def time_from_base(self, z: Tensor) -> Tensor:
        """Training times on ``train_interval()`` from standard variates of the time sampler's ``base``."""
        return self._on_train_interval(self.time_sampler.from_base(z))

    def _on_train_interval(self, u: Tensor) -> Tensor:
        t0, t1 = self.train_interval()
        return t0 + (t1 - t0) * u

    # ---- targets and weights ------------------------------------------------------------------
    def target(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> Tensor:
        """The regression target of the prediction type at ``t``."""
        if self.prediction == "velocity":
            return self.interpolant.velocity(x_0, x_1, t)
        if self.prediction == "noise":
            return x_0
        return -x_0 / self.interpolant.sigma(broadcast_time(t, x_1))

    def weight(self, t: Tensor) -> Tensor:
        """``(N,)`` loss weight ``lambda_t`` (ones for ``none``)."""
        if self.loss_weight == "none":
            return torch.ones_like(t)
        a, s, da, ds = self.interpolant.coefficients(t)
        drift_var = s * (da * s / a - ds)  # = w_KL / 2
        if self.loss_weight == "velocity":
            return (drift_var / s) ** 2
        return drift_var / s**2

    def loss_from_prediction(self, prediction: Tensor, x_0: Tensor, x_1: Tensor, t: Tensor) -> Tensor:
        """``(N,)`` per-sample loss of a given network output (no randomness)."""
        if self.prediction == "score":
            # |sigma out + x_0|^2 = sigma^2 |out - target|^2, written as in the paper for stability at small sigma
            residual = broadcast_time(self.interpolant.sigma(t), x_1) * prediction + x_0
        else:
            residual = prediction - self.target(x_0, x_1, t)
        per_sample = residual.pow(2).flatten(1).mean(dim=1)
        return self.weight(t).to(per_sample.dtype) * per_sample

    def loss(
        self,
        model: ModelFn,
        x_1: Tensor,
        *,
        t: Tensor | None = None,
        x_0: Tensor | None = None,
        generator: torch.Generator | None = None,
        **model_kwargs,
    ) -> LossOutput:
        """Per-sample training loss of ``model(x_t, t, **model_kwargs)`` on data ``x_1``.

        Args:
            model: callable ``(x_t, t, **model_kwargs) -> (N, ...)``.
            x_1: ``(N, ...)`` data (latents).
            t: ``(N,)`` times to use; drawn with :meth:`sample_time` if omitted.
            x_0: ``(N, ...)`` noise to use; drawn from ``N(0, I)`` if omitted.
            generator: generator for the draws that are not given.
        """
        n = x_1.shape[0]
        if t is None:
            t = self.sample_time(n, generator=generator, device=x_1.device)
        t = t.to(device=x_1.device, dtype=x_1.dtype)
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},); got {tuple(t.shape)}")
        if x_0 is None:
            x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)
        elif x_0.shape != x_1.shape:
            raise ValueError(f"x_0 must have the shape of x_1 {tuple(x_1.shape)}; got {tuple(x_0.shape)}")
        x_t = self.interpolant.interpolate(x_0, x_1, t)
        out = model(x_t, t, **model_kwargs)
        loss = self.loss_from_prediction(out.float(), x_0.float(), x_1.float(), t.float())
        return LossOutput(loss=loss, t=t, x_t=x_t, prediction=out, target=self.target(x_0, x_1, t))

    def __repr__(self) -> str:
        return (
            f"TrainingObjective(path={self.interpolant!r}, prediction={self.prediction!r}, "
            f"loss_weight={self.loss_weight!r}, time_sampler={self.time_sampler!r}, "
            f"train_eps={self.train_eps}, sample_eps={self.sample_eps})"
        )


def _check_eps(value: float, name: str) -> float:
    value = float(value)
    if not (0.0 <= value < MAX_EPS):
        raise ValueError(f"{name} must be in [0, {MAX_EPS}); got {value}")
    return value
