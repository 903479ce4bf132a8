"""ODE sampler: convergence orders, the distribution it reaches, reversibility, NFE, fields and grids.

Everything runs on the closed-form 2-D Gaussian mixture of ``gaussian_mixture.py`` in float64.
"""

from __future__ import annotations

import pytest
import torch
from gaussian_mixture import ExactField, GaussianMixture2D, default_mixture

from sit_lightning.interpolants import GVP, VP, Interpolant, Linear
from sit_lightning.sampling import (
    FIXED_STEP_NFE,
    FunctionField,
    ModelField,
    default_interval,
    sample_ode,
    shift_time,
    time_grid,
)
from sit_lightning.sampling.ode import ADAPTIVE_METHODS

PATHS = [Linear(), GVP(), VP()]
PATH_IDS = ["linear", "gvp", "vp"]
Z_BOUND = 4.0  # statistical bounds at 4 standard errors
MASS_BOUND = 0.02  # component masses within 2 percentage points


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture2D:
    return default_mixture()


def mixture_field(mixture: GaussianMixture2D, path: Interpolant) -> ExactField:
    return mixture.field(path)


def normals(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- the closed-form helper itself -------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_mixture_score_is_gradient_of_log_density(mixture: GaussianMixture2D, path: Interpolant) -> None:
    x = normals(200, 1) * 1.5
    t = torch.rand(200, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture.log_density(path, xg, t).sum(), xg)
    fields = mixture.fields(path, x, t)
    torch.testing.assert_close(fields.score, grad, rtol=1e-10, atol=1e-10)
    # velocity, noise and data are one field: the interpolant's conversions agree with them
    for target in ("velocity", "noise", "data"):
        converted = path.convert(fields.score, x, t, "score", target)
        torch.testing.assert_close(converted, getattr(fields, target), rtol=1e-9, atol=1e-9)
    # and the log density is normalised: at t = 1 it integrates to 1 on a grid
    side = torch.linspace(-6, 6, 241, dtype=torch.float64)
    xx = torch.cartesian_prod(side, side)
    mass = mixture.log_density(path, xx, 1.0).exp().sum() * (side[1] - side[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-6


def test_mixture_moments_match_its_exact_samples(mixture: GaussianMixture2D) -> None:
    x, _ = mixture.sample(40_000, torch.Generator().manual_seed(0))
    err = mixture.distribution_error(Linear(), x)
    assert err.worst_z() < Z_BOUND
    # a shifted sample must fail the same check (the check has power)
    assert mixture.distribution_error(Linear(), x + 0.05).worst_z() > Z_BOUND


# ---- accuracy per trajectory ---------------------------------------------------------------------
CONVERGENCE = [
    ("euler", (200, 400, 800), 1.8),
    ("midpoint", (50, 100, 200), 3.5),
    ("heun", (50, 100, 200), 3.5),
    ("rk4", (25, 50, 100), 12.0),
    ("rk4_38", (25, 50, 100), 12.0),
]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_fixed_step_methods_converge_at_their_order(mixture: GaussianMixture2D, path: Interpolant) -> None:
    field = mixture_field(mixture, path)
    noise = normals(64, 3)
    reference = sample_ode(field, noise, method="dopri5", atol=1e-10, rtol=1e-10).samples
    for method, step_counts, min_ratio in CONVERGENCE:
        errors = []
        for steps in step_counts:
            out = sample_ode(field, noise, method=method, steps=steps).samples
            errors.append(float((out - reference).norm(dim=1).median()))
        ratios = [errors[0] / errors[1], errors[1] / errors[2]]
        assert min(ratios) >= min_ratio, f"{method}: median errors {errors}, ratios {ratios}"


# ---- the distribution ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_heun_ode_samples_the_mixture(mixture: GaussianMixture2D, path: Interpolant) -> None:
    field = mixture_field(mixture, path)
    result = sample_ode(field, normals(20_000, 4), method="heun", steps=200)
    err = mixture.distribution_error(path, result.samples)
    assert err.worst_z() < Z_BOUND, err
    assert float(err.mass_error.abs().max()) < MASS_BOUND
    assert result.nfe == 400


# ---- reversibility -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_reverse_ode_returns_the_starting_noise(mixture: GaussianMixture2D, path: Interpolant) -> None:
    field = mixture_field(mixture, path)
    noise = normals(64, 5)
    data = sample_ode(field, noise, method="rk4", steps=200).samples
    back = sample_ode(field, data, method="rk4", steps=200, reverse=True)
    assert float((back.samples - noise).abs().max()) < 1e-4
    t0, t1 = default_interval(path)
    assert back.times[0] == t1 and back.times[-1] == t0


def test_adaptive_reverse_also_encodes(mixture: GaussianMixture2D) -> None:
    field = mixture_field(mixture, Linear())
    noise = normals(32, 6)
    data = sample_ode(field, noise, method="dopri5", atol=1e-9, rtol=1e-9).samples
    back = sample_ode(field, data, method="dopri5", atol=1e-9, rtol=1e-9, reverse=True).samples
    assert float((back - noise).abs().max()) < 1e-6


# ---- NFE -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(FIXED_STEP_NFE))
def test_fixed_step_nfe(mixture: GaussianMixture2D, method: str) -> None:
    field = mixture_field(mixture, Linear())
    field.nfe = 7  # the result reports what this call spent, not the field's running total
    result = sample_ode(field, normals(8, 0), method=method, steps=13, return_trajectory=True)
    assert result.nfe == FIXED_STEP_NFE[method] * 13
    assert field.nfe == 7 + result.nfe
    assert result.trajectory is not None and result.trajectory.shape == (14, 8, 2)
    assert torch.equal(result.trajectory[-1], result.samples)
    torch.testing.assert_close(result.times, torch.linspace(0, 1, 14, dtype=torch.float64))


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_adaptive_methods_report_the_field_nfe(mixture: GaussianMixture2D, method: str) -> None:
    path = Linear()
    field = mixture_field(mixture, path)
    noise = normals(16, 0)
    result = sample_ode(field, noise, method=method, atol=1e-6, rtol=1e-6)
    assert result.nfe == field.nfe > 10
    reference = sample_ode(field, noise, method="rk4", steps=200).samples
    assert float((result.samples - reference).abs().max()) < 1e-3
    assert result.trajectory is None


def test_released_heun_num_steps_maps_to_our_steps(mixture: GaussianMixture2D) -> None:
    # released heun2 with num_steps=126 grid points = our heun with steps=125 intervals = 250 NFE
    result = sample_ode(mixture_field(mixture, Linear()), normals(4, 0), method="heun", steps=125)
    assert result.nfe == 250 and result.times.numel() == 126


# ---- every prediction type samples the same -----------------------------------------------------
class MixtureModel(torch.nn.Module):
    """A "network" that outputs one prediction type of the exact mixture; records the t it saw."""

    def __init__(self, mixture: GaussianMixture2D, path: Interpolant, prediction: str) -> None:
        super().__init__()
        self.mixture, self.path, self.prediction = mixture, path, prediction
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.seen_t.append(t)
        return scale * getattr(self.mixture.fields(self.path, x, t), self.prediction)


@pytest.mark.parametrize("prediction", ["score", "noise", "data"])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_every_prediction_type_gives_the_velocity_models_samples(
    mixture: GaussianMixture2D, path: Interpolant, prediction: str
) -> None:
    noise = normals(32, 7)
    reference = ModelField(MixtureModel(mixture, path, "velocity"), path, "velocity", scale=1.0)
    model = MixtureModel(mixture, path, prediction)
    field = ModelField(model, path, prediction, scale=1.0)
    t0, t1 = default_interval(path, prediction)
    assert (t0, t1) == ((0.0, 1 - 1e-3) if isinstance(path, VP) else (1e-3, 1 - 1e-3))
    for method in [*FIXED_STEP_NFE, "dopri5"]:
        expected = sample_ode(reference, noise, method=method, steps=10, t0=t0, t1=t1).samples
        got = sample_ode(field, noise, method=method, steps=10, t0=t0, t1=t1).samples
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    # default interval follows the field's prediction type
    assert sample_ode(field, noise, method="euler", steps=4).times[0] == t0
    assert all(t.shape == (32,) and t.dtype == torch.float64 for t in model.seen_t)


def test_model_kwargs_reach_the_model(mixture: GaussianMixture2D) -> None:
    path = Linear()
    noise = normals(8, 0)
    model = MixtureModel(mixture, path, "velocity")
    plain = sample_ode(ModelField(model, path), noise, method="euler", steps=1).samples
    doubled = sample_ode(ModelField(model, path, scale=2.0), noise, method="euler", steps=1).samples
    # one Euler step with the velocity doubled moves exactly twice as far
    torch.testing.assert_close(doubled - noise, 2 * (plain - noise), rtol=1e-12, atol=1e-12)


# ---- grids ---------------------------------------------------------------------------------------
def test_shifted_grid_puts_steps_near_noise_for_small_shift() -> None:
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_time(u, 1.0), u)
    shifted = time_grid(0.0, 1.0, 10, grid="shifted", shift=0.3)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert bool((shifted[1:] > shifted[:-1]).all())
    assert float(shifted[5]) == pytest.approx(0.3 * 0.5 / (1 - 0.7 * 0.5))
    assert float(shifted[1] - shifted[0]) < 0.1 < float(shifted[-1] - shifted[-2])
    # mapped onto [t0, t1]
    g = time_grid(0.2, 0.8, 4, grid="shifted", shift=2.0)
    torch.testing.assert_close(g, 0.2 + 0.6 * shift_time(torch.linspace(0, 1, 5, dtype=torch.float64), 2.0))


def test_shifted_grid_sampling_uses_that_grid(mixture: GaussianMixture2D) -> None:
    field = mixture_field(mixture, Linear())
    result = sample_ode(field, normals(4, 0), method="euler", steps=10, grid="shifted", shift=0.3)
    torch.testing.assert_close(result.times, time_grid(0.0, 1.0, 10, grid="shifted", shift=0.3))


# ---- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "rk45"}, "method must be one of"),
        ({"grid": "cosine"}, "grid must be one of"),
        ({"grid": "shifted", "shift": 0.0}, "shift must be"),
        ({"shift": 0.5}, "needs grid='shifted'"),
        ({"steps": 0}, "steps must be"),
        ({"t0": 0.5, "t1": 0.2}, "need 0 <= t0 < t1 <= 1"),
        ({"method": "dopri5", "atol": 0.0}, "atol and rtol must be > 0"),
    ],
)
def test_bad_settings_raise_with_the_allowed_values(
    mixture: GaussianMixture2D, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        sample_ode(mixture_field(mixture, Linear()), normals(2, 0), **kwargs)


def test_model_field_rejects_unknown_prediction() -> None:
    with pytest.raises(ValueError, match="prediction must be one of"):
        ModelField(lambda x, t: x, "linear", "epsilon")  # type: ignore[arg-type]


def test_function_field_counts_and_converts(mixture: GaussianMixture2D) -> None:
    path = GVP()
    x, t = normals(16, 9), torch.full((16,), 0.3, dtype=torch.float64)
    exact = mixture.fields(path, x, t)
    converted = FunctionField(lambda x, t: mixture.velocity(path, x, t), path)
    given = FunctionField(
        lambda x, t: mixture.velocity(path, x, t), path, score_fn=lambda x, t: mixture.score(path, x, t)
    )
    for field in (converted, given):
        v, s = field.velocity_and_score(x, 0.3)  # a scalar t reaches the function as (N,)
        torch.testing.assert_close(v, exact.velocity)
        torch.testing.assert_close(s, exact.score, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(field.velocity(x, t), exact.velocity)
        assert field.nfe == 2
        field.reset_nfe()
        assert field.nfe == 0


def test_fixed_step_methods_equal_torchdiffeqs_fixed_grid_solvers(mixture: GaussianMixture2D) -> None:
    # our name -> torchdiffeq's: released "heun2" = heun, released "rk4" = the 3/8 rule (rk4_38)
    from torchdiffeq import odeint

    path = VP()
    field = mixture_field(mixture, path)
    noise = normals(32, 8)
    grid = torch.linspace(0.0, 1 - 1e-3, 9, dtype=torch.float64)
    ours = {}
    for method, theirs in (
        ("euler", "euler"),
        ("midpoint", "midpoint"),
        ("heun", "heun2"),
        ("rk4_38", "rk4"),
    ):
        expected = odeint(lambda t, x: field.velocity(x, t), noise, grid, method=theirs)[-1]
        ours[method] = sample_ode(field, noise, method=method, steps=8, t0=0.0, t1=1 - 1e-3).samples
        torch.testing.assert_close(ours[method], expected, rtol=1e-12, atol=1e-12)
    # the classic RK4 is a different method (the name mapping matters at this step count)
    classic = sample_ode(field, noise, method="rk4", steps=8, t0=0.0, t1=1 - 1e-3).samples
    assert float((classic - ours["rk4_38"]).abs().max()) > 1e-6
