"""Every setting of one sampling run as one typed, validated value: :class:`SamplerSettings`.

``SiTModule.sample``, the periodic-sampling callbacks (``settings:`` in YAML) and plain code take the
same frozen dataclass, so what one can set the others can set too, and a bad value (a misspelt
method, an interval the wrong way round, ``eta`` without ``w_kl_eta``) fails when the settings are
built: in a LightningCLI run when the config is parsed, before any training step.

```yaml
settings: {sampler: ode, method: heun, steps: 16, cfg_scale: 1.5, guidance_interval: [0.1, 1.0]}
```

A setting that the chosen sampler would ignore is an error, not a no-op: an SDE diffusion with
``sampler: ode``, ``atol`` with a fixed-step method, ``steps`` with an adaptive one.

What is *not* a setting: the network, the labels, the starting noise and the source of the SDE's
normals (the caller's), the loss table ``L_t`` of ``w_kl_eta`` (the model's validation profile), and
the autoguidance guide. A guide is a second network; ``SiTModule.sample(..., guide=network)`` and
:meth:`SamplerSettings.guided` take it at run time, and ``cfg_scale`` is then the autoguidance scale.

Time convention: t = 0 is noise, t = 1 is data (``interpolants.py``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ..errors import ConfigurationError
from .diffusion import WKLEta
from .field import VectorField
from .grids import GRIDS, GridName
from .guidance import ClassifierFreeGuidance
from .ode import ADAPTIVE_METHODS, FIXED_STEP_NFE, ODE_METHODS, OdeMethod, sample_ode
from .result import SampleResult
from .sde import (
    DEFAULT_LAST_STEP_SIZE,
    LAST_STEPS,
    SDE_METHODS,
    LastStep,
    NormalSource,
    SdeMethod,
    sample_sde,
)

__all__ = ["DIFFUSION_NAMES", "DiffusionName", "SAMPLERS", "SamplerKind", "SamplerSettings"]

SamplerKind = Literal["ode", "sde"]
SAMPLERS: tuple[str, ...] = get_args(SamplerKind)
#: Names of the SDE diffusion coefficients: :data:`~sit_lightning.sampling.diffusion.DIFFUSIONS` plus
#: ``w_kl_eta`` (paper eq. 14), which also needs ``eta`` and the model's loss table ``L_t``.
DiffusionName = Literal[
    "constant", "w_kl", "sigma", "linear", "decreasing", "increasing_decreasing", "w_kl_eta"
]
DIFFUSION_NAMES: tuple[str, ...] = get_args(DiffusionName)


def _default(sampler: Callable[..., Any], name: str) -> Any:
    """The default of ``sampler``'s argument ``name``: the samplers' signatures stay the one source."""
    return inspect.signature(sampler).parameters[name].default


_ODE_DEFAULT_METHOD: str = _default(sample_ode, "method")  # heun
_ODE_DEFAULT_STEPS: int = _default(sample_ode, "steps")  # 125: 250 NFE, the paper's ODE
_ODE_DEFAULT_ATOL: float = _default(sample_ode, "atol")
_ODE_DEFAULT_RTOL: float = _default(sample_ode, "rtol")
_SDE_DEFAULT_METHOD: str = _default(sample_sde, "method")  # euler
_SDE_DEFAULT_STEPS: int = _default(sample_sde, "steps")  # 250: the paper's SDE
#: Settings that only the SDE reads, and those that only adaptive ODE methods read.
_SDE_ONLY = ("diffusion", "diffusion_norm", "eta", "last_step", "last_step_size")
_ADAPTIVE_ONLY = ("atol", "rtol")


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: sampler, method, steps, time grid, SDE diffusion and last step, guidance.

    Args:
        sampler: ``ode`` (probability flow, :func:`~sit_lightning.sampling.sample_ode`) or ``sde``
            (:func:`~sit_lightning.sampling.sample_sde`).
        method: ODE ``euler | midpoint | heun | rk4 | rk4_38`` (fixed step) or ``dopri5 | bosh3 |
            adaptive_heun | dopri8 | fehlberg2`` (adaptive); SDE ``euler | heun``. None: ``heun`` for
            the ODE, ``euler`` for the SDE.
        steps: intervals of the time grid (docs/sampling.md, "Counting steps and NFE"); for the SDE
            with a last step it includes that step. None: 125 for the ODE (Heun: 250 NFE), 250 for the
            SDE. Must stay None for adaptive ODE methods, which choose their own steps.
        grid: ``uniform | shifted`` time grid (fixed-step methods).
        shift: the shifted grid's ``s > 0`` (``s < 1``: more steps near the noise); 1 with ``uniform``.
        t0: noise-end time; None: the sampler's default (``SiTModule.sample``: the objective's
            ``sample_interval()`` for the ODE, the path's default for the SDE).
        t1: data-end time; None: as ``t0`` (the SDE with a last step ends at 1).
        atol: absolute tolerance of adaptive ODE methods.
        rtol: relative tolerance of adaptive ODE methods.
        diffusion: SDE diffusion coefficient ``w_t`` by name (docs/sampling.md, section 5);
            ``w_kl_eta`` is paper eq. 14 and needs ``eta`` and the model's loss table ``L_t``.
        diffusion_norm: the coefficient's norm ``n`` (``w_t = n * base``).
        eta: the ``eta >= 0`` of ``w_kl_eta``; given exactly when ``diffusion`` is ``w_kl_eta``.
        last_step: SDE last step ``none | mean | tweedie | euler``.
        last_step_size: ``h`` of the SDE's last step, in ``(0, 1)``.
        cfg_scale: guidance scale ``>= 0`` (1: none, no extra pass; classifier-free with the null
            class, or autoguidance when a guide network is given).
        guidance_interval: ``(t_lo, t_hi)``, ``0 <= t_lo <= t_hi <= 1``: guide only there; None:
            everywhere.
        guidance_channels: guide only the first k output channels (3 = the released code); None: all.

    Raises:
        ConfigurationError: (a ``ValueError``) naming the bad value and the allowed ones, at
            construction; the ``sit-lightning`` command prints it as one line.
    """

    sampler: SamplerKind = "ode"
    method: OdeMethod | SdeMethod | None = None
    steps: int | None = None
    grid: GridName = "uniform"
    shift: float = 1.0
    t0: float | None = None
    t1: float | None = None
    atol: float = _ODE_DEFAULT_ATOL
    rtol: float = _ODE_DEFAULT_RTOL
    diffusion: DiffusionName = "w_kl"
    diffusion_norm: float = 1.0
    eta: float | None = None
    last_step: LastStep = "mean"
    last_step_size: float = DEFAULT_LAST_STEP_SIZE
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    guidance_channels: int | None = None

    def __post_init__(self) -> None:
        _one_of("sampler", self.sampler, SAMPLERS)
        methods = ODE_METHODS if self.sampler == "ode" else SDE_METHODS
        if self.method is not None:
            _one_of("method", self.method, methods, f" for sampler={self.sampler!r}")
        _one_of("grid", self.grid, GRIDS)
        _one_of("diffusion", self.diffusion, DIFFUSION_NAMES)
        _one_of("last_step", self.last_step, LAST_STEPS)
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)):
            raise ConfigurationError(f"steps must be an integer or None; got {self.steps!r}")
        if self.adaptive and self.steps is not None:
            raise ConfigurationError(
                f"steps={self.steps} given with the adaptive method {self.method!r}, which chooses its own "
                f"steps; leave steps None or pick a fixed-step method {tuple(FIXED_STEP_NFE)}"
            )
        has_last = self.sampler == "sde" and self.last_step != "none"
        min_steps = 2 if has_last else 1
        if self.steps is not None and self.steps < min_steps:
            why = (
                f" (sampler='sde' with last_step={self.last_step!r} spends one on the last step)"
                if has_last
                else ""
            )
            raise ConfigurationError(f"steps must be >= {min_steps}{why}; got {self.steps}")
        _positive("shift", self.shift)
        if self.grid == "uniform" and self.shift != 1.0:
            raise ConfigurationError(f"shift={self.shift} needs grid='shifted' (grid='uniform' has no shift)")
        if self.adaptive and self.grid != "uniform":
            raise ConfigurationError(
                f"grid={self.grid!r} applies to fixed-step methods; {self.method!r} is adaptive"
            )
        for name in ("t0", "t1"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ConfigurationError(f"{name} must be None or in [0, 1] (0 noise, 1 data); got {value!r}")
        if self.t0 is not None and self.t1 is not None and not self.t0 < self.t1:
            raise ConfigurationError(f"need t0 < t1 (t0 noise, t1 data); got t0={self.t0}, t1={self.t1}")
        _positive("atol", self.atol)
        _positive("rtol", self.rtol)
        _non_negative("diffusion_norm", self.diffusion_norm)
        if (self.eta is not None) != (self.diffusion == WKLEta.name):
            raise ConfigurationError(
                f"eta is the parameter of diffusion='w_kl_eta' and must be given exactly with it; "
                f"got diffusion={self.diffusion!r}, eta={self.eta!r}"
            )
        if self.eta is not None:
            _non_negative("eta", self.eta)
        if not (math.isfinite(self.last_step_size) and 0.0 < self.last_step_size < 1.0):
            raise ConfigurationError(f"last_step_size must be in (0, 1); got {self.last_step_size!r}")
        _non_negative("cfg_scale", self.cfg_scale)
        if self.guidance_interval is not None:
            interval = tuple(float(v) for v in self.guidance_interval)
            if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
                raise ConfigurationError(
                    f"guidance_interval must be None or (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1; "
                    f"got {self.guidance_interval!r}"
                )
            object.__setattr__(self, "guidance_interval", interval)  # a YAML list becomes the tuple
        if self.guidance_channels is not None and (
            isinstance(self.guidance_channels, bool)
            or not isinstance(self.guidance_channels, int)
            or self.guidance_channels < 1
        ):
            raise ConfigurationError(
                f"guidance_channels must be None (all) or an integer >= 1; got {self.guidance_channels!r}"
            )
        self._check_nothing_ignored()

    def _check_nothing_ignored(self) -> None:
        """A setting the chosen sampler would not read must keep its default (never silently ignored)."""
        applies_to: dict[str, str] = {}  # setting -> the runs that read it
        if self.sampler == "ode":
            applies_to.update(dict.fromkeys(_SDE_ONLY, "sampler='sde'"))
            if not self.adaptive:
                applies_to.update(
                    dict.fromkeys(_ADAPTIVE_ONLY, f"the adaptive ODE methods {ADAPTIVE_METHODS}")
                )
        else:
            applies_to.update(dict.fromkeys(_ADAPTIVE_ONLY, f"sampler='ode' with one of {ADAPTIVE_METHODS}"))
            if self.last_step == "none":
                applies_to["last_step_size"] = "an SDE last step other than 'none'"
        defaults = {f.name: f.default for f in fields(self)}
        ignored = [name for name in applies_to if getattr(self, name) != defaults[name]]
        if ignored:
            run = f"sampler={self.sampler!r}, method={self.resolved_method!r}"
            if self.sampler == "sde":
                run += f", last_step={self.last_step!r}"
            raise ConfigurationError(
                f"with {run} these settings would be ignored: "
                + "; ".join(
                    f"{name}={getattr(self, name)!r} (applies to {applies_to[name]})" for name in ignored
                )
            )

    # ---- what the defaults resolve to ------------------------------------------------------------
    @property
    def resolved_method(self) -> str:
        """The method that runs (``method``, or the sampler's default)."""
        if self.method is not None:
            return self.method
        return _ODE_DEFAULT_METHOD if self.sampler == "ode" else _SDE_DEFAULT_METHOD

    @property
    def adaptive(self) -> bool:
        """True for an adaptive (torchdiffeq) ODE method, whose steps and NFE the solver chooses."""
        return self.sampler == "ode" and self.method in ADAPTIVE_METHODS

    @property
    def resolved_steps(self) -> int | None:
        """The grid intervals that run (``steps``, or the sampler's default); None for adaptive methods."""
        if self.adaptive:
            return None
        if self.steps is not None:
            return self.steps
        return _ODE_DEFAULT_STEPS if self.sampler == "ode" else _SDE_DEFAULT_STEPS

    def nfe_per_image(self) -> int | None:
        """Network evaluations per sample (docs/sampling.md's table); None for adaptive ODE methods.

        A guided evaluation is one call on a doubled batch and counts once (the project's NFE
        convention), so guidance does not change this number.
        """
        steps = self.resolved_steps
        if steps is None:
            return None
        per_step = FIXED_STEP_NFE[self.resolved_method]
        if self.sampler == "ode" or self.last_step == "none":
            return per_step * steps
        return per_step * (steps - 1) + 1  # the last step costs one evaluation

    def describe(self, with_guidance: bool = True) -> str:
        """One line for reports: ``ode heun, 16 steps, 32 NFE per image``, then every other setting
        that differs from its default (``cfg_scale`` and the guidance fields only with ``with_guidance``)."""
        nfe = self.nfe_per_image()
        parts = [f"{self.sampler} {self.resolved_method}"]
        parts.append("adaptive steps" if nfe is None else f"{self.resolved_steps} steps, {nfe} NFE per image")
        skip = {"sampler", "method", "steps"}
        if not with_guidance:
            skip |= {"cfg_scale", "guidance_interval", "guidance_channels"}
        parts += [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name not in skip and getattr(self, f.name) != f.default
        ]
        return ", ".join(parts)

    # ---- running them ----------------------------------------------------------------------------
    def guided(
        self,
        network: Callable[..., Tensor],
        *,
        null_class: int | None = None,
        guide: Callable[..., Tensor] | None = None,
    ) -> Callable[..., Tensor]:
        """``network`` wrapped in :class:`ClassifierFreeGuidance` with these settings; itself when ``cfg_scale == 1``.

        Args:
            network: ``(x, t, y, **kw) -> output``.
            null_class: the unconditional label (classifier-free guidance); None with ``guide``.
            guide: autoguidance: the weaker network whose output replaces the unconditional one.
        """
        if self.cfg_scale == 1.0:
            return network
        return ClassifierFreeGuidance(
            network,
            self.cfg_scale,
            null_class=null_class,
            interval=self.guidance_interval,
            guidance_channels=self.guidance_channels,
            guide=guide,
        )

    def sample(
        self,
        field: VectorField,
        noise: Tensor,
        *,
        normals: NormalSource | None = None,
        generator: torch.Generator | None = None,
        loss_table: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> SampleResult:
        """Run the chosen sampler on ``field`` from ``noise`` ``(N, ...)`` at ``t0``.

        Guidance is not applied here: it belongs to the network inside ``field`` (:meth:`guided`).

        Args:
            field: the (guided) model as a :class:`VectorField`.
            noise: ``(N, ...)`` starting state.
            normals: SDE: the source of each stochastic step's standard normals (see ``sample_sde``).
            generator: SDE: a ``torch.Generator`` for the normals when ``normals`` is None.
            loss_table: ``(times, values)`` of ``L_t``, required by ``diffusion='w_kl_eta'``.

        Returns:
            the sampler's :class:`SampleResult`.
        """
        return self._sampler()(field, noise, **self.sampler_kwargs(normals, generator, loss_table))

    def _sampler(self) -> Callable[..., SampleResult]:
        return sample_ode if self.sampler == "ode" else sample_sde

    def sampler_kwargs(
        self,
        normals: NormalSource | None = None,
        generator: torch.Generator | None = None,
        loss_table: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments of ``sample_ode`` / ``sample_sde`` that these settings stand for."""
        kwargs: dict[str, Any] = {"method": self.resolved_method, "t0": self.t0, "t1": self.t1}
        if not self.adaptive:
            kwargs.update(steps=self.resolved_steps, grid=self.grid, shift=self.shift)
        if self.sampler == "ode":
            if self.adaptive:
                kwargs.update(atol=self.atol, rtol=self.rtol)
            return kwargs
        if self.diffusion == WKLEta.name:
            if loss_table is None:
                raise ConfigurationError(
                    "diffusion='w_kl_eta' needs the model's loss table L_t (SiTModule.loss_profile, written "
                    "by a validation run); got none"
                )
            assert self.eta is not None  # __post_init__
            times, values = loss_table
            kwargs["diffusion"] = WKLEta(self.eta, times, values, norm=self.diffusion_norm)
        else:
            kwargs.update(diffusion=self.diffusion, norm=self.diffusion_norm)
        kwargs.update(last_step=self.last_step, last_step_size=self.last_step_size)
        kwargs.update(normals=normals, generator=generator)
        return kwargs


def _one_of(name: str, value: Any, allowed: tuple[str, ...], where: str = "") -> None:
    if value not in allowed:
        raise ConfigurationError(f"{name} must be one of {allowed}{where}; got {value!r}")


def _positive(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigurationError(f"{name} must be a finite number > 0; got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ConfigurationError(f"{name} must be a finite number >= 0; got {value!r}")
