"""Sample error against NFE for every sampler, on the exact 2-D Gaussian mixture (CPU, float64).

Prints a markdown table (the one in docs/sampling.md):

- per-trajectory error (ODE only): median over trajectories of ``|x - x_ref|`` where ``x_ref`` is
  dopri5 at rtol = atol = 1e-10 from the same noise;
- distribution error: the moment error ``|mean - m|_2 + |cov - S|_F`` and the worst component-mass
  error (mean responsibility minus pi_k, in points). For ODEs it is measured *paired*, against the
  reference flow's samples from the same noise (the discretisation's share, free of sampling
  noise); SDE samples are compared with the exact mixture on ``--sde-samples`` draws, so their
  numbers include a sampling-noise floor, shown by the ``exact draws`` row.

Usage: ``python benchmarks/sampler_error_vs_nfe.py [--path linear|gvp|vp]``
(runs in well under 2 minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "sampling"))
from gaussian_mixture import GaussianMixture2D, default_mixture  # noqa: E402

from sit_lightning.interpolants import Interpolant, make_interpolant  # noqa: E402
from sit_lightning.sampling import FIXED_STEP_NFE, sample_ode, sample_sde  # noqa: E402

NFE_BUDGETS = (8, 16, 32, 64, 128, 256)
TRAJECTORIES = 500  # the per-trajectory error uses the first ones


def moment_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|mean(a) - mean(b)|_2 + |cov(a) - cov(b)|_F`` for samples ``(N, 2)``."""
    return float((a.mean(0) - b.mean(0)).norm() + (torch.cov(a.T) - torch.cov(b.T)).norm())


def exact_gap(mixture: GaussianMixture2D, path: Interpolant, samples: torch.Tensor) -> tuple[float, float]:
    """Moment error and worst mass error (points) of ``samples`` against the exact mixture."""
    err = mixture.distribution_error(path, samples)
    cov_err = torch.stack([err.cov_error[0], err.cov_error[1], err.cov_error[1], err.cov_error[2]])
    return float(err.mean_error.norm() + cov_err.norm()), 100 * float(err.mass_error.abs().max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="linear", choices=["linear", "gvp", "vp"])
    parser.add_argument("--samples", type=int, default=10_000, help="ODE samples")
    parser.add_argument("--sde-samples", type=int, default=40_000, help="SDE samples (unpaired)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    mixture = default_mixture()
    path = make_interpolant(args.path)
    field = mixture.field(path)
    noise = torch.randn(
        args.samples, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64
    )
    start = time.perf_counter()
    reference = sample_ode(field, noise, method="dopri5", atol=1e-10, rtol=1e-10)
    rows = []

    ref_resp = mixture.responsibilities(path, reference.samples, 1.0).mean(0)

    def add_ode(sampler: str, setting: str, nfe: int, samples: torch.Tensor) -> None:
        traj = float((samples[:TRAJECTORIES] - reference.samples[:TRAJECTORIES]).norm(dim=1).median())
        mass = 100 * float((mixture.responsibilities(path, samples, 1.0).mean(0) - ref_resp).abs().max())
        rows.append(
            (
                sampler,
                setting,
                nfe,
                f"{traj:.2e}",
                f"{moment_gap(samples, reference.samples):.2e}",
                f"{mass:.3f}",
            )
        )

    def add_unpaired(sampler: str, setting: str, nfe: int, samples: torch.Tensor) -> None:
        moment, mass = exact_gap(mixture, path, samples)
        rows.append((sampler, setting, nfe, "-", f"{moment:.2e}", f"{mass:.3f}"))

    moment, mass = exact_gap(mixture, path, reference.samples)
    rows.append(
        (
            "reference: dopri5 (vs exact)",
            "rtol=atol=1e-10",
            reference.nfe,
            "0",
            f"{moment:.2e}",
            f"{mass:.3f}",
        )
    )
    for method, stages in FIXED_STEP_NFE.items():
        for budget in NFE_BUDGETS:
            if budget % stages:
                continue
            out = sample_ode(field, noise, method=method, steps=budget // stages)
            add_ode(f"ODE {method}", f"steps={budget // stages}", out.nfe, out.samples)
    for tol in (1e-3, 1e-5):
        out = sample_ode(field, noise, method="dopri5", atol=tol, rtol=tol)
        add_ode("ODE dopri5", f"rtol=atol={tol:g}", out.nfe, out.samples)
    sde_noise = torch.randn(
        args.sde_samples, 2, generator=torch.Generator().manual_seed(args.seed + 3), dtype=torch.float64
    )
    for method, per_step in (("euler", 1), ("heun", 2)):
        for budget in NFE_BUDGETS:
            steps = (budget - 1) // per_step + 1  # stochastic steps + the last step
            out = sample_sde(
                field,
                sde_noise,
                method=method,
                steps=steps,
                diffusion="w_kl",
                last_step="mean",
                generator=torch.Generator().manual_seed(args.seed + 1),
            )
            add_unpaired(f"SDE {method}", f"w_kl, mean 0.04, steps={steps}", out.nfe, out.samples)
    exact, _ = mixture.sample(args.sde_samples, torch.Generator().manual_seed(args.seed + 2))
    add_unpaired("exact draws (SDE floor)", f"n={args.sde_samples}", 0, exact)

    print(
        f"path={args.path}, ODE samples={args.samples} (errors paired with the reference flow), "
        f"SDE samples={args.sde_samples} (errors against the exact mixture), float64, CPU"
    )
    print()
    print("| sampler | setting | NFE | median trajectory error | moment error | worst mass error (points) |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")
    print()
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
