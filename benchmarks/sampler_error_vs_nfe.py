"""Sample error against NFE for every sampler, on the exact 2-D Gaussian mixture (CPU, float64).

Prints a markdown table (the one in docs/sampling.md):

- per-trajectory error (ODE only): median over trajectories of ``|x - x_ref|`` where ``x_ref`` is
  dopri5 at rtol = atol = 1e-10 from the same noise;
- distribution error: the moment error ``|mean - m|_2 + |cov - S|_F`` and the worst component-mass
  error (mean responsibility minus pi_k, in points). For ODEs it is measured *paired*, against the
  reference flow's samples from the same noise (the discretisation's share, free of sampling
  noise); SDE samples are compared with the exact mixture on ``--sde-samples`` draws, so their
  numbers include a sampling-noise floor, shown by the ``exact draws`` row.

Usage: ``python benchmarks/sampler_error_vs_nfe.py [--path linear|gvp|vp] [--plot FILE.png]``
(runs in well under 2 minutes on one CPU core). ``--plot`` also draws the table as a PNG (two panels,
log-log: trajectory error and moment error against NFE; matplotlib, the ``notebook`` extra).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "sampling"))
if str(Path(__file__).resolve().parent) not in sys.path:  # bench_records, beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_records import pyplot  # noqa: E402
from gaussian_mixture import GaussianMixture2D, default_mixture  # noqa: E402

from sit_lightning.interpolants import Interpolant, make_interpolant  # noqa: E402
from sit_lightning.sampling import FIXED_STEP_NFE, sample_ode, sample_sde  # noqa: E402

NFE_BUDGETS = (8, 16, 32, 64, 128, 256)
TRAJECTORIES = 500  # the per-trajectory error uses the first ones
SDE_FLOOR = "exact draws (SDE floor)"


@dataclass(frozen=True)
class Row:
    """One line of the table; ``trajectory`` is None where it is not measured (SDE rows)."""

    sampler: str
    setting: str
    nfe: int
    trajectory: float | None
    moment: float
    mass: float

    def cells(self) -> tuple[str, ...]:
        if self.trajectory is None:
            trajectory = "-"
        else:
            trajectory = "0" if self.trajectory == 0 else f"{self.trajectory:.2e}"
        return (
            self.sampler,
            self.setting,
            str(self.nfe),
            trajectory,
            f"{self.moment:.2e}",
            f"{self.mass:.3f}",
        )


def moment_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|mean(a) - mean(b)|_2 + |cov(a) - cov(b)|_F`` for samples ``(N, 2)``."""
    return float((a.mean(0) - b.mean(0)).norm() + (torch.cov(a.T) - torch.cov(b.T)).norm())


def exact_gap(mixture: GaussianMixture2D, path: Interpolant, samples: torch.Tensor) -> tuple[float, float]:
    """Moment error and worst mass error (points) of ``samples`` against the exact mixture."""
    err = mixture.distribution_error(path, samples)
    cov_err = torch.stack([err.cov_error[0], err.cov_error[1], err.cov_error[1], err.cov_error[2]])
    return float(err.mean_error.norm() + cov_err.norm()), 100 * float(err.mass_error.abs().max())


def plot(rows: list[Row], path: Path, title: str) -> Path:
    """The table as two log-log panels against NFE: the ODEs' median trajectory error, and the moment
    error of every sampler with the SDE rows' sampling-noise floor as a dotted line. Needs matplotlib."""
    plt = pyplot()

    curves = [r for r in rows if r.sampler.startswith(("ODE", "SDE")) and r.nfe > 0]
    samplers = list(dict.fromkeys(r.sampler for r in curves))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(samplers)}
    fig, (ax_traj, ax_moment) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in samplers:
        points = sorted((r.nfe, r.trajectory, r.moment) for r in curves if r.sampler == name)
        style = {
            "color": colours[name],
            "marker": "o",
            "markersize": 3,
            "linestyle": "--" if name.startswith("SDE") else "-",
            "label": name,
        }
        if name == "ODE dopri5":  # adaptive: one point per tolerance, not a curve
            style.update(linestyle="none", marker="s", markersize=5)
        if points[0][1] is not None:
            ax_traj.plot([p[0] for p in points], [p[1] for p in points], **style)
        ax_moment.plot([p[0] for p in points], [p[2] for p in points], **style)
    floor = [r.moment for r in rows if r.sampler == SDE_FLOOR]
    if floor:
        ax_moment.axhline(
            floor[0], color="grey", linewidth=0.8, linestyle=":", label="SDE sampling-noise floor"
        )
    ticks = sorted({r.nfe for r in curves if r.sampler.startswith("ODE") and r.sampler != "ODE dopri5"})
    for ax, name in (
        (ax_traj, "median trajectory error (ODE, vs dopri5 1e-10)"),
        (ax_moment, "moment error |dmean| + |dcov|"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("NFE")
        ax.set_title(name, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    ax_moment.legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="linear", choices=["linear", "gvp", "vp"])
    parser.add_argument("--samples", type=int, default=10_000, help="ODE samples")
    parser.add_argument("--sde-samples", type=int, default=40_000, help="SDE samples (unpaired)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--nfe",
        default=",".join(map(str, NFE_BUDGETS)),
        help="NFE budgets, comma-separated (default %(default)s)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="also draw the table into this PNG")
    args = parser.parse_args(argv)
    budgets = tuple(int(b) for b in args.nfe.split(","))

    torch.set_num_threads(1)
    mixture = default_mixture()
    path = make_interpolant(args.path)
    field = mixture.field(path)
    noise = torch.randn(
        args.samples, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64
    )
    start = time.perf_counter()
    reference = sample_ode(field, noise, method="dopri5", atol=1e-10, rtol=1e-10)
    rows: list[Row] = []

    ref_resp = mixture.responsibilities(path, reference.samples, 1.0).mean(0)

    def add_ode(sampler: str, setting: str, nfe: int, samples: torch.Tensor) -> None:
        traj = float((samples[:TRAJECTORIES] - reference.samples[:TRAJECTORIES]).norm(dim=1).median())
        mass = 100 * float((mixture.responsibilities(path, samples, 1.0).mean(0) - ref_resp).abs().max())
        rows.append(Row(sampler, setting, nfe, traj, moment_gap(samples, reference.samples), mass))

    def add_unpaired(sampler: str, setting: str, nfe: int, samples: torch.Tensor) -> None:
        moment, mass = exact_gap(mixture, path, samples)
        rows.append(Row(sampler, setting, nfe, None, moment, mass))

    moment, mass = exact_gap(mixture, path, reference.samples)
    rows.append(Row("reference: dopri5 (vs exact)", "rtol=atol=1e-10", reference.nfe, 0.0, moment, mass))
    for method, stages in FIXED_STEP_NFE.items():
        for budget in budgets:
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
        for budget in budgets:
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
    add_unpaired(SDE_FLOOR, f"n={args.sde_samples}", 0, exact)

    header = (
        f"path={args.path}, ODE samples={args.samples} (errors paired with the reference flow), "
        f"SDE samples={args.sde_samples} (errors against the exact mixture), float64, CPU"
    )
    print(header)
    print()
    print("| sampler | setting | NFE | median trajectory error | moment error | worst mass error (points) |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    print()
    print(f"total time {time.perf_counter() - start:.1f} s")
    if args.plot is not None:
        print(f"wrote {plot(rows, args.plot, header)}")
    return rows


if __name__ == "__main__":
    main()
