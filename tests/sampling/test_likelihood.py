"""Likelihood by the probability-flow ODE against closed-form Gaussian densities (float64, CPU).

Data ~ N(m, S) with a rotated, anisotropic S in 4 dimensions: x_t is N(alpha m, alpha^2 S + sigma^2 I),
so the exact velocity and log p_t are known (tests/gaussian_closed_form.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from gaussian_closed_form import exact_fields, log_density, rotated_gaussian
from sit_lightning.interpolants import GVP, VP, Interpolant, Linear
from sit_lightning.sampling.field import FunctionField, ModelField
from sit_lightning.sampling.likelihood import likelihood, standard_normal_logp

DIM = 4
F64 = torch.float64
MEAN, COV = rotated_gaussian(DIM, seed=0)
#: Acceptance bound: nats per dimension between the ODE's NLL and the exact log-density.
NATS_PER_DIM_TOL = 1e-3


def gaussian_field(path: Interpolant, times_seen: list[float] | None = None) -> FunctionField:
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if times_seen is not None:
            times_seen.extend(t.tolist())
        return exact_fields(path, MEAN, COV, x, t).velocity

    return FunctionField(velocity, path)


def points_at(path: Interpolant, t1: float, n: int, seed: int) -> torch.Tensor:
    """``n`` draws of x_{t1} = alpha x_1 + sigma x_0 (exactly distributed as p_{t1})."""
    g = torch.Generator().manual_seed(seed)
    x_1 = MEAN + torch.randn(n, DIM, generator=g, dtype=F64) @ torch.linalg.cholesky(COV).T
    x_0 = torch.randn(n, DIM, generator=g, dtype=F64)
    t = torch.tensor(t1, dtype=F64)
    return path.alpha(t) * x_1 + path.sigma(t) * x_0


def exact_nll(path: Interpolant, x: torch.Tensor, t: float) -> torch.Tensor:
    return -log_density(path, MEAN, COV, x, torch.full((x.shape[0],), t, dtype=F64))


@pytest.mark.parametrize(
    ("path", "method", "steps"),
    [(Linear(), "rk4", 16), (GVP(), "rk4", 16), (VP(), "dopri5", 1)],
    ids=["linear", "gvp", "vp"],
)
def test_exact_divergence_matches_closed_form_density(path: Interpolant, method: str, steps: int) -> None:
    times_seen: list[float] = []
    field = gaussian_field(path, times_seen)
    t1 = 1.0 if not isinstance(path, VP) else 1.0 - 1e-3
    x = points_at(path, t1, n=32, seed=1)
    # VP's t = 0 is not pure noise (alpha_0 = 0.0066): give the exact p_0 to test the integration,
    # then check that the default N(0, I) prior changes the result by exactly the prior mismatch.
    prior = (
        (lambda z: log_density(path, MEAN, COV, z, torch.zeros(z.shape[0], dtype=F64)))
        if isinstance(path, VP)
        else None
    )
    result = likelihood(field, x, method=method, steps=steps, divergence="exact", prior_logp=prior)
    assert (result.t0, result.t1) == (0.0, t1)  # the documented default endpoints
    assert 0.0 <= min(times_seen) and max(times_seen) <= t1  # never evaluated outside [t0, t1]
    err = (result.nll_nats - exact_nll(path, x, t1)).abs().max().item() / DIM
    assert err < NATS_PER_DIM_TOL, err
    assert torch.allclose(result.bits_per_dim, result.nll_nats / (DIM * math.log(2)))
    assert torch.equal(result.log_density, -result.nll_nats)
    if isinstance(path, VP):
        plain = likelihood(gaussian_field(path), x, method=method, steps=steps, divergence="exact")
        mismatch = standard_normal_logp(result.prior_z) - prior(result.prior_z)
        assert torch.allclose(plain.log_density - result.log_density, mismatch, atol=1e-4)
        assert mismatch.abs().max() > 1e-2  # the N(0, I) prior is visibly off for VP (mean ~ 1 here)


def test_fixed_step_rk4_converges_at_fourth_order() -> None:
    # Halving the step must cut the error by about 2^4 (a wrong sign or time would not converge at all).
    path = GVP()
    x = points_at(path, 1.0, n=16, seed=2)
    ref = exact_nll(path, x, 1.0)
    errs = [
        (likelihood(gaussian_field(path), x, steps=s, divergence="exact").nll_nats - ref).abs().max().item()
        for s in (8, 16)
    ]
    assert 10 < errs[0] / errs[1] < 25, errs


def test_hutchinson_is_unbiased_over_many_points() -> None:
    path = Linear()
    x = points_at(path, 1.0, n=256, seed=3)
    gen = torch.Generator().manual_seed(4)
    result = likelihood(gaussian_field(path), x, steps=16, divergence="hutchinson", generator=gen)
    errors = result.nll_nats - exact_nll(path, x, 1.0)
    stderr = errors.std() / math.sqrt(len(errors))
    assert stderr > 1e-3  # the estimator is noisy per point (it is not the exact trace)
    assert errors.mean().abs() < 3 * stderr, (errors.mean().item(), stderr.item())
    # The probe changes only the divergence integral, not the trajectory: same z as the exact run.
    exact = likelihood(gaussian_field(path), x, steps=16, divergence="exact")
    assert torch.allclose(result.prior_z, exact.prior_z, rtol=0, atol=1e-12)


def test_one_probe_per_trajectory_and_one_forward_per_evaluation() -> None:
    path = GVP()
    seen_probes: list[torch.Tensor] = []
    forwards = 0

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal forwards
        forwards += 1
        v = exact_fields(path, MEAN, COV, x, t).velocity
        v.register_hook(lambda grad: seen_probes.append(grad.clone()))  # the vector of the VJP
        return v

    field = FunctionField(velocity, path)
    x = points_at(path, 1.0, n=8, seed=5)
    result = likelihood(field, x, method="rk4", steps=5, generator=torch.Generator().manual_seed(6))
    assert result.nfe == 20 == forwards == field.nfe  # 5 steps x 4 stages, one forward each
    assert len(seen_probes) == 20
    first = seen_probes[0]
    assert set(first.unique().tolist()) == {-1.0, 1.0}  # Rademacher
    assert all(torch.equal(p, first) for p in seen_probes)  # drawn once, used at every evaluation

    # A caller-supplied probe is the one used, at every evaluation.
    seen_probes.clear()
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    likelihood(field, x, method="heun", steps=3, probe=probe)
    assert len(seen_probes) == 6 and all(torch.equal(p, probe) for p in seen_probes)


def test_exact_divergence_costs_one_forward_per_evaluation() -> None:
    path = Linear()
    field = gaussian_field(path)
    result = likelihood(field, points_at(path, 1.0, 4, seed=8), method="heun", steps=7, divergence="exact")
    assert result.nfe == field.nfe == 14


def test_model_field_with_noise_prediction() -> None:
    # A "network" that predicts the noise E[x_0 | x_t] exactly, through ModelField and its conversion;
    # the default interval for a noise model on Linear is (1e-3, 1 - 1e-3).
    path = Linear()

    def noise_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and y.shape == (x.shape[0],)
        return exact_fields(path, MEAN, COV, x, t).noise

    x = points_at(path, 1 - 1e-3, n=16, seed=9)
    field = ModelField(noise_model, path, prediction="noise", y=torch.zeros(16, dtype=torch.long))
    result = likelihood(field, x, steps=16, divergence="exact")
    assert (result.t0, result.t1) == (1e-3, 1 - 1e-3)
    # p_{t0} at t0 = 1e-3 is N(0.001 m, ...), not N(0, I): give it exactly.
    prior = lambda z: log_density(path, MEAN, COV, z, torch.full((z.shape[0],), 1e-3, dtype=F64))  # noqa: E731
    exact_prior = likelihood(field, x, steps=16, divergence="exact", prior_logp=prior)
    err = (exact_prior.nll_nats - exact_nll(path, x, 1 - 1e-3)).abs().max().item() / DIM
    assert err < NATS_PER_DIM_TOL, err
    assert (result.nll_nats - exact_prior.nll_nats).abs().max().item() / DIM < 5e-3


def test_dequantized_bits_per_dim_refers_to_8_bit_pixels() -> None:
    path = Linear()
    gen = torch.Generator().manual_seed(10)
    k = torch.randint(0, 256, (6, DIM), generator=gen)
    x = 2 * k.to(F64) / 255 - 1  # the documented scaling of 8-bit pixels to [-1, 1]
    deq = likelihood(gaussian_field(path), x, steps=12, divergence="exact", dequantize=True,
                     generator=torch.Generator().manual_seed(11))  # fmt: skip
    # Same uniform draw by hand: x + (2/255) u, then the change of variables to pixel units [0, 256).
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(11), dtype=F64)
    plain = likelihood(gaussian_field(path), x + 2 / 255 * u, steps=12, divergence="exact")
    assert torch.allclose(deq.log_density, plain.log_density, rtol=0, atol=1e-12)
    assert torch.allclose(deq.nll_nats, plain.nll_nats + DIM * math.log(127.5), rtol=0, atol=1e-10)
    # log2(127.5) = 6.994 bits per dimension between data-unit and pixel-unit bits/dim
    assert torch.allclose(deq.bits_per_dim - plain.bits_per_dim, torch.tensor(math.log2(127.5), dtype=F64))
    # Closed form: -log p(x + Delta u) in pixel units
    ref = exact_nll(path, x + 2 / 255 * u, 1.0) + DIM * math.log(127.5)
    assert ((deq.nll_nats - ref).abs() / DIM).max() < NATS_PER_DIM_TOL


def test_dequantize_rejects_data_off_the_pixel_grid() -> None:
    x = torch.rand(3, DIM, dtype=F64)  # data in [0, 1), not 2k/255 - 1
    with pytest.raises(ValueError, match="8-bit pixels"):
        likelihood(gaussian_field(Linear()), x, dequantize=True)


def test_bad_arguments_fail_with_the_allowed_values() -> None:
    x = torch.zeros(2, DIM, dtype=F64)
    with pytest.raises(ValueError, match="VP has sigma_1 = 0"):
        likelihood(gaussian_field(VP()), x, t1=1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        likelihood(gaussian_field(Linear()), x, method="rk45")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divergence must be one of"):
        likelihood(gaussian_field(Linear()), x, divergence="trace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probe must have the shape"):
        likelihood(gaussian_field(Linear()), x, probe=torch.ones(2, DIM + 1, dtype=F64))
    with pytest.raises(ValueError, match="0 <= t0 < t1 <= 1"):
        likelihood(gaussian_field(Linear()), x, t0=0.5, t1=0.5)
    detached = FunctionField(lambda x, t: exact_fields(Linear(), MEAN, COV, x, t).velocity.detach(), Linear())
    with pytest.raises(RuntimeError, match="differentiable"):
        likelihood(detached, x, steps=1)


def test_exact_divergence_through_the_sit_network_equals_the_jacobian_trace(golden: dict) -> None:
    # One Euler step from t1 to t0 gives delta = (t0 - t1) div v(x, t1): compare with the trace of the
    # network's full Jacobian, per sample, through ModelField (which must not switch gradients off).
    # float32: models/sit.py feeds float32 time features to its time MLP, so it cannot run in float64.
    from sit_lightning.models import SiT

    model = SiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10
    )
    state = {k.removeprefix("model."): v for k, v in golden.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    model = model.eval()
    x, y = golden["ode.noise"][:2], golden["ode.y"][:2]
    t1, t0 = 0.9, 0.2
    field = ModelField(model, Linear(), y=y)
    result = likelihood(field, x, method="euler", steps=1, t0=t0, t1=t1, divergence="exact")
    for i, (x_i, y_i) in enumerate(zip(x, y, strict=True)):

        def one_sample(xi: torch.Tensor, y_i: torch.Tensor = y_i) -> torch.Tensor:
            return model(xi[None], torch.full((1,), t1), y_i[None])[0]

        jac = torch.autograd.functional.jacobian(one_sample, x_i, vectorize=True)  # (C, H, W, C, H, W)
        trace = jac.reshape(x_i.numel(), x_i.numel()).diagonal().sum()
        delta = result.log_density[i] - standard_normal_logp(result.prior_z[i : i + 1])[0]
        assert torch.allclose(delta, (t0 - t1) * trace, rtol=1e-4, atol=1e-3), (delta, trace)
    expected_z = x + (t0 - t1) * model(x, torch.full((2,), t1), y)
    assert torch.allclose(result.prior_z, expected_z, rtol=1e-5, atol=1e-5)
    assert result.nfe == field.nfe == 1
