"""What the Lightning Trainer costs per step: ``sit-lightning fit``'s own step against a plain PyTorch loop.

Usage::

    python benchmarks/lightning_overhead.py --models SiT-XL/2:64 --compile --out results/
    python benchmarks/lightning_overhead.py --device cpu --depth 1 --hidden-size 32 --num-heads 2 \\
        --models SiT-B/2:4 --warmup 1 --steps 2          # CPU smoke run

Both recipes train the same :class:`~sit_lightning.module.SiTModule` (one instance, so with
``--compile`` the network is compiled once, by the first recipe's warm-up) on the same batches:
random latents 4x32x32 (256 px), 1000 classes, already on the device (as after Lightning's batch
transfer of precomputed latents), with ``key`` tensors ``step * N + arange(N)`` on the device, so the
keyed draws of ``SiTModule.training_draws`` run in both.

- ``plain``: a plain loop over the module's own parts, the work of fit's step and nothing else:
  keyed draws, ``torch.autocast(bfloat16)`` around forward + ``loss.mean()``, backward, the gradient
  norm and the non-finite guard of ``NonFiniteSteps`` (as ``configure_gradient_clipping``), the
  optimizer of ``configure_optimizers`` (``PaperAdamW``, fused on CUDA), ``zero_grad(set_to_none=True)``
  and the :class:`~sit_lightning.callbacks.EMACallback` update.
- ``lightning``: ``Trainer.fit`` with what ``sit-lightning fit`` uses per step: ``precision
  bf16-mixed``, ``EMACallback``, ``PreemptionCallback``, the default logger (TensorBoard) with the
  base configs' ``log_every_n_steps: 100``, and the progress bar. Checkpointing is off (the configs
  save every 50,000 steps; a save is not a per-step cost).

The timed span is ``--steps`` steps after ``--warmup`` untimed ones, between two device
synchronisations (in the Trainer: a callback at the first timed batch's start and the last one's end),
so the host may run ahead of the device inside it as in a real run: every host-device sync in a step
shows up. With ``--rounds R`` the two recipes alternate R times (plain, lightning, plain, ...) and
the best round of each counts. Reported: ms/step, images/s, the Lightning overhead
``lightning / plain - 1`` (the goal of issue 12: <= 3%), peak memory, and the training FLOPs per image
(for the MFU against a measured matmul rate, see ``benchmarks/gpu_session.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # train_throughput and bench_records, beside this file

import bench_records as records  # noqa: E402
from bench_records import cell, say  # noqa: E402
from train_throughput import (  # noqa: E402
    DEFAULT_MODELS,
    GIB,
    ArchOverrides,
    FixedBatch,
    ModelSpec,
    _build_module,
    _parse_models,
)

from sit_lightning.callbacks import EMACallback, PreemptionCallback  # noqa: E402
from sit_lightning.callbacks.throughput import TRAIN_FLOPS_MULTIPLIER  # noqa: E402
from sit_lightning.module import NonFiniteSteps, SiTModule  # noqa: E402

__all__ = ["RECIPES", "main"]

RECIPES = ("plain", "lightning")
DEFAULT_WARMUP = 5
DEFAULT_STEPS = 30
#: The base configs' logging period (configs/base/imagenet256.yaml).
LOG_EVERY_N_STEPS = 100
#: The issue's bound on the Trainer's overhead against the plain loop.
MAX_OVERHEAD = 0.03
RESULT_NAME = "lightning_overhead"
MS_PER_S = 1e3
TABLE_HEADER = (
    "| model | batch | plain ms/step | Lightning ms/step | plain img/s | Lightning img/s | overhead | "
    "peak GiB (Lightning) | note |\n|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


@dataclass
class Row:
    """One model: both recipes' best round."""

    model: str
    batch: int
    plain_ms: float | None = None
    lightning_ms: float | None = None
    plain_rounds_ms: list[float] = field(default_factory=list)
    lightning_rounds_ms: list[float] = field(default_factory=list)
    overhead: float | None = None
    plain_images_per_sec: float | None = None
    lightning_images_per_sec: float | None = None
    peak_gib: float | None = None
    train_flops_per_image: float | None = None
    note: str = ""
    error: str | None = None

    def finish(self) -> None:
        if self.plain_rounds_ms:
            self.plain_ms = min(self.plain_rounds_ms)
            self.plain_images_per_sec = self.batch / (self.plain_ms / MS_PER_S)
        if self.lightning_rounds_ms:
            self.lightning_ms = min(self.lightning_rounds_ms)
            self.lightning_images_per_sec = self.batch / (self.lightning_ms / MS_PER_S)
        if self.plain_ms and self.lightning_ms:
            self.overhead = self.lightning_ms / self.plain_ms - 1

    def markdown(self) -> str:
        overhead = "n/a" if self.overhead is None else f"{100 * self.overhead:+.1f}%"
        return (
            f"| {self.model} | {self.batch} | {cell(self.plain_ms, '.1f')} | {cell(self.lightning_ms, '.1f')} | "
            f"{cell(self.plain_images_per_sec, '.0f')} | {cell(self.lightning_images_per_sec, '.0f')} | {overhead} | "
            f"{cell(self.peak_gib, '.1f')} | {self.error or self.note} |"
        )


# ------------------------------------------------------------------------------------------------
# The data and the two recipes
# ------------------------------------------------------------------------------------------------
class DeviceBatches:
    """``total`` batches ``{"x", "y", "key"}`` of one fixed latent batch, keys ``step * N + arange(N)``."""

    def __init__(self, data: FixedBatch, total: int) -> None:
        n, device = len(data.x), data.x.device
        self.batches = [
            {"x": data.x, "y": data.y, "key": torch.arange(i * n, (i + 1) * n, device=device)}
            for i in range(total)
        ]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(module: SiTModule, batches: DeviceBatches, warmup: int, steps: int) -> float:
    """Seconds of ``steps`` steps of fit's work in a plain loop (after ``warmup`` untimed ones)."""
    device = module.device
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer), "a scheduler is not part of this benchmark"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ema = EMACallback()
    ema._ensure(module)  # under the Trainer: on_train_start
    nonfinite = NonFiniteSteps(max_consecutive=10)
    start = 0.0
    for step, batch in enumerate(batches):
        if step == warmup:
            _synchronize(device)
            start = time.perf_counter()
        if step == warmup + steps:
            break
        draws = module.training_draws(batch, step)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = module.objective.loss(
                module.network,
                batch["x"],
                t=draws.t,
                x_0=draws.x_0,
                y=batch["y"],
                drop_labels=draws.drop_labels,
            )
            loss = out.loss.mean()
        loss.backward()
        grad_norm = nonfinite.grad_norm(params)
        nonfinite.guard(optimizer, torch.isfinite(grad_norm), scaler_skips=False)
        optimizer.step()
        nonfinite.release()
        optimizer.zero_grad(set_to_none=True)
        ema.update(module, step + 1)
    _synchronize(device)
    seconds = time.perf_counter() - start
    del optimizer, ema
    return seconds


class _StepTimer(pl.Callback):
    """Device-synchronised wall time from the start of step ``warmup`` to the end of step ``warmup + steps - 1``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start: float | None = None
        self.seconds: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            _synchronize(pl_module.device)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup + self.steps and self.start is not None:
            _synchronize(pl_module.device)
            self.seconds = time.perf_counter() - self.start


def lightning_fit(module: SiTModule, batches: DeviceBatches, warmup: int, steps: int, root: Path) -> float:
    """Seconds of ``steps`` steps of ``Trainer.fit`` with fit's per-step callbacks, logger and progress bar."""
    timer = _StepTimer(warmup, steps)
    device = module.device
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision="bf16-mixed",
        max_steps=warmup + steps,
        log_every_n_steps=LOG_EVERY_N_STEPS,
        callbacks=[EMACallback(), PreemptionCallback(), timer],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=batches)
    if timer.seconds is None:
        raise RuntimeError(f"the Trainer stopped at step {trainer.global_step} before the timed steps ended")
    return timer.seconds


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=_parse_models, default=_parse_models(DEFAULT_MODELS),
                        help=f"comma-separated preset:batch (default {DEFAULT_MODELS})")  # fmt: skip
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help="untimed steps (compile happens here)"
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=1, help="alternations plain / lightning; best counts")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the network (--model.compile true)"
    )
    parser.add_argument(
        "--device", type=torch.device, default=None, help="default: cuda if available, else cpu"
    )
    parser.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--hidden-size", type=int, default=None, help="override the preset's width")
    parser.add_argument("--num-heads", type=int, default=None, help="override the preset's heads")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which models and rounds after a model's first are skipped")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help=f"write {RESULT_NAME}.{{json,md}} here")
    parser.add_argument("--result-name", default=RESULT_NAME,
                        help=f"stem of the files written in --out (default {RESULT_NAME})")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark (``argv`` as on the command line) and return its rows."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.device = records.resolve_device(args.device)
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error(
            f"--steps, --warmup and --rounds must be >= 1; got {args.steps}, {args.warmup}, {args.rounds}"
        )
    device: torch.device = args.device
    began = args.began = time.perf_counter()
    environment = records.environment(device)
    overrides = ArchOverrides(args.depth, args.hidden_size, args.num_heads)
    settings = {
        "models": [f"{m.arch}:{m.batch}" for m in args.models],
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "compile": args.compile,
        "overrides": asdict(overrides),
        "log_every_n_steps": LOG_EVERY_N_STEPS,
        "command": records.command_line("lightning_overhead.py", argv),
    }
    say("environment: " + ", ".join(f"{k}={v}" for k, v in environment.items()))
    rows: list[Row] = []
    root = (args.out or Path(".")) / "lightning_overhead_runs"
    for spec in args.models:
        row = Row(model=spec.arch, batch=spec.batch)
        rows.append(row)
        elapsed = time.perf_counter() - began
        if args.time_budget is not None and elapsed > args.time_budget:
            row.note = f"skipped: time budget of {args.time_budget:.0f} s spent ({elapsed:.0f} s)"
        else:
            try:
                _measure(spec, args, overrides, row, root, say)
            except Exception as err:  # an OOM or a compile failure is this row's result
                row.error = records.failure(err)
            gc.collect()
            if args.compile:
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row.finish()
        say(TABLE_HEADER + "\n" + row.markdown())
        if args.out is not None:
            _write(args.out, environment, settings, rows, args.result_name)
    return rows


def _measure(
    spec: ModelSpec,
    args: argparse.Namespace,
    overrides: ArchOverrides,
    row: Row,
    root: Path,
    say: Callable[[str], None],
) -> None:
    device: torch.device = args.device
    module = _build_module(spec.arch, device, overrides, args.seed)
    module.compile_network = bool(args.compile)
    module.configure_model()  # compiles in place; the Trainer's configure_model then finds it compiled
    row.train_flops_per_image = TRAIN_FLOPS_MULTIPLIER * module.network.flops_per_sample()
    if device.type == "cuda":
        module.network.check_label_range = False  # as SiTModule.setup does on CUDA (plain loop)
    data = FixedBatch.make(spec.batch, device, args.seed)
    batches = DeviceBatches(data, args.warmup + args.steps)
    for round_ in range(args.rounds):
        elapsed = time.perf_counter() - args.began
        if round_ > 0 and args.time_budget is not None and elapsed > args.time_budget:
            row.note = f"{round_} of {args.rounds} rounds: time budget of {args.time_budget:.0f} s spent"
            break
        seconds = plain_loop(module, batches, args.warmup, args.steps)
        row.plain_rounds_ms.append(MS_PER_S * seconds / args.steps)
        say(f"<!-- {spec.arch}:{spec.batch} round {round_}: plain {row.plain_rounds_ms[-1]:.2f} ms/step -->")
        gc.collect()
        seconds = lightning_fit(module, batches, args.warmup, args.steps, root)
        row.lightning_rounds_ms.append(MS_PER_S * seconds / args.steps)
        if device.type == "cuda":
            row.peak_gib = max(row.peak_gib or 0.0, torch.cuda.max_memory_allocated(device) / GIB)
        say(
            f"<!-- {spec.arch}:{spec.batch} round {round_}: Lightning {row.lightning_rounds_ms[-1]:.2f} ms/step -->"
        )
        gc.collect()
    with contextlib.suppress(Exception):
        del module


def _write(
    out: Path, environment: dict[str, Any], settings: dict[str, Any], rows: list[Row], name: str = RESULT_NAME
) -> None:
    payload = {
        "environment": environment,
        "settings": settings,
        "max_overhead": MAX_OVERHEAD,
        "rows": [asdict(row) for row in rows],
    }
    records.write_result(
        out, name, payload, TABLE_HEADER + "\n" + "\n".join(r.markdown() for r in rows) + "\n"
    )


if __name__ == "__main__":
    main()
