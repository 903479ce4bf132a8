"""Classifier-free guidance and autoguidance as a wrapper around the network.

:class:`ClassifierFreeGuidance` has the network's own signature ``(x, t, y, **kwargs) -> output`` and
returns an output of the same prediction type, so it plugs into
:class:`~sit_lightning.sampling.field.ModelField` as the ``model`` and every sampler stays unaware of
guidance. With the conditional output ``c = model(x, t, y)`` and a guiding output ``u`` it returns

    guided = u + scale * (c - u)                                       (SiT paper, App. C)

- classifier-free guidance: ``u = model(x, t, null_class)`` (the unconditional output);
- autoguidance (Karras et al. 2024, arXiv 2406.02507): ``u = guide(x, t, y)``, a second, weaker
  (smaller or less trained) conditional model with the same labels.

Guidance is an affine combination (weights ``1 - scale`` and ``scale`` sum to one) and every conversion
between velocity, score, noise and data is affine in the model output, ``a_t * out + b_t * x_t``
(:meth:`~sit_lightning.interpolants.Interpolant.convert`), so guiding any prediction type and then
converting gives the same velocity as converting both outputs first and then guiding.

Channels: guidance applies to all output channels by default. ``guidance_channels=3`` reproduces the
released code (``SiT.forward_with_cfg`` in the released ``models.py``), where channels ``>= 3`` keep the
conditional output. The released function returns a doubled batch whose second half is a copy of the
guided rows except that its channel 3 is the raw unconditional output; this wrapper returns only the
``N`` conditional rows, which is what the sampler integrates.

Cost: the conditional and unconditional rows run as ONE doubled batch (one network call). Outside the
guidance interval ``[t_lo, t_hi]`` only the conditional pass runs and the batch is not doubled; with
per-sample times that straddle the interval, only the rows inside are doubled (still one call).
:attr:`ClassifierFreeGuidance.calls` counts the calls and rows each model saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ClassifierFreeGuidance", "GuidanceCalls"]


@dataclass
class GuidanceCalls:
    """Running counts of network evaluations made through a :class:`ClassifierFreeGuidance`.

    Attributes:
        main: calls of the main model; a doubled conditional + unconditional batch counts once
            (the project's NFE convention: a guided pair is one batched call of double size).
        doubled: main-model calls that carried unconditional rows (classifier-free guidance only).
        main_rows: rows (samples) the main model evaluated in total, conditional and unconditional.
        guide: calls of the guide model (autoguidance only).
        guide_rows: rows the guide model evaluated in total.
    """

    main: int = 0
    doubled: int = 0
    main_rows: int = 0
    guide: int = 0
    guide_rows: int = 0


class ClassifierFreeGuidance:
    """Guided network: ``u + scale * (c - u)`` with ``c`` the conditional output (see module docstring).

    Args:
        model: the network, ``model(x, t, y, **kwargs) -> output`` with ``x`` of shape ``(N, C, ...)``,
            ``t`` a scalar or ``(N,)`` time (0 = noise, 1 = data), ``y`` ``(N,)`` integer labels, and an
            output of shape ``(N, C_out, ...)`` of any prediction type.
        scale: guidance scale ``>= 0`` (the paper's zeta). 1 returns the conditional model unchanged
            (bitwise, with no unconditional pass); 0 gives the unconditional (or guide) model;
            values in (0, 1) interpolate and values above 1 extrapolate.
        null_class: the label of the unconditional ("null") class, ``num_classes`` for SiT (1000 on
            ImageNet). Required for classifier-free guidance; must be ``None`` with ``guide``.
        interval: ``(t_lo, t_hi)`` with ``0 <= t_lo <= t_hi <= 1``: guide only where
            ``t_lo <= t <= t_hi`` (closed interval, per sample), elsewhere return the conditional
            output. ``None`` guides at every time.
        guidance_channels: guide only the first ``k`` output channels and keep the conditional output
            in the others. ``None`` (default) guides all channels; ``3`` reproduces the released code.
        guide: autoguidance: a second conditional network with the model's signature; the guiding
            output is ``guide(x, t, y, **kwargs)`` instead of the null-class output.

    Raises:
        ValueError: for a negative or non-finite scale, an interval outside ``0 <= lo <= hi <= 1``,
            ``guidance_channels < 1``, no ``null_class`` without ``guide``, or both given.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        scale: float,
        *,
        null_class: int | None = None,
        interval: tuple[float, float] | None = None,
        guidance_channels: int | None = None,
        guide: Callable[..., Tensor] | None = None,
    ) -> None:
        scale = float(scale)
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"guidance scale must be finite and >= 0; got {scale}")
        if guide is None and null_class is None:
            raise ValueError("classifier-free guidance needs null_class (the unconditional label); got None")
        if guide is not None and null_class is not None:
            raise ValueError(
                f"autoguidance (guide=...) uses the labels y for both models; null_class={null_class} "
                "would be ignored, so pass null_class=None"
            )
        if interval is not None:
            lo, hi = (float(v) for v in interval)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1; got {interval}")
            interval = (lo, hi)
        if guidance_channels is not None and int(guidance_channels) < 1:
            raise ValueError(f"guidance_channels must be None (all) or >= 1; got {guidance_channels}")
        self.model = model
        self.guide = guide
        self.scale = scale
        self.null_class = None if null_class is None else int(null_class)
        self.interval = interval
        self.guidance_channels = None if guidance_channels is None else int(guidance_channels)
        self.calls = GuidanceCalls()

    def reset_calls(self) -> None:
        """Zero :attr:`calls`."""
        self.calls = GuidanceCalls()

    # ---- which rows are guided ------------------------------------------------------------
    def guided_rows(self, t: Tensor | float, n: int) -> Tensor:
        """``(n,)`` bool: the rows that get guidance at time ``t`` (scalar or ``(n,)``)."""
        t = torch.as_tensor(t)
        if self.scale == 1.0:
            return torch.zeros(n, dtype=torch.bool, device=t.device)
        if self.interval is None:
            return torch.ones(n, dtype=torch.bool, device=t.device)
        lo, hi = self.interval
        inside = (t >= lo) & (t <= hi)
        return inside.expand(n) if inside.ndim == 0 else inside

    # ---- the guided network -----------------------------------------------------------------
    def __call__(self, x: Tensor, t: Tensor | float, y: Tensor, **kwargs: Any) -> Tensor:
        """Guided output for ``x`` ``(N, C, ...)``, ``t`` scalar or ``(N,)``, labels ``y`` ``(N,)``.

        Tensor keyword arguments with ``N`` rows are treated as per-sample and follow the rows into
        the unconditional (or guide) batch; other keyword arguments are passed unchanged.
        """
        n = x.shape[0]
        if self.scale == 1.0:  # exactly the conditional model: no unconditional pass at all
            return self._call_main(x, t, y, kwargs)
        rows = self.guided_rows(t, n)
        # Without an interval every row is guided: skip the count (a device sync on GPU).
        n_guided = n if self.interval is None else int(rows.sum())
        if n_guided == 0:  # outside the interval: conditional only, batch not doubled
            return self._call_main(x, t, y, kwargs)
        every = n_guided == n
        if self.guide is not None:
            cond = self._call_main(x, t, y, kwargs)
            sub = _select_rows(rows, every, n, x, t, y, kwargs)
            self.calls.guide += 1
            self.calls.guide_rows += n_guided
            uncond = self.guide(sub.x, sub.t, sub.y, **sub.kwargs)
        else:
            # One doubled batch: [all N conditional rows; the guided rows with the null label].
            sub = _select_rows(rows, every, n, x, t, y, kwargs)
            null = torch.full_like(sub.y, self.null_class)
            # A scalar time guides all rows or none, so it stays a scalar for the doubled batch.
            both_t = t if torch.as_tensor(t).ndim == 0 else torch.cat([t, sub.t])
            both_kwargs = {
                k: torch.cat([v, sub.kwargs[k]]) if _is_per_sample(v, n) else v for k, v in kwargs.items()
            }
            out = self._call_main(torch.cat([x, sub.x]), both_t, torch.cat([y, null]), both_kwargs)
            self.calls.doubled += 1
            cond, uncond = out[:n], out[n:]
        cond_rows = cond if every else cond[rows]
        guided = self._combine(cond_rows, uncond)
        if every:
            return guided
        result = cond.clone()
        result[rows] = guided
        return result

    def _call_main(self, x: Tensor, t: Tensor | float, y: Tensor, kwargs: dict[str, Any]) -> Tensor:
        self.calls.main += 1
        self.calls.main_rows += x.shape[0]
        return self.model(x, t, y, **kwargs)

    def _combine(self, cond: Tensor, uncond: Tensor) -> Tensor:
        guided = uncond + self.scale * (cond - uncond)
        k = self.guidance_channels
        if k is None:
            return guided
        if k > cond.shape[1]:
            raise ValueError(f"guidance_channels={k} exceeds the model output's {cond.shape[1]} channels")
        # Released behaviour (SiT.forward_with_cfg): channels >= k keep the conditional output.
        return torch.cat([guided[:, :k], cond[:, k:]], dim=1)

    def __repr__(self) -> str:
        kind = "guide=<model>" if self.guide is not None else f"null_class={self.null_class}"
        return (
            f"ClassifierFreeGuidance(scale={self.scale}, {kind}, interval={self.interval}, "
            f"guidance_channels={self.guidance_channels})"
        )


@dataclass(frozen=True)
class _Rows:
    """The inputs restricted to the guided rows."""

    x: Tensor
    t: Tensor | float
    y: Tensor
    kwargs: dict[str, Any]


def _is_per_sample(value: Any, n: int) -> bool:
    return isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n


def _rows_t(t: Tensor | float, n: int, x: Tensor) -> Tensor:
    """``t`` as an ``(n,)`` tensor (a scalar time is repeated)."""
    t = torch.as_tensor(t, device=x.device)
    return t.expand(n) if t.ndim == 0 else t


def _select_rows(
    rows: Tensor, every: bool, n: int, x: Tensor, t: Tensor | float, y: Tensor, kwargs: dict[str, Any]
) -> _Rows:
    if every:
        return _Rows(x, t, y, kwargs)
    t_rows = _rows_t(t, n, x)[rows]
    kw = {k: v[rows] if _is_per_sample(v, n) else v for k, v in kwargs.items()}
    return _Rows(x[rows], t_rows, y[rows], kw)
