"""A 2-D Gaussian mixture with exact velocity, score and densities under any affine path (float64).

Data: ``x_1 ~ sum_k pi_k N(m_k, S_k)`` with anisotropic, rotated ``S_k``. With ``x_0 ~ N(0, I)``
independent, ``x_t = alpha x_1 + sigma x_0`` given component k is ``N(mu_k, C_k)`` with
``mu_k = alpha m_k`` and ``C_k = alpha^2 S_k + sigma^2 I``. By Gaussian conditioning, per component

    E[x_1 | x_t, k] = m_k + alpha S_k C_k^{-1} (x_t - mu_k),
    E[x_0 | x_t, k] = sigma C_k^{-1} (x_t - mu_k),
    grad log N(x_t; mu_k, C_k) = -C_k^{-1} (x_t - mu_k),

and the mixture averages them with the responsibilities ``r_k(x_t) = P(k | x_t)``:

    v = d_alpha E[x_1 | x_t] + d_sigma E[x_0 | x_t],   score = sum_k r_k (-C_k^{-1} (x_t - mu_k)).

All 2x2 algebra is written out elementwise, so a field evaluation on 20k points costs about a
millisecond. Import as ``from gaussian_mixture import GaussianMixture2D`` (tests/sampling/conftest.py
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from sit_lightning.interpolants import Interpolant
from sit_lightning.sampling.field import VelocityScore

__all__ = ["DistributionError", "ExactField", "GaussianMixture2D", "MixtureFields", "default_mixture"]

LOG_2PI = math.log(2 * math.pi)


class MixtureFields(NamedTuple):
    """Exact fields at ``(x_t, t)``, each ``(N, 2)``; ``responsibilities`` ``(N, K)``."""

    velocity: Tensor
    score: Tensor
    noise: Tensor
    data: Tensor
    responsibilities: Tensor


class DistributionError(NamedTuple):
    """Samples against the exact mixture; each error comes with its standard error (from the samples).

    ``mass`` is the mean responsibility ``E[P(k | X)]`` under the data density, which equals
    ``pi_k`` exactly when ``X ~ p_1`` (unlike the rate of max-responsibility assignment, which is
    biased wherever the components overlap).
    """

    mean_error: Tensor  # (2,) sample mean - exact mean
    mean_se: Tensor  # (2,)
    cov_error: Tensor  # (3,) entries (0,0), (0,1), (1,1) of sample cov - exact cov
    cov_se: Tensor  # (3,)
    mass_error: Tensor  # (K,) mean responsibility - pi_k
    mass_se: Tensor  # (K,)

    def worst_z(self) -> float:
        """The largest |error| / standard error over all statistics."""
        z = torch.cat(
            [self.mean_error / self.mean_se, self.cov_error / self.cov_se, self.mass_error / self.mass_se]
        )
        return float(z.abs().max())


class _Posterior(NamedTuple):
    log_components: Tensor  # (K, N) log pi_k + log N(x; mu_k, C_k)
    resid_solved: tuple[Tensor, Tensor]  # two (K, N): C_k^{-1} (x - mu_k)
    coefficients: tuple[Tensor, Tensor, Tensor, Tensor]  # (M,) each, M = 1 or N


class GaussianMixture2D:
    """``sum_k weights[k] N(means[k], covs[k])`` in 2-D, float64.

    Args:
        weights: ``(K,)`` mixture weights (normalised here).
        means: ``(K, 2)``.
        covs: ``(K, 2, 2)`` symmetric positive definite.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        self.log_weights = self.weights.log()

    # ---- data-level facts -------------------------------------------------------------------
    @property
    def mean(self) -> Tensor:
        """``(2,)`` exact mean of the data."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """``(2, 2)`` exact covariance of the data (within- plus between-component)."""
        centred = self.means - self.mean
        between = torch.einsum("k,ki,kj->ij", self.weights, centred, centred)
        return torch.einsum("k,kij->ij", self.weights, self.covs) + between

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` exact draws ``(n, 2)`` and their component labels ``(n,)``."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)  # (K, 2, 2)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.means[labels] + torch.einsum("nij,nj->ni", chol[labels], z), labels

    def distribution_error(self, path: Interpolant, samples: Tensor) -> DistributionError:
        """Compare ``samples`` ``(N, 2)`` (meant to be data, t = 1) with the exact mixture."""
        x = samples.to(torch.float64)
        n = x.shape[0]
        centred = x - x.mean(0)
        pairs = ((0, 0), (0, 1), (1, 1))
        products = torch.stack([centred[:, i] * centred[:, j] for i, j in pairs], dim=-1)  # (N, 3)
        exact_cov = self.covariance
        resp = self.responsibilities(path, x, 1.0)  # (N, K)
        return DistributionError(
            mean_error=x.mean(0) - self.mean,
            mean_se=x.std(0) / math.sqrt(n),
            cov_error=products.mean(0) - torch.stack([exact_cov[i, j] for i, j in pairs]),
            cov_se=products.std(0) / math.sqrt(n),
            mass_error=resp.mean(0) - self.weights,
            mass_se=resp.std(0) / math.sqrt(n),
        )

    # ---- time-t quantities ------------------------------------------------------------------
    def _posterior(self, path: Interpolant, x: Tensor, t: Tensor | float) -> _Posterior:
        # Layout (K, N): sums over the few components are sums of K contiguous rows (fast on CPU).
        t = torch.as_tensor(t, dtype=x.dtype)
        if t.ndim == 1 and t.numel() > 1 and bool((t == t[0]).all()):
            t = t[0]  # one time for the batch (what samplers pass): coefficients once, not per sample
        t = t.reshape(-1)  # (M,) with M = 1 or N
        a, s, da, ds = path.coefficients(t)  # (M,)
        cov = self.covs[:, :, :, None]  # (K, 2, 2, 1)
        a2, s2 = a**2, s**2
        c00 = a2 * cov[:, 0, 0] + s2  # (K, M): C_k = alpha^2 S_k + sigma^2 I, written out
        c01 = a2 * cov[:, 0, 1]
        c11 = a2 * cov[:, 1, 1] + s2
        det = c00 * c11 - c01 * c01
        r0 = x[:, 0] - a * self.means[:, 0, None]  # (K, N)
        r1 = x[:, 1] - a * self.means[:, 1, None]
        sol0 = (c11 * r0 - c01 * r1) / det  # C_k^{-1} (x - mu_k), first coordinate
        sol1 = (c00 * r1 - c01 * r0) / det
        log_comp = self.log_weights[:, None] - 0.5 * (r0 * sol0 + r1 * sol1 + det.log() + 2 * LOG_2PI)
        return _Posterior(log_comp, (sol0, sol1), (a, s, da, ds))

    @staticmethod
    def _softmax_rows(log_comp: Tensor) -> Tensor:
        shifted = (log_comp - log_comp.max(dim=0).values).exp()  # (K, N)
        return shifted / shifted.sum(dim=0)

    def component_log_densities(self, path: Interpolant, x: Tensor, t: Tensor | float) -> Tensor:
        """``(N, K)``: ``log pi_k + log N(x; alpha m_k, alpha^2 S_k + sigma^2 I)`` at time ``t``."""
        return self._posterior(path, x, t).log_components.T

    def log_density(self, path: Interpolant, x: Tensor, t: Tensor | float) -> Tensor:
        """``(N,)``: ``log p_t(x)``."""
        return torch.logsumexp(self.component_log_densities(path, x, t), dim=-1)

    def responsibilities(self, path: Interpolant, x: Tensor, t: Tensor | float) -> Tensor:
        """``(N, K)``: ``P(k | x_t = x)``."""
        return self._softmax_rows(self._posterior(path, x, t).log_components).T

    def fields(self, path: Interpolant, x: Tensor, t: Tensor | float) -> MixtureFields:
        """Exact velocity, score, ``E[x_0 | x_t]``, ``E[x_1 | x_t]`` at ``x`` ``(N, 2)``, ``t`` scalar or ``(N,)``."""
        post = self._posterior(path, x, t)
        a, s, da, ds = (c[:, None] for c in post.coefficients)  # (M, 1)
        resp = self._softmax_rows(post.log_components)  # (K, N)
        sol0, sol1 = post.resid_solved  # (K, N)
        cov = self.covs[:, :, :, None]  # (K, 2, 2, 1)
        mean_solved = torch.stack([(resp * sol0).sum(0), (resp * sol1).sum(0)], dim=-1)  # (N, 2)
        # E[x_1 | x_t, k] = m_k + alpha S_k sol_k, averaged with the responsibilities
        data0 = (resp * (self.means[:, 0, None] + a.T * (cov[:, 0, 0] * sol0 + cov[:, 0, 1] * sol1))).sum(0)
        data1 = (resp * (self.means[:, 1, None] + a.T * (cov[:, 1, 0] * sol0 + cov[:, 1, 1] * sol1))).sum(0)
        data = torch.stack([data0, data1], dim=-1)
        noise = s * mean_solved
        return MixtureFields(da * data + ds * noise, -mean_solved, noise, data, resp.T)

    def field(self, path: Interpolant) -> ExactField:
        """The exact field of this mixture under ``path``, as a sampler's ``VectorField``."""
        return ExactField(self, path)

    def velocity(self, path: Interpolant, x: Tensor, t: Tensor | float) -> Tensor:
        return self.fields(path, x, t).velocity

    def score(self, path: Interpolant, x: Tensor, t: Tensor | float) -> Tensor:
        return self.fields(path, x, t).score


class ExactField:
    """A ``VectorField`` (see ``sit_lightning.sampling.field``) of a mixture's exact velocity and score.

    ``velocity_and_score`` evaluates the mixture once (one NFE), like a network call.
    """

    def __init__(self, mixture: GaussianMixture2D, path: Interpolant) -> None:
        self.mixture = mixture
        self.interpolant = path
        self.nfe = 0

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        self.nfe += 1
        return self.mixture.fields(self.interpolant, x, t).velocity

    def velocity_and_score(self, x: Tensor, t: Tensor | float) -> VelocityScore:
        self.nfe += 1
        fields = self.mixture.fields(self.interpolant, x, t)
        return VelocityScore(fields.velocity, fields.score)

    def reset_nfe(self) -> None:
        self.nfe = 0


def _rotated(angle: float, scales: tuple[float, float]) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return rot @ torch.diag(torch.tensor(scales, dtype=torch.float64) ** 2) @ rot.T


def default_mixture() -> GaussianMixture2D:
    """Three anisotropic, rotated, unequally weighted components that overlap a little."""
    weights = torch.tensor([0.5, 0.3, 0.2])
    means = torch.tensor([[-1.5, 0.5], [1.5, 1.0], [0.3, -1.8]])
    covs = torch.stack([_rotated(0.4, (0.8, 0.25)), _rotated(-0.9, (0.5, 0.2)), _rotated(1.3, (0.6, 0.3))])
    return GaussianMixture2D(weights, means, covs)
