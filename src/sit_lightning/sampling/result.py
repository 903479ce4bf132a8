"""The named result every sampler returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["SampleResult"]


@dataclass(frozen=True)
class SampleResult:
    """What a sampler returns.

    Attributes:
        samples: ``(N, ...)`` the final state (data for a forward run, noise for ``reverse=True``).
        nfe: network evaluations this call spent (as counted by the field).
        times: 1-D tensor of the times the state was at, in integration order (the fixed grid; for
            adaptive ODE methods only the two ends). For an SDE with a last step, the last entry is
            the end of the last step.
        trajectory: ``(len(times), N, ...)`` the state at each of ``times`` if requested, else None.
    """

    samples: Tensor
    nfe: int
    times: Tensor
    trajectory: Tensor | None = None
