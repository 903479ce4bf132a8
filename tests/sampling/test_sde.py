"""SDE sampler: the distribution it reaches, the predicted bias of long last steps, NFE, noise sources,
diffusion coefficients and guards. Closed-form fields in float64 (``gaussian_mixture.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
from gaussian_mixture import ExactField, GaussianMixture2D, default_mixture

from sit_lightning.interpolants import GVP, VP, Interpolant, Linear
from sit_lightning.sampling import (
    DIFFUSIONS,
    RELEASED_FORMS,
    WKL,
    Constant,
    Decreasing,
    DiffusionCoefficient,
    IncreasingDecreasing,
    LinearDecay,
    ModelField,
    SigmaDiffusion,
    WKLEta,
    from_released,
    make_diffusion,
    sample_sde,
    time_grid,
)
from sit_lightning.sampling.sde import last_step_update

Z_BOUND = 4.0
SWEEP_SAMPLES = 3000  # 1000 steps x 35 settings: fewer samples than the ODE test, same 4-SE bounds
SDE_STEPS = 1000
PATHS = {"linear": Linear(), "gvp": GVP(), "vp": VP()}
# A loss table for w_kl_eta (per-dimension velocity MSE, larger near noise as for trained models).
ETA_TABLE = WKLEta(eta=0.5, loss_times=[0.0, 0.5, 1.0], loss_values=[1.2, 0.6, 0.3])


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture2D:
    return default_mixture()


def mixture_field(mixture: GaussianMixture2D, path: Interpolant) -> ExactField:
    return mixture.field(path)


def normals(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- the distribution: every method and coefficient, with no or a short enough last step ------------
# (path, method, diffusion, last_step, last_step_size). A last step is "short enough" when its bias
# (Gaussian analysis below) is far under one standard error at this sample size: D(t) h <= 0.05 on
# Linear/GVP; h = 1e-3 on VP.
_COEFFICIENTS = ("w_kl", "constant", "sigma", "linear", "decreasing", "increasing_decreasing", ETA_TABLE)
SWEEP = [
    # GVP and VP x every method x diffusion coefficient, with no last step (Linear: the 20k test below)
    *(
        (path, method, diffusion, "none", 0.0)
        for path in ("gvp", "vp")
        for method in ("euler", "heun")
        for diffusion in _COEFFICIENTS
    ),
    # every last step, each short enough for its form
    ("linear", "euler", "w_kl", "mean", 0.04),  # the paper's SDE setting: D(0.96) h = 0.0017
    ("linear", "euler", "linear", "euler", 0.04),
    ("linear", "euler", "increasing_decreasing", "tweedie", 0.04),
    ("linear", "euler", ETA_TABLE, "mean", 0.04),
    ("gvp", "euler", "sigma", "mean", 0.04),
    ("vp", "heun", "sigma", "mean", 1e-3),
    ("vp", "euler", "constant", "tweedie", 1e-3),
]


@pytest.mark.parametrize(("path_name", "method", "diffusion", "last_step", "h"), SWEEP)
def test_sde_samples_the_mixture(
    mixture: GaussianMixture2D,
    path_name: str,
    method: str,
    diffusion: str | DiffusionCoefficient,
    last_step: str,
    h: float,
) -> None:
    path = PATHS[path_name]
    field = mixture_field(mixture, path)
    kwargs = {"last_step_size": h} if last_step != "none" else {}
    result = sample_sde(
        field,
        normals(SWEEP_SAMPLES, 11),
        method=method,
        steps=SDE_STEPS,
        diffusion=diffusion,
        last_step=last_step,
        generator=torch.Generator().manual_seed(12),
        **kwargs,
    )
    assert bool(torch.isfinite(result.samples).all())
    err = mixture.distribution_error(path, result.samples)
    # masses are held to 4 SE like the moments; at 3000 samples 4 SE is ~3.5 points, so the ODE test's
    # 2-point bound (20k samples) would not be an honest bound here
    assert err.worst_z() < Z_BOUND, err
    stochastic = SDE_STEPS - (last_step != "none")
    assert result.nfe == (2 if method == "heun" else 1) * stochastic + (last_step != "none")


FULL_SAMPLES = 20_000  # the ODE test's sample size, so the 2-point mass bound is an honest one


@pytest.mark.parametrize("diffusion", _COEFFICIENTS, ids=lambda d: d if isinstance(d, str) else "w_kl_eta")
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_every_method_and_coefficient_meets_the_ode_bounds(
    mixture: GaussianMixture2D, method: str, diffusion: str | DiffusionCoefficient
) -> None:
    """Linear path, 1000 steps, 20k samples: mean and covariance within 4 SE, every mass within 2 points."""
    path = PATHS["linear"]
    result = sample_sde(
        mixture_field(mixture, path),
        normals(FULL_SAMPLES, 11),
        method=method,
        steps=SDE_STEPS,
        diffusion=diffusion,
        last_step="none",
        generator=torch.Generator().manual_seed(12),
    )
    err = mixture.distribution_error(path, result.samples)
    assert err.worst_z() < Z_BOUND, err
    assert float(err.mass_error.abs().max()) < 0.02, err


# ---- the bias of the paper's long last step, where it is not small --------------------------------
def gaussian_last_step(
    path: Interpolant,
    mean: torch.Tensor,
    cov: torch.Tensor,
    coefficient: DiffusionCoefficient,
    last: str,
    h: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance after the last step from exact ``x_t ~ N(alpha m, C_t)``, t = 1 - h.

    For Gaussian data every field is affine in x: with ``C = alpha^2 S + sigma^2 I``,
    ``v(x) = (d_alpha alpha S + d_sigma sigma I) C^{-1} (x - alpha m) + d_alpha m`` and
    ``s(x) = -C^{-1} (x - alpha m)``. So the step is ``x' = B x + c`` and ``Cov' = B C B^T``:
    mean: ``B = I + h (A_v - (w/2) C^{-1})``; euler: ``B = I + h A_v``; tweedie: ``B = alpha S C^{-1}``
    (Cov' = alpha^2 S C^{-1} S: the posterior mean misses the posterior covariance).
    """
    t = torch.tensor(1.0 - h, dtype=torch.float64)
    a, s, da, ds = (float(c) for c in path.coefficients(t))
    eye = torch.eye(2, dtype=torch.float64)
    c_t = a**2 * cov + s**2 * eye
    c_inv = torch.linalg.inv(c_t)
    a_v = (da * a * cov + ds * s * eye) @ c_inv
    if last == "tweedie":
        b, out_mean = a * cov @ c_inv, mean
    else:
        w = float(coefficient(t, path)) if last == "mean" else 0.0
        b = eye + h * (a_v - 0.5 * w * c_inv)
        out_mean = a * mean + h * da * mean
    return out_mean, b @ c_t @ b.T


# (path, coefficient, last step): the paper's h = 0.04 where the Gaussian analysis predicts a bias.
# constant(2) is the released "constant" at norm 1 (w = 2 D); VP's w_kl is the released SBDM.
BIASED = [
    ("linear", Constant(2.0), "mean"),
    ("gvp", Constant(2.0), "mean"),
    ("vp", WKL(), "mean"),
    ("vp", WKL(), "tweedie"),
]
GAUSS_MEAN = torch.tensor([0.5, -0.3], dtype=torch.float64)
GAUSS_COV = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)


def single_gaussian() -> GaussianMixture2D:
    return GaussianMixture2D(torch.ones(1), GAUSS_MEAN[None], GAUSS_COV[None])


@pytest.mark.parametrize(("path_name", "coefficient", "last"), BIASED)
def test_long_last_step_bias_has_the_predicted_sign_and_size(
    path_name: str, coefficient: DiffusionCoefficient, last: str
) -> None:
    path, h, n = PATHS[path_name], 0.04, 100_000
    gaussian = single_gaussian()
    field = mixture_field(gaussian, path)
    pred_mean, pred_cov = gaussian_last_step(path, GAUSS_MEAN, GAUSS_COV, coefficient, last, h)
    bias = torch.diagonal(pred_cov - GAUSS_COV)
    # the prediction: a variance deficit of several percent (the sign and size the test pins down)
    assert bool((bias < 0).all()) and float((bias / torch.diagonal(GAUSS_COV)).min()) < -0.03
    # the last step applied to exact x_{1-h} reproduces the prediction (within 4 SE at n = 100k)
    g = torch.Generator().manual_seed(21)
    t = torch.tensor(1.0 - h, dtype=torch.float64)
    x1, _ = gaussian.sample(n, g)
    x_t = path.alpha(t) * x1 + path.sigma(t) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = last_step_update(field, x_t, 1.0 - h, h, last, float(coefficient(t, path)))
    emp_var = out.var(0)
    se = emp_var * math.sqrt(2 / n)
    assert bool(((emp_var - torch.diagonal(pred_cov)).abs() < Z_BOUND * se).all()), (emp_var, pred_cov)
    assert bool(((out.mean(0) - pred_mean).abs() < Z_BOUND * out.std(0) / math.sqrt(n)).all())
    assert bool((emp_var - torch.diagonal(GAUSS_COV) < -Z_BOUND * se).all())  # measurably too small


def test_full_sde_with_constant_and_a_long_mean_step_ends_with_the_predicted_variance() -> None:
    path, coefficient, n = Linear(), Constant(2.0), 4000
    gaussian = single_gaussian()
    result = sample_sde(
        mixture_field(gaussian, path),
        normals(n, 31),
        steps=SDE_STEPS,
        diffusion=coefficient,
        last_step="mean",
        generator=torch.Generator().manual_seed(32),
    )
    _, pred_cov = gaussian_last_step(path, GAUSS_MEAN, GAUSS_COV, coefficient, "mean", 0.04)
    var = result.samples.var(0)
    se = var * math.sqrt(2 / n)
    assert bool(((var - torch.diagonal(pred_cov)).abs() < Z_BOUND * se).all()), (var, pred_cov)
    # the smaller-variance axis shows the deficit beyond noise: -0.08 on 0.5 is about 7 SE here
    assert float(var[1] - GAUSS_COV[1, 1]) < -Z_BOUND * float(se[1])


# ---- guards ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path_name", ["linear", "gvp"])
def test_w_kl_from_t0_zero_is_finite_and_stable(mixture: GaussianMixture2D, path_name: str) -> None:
    # the released code returns NaN here (w_KL(0) = inf for a velocity model on Linear/GVP)
    path = PATHS[path_name]
    assert math.isinf(float(WKL()(torch.tensor(0.0, dtype=torch.float64), path)))
    result = sample_sde(
        mixture_field(mixture, path), normals(2000, 41), steps=100, generator=torch.Generator().manual_seed(0)
    )
    assert result.times[0] == 0.0
    assert bool(torch.isfinite(result.samples).all())
    assert float(result.samples.abs().max()) < 10.0


def test_velocity_model_heun_reaches_t1_without_nan(mixture: GaussianMixture2D) -> None:
    # the score of a converted velocity model is 0/0 at sigma = 0; the drift there is the velocity
    path = Linear()
    model = lambda x, t: mixture.velocity(path, x, t)  # noqa: E731
    for diffusion in ("constant", "sigma", "increasing_decreasing"):
        result = sample_sde(
            ModelField(model, path),
            normals(64, 0),
            method="heun",
            steps=20,
            diffusion=diffusion,
            last_step="none",
            generator=torch.Generator().manual_seed(0),
        )
        assert result.times[-1] == 1.0 and bool(torch.isfinite(result.samples).all()), diffusion


# ---- NFE, noise sources, prediction types --------------------------------------------------------
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("last_step", ["none", "mean", "tweedie", "euler"])
def test_sde_nfe_counts(mixture: GaussianMixture2D, method: str, last_step: str) -> None:
    field = mixture_field(mixture, Linear())
    field.nfe = 3
    result = sample_sde(
        field, normals(4, 0), method=method, steps=25, last_step=last_step, generator=torch.Generator()
    )
    has_last = last_step != "none"
    expected = (2 if method == "heun" else 1) * (25 - has_last) + has_last
    assert result.nfe == expected and field.nfe == 3 + expected
    assert result.times.numel() == 26
    if has_last:  # 24 stochastic steps on [0, 0.96], then the last step to 1
        assert result.times[-2] == pytest.approx(0.96) and result.times[-1] == 1.0


def test_euler_maruyama_250_steps_is_250_nfe(mixture: GaussianMixture2D) -> None:
    result = sample_sde(mixture_field(mixture, Linear()), normals(4, 0), generator=torch.Generator())
    assert result.nfe == 250


def test_noise_sources_agree(mixture: GaussianMixture2D) -> None:
    field = mixture_field(mixture, GVP())
    noise = normals(16, 1)
    steps = 12
    recorded = torch.randn(steps - 1, 16, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    from_tensor = sample_sde(field, noise, steps=steps, normals=recorded, return_trajectory=True)
    from_callable = sample_sde(field, noise, steps=steps, normals=lambda k, shape: recorded[k])
    from_generator = sample_sde(field, noise, steps=steps, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(from_tensor.samples, from_callable.samples, rtol=0, atol=0)
    # a generator draws step by step in the same order as one (steps - 1, N, 2) draw
    torch.testing.assert_close(from_tensor.samples, from_generator.samples, rtol=0, atol=0)
    assert from_tensor.trajectory is not None and from_tensor.trajectory.shape == (steps + 1, 16, 2)
    other = sample_sde(field, noise, steps=steps, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(other.samples, from_tensor.samples)
    with pytest.raises(ValueError, match="normals holds 3 steps"):
        sample_sde(field, noise, steps=steps, normals=recorded[:3])


class ExactModel(torch.nn.Module):
    def __init__(self, mixture: GaussianMixture2D, path: Interpolant, prediction: str) -> None:
        super().__init__()
        self.mixture, self.path, self.prediction = mixture, path, prediction

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return getattr(self.mixture.fields(self.path, x, t), self.prediction)


@pytest.mark.parametrize("path_name", ["linear", "gvp", "vp"])
def test_every_prediction_type_samples_the_same_sde(mixture: GaussianMixture2D, path_name: str) -> None:
    path = PATHS[path_name]
    noise = normals(32, 2)
    recorded = torch.randn(9, 32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    settings = {"steps": 10, "normals": recorded, "t0": 1e-3, "t1": 1 - 1e-3}
    reference = ModelField(ExactModel(mixture, path, "velocity"), path, "velocity")
    for prediction in ("score", "noise", "data"):
        field = ModelField(ExactModel(mixture, path, prediction), path, prediction)
        for method in ("euler", "heun"):
            for last_step in ("mean", "tweedie"):
                kw = dict(settings, method=method, last_step=last_step, diffusion="sigma")
                expected = sample_sde(reference, noise, **kw).samples
                torch.testing.assert_close(
                    sample_sde(field, noise, **kw).samples, expected, rtol=1e-8, atol=1e-8
                )


# ---- diffusion coefficients -------------------------------------------------------------------------
def test_diffusion_forms_are_the_documented_functions() -> None:
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    for path in PATHS.values():
        a, s, da, ds = path.coefficients(t)
        torch.testing.assert_close(WKL(0.5)(t, path), 0.5 * 2 * s * (da * s / a - ds))
        torch.testing.assert_close(Constant(3.0)(t, path), torch.full_like(t, 3.0))
        torch.testing.assert_close(SigmaDiffusion(2.0)(t, path), 2 * s)
        torch.testing.assert_close(LinearDecay(2.0)(t, path), 2 * (1 - t))
        torch.testing.assert_close(IncreasingDecreasing()(t, path), torch.sin(math.pi * t) ** 2)
        torch.testing.assert_close(Decreasing(0.7)(t, path), 0.5 * (0.7 * torch.cos(math.pi * t) + 1) ** 2)
    assert set(DIFFUSIONS) == {"constant", "w_kl", "sigma", "linear", "decreasing", "increasing_decreasing"}


def test_from_released_is_twice_the_released_D() -> None:
    # The released D (reference sheet §3.2), written out independently of our classes.
    t = torch.linspace(0.05, 0.95, 5, dtype=torch.float64)
    for path in PATHS.values():
        a, s, da, ds = path.coefficients(t)
        for norm in (0.5, 1.0, 2.0):
            released = {
                "constant": torch.full_like(t, norm),
                "SBDM": norm * s * (da * s / a - ds),
                "sigma": norm * s,
                "linear": norm * (1 - t),
                "decreasing": 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2,
                "increasing-decreasing": norm * torch.sin(math.pi * t) ** 2,
            }
            assert set(released) == set(RELEASED_FORMS)
            for form, d in released.items():
                torch.testing.assert_close(from_released(form, norm)(t, path), 2 * d)


def test_w_kl_eta_follows_eq_14() -> None:
    path = Linear()
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    loss = torch.tensor([1.2, 0.6, 0.3], dtype=torch.float64)
    coefficient = WKLEta(eta=0.5, loss_times=[0.2, 0.5, 0.8], loss_values=loss.tolist(), norm=1.5)
    # the table: linear inside, held constant beyond its ends
    table = coefficient.loss_at(t)
    assert float(table[0]) == 1.2 and float(table[1]) == 1.2 and float(table[-1]) == 0.3
    assert float(table[5]) == pytest.approx(0.6) and float(table[3]) == pytest.approx(1.0)
    w_kl = path.w_kl(t)
    inner = slice(1, None)
    expected = 1.5 * w_kl[inner] * table[inner] / (table[inner] + 2 * 0.5 * w_kl[inner] ** 2)
    torch.testing.assert_close(coefficient(t, path)[inner], expected)
    assert float(coefficient(t, path)[0]) == 0.0  # finite where w_KL is infinite (its limit)
    assert bool((coefficient(t, path)[inner] <= 1.5 * w_kl[inner]).all())
    # eta = 0 is w_KL
    torch.testing.assert_close(WKLEta(0.0, [0.5], [1.0])(t, path), WKL()(t, path))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: make_diffusion("sbdm"), "diffusion must be a DiffusionCoefficient or one of"),
        (lambda: make_diffusion("w_kl_eta"), "w_kl_eta needs eta"),
        (lambda: make_diffusion(WKL(), norm=2.0), "set the norm on the instance"),
        (lambda: Constant(-1.0), "norm must be a finite number >= 0"),
        (lambda: WKLEta(-0.1, [0.5], [1.0]), "eta must be"),
        (lambda: WKLEta(1.0, [0.5, 0.2], [1.0, 1.0]), "strictly increasing"),
        (lambda: WKLEta(1.0, [0.5], [0.0]), "finite and > 0"),
        (lambda: from_released("inccreasing-decreasing"), "released diffusion_form must be one of"),
    ],
)
def test_bad_diffusion_settings_raise(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "milstein"}, "method must be one of"),
        ({"last_step": "Mean"}, "last_step must be one of"),
        ({"last_step_size": 0.0}, "last_step_size must be in"),
        ({"steps": 1}, "steps must be an integer >= 2"),
        ({"normals": torch.zeros(5, 2, 2), "generator": torch.Generator()}, "either normals or generator"),
        ({"normals": lambda k, shape: torch.zeros(3)}, "must have shape"),
    ],
)
def test_bad_sde_settings_raise(mixture: GaussianMixture2D, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample_sde(mixture_field(mixture, Linear()), normals(2, 0), **{"steps": 5, **kwargs})


def test_sde_shifted_grid(mixture: GaussianMixture2D) -> None:
    result = sample_sde(
        mixture_field(mixture, Linear()),
        normals(4, 0),
        steps=11,
        grid="shifted",
        shift=0.3,
        generator=torch.Generator(),
    )
    expected = torch.cat(
        [time_grid(0.0, 0.96, 10, grid="shifted", shift=0.3), torch.ones(1, dtype=torch.float64)]
    )
    torch.testing.assert_close(result.times, expected)
