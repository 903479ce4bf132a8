"""Sample quality against NFE on the digits demo: the paper's Figure 5 / Table 6, small.

For one digits checkpoint (``<log dir>/checkpoints/last.ckpt`` of ``sit-lightning fit --config
configs/digits.yaml``), its EMA weights draw ``--num_samples`` class-balanced samples (label
``i % 10``, keyed noise of seed 0: the samples of ``FIDCallback``) with each sampler family at each
NFE budget and guidance scale, and scores them exactly as the demo's ``FIDCallback`` does: samples
through the sample file's ``uint8`` map (``through_uint8``), the digits judge trained on the train split
(``load_or_train_digits_classifier``) for the conditional accuracy and, through its 64 penultimate
features, the FID against the statistics of the test split.

Families (``--families``):

- ``ode-euler`` (steps = NFE), ``ode-heun`` (steps = NFE / 2), ``ode-midpoint``, ``ode-rk4``
  (steps = NFE / 4): fixed steps; each budget takes the most steps whose NFE fits in it, and the
  real NFE (``SamplerSettings.nfe_per_image()``) is what the table and plot show.
- ``ode-dopri5``: adaptive (torchdiffeq), one row per tolerance (``--dopri5_tolerances``,
  rtol = atol); its NFE is the solver's own count, averaged over the batches (an adaptive solver's
  steps depend on the batch, so its rows also depend on ``--batch_size``).
- ``sde-euler-w_kl``, ``sde-euler-sigma``, ``sde-euler-w_kl_eta``: Euler-Maruyama with a Mean last
  step of 0.04 (the paper's SDE; steps = NFE: NFE - 1 stochastic steps and the last one), with the
  paper's Table 6 coefficients at norm 1: ``w_KL`` (eq. 13), ``sigma_t``, and ``w_KL,eta`` (eq. 14),
  which weighs ``w_KL`` with the checkpoint's validation loss profile ``L_t`` (``module.loss_profile``;
  a checkpoint without one gets it from one validation pass over the test split, on the same weights)
  and an ``eta`` that the paper does not give (``--eta``, see its help).

Writes ``quality_vs_nfe.json`` (every row with its settings and real NFE), ``quality_vs_nfe.md``
(per guidance scale: family x NFE -> accuracy / FID, and the adaptive rows) and, with ``--plot``,
``quality_vs_nfe.png`` (FID and accuracy against NFE, log x; matplotlib, the ``notebook`` extra).
Progress goes to stderr, one line per row with an estimate of the time left.

Usage::

    python benchmarks/quality_vs_nfe.py --checkpoint lightning_logs/version_0/checkpoints/last.ckpt \\
        --out runs/quality_vs_nfe --plot
    python benchmarks/quality_vs_nfe.py --checkpoint last.ckpt --out /tmp/q --smoke   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

if str(Path(__file__).resolve().parent) not in sys.path:  # bench_records, beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_records import pyplot  # noqa: E402

from sit_lightning.callbacks.fid import conditional_accuracy  # noqa: E402
from sit_lightning.data.digits import DigitsDataModule  # noqa: E402
from sit_lightning.evaluation.digits_classifier import (  # noqa: E402
    DigitsFeatures,
    load_or_train_digits_classifier,
)
from sit_lightning.evaluation.fid import FIDScorer, frechet_distance, through_uint8  # noqa: E402
from sit_lightning.evaluation.sample_plan import generate, sample_labels  # noqa: E402
from sit_lightning.module import SiTModule  # noqa: E402
from sit_lightning.sample_cli import load_lightning_module  # noqa: E402
from sit_lightning.sampling import SamplerSettings  # noqa: E402
from sit_lightning.trusted_loading import load_checkpoint  # noqa: E402

#: The issue's NFE budgets (Figure 5's range: 8 ... 250).
FULL_NFE = (8, 16, 32, 64, 128, 250)
FULL_NUM_SAMPLES = 1000
FULL_FAMILIES = (
    "ode-euler",
    "ode-heun",
    "ode-dopri5",
    "sde-euler-w_kl",
    "sde-euler-sigma",
    "sde-euler-w_kl_eta",
)
#: ``--smoke``: the defaults of every argument left out, sized for a test of a few seconds.
SMOKE_NFE = (4, 8)
SMOKE_NUM_SAMPLES = 50
SMOKE_FAMILIES = ("ode-euler", "sde-euler-w_kl")
CFG_SCALES = (1.0, 1.5)
#: rtol = atol of the dopri5 rows; the NFE they cost is measured, not chosen.
DOPRI5_TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5)
#: ``eta`` of ``w_KL,eta`` (paper eq. 14). The paper names w_KL,eta the best coefficient for XL but
#: gives no eta. ``w = w_KL L / (L + 2 eta w_KL^2)`` follows ``w_KL`` where ``w_KL`` is small (near the
#: data) and falls like ``L / (2 eta w_KL)`` where it is large (near the noise), peaking at
#: ``sqrt(L / (8 eta))``: with the demo's ``L_t`` of order 0.5, eta = 0.1 puts that peak near 0.8, so
#: the SDE keeps about w_KL's noise over the last third of the path and much less before it.
DEFAULT_ETA = 0.1
#: FIDCallback's names: the cache of the reference statistics is shared with the demo's own run.
REFERENCE_DATASET = f"{DigitsDataModule.__name__}-test"
FLOOR_DATASET = f"{DigitsDataModule.__name__}-train"
#: FIDCallback's cache (``<default_root_dir>/eval_cache``) for a fit run from the current folder.
DEMO_CACHE_DIR = "eval_cache"
LABEL_MODE = "balanced"
SAMPLE_SEED = 0
#: Guided samples are one call on a doubled batch: twice the rows per NFE (for the time estimate).
GUIDED_COST = 2.0


# ---- sampler families ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One line of the figure: a sampler whose cost is set by a budget (fixed steps) or a tolerance.

    Attributes:
        name: the ``--families`` name.
        label: legend / table text.
        base: the settings without ``steps`` (fixed) or tolerances (adaptive) and guidance.
    """

    name: str
    label: str
    base: SamplerSettings

    @property
    def adaptive(self) -> bool:
        return self.base.adaptive

    def at_budget(self, budget: int) -> SamplerSettings | None:
        """The settings with the most steps whose NFE per image is at most ``budget`` (None: none fits)."""
        for steps in range(budget, 0, -1):
            try:
                settings = dataclasses.replace(self.base, steps=steps)
            except ValueError:  # fewer steps than the method takes (an SDE with a last step needs 2)
                return None
            nfe = settings.nfe_per_image()
            assert nfe is not None  # fixed-step
            if nfe <= budget:
                return settings
        return None

    def at_tolerance(self, tolerance: float) -> SamplerSettings:
        return dataclasses.replace(self.base, atol=tolerance, rtol=tolerance)


def make_families(eta: float) -> dict[str, Family]:
    """Every family by name; ``eta`` is the ``w_KL,eta`` family's."""

    def sde(diffusion: str, **extra: Any) -> SamplerSettings:
        return SamplerSettings(sampler="sde", method="euler", diffusion=diffusion, last_step="mean", **extra)

    families = [
        Family("ode-euler", "ODE Euler", SamplerSettings(sampler="ode", method="euler")),
        Family("ode-midpoint", "ODE midpoint", SamplerSettings(sampler="ode", method="midpoint")),
        Family("ode-heun", "ODE Heun", SamplerSettings(sampler="ode", method="heun")),
        Family("ode-rk4", "ODE RK4", SamplerSettings(sampler="ode", method="rk4")),
        Family("ode-dopri5", "ODE dopri5 (adaptive)", SamplerSettings(sampler="ode", method="dopri5")),
        Family("sde-euler-w_kl", "SDE Euler-Maruyama, w_KL", sde("w_kl")),
        Family("sde-euler-sigma", "SDE Euler-Maruyama, sigma_t", sde("sigma")),
        Family(
            "sde-euler-w_kl_eta",
            f"SDE Euler-Maruyama, w_KL,eta (eta={eta:g})",
            sde("w_kl_eta", eta=eta),
        ),
    ]
    return {f.name: f for f in families}


FAMILY_NAMES = tuple(make_families(DEFAULT_ETA))


@dataclass(frozen=True)
class Run:
    """One row to measure: a family's settings at one budget (or tolerance) and guidance scale."""

    family: Family
    settings: SamplerSettings
    cfg_scale: float
    nfe_budget: int | None
    tolerance: float | None

    def planned_cost(self, num_samples: int, adaptive_guess: int) -> float:
        """Sample-NFEs (guided: doubled), for the time estimate; adaptive rows use ``adaptive_guess``."""
        nfe = self.settings.nfe_per_image() or adaptive_guess
        return nfe * num_samples * (GUIDED_COST if self.cfg_scale != 1.0 else 1.0)


def plan(
    families: Sequence[Family],
    budgets: Sequence[int],
    tolerances: Sequence[float],
    cfg_scales: Sequence[float],
) -> list[Run]:
    """Every run, guidance scale outermost, then family, then budget (tolerance)."""
    runs = []
    for scale in cfg_scales:
        for family in families:
            if family.adaptive:
                for tol in tolerances:
                    settings = dataclasses.replace(family.at_tolerance(tol), cfg_scale=scale)
                    runs.append(Run(family, settings, scale, None, tol))
                continue
            for budget in budgets:
                settings = family.at_budget(budget)
                if settings is None:
                    raise ValueError(
                        f"NFE budget {budget} is too small for {family.name} "
                        f"({family.base.describe()}); give budgets >= its smallest NFE"
                    )
                runs.append(Run(family, dataclasses.replace(settings, cfg_scale=scale), scale, budget, None))
    return runs


# ---- checkpoint, data, judge -------------------------------------------------------------------------
def load_module(checkpoint: Path, weights: str) -> SiTModule:
    """The checkpoint's module holding its EMA (``weights='ema'``) or trained weights in the network.

    Read as ``sit-lightning sample`` reads it (:func:`~sit_lightning.sample_cli.load_lightning_module`),
    so sampling needs no trainer and no swap (``use_ema=False`` below).
    """
    return load_lightning_module(checkpoint, weights, option="--weights").eval()


def digits_data(checkpoint: Path) -> tuple[DigitsDataModule, dict[str, Any]]:
    """The digits data module of the run (its stored hyperparameters: the same test split), or the defaults."""
    stored = load_checkpoint(checkpoint).get("datamodule_hyper_parameters") or {}
    accepted = inspect.signature(DigitsDataModule).parameters
    kwargs = {k: v for k, v in dict(stored).items() if k in accepted}
    return DigitsDataModule(**kwargs), kwargs


def ensure_loss_profile(module: SiTModule, data: DigitsDataModule) -> str:
    """Where ``module.loss_profile`` comes from; runs one validation pass when the checkpoint has none.

    The fit's profile is measured on the EMA weights (``EMACallback(validate_with_ema=True)``), and the
    network already holds them here, so the pass measures the same thing on the final EMA.
    """
    if module.loss_profile is not None:
        return "checkpoint"
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,  # no_grad: the data module's cached images must stay usable with autograd
    )
    trainer.validate(module, datamodule=data, verbose=False)
    if module.loss_profile is None:
        raise RuntimeError("the validation pass wrote no loss profile; w_kl_eta cannot run")
    return "validation pass over the test split (the checkpoint has none)"


@dataclass(frozen=True)
class Judge:
    """FIDCallback's scoring on the digits: the judge, its FID scorer and the reference it scores against."""

    classifier: torch.nn.Module
    scorer: FIDScorer
    floor_fid: float
    judge_test_accuracy: float
    reference_images: int

    @classmethod
    def build(cls, data: DigitsDataModule, cache_dir: Path, device: torch.device) -> Judge:
        train, test = data.train_images(), data.test_images()
        classifier = load_or_train_digits_classifier(train.x, train.y, cache_dir=cache_dir)
        extractor = DigitsFeatures(classifier)
        reference = FIDScorer.cached_statistics(extractor, test.x, cache_dir, REFERENCE_DATASET)
        floor = frechet_distance(
            FIDScorer.cached_statistics(extractor, train.x, cache_dir, FLOOR_DATASET), reference
        )
        return cls(
            classifier=classifier.to(device),
            scorer=FIDScorer(extractor, reference).to(device),
            floor_fid=floor,
            judge_test_accuracy=conditional_accuracy(classifier, test.x, test.y),
            reference_images=len(test.x),
        )

    @torch.no_grad()
    def score(self, images: Tensor, labels: Tensor) -> tuple[float, float]:
        """``(conditional accuracy, FID)`` of samples ``(N, 1, 8, 8)`` as a sample file holds them."""
        images = through_uint8(images)
        self.scorer.reset()
        self.scorer.update(images)
        fid = self.scorer.compute()
        return conditional_accuracy(self.classifier, images, labels.to(images.device)), fid


# ---- measuring -----------------------------------------------------------------------------------------
def measure(module: SiTModule, run: Run, judge: Judge, num_samples: int, batch_size: int) -> dict[str, Any]:
    """Draw and score one run's samples; its JSON row."""
    indices = torch.arange(num_samples)
    labels = sample_labels(indices, module.network.num_classes, LABEL_MODE, SAMPLE_SEED)
    nfes: list[int] = []

    def sample_counting(*args: Any, **kwargs: Any) -> Any:
        result = module.sample(*args, **kwargs)
        nfes.append(int(result.nfe))
        return result

    start = time.perf_counter()
    images = generate(
        sample_counting,
        indices,
        labels,
        batch_size=batch_size,
        settings=run.settings,
        seed=SAMPLE_SEED,
        use_ema=False,  # the EMA weights are already in the network (load_module)
    )
    sampled = time.perf_counter() - start
    accuracy, fid = judge.score(images, labels)
    planned = run.settings.nfe_per_image()
    if planned is not None and any(n != planned for n in nfes):
        raise AssertionError(f"{run.family.name}: the sampler spent {nfes} NFE, the settings say {planned}")
    return {
        "family": run.family.name,
        "label": run.family.label,
        "cfg_scale": run.cfg_scale,
        "nfe_budget": run.nfe_budget,
        "tolerance": run.tolerance,
        "steps": run.settings.resolved_steps,
        "nfe": sum(nfes) / len(nfes),  # per image; an adaptive solver's mean over the batches
        "nfe_per_batch": nfes,
        "conditional_accuracy": accuracy,
        "fid": fid,
        "sampling_seconds": sampled,
        "seconds": time.perf_counter() - start,
        "settings": dataclasses.asdict(run.settings),
        "settings_description": run.settings.describe(),
    }


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{secs:02d}s" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- reports --------------------------------------------------------------------------------------------
def _fmt_nfe(nfe: float) -> str:
    return f"{nfe:g}" if float(nfe).is_integer() else f"{nfe:.1f}"


def _cell(row: dict[str, Any]) -> str:
    text = f"{100 * row['conditional_accuracy']:.1f}% / {row['fid']:.2f}"
    if row["nfe_budget"] is not None and row["nfe"] != row["nfe_budget"]:
        text += f" (NFE {_fmt_nfe(row['nfe'])})"
    return text


def markdown(report: dict[str, Any]) -> str:
    """Per guidance scale: family x NFE budget -> conditional accuracy / FID, then the adaptive rows."""
    rows = report["rows"]
    budgets = report["nfe_budgets"]
    lines = [
        f"Checkpoint `{report['checkpoint']}` ({report['weights']} weights), {report['num_samples']} samples "
        f"({LABEL_MODE} labels, seed {SAMPLE_SEED}), batch {report['batch_size']}, {report['device']}. "
        f"Cells: conditional accuracy / FID against the {report['reference_images']} test digits "
        f"(digits judge, {100 * report['judge_test_accuracy']:.2f}% on the real test digits; FID floor, "
        f"real train split: {report['floor_fid']:.2f}). NFE per image; a guided evaluation is one call on "
        "a doubled batch and counts once. SDE: Euler-Maruyama with a Mean last step of 0.04, NFE - 1 "
        "stochastic steps.",
    ]
    if any(r["family"] == "sde-euler-w_kl_eta" for r in rows):
        lines.append(f"w_KL,eta: eta = {report['eta']:g}, L_t from {report['loss_profile_source']}.")
    for scale in report["cfg_scales"]:
        at_scale = [r for r in rows if r["cfg_scale"] == scale]
        fixed = [r for r in at_scale if r["tolerance"] is None]
        adaptive = [r for r in at_scale if r["tolerance"] is not None]
        lines += ["", f"### cfg {scale:g}", ""]
        if fixed:
            lines.append("| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |")
            lines.append("|---|" + "---:|" * len(budgets))
            for family in dict.fromkeys(r["family"] for r in fixed):
                by_budget = {r["nfe_budget"]: r for r in fixed if r["family"] == family}
                label = next(r["label"] for r in fixed if r["family"] == family)
                cells = [_cell(by_budget[b]) if b in by_budget else "-" for b in budgets]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if adaptive:
            if fixed:
                lines.append("")
            lines.append("| adaptive sampler | rtol = atol | NFE (mean per batch) | accuracy | FID |")
            lines.append("|---|---:|---:|---:|---:|")
            for r in adaptive:
                lines.append(
                    f"| {r['label']} | {r['tolerance']:g} | {_fmt_nfe(r['nfe'])} | "
                    f"{100 * r['conditional_accuracy']:.1f}% | {r['fid']:.2f} |"
                )
    lines += ["", f"Command: `{report['command']}` ({_hms(report['seconds'])})."]
    return "\n".join(lines) + "\n"


#: Line style per guidance scale: solid without guidance, dashed for the first guided scale.
LINE_STYLES = ("-", "--", ":", "-.")


def plot(report: dict[str, Any], path: Path) -> Path:
    """Two panels, FID and conditional accuracy against NFE (log x): one colour per family, one
    line style per guidance scale (solid: cfg 1, dashed: the next scale). Needs matplotlib."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    rows = report["rows"]
    families = list(dict.fromkeys(r["family"] for r in rows))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(families)}
    styles = {s: LINE_STYLES[i % len(LINE_STYLES)] for i, s in enumerate(report["cfg_scales"])}
    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.6))
    for family in families:
        for scale in report["cfg_scales"]:
            points = sorted(
                (r["nfe"], r["fid"], 100 * r["conditional_accuracy"])
                for r in rows
                if r["family"] == family and r["cfg_scale"] == scale
            )
            if not points:
                continue
            nfe, fid, acc = zip(*points, strict=True)
            style = {"color": colours[family], "linestyle": styles[scale], "marker": "o", "markersize": 3}
            ax_fid.plot(nfe, fid, **style)
            ax_acc.plot(nfe, acc, **style)
    ax_fid.axhline(report["floor_fid"], color="grey", linewidth=0.8, linestyle=":")
    ax_acc.axhline(100 * report["judge_test_accuracy"], color="grey", linewidth=0.8, linestyle=":")
    ticks = sorted({int(b) for b in report["nfe_budgets"]})
    for ax, name in (
        (ax_fid, "FID (digits judge features, vs test split)"),
        (ax_acc, "conditional accuracy (%)"),
    ):
        ax.set_xscale("log")
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel("NFE per image")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    ax_fid.set_yscale("log")
    ax_fid.set_title("FID against NFE (dotted: real train split)")
    ax_acc.set_title("accuracy against NFE (dotted: real test digits)")
    label_of = {r["family"]: r["label"] for r in rows}
    handles = [
        Line2D([], [], color=colours[f], marker="o", markersize=3, label=label_of[f]) for f in families
    ]
    handles += [
        Line2D([], [], color="black", linestyle=styles[s], label=f"cfg {s:g}") for s in report["cfg_scales"]
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"digits demo: {report['num_samples']} EMA samples per point")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---- command line ---------------------------------------------------------------------------------------
def _list(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err

    return parse


def _families(text: str) -> tuple[str, ...]:
    names = _list(str)(text)
    unknown = [n for n in names if n not in FAMILY_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown families {unknown}; choose from {', '.join(FAMILY_NAMES)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a digits demo .ckpt (last.ckpt)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, markdown and PNG")
    parser.add_argument(
        "--num_samples", type=int, default=None, help=f"samples per point (default {FULL_NUM_SAMPLES})"
    )
    parser.add_argument(
        "--nfe",
        type=_list(int),
        default=None,
        help=f"NFE budgets, comma-separated (default {','.join(map(str, FULL_NFE))})",
    )
    parser.add_argument(
        "--families",
        type=_families,
        default=None,
        help=f"comma-separated, from {', '.join(FAMILY_NAMES)} (default {','.join(FULL_FAMILIES)})",
    )
    parser.add_argument(
        "--cfg", type=_list(float), default=CFG_SCALES, help="guidance scales (default 1.0,1.5)"
    )
    parser.add_argument(
        "--dopri5_tolerances",
        type=_list(float),
        default=DOPRI5_TOLERANCES,
        help="rtol = atol of the ode-dopri5 rows (default 1e-2,1e-3,1e-4,1e-5)",
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=DEFAULT_ETA,
        help=f"eta of w_KL,eta (default {DEFAULT_ETA}; the paper gives none: see DEFAULT_ETA in this file)",
    )
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or trained")
    parser.add_argument(
        "--batch_size", type=int, default=500, help="samples per sampler call (FIDCallback's)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cache_dir",
        type=Path,
        default=Path(DEMO_CACHE_DIR),
        help=f"where the judge and the reference statistics are cached (default {DEMO_CACHE_DIR}: FIDCallback's "
        "folder when the fit ran in this folder, so the demo's own judge scores; a judge trained anew can "
        "differ in the last bits with the number of threads)",
    )
    parser.add_argument("--plot", action="store_true", help="also write quality_vs_nfe.png (matplotlib)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny run for tests: defaults {SMOKE_NUM_SAMPLES} samples, NFE "
        f"{','.join(map(str, SMOKE_NFE))}, families {','.join(SMOKE_FAMILIES)}",
    )
    args = parser.parse_args(argv)
    if args.num_samples is None:
        args.num_samples = SMOKE_NUM_SAMPLES if args.smoke else FULL_NUM_SAMPLES
    if args.nfe is None:
        args.nfe = SMOKE_NFE if args.smoke else FULL_NFE
    if args.families is None:
        args.families = SMOKE_FAMILIES if args.smoke else FULL_FAMILIES
    if args.num_samples < 2:
        parser.error(f"--num_samples must be >= 2 (FID needs a covariance); got {args.num_samples}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1; got {args.batch_size}")
    if not args.nfe or min(args.nfe) < 1:
        parser.error(f"--nfe must be budgets >= 1; got {args.nfe}")
    if not args.cfg or min(args.cfg) < 0:
        parser.error(f"--cfg must be scales >= 0; got {args.cfg}")
    if "ode-dopri5" in args.families and (not args.dopri5_tolerances or min(args.dopri5_tolerances) <= 0):
        parser.error(f"--dopri5_tolerances must be > 0; got {args.dopri5_tolerances}")
    return args


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report written to ``<out>/quality_vs_nfe.json``."""
    args = parse_args(argv)
    start = time.perf_counter()
    command = "python benchmarks/quality_vs_nfe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache_dir

    catalogue = make_families(args.eta)
    families = [catalogue[name] for name in args.families]
    try:
        runs = plan(families, sorted(set(args.nfe)), args.dopri5_tolerances, args.cfg)
    except ValueError as err:
        raise SystemExit(f"quality_vs_nfe: {err}") from err

    module = load_module(args.checkpoint, args.weights)
    data, data_kwargs = digits_data(args.checkpoint)
    judge = Judge.build(data, cache_dir, device)
    loss_source = None
    if any(f.base.diffusion == "w_kl_eta" and f.base.sampler == "sde" for f in families):
        loss_source = ensure_loss_profile(module, data)  # on the CPU, before the move
    module = module.to(device)
    log(
        f"quality_vs_nfe: {len(runs)} rows, {args.num_samples} samples each, on {device}; judge "
        f"{100 * judge.judge_test_accuracy:.2f}% on the real test digits, FID floor {judge.floor_fid:.2f}"
    )

    adaptive_guess = max(args.nfe)  # what an adaptive row is assumed to cost until one has run
    rows: list[dict[str, Any]] = []
    done_cost = 0.0
    loop_start = time.perf_counter()
    for k, run in enumerate(runs, 1):
        row = measure(module, run, judge, args.num_samples, args.batch_size)
        rows.append(row)
        if run.tolerance is not None:
            adaptive_guess = int(row["nfe"])
        done_cost += run.planned_cost(args.num_samples, int(row["nfe"]))
        left = sum(r.planned_cost(args.num_samples, adaptive_guess) for r in runs[k:])
        rate = (time.perf_counter() - loop_start) / max(done_cost, 1.0)  # seconds per sample-NFE
        where = f"NFE {row['nfe_budget']}" if run.tolerance is None else f"tol {run.tolerance:g}"
        log(
            f"[{k}/{len(runs)}] {run.family.name:<20} cfg {run.cfg_scale:<4g} {where:<10} real NFE "
            f"{_fmt_nfe(row['nfe']):>5}: accuracy {100 * row['conditional_accuracy']:6.2f}%  FID "
            f"{row['fid']:8.3f}  ({row['seconds']:.1f} s; about {_hms(left * rate)} left)"
        )

    report: dict[str, Any] = {
        "command": command,
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": _sha256(args.checkpoint),
        "weights": args.weights,
        "num_samples": args.num_samples,
        "labels": LABEL_MODE,
        "seed": SAMPLE_SEED,
        "batch_size": args.batch_size,
        "device": str(device),
        "nfe_budgets": sorted(set(args.nfe)),
        "families": list(args.families),
        "cfg_scales": list(args.cfg),
        "dopri5_tolerances": list(args.dopri5_tolerances),
        "eta": args.eta,
        "loss_profile_source": loss_source,
        "loss_profile": None
        if module.loss_profile is None
        else {k: v.tolist() for k, v in module.loss_profile._asdict().items()},
        "data": {"module": DigitsDataModule.__name__, **data_kwargs},
        "reference_images": judge.reference_images,
        "floor_fid": judge.floor_fid,
        "judge_test_accuracy": judge.judge_test_accuracy,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    (args.out / "quality_vs_nfe.json").write_text(json.dumps(report, indent=1))
    (args.out / "quality_vs_nfe.md").write_text(markdown(report))
    written = [args.out / "quality_vs_nfe.json", args.out / "quality_vs_nfe.md"]
    if args.plot:
        written.append(plot(report, args.out / "quality_vs_nfe.png"))
    log(
        f"quality_vs_nfe: {len(rows)} rows in {_hms(report['seconds'])}; wrote "
        + ", ".join(map(str, written))
    )
    if not all(math.isfinite(r["fid"]) for r in rows):
        log("quality_vs_nfe: warning: some FIDs are not finite")
    return report


if __name__ == "__main__":
    main()
