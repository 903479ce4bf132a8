"""Interpolants: derivatives, conversions and closed-form Gaussian fields (float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gaussian_closed_form import exact_fields, log_density, rotated_gaussian
from sit_lightning.interpolants import (
    GVP,
    INTERPOLANTS,
    PREDICTIONS,
    VP,
    DefaultEps,
    Interpolant,
    Linear,
    PathCoefficients,
    broadcast_time,
    make_interpolant,
)

REL = 1e-10


class SquaredTrig(Interpolant):
    """A user's own path: two schedules, derivatives by autograd."""

    name = "squared_trig"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * t) ** 2

    def sigma(self, t):
        return torch.cos(0.5 * math.pi * t) ** 2


PATHS = [Linear(), GVP(), VP(), SquaredTrig()]
IDS = ["linear", "gvp", "vp", "custom"]
T = torch.linspace(1e-3, 1 - 1e-3, 257, dtype=torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_derivatives_equal_autograd(path: Interpolant) -> None:
    c = path.coefficients(T)
    assert isinstance(c, PathCoefficients)
    t = T.clone().requires_grad_(True)
    (d_alpha,) = torch.autograd.grad(path.alpha(t).sum(), t)
    (d_sigma,) = torch.autograd.grad(path.sigma(t).sum(), t)
    assert rel(c.d_alpha_t, d_alpha) < REL
    assert rel(c.d_sigma_t, d_sigma) < REL


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_custom_derivatives_match_closed_form_by_finite_difference(path: Interpolant) -> None:
    # independent of autograd: a central difference of the schedules
    h = 1e-6
    t = T[5:-5]
    fd_alpha = (path.alpha(t + h) - path.alpha(t - h)) / (2 * h)
    fd_sigma = (path.sigma(t + h) - path.sigma(t - h)) / (2 * h)
    assert rel(path.d_alpha(t), fd_alpha) < 1e-7
    assert rel(path.d_sigma(t), fd_sigma) < 1e-7


def test_endpoints_and_variance_preservation() -> None:
    zero, one = torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    for path in (Linear(), GVP()):
        assert path.alpha(zero).item() == 0 and path.sigma(zero).item() == 1
        assert path.alpha(one).item() == 1 and abs(path.sigma(one).item()) < 1e-16
    for path in (GVP(), VP()):
        c = path.coefficients(T)
        assert torch.allclose(c.alpha_t**2 + c.sigma_t**2, torch.ones_like(T), atol=1e-14)
    # VP does not start at pure noise: alpha_0 = exp(-(beta_max - beta_min)/4 - beta_min/2)
    assert VP().alpha(zero).item() == pytest.approx(math.exp(-0.25 * 19.9 - 0.05), rel=1e-14)


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_conversions_round_trip(path: Interpolant) -> None:
    # The custom path has sigma ~ (1 - t)^2 near data, so score -> data -> score loses ~1/sigma^2 digits at
    # t = 1 - 1e-3 (the data prediction carries almost no information about the score there): an
    # ill-conditioned map, not an error. It is checked on the interior instead.
    t = T if not isinstance(path, SquaredTrig) else torch.linspace(0.05, 0.95, 257, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t.shape[0], 3, 4, 4, generator=g, dtype=torch.float64)
    for source, target in itertools.permutations(PREDICTIONS, 2):
        pred = torch.randn(x.shape, generator=g, dtype=torch.float64)
        back = path.convert(path.convert(pred, x, t, source, target), x, t, target, source)
        assert rel(back, pred) < REL, (source, target)


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_conversions_of_exact_gaussian_velocity(path: Interpolant) -> None:
    """On N(m, S) with non-diagonal S, converting the exact velocity gives the exact score, noise, data."""
    mean, cov = rotated_gaussian(3, seed=0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T.shape[0], 3, generator=g, dtype=torch.float64) * 2
    f = exact_fields(path, mean, cov, x, T)
    for target in ("score", "noise", "data"):
        got = path.convert(f.velocity, x, T, "velocity", target)
        assert rel(got, getattr(f, target)) < REL, target
    # and the exact score is the gradient of the exact log density (an independent check of the helper)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_density(path, mean, cov, xg, T).sum(), xg)
    assert rel(f.score, grad) < REL


def test_w_kl_closed_forms() -> None:
    t = T
    assert rel(Linear().w_kl(t), 2 * (1 - t) / t) < REL
    assert rel(GVP().w_kl(t), math.pi / torch.tan(0.5 * math.pi * t)) < REL
    vp = VP()
    # the VP override equals the generic formula of the base class
    assert rel(vp.w_kl(t), Interpolant.w_kl(vp, t)) < REL


def test_golden_paths(golden: dict) -> None:
    t = golden["paths.t"]
    for name in ("Linear", "GVP", "VP"):
        path = make_interpolant(name)
        c = path.coefficients(t)
        for field, ours in zip(("alpha", "sigma", "d_alpha", "d_sigma"), c, strict=True):
            assert rel(ours, golden[f"paths.{name}.{field}"]) < 1e-12, (name, field)
        # paper's w_KL = 2 * released SBDM diffusion D
        assert rel(path.w_kl(t) / 2, golden[f"paths.{name}.sbdm_D"]) < 1e-12, name
        score = path.convert(golden["paths.v"], golden["paths.x"], t, "velocity", "score")
        assert rel(score, golden[f"paths.{name}.score_from_velocity"]) < 1e-12, name


def test_float32_and_float64_agree() -> None:
    x = torch.randn(T.shape[0], 2, dtype=torch.float64)
    v = torch.randn(T.shape[0], 2, dtype=torch.float64)
    for path in (Linear(), GVP(), VP()):
        s64 = path.convert(v, x, T, "velocity", "score")
        s32 = path.convert(v.float(), x.float(), T.float(), "velocity", "score")
        assert s32.dtype == torch.float32
        assert rel(s32.double(), s64) < 1e-4


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="'cosine'"):
        make_interpolant("cosine")
    with pytest.raises(ValueError, match="one of .*velocity.*got 'logits'"):
        Linear().convert(torch.zeros(1), torch.zeros(1), 0.5, "logits", "velocity")
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        broadcast_time(torch.zeros(3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="beta_min"):
        VP(beta_min=5, beta_max=1)


def test_released_endpoint_policy() -> None:
    # released create_transport / Transport.check_interval: eps per path and prediction, and the clipped ends
    for path in (Linear(), GVP(), SquaredTrig()):
        assert path.default_eps("velocity") == (0.0, 0.0)
        for prediction in ("score", "noise", "data"):
            assert path.default_eps(prediction) == (1e-3, 1e-3)
        assert path.interval(1e-3) == (1e-3, 1 - 1e-3)
        assert path.interval(0.0) == (0.0, 1.0)
    for prediction in PREDICTIONS:
        assert VP().default_eps(prediction) == (1e-5, 1e-3)
    assert VP().interval(1e-3) == (0.0, 1 - 1e-3)  # alpha_0 > 0: only the data end is clipped
    assert VP().default_eps("noise").sample_eps == 1e-3
    assert VP().interval(1e-3).t1 == 1 - 1e-3


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_declared_ends_match_the_schedules(path: Interpolant) -> None:
    # the declarations are facts about alpha and sigma: alpha_0 > 0 leaves t = 0 usable; d_sigma is
    # infinite at t = 1 exactly when the path says it is singular there
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    assert path.clips_noise_end == (path.alpha(zero).item() == 0.0)
    assert path.singular_at_data == (not math.isfinite(path.d_sigma(one).item()))


def test_registry_is_built_from_the_class_names() -> None:
    assert INTERPOLANTS == {"linear": Linear, "gvp": GVP, "vp": VP}
    for name, cls in INTERPOLANTS.items():
        assert cls.name == name
        assert type(make_interpolant(name.upper())) is cls
    with pytest.raises(ValueError, match=r"one of \('linear', 'gvp', 'vp'\); got 'cosine'"):
        make_interpolant("cosine")


def test_bad_end_declarations_fail_at_class_definition() -> None:
    with pytest.raises(
        TypeError, match=r"Singular.velocity_eps entries must be in \(0, 0.5\) since singular"
    ):

        class Singular(SquaredTrig):
            singular_at_data = True  # but keeps the velocity default (0, 0): would evaluate t = 1

    with pytest.raises(TypeError, match=r"Wide.converted_eps entries must be in \[0, 0.5\)"):

        class Wide(SquaredTrig):
            converted_eps = (0.5, 1e-3)

    with pytest.raises(TypeError, match="must be a pair"):

        class Single(SquaredTrig):
            velocity_eps = 1e-3

    class Plain(SquaredTrig):
        velocity_eps = (1e-4, 2e-4)  # a plain pair is accepted and named

    assert Plain().default_eps("velocity") == DefaultEps(train_eps=1e-4, sample_eps=2e-4)
    with pytest.raises(ValueError, match="eps must be in"):
        Linear().interval(0.5)
    with pytest.raises(ValueError, match="prediction must be one of .*got 'logits'"):
        Linear().default_eps("logits")
