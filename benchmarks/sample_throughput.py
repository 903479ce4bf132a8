"""Guided sampling speed: our Heun sampler against the released ``heun2`` path, on one device.

Usage::

    python benchmarks/sample_throughput.py --out results/                      # SiT-XL/2, 64 samples
    python benchmarks/sample_throughput.py --checkpoint SiT-XL-2-256x256.pt --vae VAE_DIR --out results/
    python benchmarks/sample_throughput.py --smoke --device cpu                # CPU smoke run (seconds)

The task is the paper's guided ODE sample (SiT-XL/2 at 256 px, i.e. 4x32x32 latents; Heun with
250 NFE; cfg 1.5 on the first three latent channels, as the released ``SiT.forward_with_cfg``) for
``--num-samples`` samples (64) drawn ``--batch`` at a time (64), all variants from the same noise and
labels. Variants:

- ``released``: the released ``sample.py`` / ``sample_ddp.py`` path re-implemented on our network
  (which equals the released one on the golden weights): the noise and labels doubled (``z`` twice,
  labels then the null class 1000), ``torchdiffeq.odeint(fn, z, t, method="heun2")`` (written out
  in :func:`torchdiffeq_heun2` where torchdiffeq is not installed) on
  ``t = torch.linspace(0, 1, 126)`` on the device (125 Heun steps, 250 NFE, and the whole trajectory
  kept, as released), ``fn(t, x) = forward_with_cfg(x, ones(N).to(device) * t, y, 1.5)`` (one forward
  on ``cat([x[:N/2], x[:N/2]])``, channels 0-2 guided, the sample keeps the first half), fp32 weights,
  TF32 matmuls as ``sample_ddp.py --tf32`` (its default; ``--no-released-tf32`` for plain fp32).
- ``fp32``: ours, ``SiTModule.sample(labels, "released-ode-heun250-cfg1.5", noise=z)`` (the same
  Heun scheme and guidance in our sampler: one doubled batch of N conditional + N null rows), fp32
  weights with TF32 matmuls as ``sit-lightning sample`` runs by default (``--tf32``;
  ``--no-fp32-tf32`` for IEEE fp32, about 5x slower on an H100). The reference of the differences.
- ``bf16``: ``fp32`` under ``torch.autocast(dtype=bfloat16)`` (the network in bf16, the ODE state in fp32).
- ``bf16_compile``: ``bf16`` with ``module.network.compile()``; compiled in a warm-up run.

Each variant runs one untimed warm-up batch of ``--warmup-steps`` Heun steps (where the compile
variant compiles: the timed runs have the same shapes), then the timed runs of all ``--num-samples``
(``--time-budget SECONDS`` skips the variants that would start later);
images/s = samples / seconds between two device synchronisations. Reported: images/s, the ratio to
``released``, peak memory, and the difference of each variant's samples to ``fp32``: the mean
absolute difference of the latents and, with ``--vae`` (a local diffusers ``AutoencoderKL``), of the
decoded uint8 images in levels (0-255; the issue's criterion is <= 2). Without ``--vae`` only the
latent difference is measured and the uint8 column says ``n/a``.

Weights: ``--checkpoint`` loads released SiT weights (``load_released_sit``). Without it the network
has random weights whose zero-initialised layers (adaLN-Zero, the final layer) are drawn from
N(0, 0.02^2), so that the field is not identically 0; the timings are the same, the differences are
only indicative.

``--smoke`` (CPU tests): a one-block SiT of width 32 on 4x8x8 latents, 2 samples, 2 Heun steps.
On the CPU the compile variant is skipped unless ``--compile-on-cpu`` and ``released`` runs without TF32.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

if str(Path(__file__).resolve().parent) not in sys.path:  # bench_records, beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_records as records  # noqa: E402
from bench_records import cell, say  # noqa: E402

from sit_lightning.evaluation.images import make_decoder, to_uint8  # noqa: E402
from sit_lightning.models import SiTConfig  # noqa: E402
from sit_lightning.module import SiTModule  # noqa: E402
from sit_lightning.sampling import SamplerSettings  # noqa: E402
from sit_lightning.sampling.presets import sampler_preset  # noqa: E402

__all__ = ["VARIANTS", "main", "released_heun2_sample", "torchdiffeq_heun2"]

Variant = Literal["released", "fp32", "bf16", "bf16_compile"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
PRESET = "released-ode-heun250-cfg1.5"
#: The released sampler's grid points for 250 NFE with heun2 (126 points: 125 steps of 2 NFE).
RELEASED_NUM_STEPS = 126
RELEASED_GUIDED_CHANNELS = 3  # SiT.forward_with_cfg: eps, rest = model_out[:, :3], model_out[:, 3:]
DEFAULT_ARCH = "SiT-XL/2"
DEFAULT_NUM_SAMPLES = 64
DEFAULT_WARMUP_STEPS = 2
PERTURB_STD = 0.02
GIB = float(2**30)
RESULT_NAME = "sample_throughput"
#: The issue's bound on the decoded images' mean absolute difference (uint8 levels).
MAX_UINT8_MAD = 2.0
TABLE_HEADER = (
    "| variant | samples | NFE | s | img/s | vs released | peak GiB | latent MAD vs fp32 | uint8 MAD vs fp32 | note |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


@dataclass
class Row:
    """One variant's measurement."""

    variant: str
    samples: int
    nfe: int | None = None
    seconds: float | None = None
    images_per_sec: float | None = None
    vs_released: float | None = None
    peak_gib: float | None = None
    latent_mad: float | None = None
    uint8_mad: float | None = None
    note: str = ""
    error: str | None = None

    def markdown(self) -> str:
        note = self.error or self.note
        return (
            f"| {self.variant} | {self.samples} | {self.nfe or 'n/a'} | {cell(self.seconds, '.2f')} | "
            f"{cell(self.images_per_sec, '.3f')} | {cell(self.vs_released, '.2f')}{'x' if self.vs_released else ''} | {cell(self.peak_gib, '.1f')} | "
            f"{cell(self.latent_mad, '.2e')} | {cell(self.uint8_mad, '.3f')} | {note} |"
        )


@dataclass
class Report:
    environment: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The issue's sampling goal: best of ours against released, and its uint8 difference."""
        by = {row.variant: row for row in self.rows}
        ours = [by[v] for v in ("bf16_compile", "bf16", "fp32") if v in by and by[v].images_per_sec]
        best = max(ours, key=lambda row: row.images_per_sec or 0.0, default=None)
        return {
            "best_variant": None if best is None else best.variant,
            "speedup_vs_released": None if best is None else best.vs_released,
            "uint8_mad_vs_fp32": None if best is None else best.uint8_mad,
            "latent_mad_vs_fp32": None if best is None else best.latent_mad,
            "goal_speedup": 2.0,
            "goal_uint8_mad": MAX_UINT8_MAD,
        }

    def markdown(self) -> str:
        lines = [TABLE_HEADER, *(row.markdown() for row in self.rows)]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        payload = {
            "environment": self.environment,
            "settings": self.settings,
            "rows": [asdict(r) for r in self.rows],
            "summary": self.summary(),
        }
        records.write_result(out, RESULT_NAME, payload, self.markdown())


# ------------------------------------------------------------------------------------------------
# The released path
# ------------------------------------------------------------------------------------------------
def forward_with_cfg(network: torch.nn.Module, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
    """The released ``SiT.forward_with_cfg``: one forward of the doubled first half, channels 0-2 guided."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = network(combined, t, y)
    eps, rest = model_out[:, :RELEASED_GUIDED_CHANNELS], model_out[:, RELEASED_GUIDED_CHANNELS:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


@torch.no_grad()
def released_heun2_sample(
    network: torch.nn.Module,
    z: Tensor,
    labels: Tensor,
    cfg_scale: float,
    num_null: int,
    num_steps: int = RELEASED_NUM_STEPS,
) -> tuple[Tensor, int]:
    """Samples of the released ``sample.py`` ODE path (velocity, Linear path: t from 0 to 1); and its NFE.

    ``z`` and ``labels`` are doubled here as ``sample.py`` does; returns the first half of the last
    point of the trajectory, as released.
    """
    device = z.device
    z2 = torch.cat([z, z], 0)
    y2 = torch.cat([labels, torch.full_like(labels, num_null)], 0)
    nfe = [0]

    def fn(t: Tensor, x: Tensor) -> Tensor:  # released ode.sample's _fn with velocity_ode's drift
        t = torch.ones(x.size(0)).to(device) * t
        nfe[0] += 1
        return forward_with_cfg(network, x, t, y2, cfg_scale)

    t = torch.linspace(0.0, 1.0, num_steps).to(device)
    try:
        import torchdiffeq
    except ImportError:  # a machine without it: the same loop, written out
        trajectory = torchdiffeq_heun2(fn, z2, t)
    else:
        trajectory = torchdiffeq.odeint(fn, z2, t, method="heun2", atol=[1e-6], rtol=[1e-3])
    return trajectory[-1].chunk(2, dim=0)[0], nfe[0]


def torchdiffeq_heun2(fn: Callable[[Tensor, Tensor], Tensor], y0: Tensor, t: Tensor) -> Tensor:
    """torchdiffeq 0.2.5's ``odeint(method="heun2")`` on the grid ``t``, written out (same operations).

    ``FixedGridODESolver.integrate`` with ``Heun2._step_func`` / ``rk2_step_func`` and the time cast of
    ``_PerturbFunc``; the grid comparisons (``t1 >= t[j]``, ``_linear_interp``'s ``t == t0``) read
    device tensors on the host, as torchdiffeq does. Returns the whole trajectory ``(len(t), *y0.shape)``.
    """
    solution = torch.empty(len(t), *y0.shape, dtype=y0.dtype, device=y0.device)
    solution[0] = y0
    j = 1
    for t0, t1 in zip(t[:-1], t[1:], strict=True):
        dt = t1 - t0
        k1 = fn(t0.to(y0.abs().dtype), y0)
        k2 = fn((t0 + dt * 1.0).to(y0.abs().dtype), y0 + dt * k1 * 1.0)
        y1 = y0 + dt * (k1 * 0.5 + k2 * 0.5)
        while j < len(t) and t1 >= t[j]:
            if t[j] == t0:
                solution[j] = y0
            elif t[j] == t1:
                solution[j] = y1
            else:
                solution[j] = y0 + (t[j] - t0) / (t1 - t0) * (y1 - y0)
            j += 1
        y0 = y1
    return solution


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """``allow_tf32`` of CUDA matmuls inside the block (the released ``sample_ddp.py --tf32``), restored after."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32 = saved


def _build_module(args: argparse.Namespace) -> SiTModule:
    """SiTModule on the device: released weights from ``--checkpoint``, else perturbed random ones."""
    device: torch.device = args.device
    if args.smoke:
        config = SiTConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10)
    else:
        config = SiTConfig.from_preset(args.arch, input_size=32, in_channels=4, num_classes=1000)
    with device if device.type == "cuda" else contextlib.nullcontext():
        module = SiTModule(arch=config, seed=args.seed)
    module.to(device).eval()
    if args.checkpoint is not None:
        from sit_lightning.models.checkpoint import load_released_sit

        released = load_released_sit(args.checkpoint, args.arch, map_location=device)
        module.network.load_state_dict(released.state_dict())
        del released
    else:
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        with torch.no_grad():
            for p in module.network.parameters():
                if not p.any():  # adaLN-Zero and final layers: an untrained network's field is 0
                    p.copy_(torch.randn(p.shape, generator=generator) * PERTURB_STD)
    if device.type == "cuda":
        module.network.check_label_range = False  # a host-device sync per forward (SiTModule.setup)
    return module


def _run_variant(
    variant: Variant,
    module: SiTModule,
    settings: SamplerSettings,
    noise: Tensor,
    labels: Tensor,
    batch: int,
    released_tf32: bool,
    fp32_tf32: bool = True,
) -> tuple[Tensor, int]:
    """All samples of one variant, ``batch`` at a time: ``(samples (N, C, H, W) float32, NFE per sample)``.

    The released path runs on ``settings.steps + 1`` grid points (126 for 125 steps).
    """
    device = noise.device
    out, nfe = [], 0
    for start in range(0, len(noise), batch):
        z, y = noise[start : start + batch], labels[start : start + batch]
        if variant == "released":
            assert settings.steps is not None
            with _tf32(released_tf32 and device.type == "cuda"):
                samples, nfe = released_heun2_sample(
                    module.network, z, y, settings.cfg_scale, module.network.num_classes, settings.steps + 1
                )
        else:
            autocast = (
                torch.autocast(device.type, dtype=torch.bfloat16)
                if variant in ("bf16", "bf16_compile")
                else contextlib.nullcontext()
            )
            with _tf32(fp32_tf32 and variant == "fp32" and device.type == "cuda"), autocast:
                result = module.sample(y, settings, noise=z, use_ema=False)
            samples, nfe = result.samples, result.nfe
        out.append(samples.float())
    return torch.cat(out), nfe


def _decode_uint8(decoder: Any, latents: Tensor, batch: int) -> Tensor:
    return torch.cat([to_uint8(decoder(latents[i : i + batch])).cpu() for i in range(0, len(latents), batch)])


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def _parse_variants(text: str) -> list[Variant]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {bad or text!r}; choose from {', '.join(VARIANTS)}"
        )
    return [
        v for v in VARIANTS if v in names
    ]  # released and fp32 first: the ratios and differences need them


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", type=_parse_variants, default=list(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default all)")  # fmt: skip
    parser.add_argument("--arch", default=DEFAULT_ARCH, help="SiT preset (default SiT-XL/2)")
    parser.add_argument("--checkpoint", default=None, help="released SiT weights (default: random weights)")
    parser.add_argument(
        "--vae", default=None, help="local diffusers AutoencoderKL: measure uint8 differences"
    )
    parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    parser.add_argument("--batch", type=int, default=None, help="samples per sampler call (default all)")
    parser.add_argument("--steps", type=int, default=None, help="Heun steps (default 125: 250 NFE)")
    parser.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS)
    parser.add_argument("--no-released-tf32", dest="released_tf32", action="store_false",
                        help="run the released path in plain fp32 (default: TF32, as sample_ddp.py)")  # fmt: skip
    parser.add_argument("--no-fp32-tf32", dest="fp32_tf32", action="store_false",
                        help="our fp32 reference in IEEE fp32 (default: TF32, as sit-lightning sample)")  # fmt: skip
    parser.add_argument("--compile-on-cpu", action="store_true")
    parser.add_argument("--device", type=torch.device, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which the remaining variants are skipped")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny network, 2 samples, 2 steps (CPU tests)")
    parser.add_argument("--out", type=Path, default=None, help=f"write {RESULT_NAME}.{{json,md}} here")
    return parser


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark (``argv`` as on the command line) and return its report."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    began = time.perf_counter()
    args.device = records.resolve_device(args.device)
    if args.smoke:
        args.num_samples, args.steps = min(args.num_samples, 2), args.steps or 2
        args.warmup_steps = 1
    steps = args.steps or sampler_preset(PRESET).steps
    if args.num_samples < 1 or steps < 1:
        parser.error(f"--num-samples and --steps must be >= 1; got {args.num_samples} and {steps}")
    batch = args.batch or args.num_samples
    device: torch.device = args.device
    settings = replace(sampler_preset(PRESET), steps=steps)
    report = Report(
        records.environment(device),
        {
            "arch": "smoke" if args.smoke else args.arch,
            "preset": PRESET,
            "steps": steps,
            "released_num_steps": steps + 1,
            "num_samples": args.num_samples,
            "batch": batch,
            "checkpoint": args.checkpoint,
            "vae": args.vae,
            "released_tf32": args.released_tf32 and device.type == "cuda",
            "fp32_tf32": args.fp32_tf32 and device.type == "cuda",
            "time_budget_s": args.time_budget,
            "command": records.command_line("sample_throughput.py", argv),
        },
    )
    say("environment: " + ", ".join(f"{k}={v}" for k, v in report.environment.items()))
    module = _build_module(args)
    noise = module.sample_noise(range(args.num_samples), seed=args.seed).float()
    labels = torch.randint(
        0, module.network.num_classes, (args.num_samples,), generator=torch.Generator().manual_seed(args.seed)
    ).to(device)
    decoder = make_decoder(args.vae) if args.vae else None
    outputs: dict[str, Tensor] = {}
    say("\n" + TABLE_HEADER)
    for variant in args.variants:
        row = Row(variant=variant, samples=args.num_samples)
        report.rows.append(row)
        elapsed = time.perf_counter() - began
        if args.time_budget is not None and elapsed > args.time_budget:
            row.note = f"skipped: time budget of {args.time_budget:.0f} s spent ({elapsed:.0f} s)"
            say(row.markdown())
            continue
        if variant == "bf16_compile" and device.type == "cpu" and not args.compile_on_cpu:
            row.note = "skipped on CPU (use --compile-on-cpu)"
            say(row.markdown())
            continue
        if variant in ("released", "fp32"):
            tf32 = args.released_tf32 if variant == "released" else args.fp32_tf32
            row.note = "fp32 + TF32" if tf32 and device.type == "cuda" else "fp32"
        try:
            if variant == "bf16_compile":  # compiled in the warm-up (same batch shape), not in the timed runs
                module.network.compile()  # in place, as SiTModule.configure_model does
            warm = (replace(settings, steps=args.warmup_steps), noise[:batch], labels[:batch])
            _run_variant(variant, module, *warm, batch, args.released_tf32, args.fp32_tf32)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _synchronize(device)
            start = time.perf_counter()
            samples, row.nfe = _run_variant(
                variant, module, settings, noise, labels, batch, args.released_tf32, args.fp32_tf32
            )
            _synchronize(device)
            row.seconds = time.perf_counter() - start
            row.images_per_sec = args.num_samples / row.seconds
            if device.type == "cuda":
                row.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
            outputs[variant] = samples
            if not math.isfinite(float(samples.abs().max())):
                row.note = "non-finite samples"
        except Exception as err:  # an OOM or a compile failure is this row's result
            row.error = records.failure(err)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _compare(report, outputs, None, batch)  # ratios and latent differences so far (a cut run keeps them)
        say(row.markdown())
        if args.out is not None:
            report.write(args.out)
    _compare(report, outputs, decoder, batch)
    say("\n" + report.markdown())
    say("summary: " + json.dumps(report.summary()))
    if args.out is not None:
        report.write(args.out)
    return report


def _compare(report: Report, outputs: dict[str, Tensor], decoder: Any, batch: int) -> None:
    """Ratios to ``released`` and differences to ``fp32`` (latents; decoded uint8 images with a decoder)."""
    released = next((r for r in report.rows if r.variant == "released" and r.images_per_sec), None)
    reference = outputs.get("fp32")
    reference_images = (
        None if reference is None or decoder is None else _decode_uint8(decoder, reference, batch)
    )
    for row in report.rows:
        if released is not None and row.images_per_sec is not None:
            row.vs_released = row.images_per_sec / (released.images_per_sec or math.nan)
        samples = outputs.get(row.variant)
        if samples is None or reference is None:
            continue
        row.latent_mad = float((samples - reference).abs().mean())
        if reference_images is not None:
            images = _decode_uint8(decoder, samples, batch)
            row.uint8_mad = float((images.float() - reference_images.float()).abs().mean())


if __name__ == "__main__":
    main()
