"""Score training recipes for the CPU digits demo: conditional accuracy and FID per recipe and seed.

The demo (``configs/digits.yaml``) must train and evaluate within 10 minutes on a 2-core CPU and
still reach >= 95% conditional accuracy without guidance. This script trains each named recipe
(``configs/digits.yaml`` plus CLI overrides) for each seed in a subprocess, then scores the EMA
samples exactly as the demo does (2,000 samples, 200 per class, seed 0, Heun) with 16 and with 8 ODE
steps, without and with guidance 1.5. Runs are independent, so they can go in parallel (``--jobs``)
on a machine with many cores or a GPU: the accuracy of a recipe does not depend on the device (the
draws are keyed and made on the CPU), only its wall time does -- time the chosen recipe on the
target CPU with the real command.

Usage::

    python benchmarks/digits_recipes.py --out runs/recipes --jobs 8 --accelerator gpu
    python benchmarks/digits_recipes.py --recipes base oc2e3_1500 --seeds 0 1 --out runs/recipes

Prints one markdown row per run as it finishes and a table at the end (also ``results.md`` and
``results.json`` under ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"


def one_cycle(max_lr: float, steps: int, warmup: int = 100) -> list[str]:
    """Overrides for a warm-up then cosine decay (OneCycleLR without momentum cycling)."""
    scheduler = {
        "class_path": "torch.optim.lr_scheduler.OneCycleLR",
        "init_args": {
            "max_lr": max_lr,
            "total_steps": steps,
            "pct_start": warmup / steps,
            "anneal_strategy": "cos",
            "cycle_momentum": False,
            "div_factor": 100.0,
            "final_div_factor": 100.0,
        },
    }
    return ["--trainer.max_steps", str(steps), "--model.lr_scheduler", json.dumps(scheduler)]


def warmup_constant(lr: float, steps: int, warmup: int = 100) -> list[str]:
    """Overrides for a linear warm-up then a constant learning rate (the first demo's recipe)."""
    scheduler = {
        "class_path": "torch.optim.lr_scheduler.LinearLR",
        "init_args": {"start_factor": 0.01, "total_iters": warmup},
    }
    return [
        "--trainer.max_steps",
        str(steps),
        "--model.optimizer.init_args.lr",
        str(lr),
        "--model.lr_scheduler",
        json.dumps(scheduler),
    ]


#: overrides for logit-normal (mean 0, std 1) training times instead of uniform ones
LOGIT_NORMAL_TIME = [
    "--model.objective.init_args.time_sampler",
    json.dumps({"class_path": "sit_lightning.objective.LogitNormalTimeSampler"}),
]

#: name -> CLI overrides on top of configs/digits.yaml (each sets its own steps and schedule, so the
#: names keep their meaning when the config's defaults change)
RECIPES: dict[str, list[str]] = {
    "base": warmup_constant(1e-3, 2000),
    "base_1600": warmup_constant(1e-3, 1600),
    "oc1e3_1500": one_cycle(1e-3, 1500),
    "oc2e3_1500": one_cycle(2e-3, 1500),
    "oc3e3_1500": one_cycle(3e-3, 1500),
    "oc2e3_1200": one_cycle(2e-3, 1200),
    "oc2e3_1500_ema099": one_cycle(2e-3, 1500),
    "oc2e3_1500_logitnormal": one_cycle(2e-3, 1500) + LOGIT_NORMAL_TIME,
    "oc4e3_1500": one_cycle(4e-3, 1500),
    "oc3e3_1200": one_cycle(3e-3, 1200),
    "oc4e3_1200": one_cycle(4e-3, 1200),
    "oc3e3_1000": one_cycle(3e-3, 1000),
    "oc3e3_1500_logitnormal": one_cycle(3e-3, 1500) + LOGIT_NORMAL_TIME,
    # cheaper steps (about 150 ms instead of 190 ms on the 2-core CPU), more of them
    "w96_oc3e3_1800": one_cycle(3e-3, 1800) + ["--model.arch.hidden_size", "96"],
    "d3_oc3e3_1800": one_cycle(3e-3, 1800) + ["--model.arch.depth", "3"],
}


#: recipe -> EMA decay, where it differs from the config's (a list entry is awkward to override on the CLI)
EMA_DECAY: dict[str, float] = {"oc2e3_1500_ema099": 0.99}


def run_one(name: str, seed: int, out: Path, accelerator: str, max_steps: int | None) -> dict:
    """Train one recipe with one model seed in this process and score it; returns the result row."""
    import dataclasses

    import torch

    from sit_lightning.callbacks import EMACallback, FIDCallback
    from sit_lightning.cli import SiTLightningCLI
    from sit_lightning.module import SiTModule

    args = ["--config", str(CONFIG), *RECIPES[name]]
    args += ["--model.seed", str(seed), "--trainer.accelerator", accelerator]
    args += [
        "--trainer.default_root_dir",
        str(out / f"{name}-s{seed}"),
        "--trainer.enable_progress_bar",
        "false",
    ]
    args += ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    from lightning.pytorch import LightningDataModule

    cli = SiTLightningCLI(SiTModule, LightningDataModule, subclass_mode_data=True, run=False, args=args)
    if name in EMA_DECAY:
        next(cb for cb in cli.trainer.callbacks if isinstance(cb, EMACallback)).decay = EMA_DECAY[name]
    demo = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FIDCallback))
    # the same samples with 8 Heun steps, scored in on_train_end like the demo's own (after fit the
    # module has been moved back to the CPU by Lightning's teardown)
    heun8 = FIDCallback(
        num_samples=demo.num_samples,
        seed=demo.seed,
        settings=dataclasses.replace(demo.settings, method="heun", steps=8),
        cfg_scales=demo.cfg_scales,
        batch_size=demo.batch_size,
        floor=False,
        report=False,
    )
    cli.trainer.callbacks.append(heun8)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    scores = {f"heun{demo.settings.steps}": demo.history, "heun8": heun8.history}
    row = {
        "recipe": name,
        "seed": seed,
        "steps": cli.trainer.global_step,
        "device": torch.cuda.get_device_name() if accelerator == "gpu" else "cpu",
        "seconds": time.perf_counter() - start,
    }
    for sampler, results in scores.items():
        for step, r in results:
            if step != cli.trainer.global_step:
                continue
            row[f"acc_{sampler}_cfg{r.cfg_scale:g}"] = r.conditional_accuracy
            row[f"fid_{sampler}_cfg{r.cfg_scale:g}"] = r.fid
    return row


COLUMNS = [
    ("acc_heun16_cfg1", "acc h16"),
    ("acc_heun8_cfg1", "acc h8"),
    ("acc_heun16_cfg1.5", "acc h16 cfg1.5"),
    ("fid_heun16_cfg1", "FID h16"),
    ("fid_heun8_cfg1", "FID h8"),
    ("fid_heun16_cfg1.5", "FID h16 cfg1.5"),
]


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['recipe']} | {row['seed']} | error: {row['error'][-200:]} |"
    cells = [row["recipe"], str(row["seed"]), str(row["steps"])]
    for key, _ in COLUMNS:
        value = row.get(key)
        cells.append(
            "-" if value is None else (f"{100 * value:.2f}%" if key.startswith("acc") else f"{value:.3f}")
        )
    cells.append(f"{row['seconds']:.0f}")
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| recipe | seed | steps | "
    + " | ".join(t for _, t in COLUMNS)
    + " | s |\n"
    + "|---" * (4 + len(COLUMNS))
    + "|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (subprocesses)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--max-steps", type=int, default=None, help="override every recipe (smoke runs)")
    parser.add_argument("--one", nargs=2, metavar=("RECIPE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.one is not None:  # a worker: train, score, write the row
        name, seed = args.one[0], int(args.one[1])
        row = run_one(name, seed, args.out, args.accelerator, args.max_steps)
        (args.out / f"{name}-s{seed}.json").write_text(json.dumps(row, indent=1))
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    queue = [(name, seed) for name in args.recipes for seed in args.seeds]
    running: list[tuple[str, int, subprocess.Popen, Path]] = []
    rows: list[dict] = []
    print(HEADER, flush=True)
    while queue or running:
        while queue and len(running) < args.jobs:
            name, seed = queue.pop(0)
            log = args.out / f"{name}-s{seed}.log"
            cmd = [sys.executable, __file__, "--out", str(args.out), "--accelerator", args.accelerator]
            cmd += ["--one", name, str(seed)]
            if args.max_steps is not None:
                cmd += ["--max-steps", str(args.max_steps)]
            with log.open("w") as handle:
                proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
            running.append((name, seed, proc, log))
        time.sleep(1.0)
        for item in list(running):
            name, seed, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            result = args.out / f"{name}-s{seed}.json"
            if proc.returncode == 0 and result.exists():
                row = json.loads(result.read_text())
            else:
                row = {"recipe": name, "seed": seed, "error": log.read_text()[-2000:]}
            rows.append(row)
            print(format_row(row), flush=True)
    table = HEADER + "\n" + "\n".join(format_row(r) for r in rows)
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
