"""The documented extension point: a user's own interpolant (two schedules) used end to end.

The path below is defined by ``alpha`` and ``sigma`` only. The objective trains on it, the conversions
turn its exact noise prediction into a velocity, and the ODE sampler carries N(0, I) noise to the
data distribution, all without any code knowing the path.
"""

from __future__ import annotations

import math

import torch

from gaussian_closed_form import exact_fields, rotated_gaussian
from sit_lightning.interpolants import Interpolant
from sit_lightning.objective import TrainingObjective
from sit_lightning.sampling import ModelField, sample_ode


class SquaredTrig(Interpolant):
    name = "squared_trig"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * t) ** 2

    def sigma(self, t):
        return torch.cos(0.5 * math.pi * t) ** 2


def test_custom_path_trains_and_samples_end_to_end() -> None:
    path = SquaredTrig()
    mean, cov = rotated_gaussian(2, seed=4)
    objective = TrainingObjective(path, "noise")
    # a custom path is treated like Linear/GVP: score/noise models clip both ends by 1e-3
    assert objective.train_interval() == (1e-3, 1 - 1e-3)

    def noise_model(x_t, t):  # the Bayes-optimal noise predictor for this path and data
        return exact_fields(path, mean, cov, x_t, t).noise

    # 1) training: the exact predictor has a lower loss than a slightly wrong one (paired Monte Carlo)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    x_1 = mean + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    t = objective.sample_time(n, generator=g).double()
    x_0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    exact = objective.loss(noise_model, x_1, t=t, x_0=x_0).loss
    wrong = objective.loss(lambda x, tt: 1.2 * noise_model(x, tt), x_1, t=t, x_0=x_0).loss
    diff = wrong - exact
    assert diff.mean() > 5 * diff.std() / math.sqrt(n)

    # 2) sampling: noise model -> velocity by the path's conversions -> Heun ODE -> the data law.
    # t0 = 0 needs alpha = 0 handled: the noise->velocity conversion divides by alpha, so start at 1e-3.
    m = 20_000
    z = torch.randn(m, 2, generator=g, dtype=torch.float64)
    # x at t0 = 1e-3 is essentially noise (alpha = 2.5e-6); start there from exact x_t0 draws
    t0, t1 = 1e-3, 1.0 - 1e-3
    a0, s0 = (
        path.alpha(torch.tensor(t0, dtype=torch.float64)),
        path.sigma(torch.tensor(t0, dtype=torch.float64)),
    )
    x_data = mean + torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    start = a0 * x_data + s0 * z
    field = ModelField(noise_model, path, prediction="noise")
    result = sample_ode(field, start, method="heun", steps=200, t0=t0, t1=t1)
    assert result.nfe == 400
    # at t1 the law is N(a1 m, a1^2 S + s1^2 I)
    a1, s1 = (
        path.alpha(torch.tensor(t1, dtype=torch.float64)),
        path.sigma(torch.tensor(t1, dtype=torch.float64)),
    )
    target_mean = a1 * mean
    target_cov = a1**2 * cov + s1**2 * torch.eye(2, dtype=torch.float64)
    samples = result.samples
    se_mean = torch.sqrt(torch.diag(target_cov) / m)
    assert torch.all((samples.mean(0) - target_mean).abs() < 4 * se_mean)
    emp_cov = torch.cov(samples.T)
    # SE of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / m) for Gaussian data
    se_cov = torch.sqrt((torch.outer(torch.diag(target_cov), torch.diag(target_cov)) + target_cov**2) / m)
    assert torch.all((emp_cov - target_cov).abs() < 4 * se_cov)
