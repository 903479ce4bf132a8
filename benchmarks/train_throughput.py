"""Training throughput of SiT on one device: the released recipe against ours, in one process.

Usage::

    python benchmarks/train_throughput.py --out results/
    PYTHONPATH=src python3 benchmarks/train_throughput.py --time-budget 360 --out $OUT   # lent H100,
        # package not installed: about 3-5 minutes, most of it the four torch.compile warm-ups
    python benchmarks/train_throughput.py --device cpu --depth 1 --hidden-size 32 --num-heads 2 \\
        --models SiT-B/2:4 --warmup 1 --steps 1          # CPU smoke run (seconds)

For each model of ``--models`` (``preset:batch``; default ``SiT-B/2:256,SiT-XL/2:64``, latents
4x32x32 = 256 px images, 1000 classes, ``learn_sigma=True`` as released) and each recipe of
``--recipes`` it builds a fresh :class:`~sit_lightning.module.SiTModule`, runs ``--warmup`` untimed
and ``--steps`` timed training steps on fixed random data, and reports the median step time. A
training step is: draws (t, noise, label dropout) + forward + ``loss.mean()`` + backward +
optimizer step + ``zero_grad(set_to_none=True)`` + EMA update. The device is synchronised before
and after each timed step (``time.perf_counter``), so the time covers the kernels, not their launch.

Recipes:

- ``released``: the released train.py's recipe on our network: fp32 weights with TF32 matmuls and
  convolutions (switched on for this recipe only, restored after), ``torch.optim.AdamW(lr=1e-4,
  weight_decay=0)`` with torch's default implementation, the EMA updated parameter by parameter
  (``ema.mul_(decay).add_(p, alpha=1 - decay)``, the released ``update_ema``), and t, noise and
  label dropout drawn with ``torch.rand`` / ``torch.randn`` directly on the device.
- ``bf16``: our training path: ``torch.autocast(dtype=bfloat16)`` around forward + loss,
  :class:`~sit_lightning.module.PaperAdamW` (fused on CUDA), the EMA of
  :class:`~sit_lightning.callbacks.EMACallback` (one ``torch._foreach_lerp_``), and the keyed draws of
  :meth:`SiTModule.training_draws` (Philox on the device, the whole batch at once; the batch's ``key``
  tensor lives on the device, as after Lightning's batch transfer).
- ``bf16_compile``: ``bf16`` plus ``module.network.compile()`` in place (as ``SiTModule.configure_model``
  does); the compilation happens in the warm-up steps.
- ``bf16_compile_unkeyed``: ``bf16_compile`` with t, noise and label dropout drawn by ``torch.rand`` /
  ``torch.randn`` from the device's global generator: the difference to ``bf16_compile`` is the cost
  of keying the draws by sample (up to 2026-11-26 the keyed draws were made per sample on the CPU and
  this recipe was called ``bf16_compile_device_draws``).

The Lightning Trainer is not used: its loop, logging and callback hooks add their own overhead per
step (a few ms), which this benchmark leaves out so that only the recipes differ. On CUDA the
network's label-range check (a host-device sync) is switched off for every recipe, as
``SiTModule.setup`` does under the Trainer.

MFU (model FLOPs utilisation) = 3 x 2 x forward_MACs x batch / step_seconds / peak_flops, with
``2 x forward_MACs = SiT.flops_per_sample()`` (:func:`sit_lightning.models.forward_flops`: matmul FLOPs
of one forward, 2 x 118.6 G for SiT-XL/2 at 256 px; backward counted as two forwards) and
``peak_flops`` measured in the same run as the best of a few timed 8192 x 8192 x 8192 bf16 matmuls
(2 n^3 FLOP each), or given by ``--peak-tflops``.

The released model code's speed was measured on one H100 with the same step, warm-up and median
(docs/performance.md); compare through the ``vs
released`` ratio and the MFU, which do not depend on the card's clocks the way img/s does.

CPU mode (``--device cpu``, a smoke run): no TF32 settings; the bf16 recipes use
``torch.autocast("cpu", dtype=torch.bfloat16)``; MFU is ``n/a`` unless ``--peak-tflops`` is given; the
compile recipes are skipped unless ``--compile-on-cpu``; peak memory is ``n/a``.

Each row is printed (flushed) as soon as it is measured and, with ``--out DIR``, the files
``train_throughput.json`` and ``train_throughput.md`` (``--result-name`` for another stem) are
rewritten after every row, so a run cut off
by a time limit keeps what it measured. A recipe that raises (out of memory, say) gets its error in
its row and the run goes on. ``--time-budget SECONDS`` skips the recipes that would start after that
many seconds, with a note in their rows.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

if str(Path(__file__).resolve().parent) not in sys.path:  # bench_records, beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_records as records  # noqa: E402
from bench_records import cell, say  # noqa: E402

from sit_lightning.callbacks.ema import PAPER_EMA_DECAY, EMACallback  # noqa: E402
from sit_lightning.callbacks.throughput import TRAIN_FLOPS_MULTIPLIER  # noqa: E402
from sit_lightning.models import SIT_PRESETS, SiTConfig  # noqa: E402
from sit_lightning.module import PAPER_LR, PAPER_WEIGHT_DECAY, PaperAdamW, SiTModule  # noqa: E402

__all__ = [
    "RECIPES",
    "BenchmarkReport",
    "ModelSpec",
    "Recipe",
    "Row",
    "TrainingRun",
    "main",
    "measure_peak_flops",
]

Recipe = Literal["released", "bf16", "bf16_compile", "bf16_compile_unkeyed"]
RECIPES: tuple[Recipe, ...] = get_args(Recipe)
COMPILED_RECIPES: frozenset[Recipe] = frozenset({"bf16_compile", "bf16_compile_unkeyed"})
#: Recipes whose t / noise / label dropout come from the device's global generator (not keyed).
UNKEYED_RECIPES: frozenset[Recipe] = frozenset({"released", "bf16_compile_unkeyed"})

DEFAULT_MODELS = "SiT-B/2:256,SiT-XL/2:64"
#: Latents of 256 px images through the SD VAE (4 x 32 x 32) and ImageNet's classes, as released.
LATENT_CHANNELS = 4
LATENT_SIZE = 32
NUM_CLASSES = 1000
DEFAULT_WARMUP = 3
DEFAULT_STEPS = 10
#: The peak-FLOP probe: best of PEAK_TRIALS timings of PEAK_REPEATS back-to-back n x n x n bf16 matmuls.
PEAK_MATMUL_SIZE = 8192
PEAK_WARMUP = 3
PEAK_TRIALS = 5
PEAK_REPEATS = 5
GIB = float(2**30)
TERA = 1e12
MS_PER_S = 1e3
RESULT_NAME = "train_throughput"
TABLE_HEADER = (
    "| model | batch | recipe | ms/step (median) | img/s | MFU | peak GiB | vs released | note |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One model of ``--models``: a preset and its batch size."""

    arch: str
    batch: int

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``"SiT-XL/2:64"`` -> ``ModelSpec("SiT-XL/2", 64)``."""
        arch, sep, batch = text.strip().rpartition(":")
        if not sep or arch not in SIT_PRESETS or not batch.isdigit() or int(batch) < 1:
            raise ValueError(
                f"model {text!r} must be 'preset:batch' with a batch >= 1 and a preset among "
                f"{', '.join(SIT_PRESETS)}"
            )
        return cls(arch, int(batch))


@dataclass(frozen=True)
class ArchOverrides:
    """Overrides of the preset's size (tiny models for smoke runs); None keeps the preset's value."""

    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None


def _parse_models(text: str) -> list[ModelSpec]:
    try:
        return [ModelSpec.parse(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _parse_recipes(text: str) -> list[Recipe]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in RECIPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown recipe(s) {bad or text!r}; choose from {', '.join(RECIPES)}"
        )
    return [name for name in RECIPES if name in names]  # the released row first: the ratios need it


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions within the block (the released recipe); restored on exit."""
    if not enabled:
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _free_memory(device: torch.device, compiled: bool) -> None:
    gc.collect()
    if compiled:
        torch._dynamo.reset()  # drops the compiled graphs (and the weights they hold on to)
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_peak_flops(
    device: torch.device,
    size: int = PEAK_MATMUL_SIZE,
    trials: int = PEAK_TRIALS,
    repeats: int = PEAK_REPEATS,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[float, list[float]]:
    """FLOP/s of ``size^3`` matmuls in ``dtype``: the best trial and every trial's rate.

    Each trial times ``repeats`` back-to-back ``torch.mm`` into a preallocated output (``2 size^3``
    FLOP each) between two device synchronisations.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(PEAK_WARMUP):
        torch.mm(a, b, out=c)
    rates = []
    for _ in range(trials):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=c)
        _synchronize(device)
        rates.append(repeats * 2.0 * size**3 / (time.perf_counter() - start))
    del a, b, c
    _free_memory(device, compiled=False)
    return max(rates), rates


# ------------------------------------------------------------------------------------------------
# One recipe's training state and step
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedBatch:
    """The random training data of one model, made once on the device."""

    x: Tensor  # (N, C, H, W) latents
    y: Tensor  # (N,) labels in [0, num_classes)

    @classmethod
    def make(cls, batch: int, device: torch.device, seed: int) -> FixedBatch:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=generator)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        return cls(x=x.to(device), y=y.to(device))


def _build_module(arch: str, device: torch.device, overrides: ArchOverrides, seed: int) -> SiTModule:
    """A SiTModule on ``device``, initialised there (seconds for SiT-XL/2 on a GPU, not tens on the CPU).

    If building on the device fails, it is built on the CPU and moved (the weights' values do not
    matter for the timings).
    """

    def build() -> SiTModule:
        config = SiTConfig.from_preset(
            arch, input_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES
        )
        sizes = {k: v for k, v in asdict(overrides).items() if v is not None}
        return SiTModule(arch=replace(config, **sizes), seed=seed)

    if device.type == "cpu":
        return build()
    try:
        with device:  # the default device of every factory call in the constructor
            return build().to(device)
    except Exception as err:
        print(
            f"building {arch} on {device} failed ({type(err).__name__}: {err}); building on the CPU",
            flush=True,
        )
        gc.collect()
        return build().to(device)


class TrainingRun:
    """A fresh SiTModule with one recipe's optimizer, EMA and training step (no Lightning Trainer).

    Args:
        recipe: which recipe (see the module docstring).
        arch: SiT preset.
        device: where the model and data live.
        overrides: size overrides of the preset (tiny test models).
        ema_decay: EMA decay per step (0.9999 in the paper).
        seed: weight initialisation and keyed-draw seed.
    """

    def __init__(
        self,
        recipe: Recipe,
        arch: str,
        device: torch.device,
        overrides: ArchOverrides = ArchOverrides(),
        ema_decay: float = PAPER_EMA_DECAY,
        seed: int = 0,
    ) -> None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        self.recipe = recipe
        self.device = device
        self.ema_decay = float(ema_decay)
        self.module = _build_module(arch, device, overrides, seed)
        self.module.train()
        if device.type == "cuda":
            self.module.network.check_label_range = False  # a host-device sync per forward otherwise
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        self._released_ema: list[Tensor] | None = None
        self._ema_callback: EMACallback | None = None
        if recipe == "released":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                trainable, lr=PAPER_LR, weight_decay=PAPER_WEIGHT_DECAY
            )
            # released train.py: ema = deepcopy(model), then update_ema(ema, model, decay=0)
            self._released_ema = [p.detach().clone() for p in self.module.parameters()]
        else:
            self.optimizer = PaperAdamW(trainable)
            self._ema_callback = EMACallback(decay=self.ema_decay)
            # Under the Trainer, on_train_start creates the EMA as a copy of the initial weights.
            self._ema_callback._ensure(self.module)
        if recipe in COMPILED_RECIPES:
            self.module.network.compile()  # in place, as SiTModule.configure_model does

    def ema_tensors(self) -> list[Tensor]:
        """The EMA of every parameter of the module, in ``module.parameters()`` order."""
        if self._released_ema is not None:
            return self._released_ema
        assert self._ema_callback is not None
        return list(self._ema_callback.ema_tensors().values())

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.recipe == "released":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _draws(self, data: FixedBatch, step: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(t, x_0, drop_labels)`` of the recipe; ``drop_labels`` None lets the network draw it."""
        x_1, n = data.x, len(data.x)
        if self.recipe in UNKEYED_RECIPES:
            t = self.module.objective.sample_time(n, device=x_1.device)  # torch.rand on the device
            x_0 = torch.randn_like(x_1)
            if self.recipe == "released":
                return t, x_0, None  # the released LabelEmbedder draws torch.rand inside the forward
            drop = torch.rand(n, device=x_1.device) < self.module.network.class_dropout_prob
            return t, x_0, drop
        keys = torch.arange(step * n, (step + 1) * n, device=x_1.device)
        draws = self.module.training_draws({"x": x_1, "y": data.y, "key": keys}, step)
        return draws.t, draws.x_0, draws.drop_labels

    def _update_ema(self, step: int) -> None:
        if self._released_ema is not None:
            decay = self.ema_decay
            with torch.no_grad():  # the released update_ema, parameter by parameter
                for ema_p, p in zip(self._released_ema, self.module.parameters(), strict=True):
                    ema_p.mul_(decay).add_(p.data, alpha=1 - decay)
            return
        assert self._ema_callback is not None
        self._ema_callback.update(self.module, step + 1)  # optimizer steps taken so far

    def step(self, data: FixedBatch, step: int) -> Tensor:
        """One training step (0-based ``step``); returns the detached mean loss."""
        t, x_0, drop_labels = self._draws(data, step)
        kwargs: dict[str, Any] = {} if drop_labels is None else {"drop_labels": drop_labels}
        with self._autocast():
            out = self.module.objective.loss(self.module.network, data.x, t=t, x_0=x_0, y=data.y, **kwargs)
            loss = out.loss.mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema(step)
        return loss.detach()


# ------------------------------------------------------------------------------------------------
# Measurement and report
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One (model, recipe) measurement; the numbers are None when not measured (see error / note)."""

    model: str
    batch: int
    recipe: str
    ms_per_step: float | None = None
    images_per_sec: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    vs_released: float | None = None
    final_loss: float | None = None
    wall_s: float | None = None  # the whole recipe: build, warm-up (compile) and timed steps
    step_ms: list[float] = field(default_factory=list)
    error: str | None = None
    note: str | None = None

    def markdown(self) -> str:
        mfu = "n/a" if self.mfu is None else f"{100 * self.mfu:.1f}%"
        ratio = "n/a" if self.vs_released is None else f"{self.vs_released:.2f}x"
        note = "; ".join(s for s in (self.error and f"ERROR: {self.error}", self.note) if s)
        return (
            f"| {self.model} | {self.batch} | {self.recipe} | {cell(self.ms_per_step, '.1f')} | "
            f"{cell(self.images_per_sec, '.0f')} | {mfu} | {cell(self.peak_gib, '.1f')} | {ratio} | "
            f"{note.replace('|', '/')} |"
        )


@dataclass
class BenchmarkReport:
    """Everything the run measured: environment, peak FLOP/s and one row per (model, recipe)."""

    environment: dict[str, Any]
    peak_tflops: float | None
    peak_source: str
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    name: str = RESULT_NAME  # the files' stem: NAME.json and NAME.md

    def markdown(self) -> str:
        peak = "n/a" if self.peak_tflops is None else f"{self.peak_tflops:.0f} TFLOP/s ({self.peak_source})"
        env = ", ".join(f"{k} {v}" for k, v in self.environment.items())
        ordered = sorted(self.rows, key=lambda r: (r.model, r.batch, RECIPES.index(r.recipe)))  # type: ignore[arg-type]
        lines = [f"Environment: {env}.", f"Peak bf16 matmul: {peak}.", "", TABLE_HEADER]
        return "\n".join(lines + [row.markdown() for row in ordered]) + "\n"

    def write(self, out: Path) -> None:
        payload = {
            "environment": self.environment,
            "peak_tflops": self.peak_tflops,
            "peak_source": self.peak_source,
            "settings": self.settings,
            "rows": [asdict(row) for row in self.rows],
        }
        records.write_result(out, self.name, payload, self.markdown())


def _measure(
    recipe: Recipe,
    spec: ModelSpec,
    data: FixedBatch,
    args: argparse.Namespace,
    overrides: ArchOverrides,
    peak_flops: float | None,
    row: Row,
) -> None:
    """Fill ``row`` with the timings of one recipe (raises what the recipe raises)."""
    device: torch.device = args.device
    torch.manual_seed(args.seed)  # the device draws of the released recipe
    with _tf32(recipe == "released" and device.type == "cuda"):
        run = TrainingRun(recipe, spec.arch, device, overrides, ema_decay=args.ema_decay, seed=args.seed)
        loss = None
        for i in range(args.warmup):
            loss = run.step(data, i)
        _synchronize(device)
        seconds = []
        for i in range(args.warmup, args.warmup + args.steps):
            _synchronize(device)
            start = time.perf_counter()
            loss = run.step(data, i)
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
    assert loss is not None
    step_s = statistics.median(seconds)
    row.step_ms = [MS_PER_S * s for s in seconds]
    row.ms_per_step = MS_PER_S * step_s
    row.images_per_sec = spec.batch / step_s
    row.final_loss = float(loss)
    if peak_flops is not None:
        flops_per_image = TRAIN_FLOPS_MULTIPLIER * run.module.network.flops_per_sample()
        row.mfu = flops_per_image * row.images_per_sec / peak_flops
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
    if not math.isfinite(row.final_loss):
        row.note = "non-finite loss"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=_parse_models, default=_parse_models(DEFAULT_MODELS),
                        help=f"comma-separated preset:batch (default {DEFAULT_MODELS})")  # fmt: skip
    parser.add_argument("--recipes", type=_parse_recipes, default=list(RECIPES),
                        help=f"comma-separated subset of {','.join(RECIPES)} (default all)")  # fmt: skip
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help="untimed steps (compile happens here)"
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="timed steps; the median is reported"
    )
    parser.add_argument(
        "--device", type=torch.device, default=None, help="default: cuda if available, else cpu"
    )
    parser.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--hidden-size", type=int, default=None, help="override the preset's width")
    parser.add_argument("--num-heads", type=int, default=None, help="override the preset's heads")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak FLOP/s for the MFU, in TFLOP/s (default: measured on CUDA, n/a on CPU)")  # fmt: skip
    parser.add_argument("--peak-matmul-size", type=int, default=PEAK_MATMUL_SIZE, help="n of the peak probe")
    parser.add_argument("--compile-on-cpu", action="store_true", help="run the compile recipes on CPU too")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which the remaining recipes are skipped")  # fmt: skip
    parser.add_argument("--ema-decay", type=float, default=PAPER_EMA_DECAY, help="EMA decay per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write train_throughput.{json,md} here")
    parser.add_argument("--result-name", default=RESULT_NAME,
                        help=f"stem of the files written in --out (default {RESULT_NAME})")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> BenchmarkReport:
    """Run the benchmark (``argv`` as on the command line) and return its report."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.device is not None and args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch.cuda.is_available() is False")
    if args.device is not None and args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu; got {args.device}")
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0; got {args.steps} and {args.warmup}")
    device: torch.device = records.resolve_device(args.device)
    args.device = device
    began = time.perf_counter()

    environment = records.environment(device)
    say("environment: " + ", ".join(f"{k}={v}" for k, v in environment.items()))
    if args.peak_tflops is not None:
        peak_flops: float | None = args.peak_tflops * TERA
        peak_source = "--peak-tflops"
    elif device.type == "cuda":
        n = args.peak_matmul_size
        try:
            peak_flops, rates = measure_peak_flops(device, size=n)
            peak_source = f"measured, best of {PEAK_TRIALS} x {PEAK_REPEATS} bf16 matmuls {n}x{n}x{n}"
            say(f"peak bf16 matmul {n}^3: best {peak_flops / TERA:.0f} TFLOP/s "
                f"(trials: {', '.join(f'{r / TERA:.0f}' for r in rates)})")  # fmt: skip
        except Exception as err:  # the MFU column is lost, the timings are not
            traceback.print_exc()
            peak_flops, peak_source = None, f"measurement failed: {type(err).__name__}"
            _free_memory(device, compiled=False)
    else:
        peak_flops, peak_source = None, "not measured on CPU"
    overrides = ArchOverrides(args.depth, args.hidden_size, args.num_heads)
    settings = {
        "models": [f"{m.arch}:{m.batch}" for m in args.models],
        "recipes": list(args.recipes),
        "warmup": args.warmup,
        "steps": args.steps,
        "overrides": asdict(overrides),
        "ema_decay": args.ema_decay,
        "latent_shape": [LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE],
        "num_classes": NUM_CLASSES,
        "time_budget_s": args.time_budget,
        "command": records.command_line("train_throughput.py", argv),
    }
    report = BenchmarkReport(
        environment,
        None if peak_flops is None else peak_flops / TERA,
        peak_source,
        settings,
        name=args.result_name,
    )
    say("\n" + TABLE_HEADER)

    data = {spec: FixedBatch.make(spec.batch, device, args.seed) for spec in args.models}
    released_ips: dict[ModelSpec, float] = {}
    # Recipe-major order: were the run cut off, every model still has its released and bf16 rows.
    for recipe in args.recipes:
        for spec in args.models:
            row = Row(model=spec.arch, batch=spec.batch, recipe=recipe)
            elapsed = time.perf_counter() - began
            if args.time_budget is not None and elapsed > args.time_budget:
                row.note = f"skipped: time budget of {args.time_budget:.0f} s spent ({elapsed:.0f} s)"
            elif recipe in COMPILED_RECIPES and device.type == "cpu" and not args.compile_on_cpu:
                row.note = "skipped on CPU (use --compile-on-cpu)"
            else:
                say(f"<!-- {spec.arch} batch {spec.batch}, {recipe}: running ({elapsed:.0f} s so far) -->")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                try:
                    _measure(recipe, spec, data[spec], args, overrides, peak_flops, row)
                except Exception as err:  # an OOM or a compile failure is this row's result
                    row.error = records.failure(err)
                    if device.type == "cuda":
                        row.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
                row.wall_s = time.perf_counter() - start
                _free_memory(device, compiled=recipe in COMPILED_RECIPES)
                if recipe == "released" and row.images_per_sec is not None:
                    released_ips[spec] = row.images_per_sec
                if row.images_per_sec is not None and spec in released_ips:
                    row.vs_released = row.images_per_sec / released_ips[spec]
            report.rows.append(row)
            say(row.markdown())
            if args.out is not None:
                report.write(args.out)

    say(f"\n(total {time.perf_counter() - began:.0f} s)\n")
    say(report.markdown())
    return report


if __name__ == "__main__":
    main()
