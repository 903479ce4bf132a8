"""Closed-form fields for Gaussian data N(m, S) under any affine path (float64).

With x_1 ~ N(m, S) and x_0 ~ N(0, I) independent, x_t = alpha x_1 + sigma x_0 is N(mu_t, C_t) with
mu_t = alpha m and C_t = alpha^2 S + sigma^2 I, and by Gaussian conditioning

    E[x_0 | x_t] = sigma C_t^{-1} (x_t - mu_t),
    E[x_1 | x_t] = m + alpha S C_t^{-1} (x_t - mu_t),
    score        = -C_t^{-1} (x_t - mu_t),
    velocity     = d_alpha E[x_1 | x_t] + d_sigma E[x_0 | x_t].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from sit_lightning.interpolants import Interpolant


class GaussianFields(NamedTuple):
    velocity: Tensor
    score: Tensor
    noise: Tensor
    data: Tensor


def rotated_gaussian(dim: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A mean and a non-diagonal, anisotropic covariance (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    scales = torch.linspace(0.2, 1.5, dim, dtype=torch.float64)
    cov = q @ torch.diag(scales**2) @ q.T
    mean = torch.randn(dim, generator=g, dtype=torch.float64)
    return mean, cov


def exact_fields(path: Interpolant, mean: Tensor, cov: Tensor, x: Tensor, t: Tensor) -> GaussianFields:
    """Exact fields at x (N, d), per-sample t (N,)."""
    a, s, da, ds = (c[:, None] for c in path.coefficients(t))
    eye = torch.eye(mean.shape[0], dtype=x.dtype)
    cov_t = a[:, :, None] ** 2 * cov + s[:, :, None] ** 2 * eye  # (N, d, d)
    resid = x - a * mean
    sol = torch.linalg.solve(cov_t, resid.unsqueeze(-1)).squeeze(-1)  # C_t^{-1}(x - mu_t)
    noise = s * sol
    data = mean + a * (sol @ cov)  # S symmetric
    return GaussianFields(velocity=da * data + ds * noise, score=-sol, noise=noise, data=data)


def log_density(path: Interpolant, mean: Tensor, cov: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """log p_t(x) of x_t, (N,)."""
    a, s, _, _ = (c[:, None] for c in path.coefficients(t))
    d = mean.shape[0]
    cov_t = a[:, :, None] ** 2 * cov + s[:, :, None] ** 2 * torch.eye(d, dtype=x.dtype)
    resid = x - a * mean
    sol = torch.linalg.solve(cov_t, resid.unsqueeze(-1)).squeeze(-1)
    return -0.5 * (resid * sol).sum(-1) - 0.5 * torch.logdet(cov_t) - 0.5 * d * math.log(2 * math.pi)
