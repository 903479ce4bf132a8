"""Exact likelihood of data under a flow model: the probability-flow ODE with its divergence.

Along a solution of ``dx/dt = v(x, t)`` (t = 0 noise, t = 1 data), ``d/dt log p_t(x_t) = -div v``
(instantaneous change of variables; SiT paper App. B), so :func:`likelihood` integrates ``(x, div v)``
from the data end ``t1`` back to the noise end ``t0`` and adds the ``N(0, I)`` prior there. One network
evaluation per solver stage (velocity and divergence from the same forward pass), one Hutchinson probe
per trajectory, bits/dim with optional dequantisation of 8-bit pixels.

The derivation, which density each path and prediction yields at its ends (VP's ``t1 < 1`` and its
``alpha_0 > 0`` prior error), and the bits/dim algebra: docs/guidance_likelihood.md, section 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from .field import VectorField
from .grids import default_interval, time_grid
from .ode import ADAPTIVE_METHODS, ODE_METHODS, OdeMethod, integrate_adaptive, ode_step

Divergence = Literal["exact", "hutchinson"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
ProbeDistribution = Literal["rademacher", "gaussian"]
PROBE_DISTRIBUTIONS: tuple[str, ...] = get_args(ProbeDistribution)

#: Data range of ``dequantize=True``: pixels k in {0, ..., 2^bits - 1} map to x = k * Delta - 1 in [-1, 1].
DATA_LOW, DATA_HIGH = -1.0, 1.0
#: How far (in bins) dequantised input may sit from the pixel grid before it is rejected.
GRID_TOLERANCE_BINS = 1e-3

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "LikelihoodResult",
    "PROBE_DISTRIBUTIONS",
    "ProbeDistribution",
    "likelihood",
    "standard_normal_logp",
]


class LikelihoodResult(NamedTuple):
    """What :func:`likelihood` returns (see the module docstring for which density it is).

    Attributes:
        nll_nats: ``(N,)`` negative log-likelihood per sample in nats: ``-log p_{t1}(x)`` in data units,
            or, with ``dequantize=True``, the dequantised NLL of the discrete pixels in pixel units.
        bits_per_dim: ``(N,)`` ``nll_nats / (D ln 2)``.
        prior_z: ``(N, ...)`` the state reached at ``t0`` (the latent noise of ``x``).
        nfe: network evaluations spent (each gives the velocity and the divergence).
        t0: the noise end of the integration.
        t1: the data end: the density is that of ``x_{t1}``.
        log_density: ``(N,)`` ``log p_{t1}`` of the (dequantised) input in data units, nats.
    """

    nll_nats: Tensor
    bits_per_dim: Tensor
    prior_z: Tensor
    nfe: int
    t0: float
    t1: float
    log_density: Tensor


def likelihood(
    field: VectorField,
    x: Tensor,
    *,
    method: OdeMethod = "rk4",
    steps: int = 50,
    t0: float | None = None,
    t1: float | None = None,
    divergence: Divergence = "hutchinson",
    probe: Tensor | None = None,
    probe_distribution: ProbeDistribution = "rademacher",
    generator: torch.Generator | None = None,
    dequantize: bool = False,
    bits: int = 8,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
) -> LikelihoodResult:
    """Negative log-likelihood of ``x`` under the probability-flow ODE of ``field``.

    Integrates ``(x, delta)`` from the data end ``t1`` to the noise end ``t0`` (module docstring).
    The field must be differentiable in ``x`` (no ``torch.no_grad`` inside it; put the network in eval
    mode) and must treat the rows of a batch independently. No gradient flows back to the inputs or
    the network parameters.

    Args:
        field: the model as a field (``velocity(x, t)``, ``interpolant``), e.g. a
            :class:`~sit_lightning.sampling.field.ModelField`. Guidance must be off (scale 1): a guided
            field is not the velocity of any density path.
        x: ``(N, ...)`` data (at the data end, t = 1 convention). With ``dequantize=True``: pixels
            scaled by ``x = 2 k / (2^bits - 1) - 1``.
        method: a fixed-step method of :func:`~sit_lightning.sampling.ode.sample_ode` (``euler | midpoint
            | heun | rk4 | rk4_38`` on a uniform grid of ``steps`` steps; NFE = steps x 1, 2, 2, 4, 4) or
            an adaptive one (``dopri5 | bosh3 | adaptive_heun | dopri8 | fehlberg2``, torchdiffeq, with
            ``atol``/``rtol``; its error norm spans the whole batch, so results depend slightly on
            the batch).
        steps: number of steps of a fixed-grid method (ignored by adaptive methods).
        t0: noise end; default from :func:`~sit_lightning.sampling.grids.default_interval` for the
            field's path and prediction (``field.prediction`` if present, else velocity), as the ODE
            sampler: Linear/GVP velocity (0, 1), score/noise/data (1e-3, 1 - 1e-3), VP (0, 1 - 1e-3).
        t1: data end, where the density is evaluated; same default. A path that is
            ``singular_at_data`` (VP) requires ``t1 < 1``.
        divergence: ``exact`` (sum of ``d v_i / d x_i`` over all ``D`` dimensions, ``D`` backward passes
            per evaluation, for small data) or ``hutchinson`` (one vector-Jacobian product with a probe).
        probe: ``(N, ...)`` Hutchinson probe, one per trajectory (``E[eps eps^T] = I`` required for
            unbiasedness); default: drawn once from ``probe_distribution`` with ``generator``.
        probe_distribution: ``rademacher`` (+-1, the lowest-variance choice) or ``gaussian``.
        generator: source of the dequantisation noise (drawn first) and the probe (drawn second), drawn
            on the generator's device and moved to ``x``'s.
        dequantize: add ``U[0, 1)`` noise of one bin to discrete data and report NLL and bits/dim of
            the discrete ``bits``-bit data (module docstring).
        bits: bit depth of the discrete data (8 for images); used only with ``dequantize``.
        atol, rtol: tolerances of the adaptive methods.
        prior_logp: ``z (N, ...) -> (N,)`` log-density of the noise end ``p_{t0}``; default
            ``log N(z; 0, I)`` (module docstring: exact for Linear and GVP, approximate for VP).

    Returns:
        :class:`LikelihoodResult`.

    Raises:
        ValueError: for an unknown method, divergence or probe distribution, ``steps < 1``, an interval
            outside ``0 <= t0 < t1 <= 1`` (``t1 < 1`` for a ``singular_at_data`` path such as VP), a
            probe of the wrong shape, or, with ``dequantize``, data that are not on the ``bits``-bit grid.
        RuntimeError: if the field's velocity is not differentiable in ``x``.
    """
    _check_choice(method, ODE_METHODS, "method")
    _check_choice(divergence, DIVERGENCES, "divergence")
    _check_choice(probe_distribution, PROBE_DISTRIBUTIONS, "probe_distribution")
    if method not in ADAPTIVE_METHODS and int(steps) < 1:
        raise ValueError(f"steps must be >= 1 for method {method!r}; got {steps}")
    t0, t1 = _interval(field, t0, t1)
    n = x.shape[0]
    dims = x[0].numel()

    x = x.detach()
    bin_width = None
    if dequantize:
        bin_width = _check_pixel_grid(x, bits)
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=_draw_device(generator, x))
        x = x + bin_width * u.to(x.device)
    if divergence == "hutchinson":
        if probe is None:
            probe = _draw_probe(x, probe_distribution, generator)
        elif probe.shape != x.shape:
            raise ValueError(f"probe must have the shape of x {tuple(x.shape)}; got {tuple(probe.shape)}")
        probe = probe.to(dtype=x.dtype, device=x.device)

    # The ODE state packs (x, delta) as one (N, D + 1) tensor, so the sampler's own steppers apply.
    state = torch.cat([x.flatten(1), torch.zeros(n, 1, dtype=x.dtype, device=x.device)], dim=1)
    augmented = _AugmentedField(field, x.shape, probe)
    with torch.no_grad():
        if method in ADAPTIVE_METHODS:
            # data end -> noise end; lands on t0 exactly instead of stepping past it
            _, path = integrate_adaptive(
                lambda t, s: augmented.velocity(s, t), state, t1, t0, method=method, atol=atol, rtol=rtol
            )
            state = path[-1]
        else:
            # data end -> noise end on the sampler's uniform grid, reversed (as sample_ode(reverse=True))
            times = time_grid(t0=t0, t1=t1, steps=int(steps)).flip(0).tolist()
            for t, t_next in zip(times[:-1], times[1:], strict=True):
                state = ode_step(augmented, state, t, t_next, method)
    z, delta = state[:, :dims].reshape(x.shape), state[:, dims]
    nfe = augmented.nfe
    prior = standard_normal_logp(z) if prior_logp is None else prior_logp(z)
    log_density = prior + delta  # delta = int_{t1}^{t0} div v dt = -int_{t0}^{t1} div v dt
    nll = -log_density
    if bin_width is not None:
        nll = nll + dims * math.log(1.0 / bin_width)  # data units -> pixel units [0, 2^bits)
    return LikelihoodResult(
        nll_nats=nll,
        bits_per_dim=nll / (dims * math.log(2)),
        prior_z=z,
        nfe=nfe,
        t0=t0,
        t1=t1,
        log_density=log_density,
    )


def standard_normal_logp(z: Tensor) -> Tensor:
    """``(N,)`` ``log N(z; 0, I)`` for ``z`` of shape ``(N, ...)``, in nats."""
    dims = z[0].numel()
    return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * dims * math.log(2 * math.pi)


# ---- pieces ------------------------------------------------------------------------------------
class _AugmentedField:
    """The field of the packed state ``(x, delta)``: ``(v(x, t), div v(x, t))`` from one forward pass."""

    def __init__(self, field: VectorField, shape: torch.Size, probe: Tensor | None) -> None:
        self.field = field
        self.shape = shape
        self.dims = math.prod(shape[1:])
        self.probe = probe
        self.nfe = 0

    def velocity(self, state: Tensor, t: Tensor | float) -> Tensor:
        self.nfe += 1
        with torch.enable_grad():
            x_t = state[:, : self.dims].detach().reshape(self.shape).requires_grad_(True)
            v = self.field.velocity(x_t, t)  # the ONE forward pass of this evaluation
            if not v.requires_grad:
                raise RuntimeError(
                    "likelihood needs a field whose velocity is differentiable in x; the field returned a "
                    "tensor without a graph (is the model running under torch.no_grad or detaching?)"
                )
            div = _hutchinson(v, x_t, self.probe) if self.probe is not None else _exact_divergence(v, x_t)
        return torch.cat([v.detach().flatten(1), div.detach()[:, None]], dim=1)


def _hutchinson(v: Tensor, x: Tensor, probe: Tensor) -> Tensor:
    """``(N,)`` ``eps^T (dv/dx) eps``: one vector-Jacobian product."""
    (vjp,) = torch.autograd.grad(v, x, grad_outputs=probe)
    return (vjp * probe).flatten(1).sum(1)


def _exact_divergence(v: Tensor, x: Tensor) -> Tensor:
    """``(N,)`` ``sum_i d v_i / d x_i``: ``D`` backward passes through one forward pass."""
    v_flat = v.flatten(1)
    dims = v_flat.shape[1]
    div = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for i in range(dims):
        # Rows are independent, so the gradient of the batch sum gives each row's own derivative.
        (grad,) = torch.autograd.grad(v_flat[:, i].sum(), x, retain_graph=i < dims - 1)
        div = div + grad.flatten(1)[:, i]
    return div


def _draw_device(generator: torch.Generator | None, x: Tensor) -> torch.device:
    """Draw on the generator's device (a CPU generator then gives the same numbers for CUDA data)."""
    return x.device if generator is None else generator.device


def _draw_probe(x: Tensor, distribution: str, generator: torch.Generator | None) -> Tensor:
    device = _draw_device(generator, x)
    if distribution == "gaussian":
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    bits = torch.randint(0, 2, x.shape, generator=generator, device=device)
    return (2 * bits - 1).to(device=x.device, dtype=x.dtype)


def _interval(field: VectorField, t0: float | None, t1: float | None) -> tuple[float, float]:
    interpolant = field.interpolant
    d0, d1 = default_interval(interpolant, getattr(field, "prediction", "velocity"))
    t0 = d0 if t0 is None else float(t0)
    t1 = d1 if t1 is None else float(t1)
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"likelihood needs 0 <= t0 < t1 <= 1 (t0 noise, t1 data); got t0={t0}, t1={t1}")
    if interpolant.singular_at_data and t1 >= 1.0:
        raise ValueError(
            f"{type(interpolant).__name__} has sigma_1 = 0, where its velocity is singular "
            f"(singular_at_data); use t1 < 1 (default {d1}); got t1={t1}"
        )
    return t0, t1


def _check_pixel_grid(x: Tensor, bits: int) -> float:
    """Bin width ``Delta = 2 / (2^bits - 1)`` after checking that ``x = k Delta - 1`` for integer k."""
    if int(bits) < 1:
        raise ValueError(f"bits must be >= 1; got {bits}")
    levels = 2 ** int(bits)
    bin_width = (DATA_HIGH - DATA_LOW) / (levels - 1)
    k = (x - DATA_LOW) / bin_width
    off_grid = (k - k.round()).abs().max().item() if x.numel() else 0.0
    if (
        off_grid > GRID_TOLERANCE_BINS
        or k.min().item() < -GRID_TOLERANCE_BINS
        or k.max().item() > levels - 1 + GRID_TOLERANCE_BINS
    ):
        raise ValueError(
            f"dequantize=True expects {bits}-bit pixels scaled by x = 2 k / {levels - 1} - 1 "
            f"(k in 0..{levels - 1}); "
            f"the data are up to {off_grid:.3g} bins off that grid or outside [-1, 1]"
        )
    return bin_width


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}; got {value!r}")
