"""The field a sampler integrates: a model (of any prediction type) seen as velocity and score.

Samplers never see the network, its prediction type or guidance. They see a *field*: anything with

- ``interpolant``: the :class:`~sit_lightning.interpolants.Interpolant` the model was trained on,
- ``nfe``: the number of network evaluations spent so far,
- ``velocity(x, t)``: the probability-flow ODE velocity ``v(x, t)``,
- ``velocity_and_score(x, t)``: ``v(x, t)`` and the score ``grad log p_t(x)`` from ONE network call,

which is the :class:`VectorField` protocol. :class:`ModelField` builds it from
``model(x, t, **model_kwargs)``; :class:`FunctionField` from closed-form functions (tests, toys).

Time convention: t = 0 is noise, t = 1 is data (see :mod:`sit_lightning.interpolants`).

A field does not switch gradients off: the samplers run under ``torch.no_grad()``, while a
likelihood computation can differentiate through the same field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..interpolants import PREDICTIONS, Interpolant, Prediction, make_interpolant

__all__ = ["FunctionField", "ModelField", "VectorField", "VelocityScore", "time_vector"]


class VelocityScore(NamedTuple):
    """The ODE velocity and the score at one ``(x, t)``, both shaped like ``x``."""

    velocity: Tensor
    score: Tensor


@runtime_checkable
class VectorField(Protocol):
    """What a sampler needs from a model (see the module docstring)."""

    interpolant: Interpolant
    nfe: int

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor: ...

    def velocity_and_score(self, x: Tensor, t: Tensor | float) -> VelocityScore: ...


def time_vector(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` (a scalar or ``(N,)``) as an ``(N,)`` tensor of ``x``'s dtype and device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},); got {tuple(t.shape)}")
    return t


class ModelField:
    """Turns ``model(x, t, **model_kwargs) -> prediction`` into the velocity field and the score.

    The prediction (``velocity | score | noise | data``) is converted with
    :meth:`Interpolant.convert`, so every sampler works with every prediction type.

    NFE counting: one per model call. A guided model whose doubled batch is one call counts one
    here (the guidance wrapper keeps its own per-model counters). :meth:`velocity_and_score` is one
    call: the SDE drift ``v + (w/2) s`` costs one NFE, not two as in the released code.

    Args:
        model: callable ``(x, t, **model_kwargs) -> (N, ...)``; it receives ``t`` as ``(N,)`` of
            ``x.dtype`` (raw time in [0, 1], 0 = noise).
        interpolant: the path the model was trained on, an instance or ``linear | gvp | vp``.
        prediction: what the model outputs: ``velocity | score | noise | data``.
        **model_kwargs: passed to every model call (e.g. ``y=labels``).
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        interpolant: Interpolant | str,
        prediction: Prediction = "velocity",
        **model_kwargs: Any,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")
        self.model = model
        self.interpolant = make_interpolant(interpolant)
        self.prediction: Prediction = prediction
        self.model_kwargs = model_kwargs
        self.nfe = 0

    def _predict(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t_vec = time_vector(t, x)
        out = self.model(x, t_vec, **self.model_kwargs)
        self.nfe += 1
        return out, t_vec

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``(N, ...)`` ODE velocity at ``x`` ``(N, ...)`` and ``t`` (scalar or ``(N,)``); one NFE."""
        out, t_vec = self._predict(x, t)
        return self.interpolant.convert(out, x, t_vec, self.prediction, "velocity")

    def velocity_and_score(self, x: Tensor, t: Tensor | float) -> VelocityScore:
        """Velocity and score from one model call (one NFE)."""
        out, t_vec = self._predict(x, t)
        velocity = self.interpolant.convert(out, x, t_vec, self.prediction, "velocity")
        score = self.interpolant.convert(out, x, t_vec, self.prediction, "score")
        return VelocityScore(velocity, score)

    def reset_nfe(self) -> None:
        """Set the NFE counter back to 0."""
        self.nfe = 0

    def __repr__(self) -> str:
        return f"ModelField(interpolant={self.interpolant!r}, prediction={self.prediction!r}, nfe={self.nfe})"


class FunctionField:
    """A field from closed-form functions (tests, toys); each evaluation counts one NFE.

    Args:
        velocity_fn: ``(x, t) -> v`` with ``t`` given as ``(N,)`` of ``x.dtype``.
        interpolant: the path, an instance or ``linear | gvp | vp``.
        score_fn: optional ``(x, t) -> score``; without it the score is converted from the velocity.
    """

    def __init__(
        self,
        velocity_fn: Callable[[Tensor, Tensor], Tensor],
        interpolant: Interpolant | str,
        score_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.velocity_fn = velocity_fn
        self.score_fn = score_fn
        self.interpolant = make_interpolant(interpolant)
        self.nfe = 0

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        self.nfe += 1
        return self.velocity_fn(x, time_vector(t, x))

    def velocity_and_score(self, x: Tensor, t: Tensor | float) -> VelocityScore:
        self.nfe += 1
        t_vec = time_vector(t, x)
        v = self.velocity_fn(x, t_vec)
        if self.score_fn is not None:
            return VelocityScore(v, self.score_fn(x, t_vec))
        return VelocityScore(v, self.interpolant.convert(v, x, t_vec, "velocity", "score"))

    def reset_nfe(self) -> None:
        self.nfe = 0

    def __repr__(self) -> str:
        return f"FunctionField(interpolant={self.interpolant!r}, nfe={self.nfe})"
