"""REPA on the CPU digits demo, and the demo's quality against the post-hoc EMA length.

Trains the demo recipe (``configs/digits.yaml``: SiT 4 blocks x 128 on 1x8x8 pixels, patch 2, so 4x4 =
16 tokens) with and without REPA (Yu et al., ICLR 2025), for each seed, and scores the EMA samples
with the demo's judge (conditional accuracy and FID against the test split, Heun 16 steps):

- during training, every ``--eval-every`` steps, ``--curve-samples`` unguided samples (the curves);
- at the end, exactly the demo's report: 2,000 samples (200 per class), unguided and at cfg 1.5.

REPA's target is not the judge (which has no per-token features, and aligning with it would make its
scores circular) but a separate small conv encoder trained on the train split whose penultimate layer
is a 4x4 x 64 feature map, one cell per 2x2 patch in SiT's token order
(``sit_lightning.evaluation.digits_encoder``; ``DigitsDataModule(repa_features=True)``). The REPA arm
adds ``lambda = 0.5`` (the paper's) times the per-token cosine loss of the tokens after block 2 of 4
(the paper aligns after block 8 of 28, early in the network; 2 of 4 is the nearest split that leaves
blocks after the alignment) through a ``128 -> 256 -> 256 -> 64`` projector (the paper's projector is
about twice the network's width). Both arms of a seed start from the same network weights and see the
same batches, times and noise (keyed draws; the projector is drawn after the network).

One run (the first arm, first seed) also keeps post-hoc EMA tracks (``PostHocEMACallback``, EDM2) with
snapshots every ``--snapshot-every`` steps; after it trains, the EMA of each ``--sigma-rels`` width is
synthesised from them (``sit_lightning.posthoc_ema.synthesize``, what ``sit-lightning posthoc-ema``
writes) and scored like the demo's final report.

Usage (docs/repa_digits.md has the measured tables)::

    nice -n 5 python benchmarks/digits_repa_study.py --out runs/repa_study --jobs 2
    python benchmarks/digits_repa_study.py --out runs/repa_study --aggregate  # tables and plot of finished runs
    python benchmarks/digits_repa_study.py --smoke --out /tmp/repa_smoke      # seconds, for the tests
    # the sweep alone, of a `sit-lightning fit` that had a PostHocEMACallback:
    python benchmarks/digits_repa_study.py --out runs/sweep --sweep-run LAST_CKPT SNAPSHOT_DIR

Writes ``results.json``, ``results.md`` and ``repa_digits.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"

ARMS = ("base", "repa")
#: model.repa of the REPA arm (the feature width is the digits encoder's)
REPA = {"encoder": None, "encoder_depth": 2, "projector_dim": 256, "feature_dim": 64, "loss_weight": 0.5}
#: the demo's final scorer: 2,000 samples, 200 per class, Heun 16 steps, unguided and cfg 1.5
DEMO_SAMPLES = 2000
DEMO_CFG = (1.0, 1.5)
HEUN16 = {"sampler": "ode", "method": "heun", "steps": 16}
SIGMA_RELS = (0.03, 0.05, 0.08, 0.11, 0.14, 0.18, 0.23, 0.28)
TRACKS = (0.05, 0.15)  # the post-hoc EMA tracks kept during training
#: tiny settings of --smoke (CPU, seconds): a 2-block width-32 network, 4 steps, 20 samples, 2 Heun steps
SMOKE = {"steps": 4, "eval_every": 2, "curve_samples": 20, "demo_samples": 20, "snapshot_every": 2}
SMOKE_ARCH = ["--model.arch.depth", "2", "--model.arch.hidden_size", "32", "--model.arch.num_heads", "2"]


def demo_callbacks() -> list[dict[str, Any]]:
    """The EMA entry of the demo config (the study adds its own scorers)."""
    callbacks = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]
    return [cb for cb in callbacks if cb["class_path"].endswith("EMACallback")]


def schedule(steps: int) -> list[str]:
    """The demo's OneCycle schedule stretched to ``steps`` (same peak, same 100 warm-up steps)."""
    warmup = min(100, steps // 2)  # 100 as in the demo; the smoke run's 4 steps warm up for 2
    return [
        "--trainer.max_steps",
        str(steps),
        "--model.lr_scheduler.init_args.total_steps",
        str(steps),
        "--model.lr_scheduler.init_args.pct_start",
        str(warmup / steps),
    ]


def run_one(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm with one seed in this process, score it; returns the result row."""
    import torch
    from lightning.pytorch import LightningDataModule

    from sit_lightning.callbacks import FIDCallback, PostHocEMACallback
    from sit_lightning.cli import SiTLightningCLI
    from sit_lightning.module import SiTModule
    from sit_lightning.sampling import SamplerSettings

    run_dir = args.out / f"{arm}-s{seed}"
    cache = args.out / "cache"
    cli_args = ["--config", str(CONFIG), *schedule(args.steps)]
    cli_args += ["--seed_everything", str(seed), "--model.seed", str(seed)]
    cli_args += ["--trainer.callbacks", json.dumps(demo_callbacks())]
    cli_args += ["--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false"]
    cli_args += ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    cli_args += ["--trainer.limit_val_batches", "0"]
    cli_args += args.overrides
    if arm == "repa":
        cli_args += ["--model.repa", json.dumps(REPA), "--data.init_args.repa_features", "true"]
        cli_args += ["--data.init_args.repa_cache_dir", str(cache)]
    cli = SiTLightningCLI(SiTModule, LightningDataModule, subclass_mode_data=True, run=False, args=cli_args)
    settings = SamplerSettings(**{**HEUN16, "steps": args.heun_steps})
    scorer = {"seed": 0, "settings": settings, "batch_size": 500, "cache_dir": str(cache), "report": False}
    curve = FIDCallback(every_n_steps=args.eval_every, num_samples=args.curve_samples, floor=False, **scorer)
    demo = FIDCallback(num_samples=args.demo_samples, cfg_scales=list(DEMO_CFG), **scorer)
    cli.trainer.callbacks += [curve, demo]
    posthoc = None
    if args.posthoc and (arm, seed) == (args.arms[0], args.seeds[0]):
        posthoc = PostHocEMACallback(TRACKS, args.snapshot_every, str(run_dir / "posthoc_ema"))
        cli.trainer.callbacks.append(posthoc)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "steps": cli.trainer.global_step,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "floor_fid": demo.floor_fid,
        "judge_test_accuracy": demo.judge_test_accuracy,
        "curve": [
            {
                "step": s,
                "cfg": r.cfg_scale,
                "accuracy": r.conditional_accuracy,
                "fid": r.fid,
                "n": r.num_samples,
            }
            for s, r in curve.history
        ],
        "final": [
            {"cfg": r.cfg_scale, "accuracy": r.conditional_accuracy, "fid": r.fid, "n": r.num_samples}
            for s, r in demo.history
        ],
    }
    if posthoc is not None:
        sweep = posthoc_sweep(
            cli.model, cli.trainer, posthoc.directory, args.sigma_rels, args.demo_samples, scorer
        )
        row["posthoc"] = {"tracks": list(TRACKS), "snapshot_every": args.snapshot_every, "sweep": sweep}
    return row


def posthoc_sweep(
    module: Any, trainer: Any, snapshot_dir: Path, sigma_rels: list[float], samples: int, scorer: dict
) -> list[dict[str, Any]]:
    """Score the post-hoc EMA of each ``sigma_rel`` (synthesised from the snapshots at the last step) like
    the demo's unguided report; the module's weights are put back afterwards."""
    from sit_lightning.callbacks import FIDCallback
    from sit_lightning.posthoc_ema import list_snapshots, synthesize

    live = {k: v.detach().clone() for k, v in module.state_dict().items()}
    score = FIDCallback(num_samples=samples, cfg_scales=[1.0], use_ema=False, **scorer)
    snapshots = list_snapshots(snapshot_dir)
    sweep = []
    for sigma_rel in sigma_rels:
        synthesis = synthesize(snapshots, sigma_rel)
        loaded = module.load_state_dict(synthesis.weights, strict=False)  # parameters only, no buffers
        assert not loaded.unexpected_keys, loaded.unexpected_keys
        (r,) = score.evaluate(trainer, module)
        sweep.append(
            {
                "sigma_rel": sigma_rel,
                "fit_error": synthesis.fit_error,
                "accuracy": r.conditional_accuracy,
                "fid": r.fid,
                "n": r.num_samples,
            }
        )
        print(f"sigma_rel {sigma_rel:g}: {sweep[-1]}", flush=True)
    module.load_state_dict(live)
    return sweep


def sweep_finished_run(
    checkpoint: Path, snapshot_dir: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """:func:`posthoc_sweep` of a run trained elsewhere (``sit-lightning fit`` with a PostHocEMACallback)."""
    from types import SimpleNamespace

    from sit_lightning.data import DigitsDataModule
    from sit_lightning.module import SiTModule
    from sit_lightning.sampling import SamplerSettings

    module = SiTModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False).eval()
    # what FIDCallback.evaluate reads of a trainer, for one process
    trainer = SimpleNamespace(
        datamodule=DigitsDataModule(),
        global_rank=0,
        world_size=1,
        global_step=0,
        loggers=[],
        strategy=SimpleNamespace(reduce=lambda value, reduce_op: value),
    )
    settings = SamplerSettings(**{**HEUN16, "steps": args.heun_steps})
    scorer = {"seed": 0, "settings": settings, "batch_size": 500, "cache_dir": str(args.out / "cache")}
    return posthoc_sweep(
        module, trainer, snapshot_dir, args.sigma_rels, args.demo_samples, {**scorer, "report": False}
    )


# ---- tables and plot -----------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _final(row: dict, cfg: float) -> dict:
    return next(r for r in row["final"] if r["cfg"] == cfg)


def markdown(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    lines: list[str] = []
    if ok:
        floor = ok[0]["floor_fid"]
        judge = ok[0]["judge_test_accuracy"]
        lines.append(
            f"Judge accuracy on real test digits: {_pct(judge)}; FID floor (train split vs test split): "
            f"{_num(floor)}; 1.1 x floor = {_num(None if floor is None else 1.1 * floor)}.\n"
        )
        steps = sorted({p["step"] for r in ok for p in r["curve"]})
        n = ok[0]["curve"][0]["n"] if ok[0]["curve"] else 0
        lines.append(f"Unguided, {n} samples per point: conditional accuracy / FID against training steps.\n")
        lines.append("| arm | seed | " + " | ".join(f"step {s}" for s in steps) + " |")
        lines.append("|---|---:|" + "---:|" * len(steps))
        for r in ok:
            by_step = {p["step"]: p for p in r["curve"]}
            cells = [
                f"{_pct(by_step[s]['accuracy'])} / {_num(by_step[s]['fid'])}" if s in by_step else "-"
                for s in steps
            ]
            lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(cells) + " |")
        n_final = ok[0]["final"][0]["n"]
        lines.append(f"\nAt the end, the demo's report ({n_final} samples, 200 per class at 2,000):\n")
        lines.append("| arm | seed | acc | FID | FID / floor | acc cfg 1.5 | FID cfg 1.5 | train + score s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in ok:
            plain, guided = _final(r, 1.0), _final(r, 1.5)
            ratio = plain["fid"] / floor if floor else None
            lines.append(
                f"| {r['arm']} | {r['seed']} | {_pct(plain['accuracy'])} | {_num(plain['fid'])} | "
                f"{_num(ratio)} | {_pct(guided['accuracy'])} | {_num(guided['fid'])} | {r['seconds']:.0f} |"
            )
        for arm in dict.fromkeys(r["arm"] for r in ok):
            mine = [r for r in ok if r["arm"] == arm]
            acc = statistics.mean(_final(r, 1.0)["accuracy"] for r in mine)
            fid = statistics.mean(_final(r, 1.0)["fid"] for r in mine)
            acc15 = statistics.mean(_final(r, 1.5)["accuracy"] for r in mine)
            fid15 = statistics.mean(_final(r, 1.5)["fid"] for r in mine)
            lines.append(
                f"| **{arm}, mean of {len(mine)}** | | {_pct(acc)} | {_num(fid)} | "
                f"{_num(fid / floor if floor else None)} | {_pct(acc15)} | {_num(fid15)} | |"
            )
        for r in ok:
            if "posthoc" not in r:
                continue
            ema = _final(r, 1.0)
            lines.append(
                f"\nPost-hoc EMA of run {r['arm']}-s{r['seed']} at step {r['steps']} (tracks sigma_rel "
                f"{r['posthoc']['tracks']}, a snapshot every {r['posthoc']['snapshot_every']} steps), "
                f"unguided, {r['posthoc']['sweep'][0]['n']} samples; the run's EMA (the demo's) scored "
                f"{_pct(ema['accuracy'])} / {_num(ema['fid'])}:\n"
            )
            lines.append("| sigma_rel | profile fit error | acc | FID | FID / floor |")
            lines.append("|---:|---:|---:|---:|---:|")
            for p in r["posthoc"]["sweep"]:
                lines.append(
                    f"| {p['sigma_rel']:g} | {100 * p['fit_error']:.1f}% | {_pct(p['accuracy'])} | "
                    f"{_num(p['fid'])} | {_num(p['fid'] / floor if floor else None)} |"
                )
    for r in rows:
        if "error" in r:
            lines.append(f"\n{r['arm']}-s{r['seed']}: error: {r['error'][-300:]}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    sweeps = [r for r in ok if "posthoc" in r]
    fig, axes = plt.subplots(1, 3 if sweeps else 2, figsize=(15 if sweeps else 10, 4))
    colours = {"base": "tab:blue", "repa": "tab:orange"}
    floor = ok[0]["floor_fid"] if ok else None
    for r in ok:
        style = {"color": colours.get(r["arm"], "k"), "ls": "-" if r["seed"] == ok[0]["seed"] else "--"}
        label = f"{r['arm']} seed {r['seed']}"
        steps = [p["step"] for p in r["curve"]]
        axes[0].plot(steps, [100 * p["accuracy"] for p in r["curve"]], marker="o", label=label, **style)
        axes[1].plot(steps, [p["fid"] for p in r["curve"]], marker="o", label=label, **style)
    judge = ok[0]["judge_test_accuracy"] if ok else None
    if judge is not None:
        axes[0].axhline(100 * judge, color="grey", lw=0.8, ls=":", label="judge on real test digits")
    if floor is not None:
        axes[1].axhline(floor, color="grey", lw=0.8, ls=":", label="floor (train vs test)")
        axes[1].axhline(1.1 * floor, color="grey", lw=0.8, ls="-.", label="1.1 x floor")
    axes[0].set(xlabel="training step", ylabel="conditional accuracy (%)", title="accuracy, unguided")
    axes[1].set(
        xlabel="training step", ylabel="FID (digits judge), log scale", title="FID, unguided", yscale="log"
    )
    for ax in axes[:2]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if sweeps:
        r = sweeps[0]
        s = [p["sigma_rel"] for p in r["posthoc"]["sweep"]]
        ax = axes[2]
        ax.plot(s, [p["fid"] for p in r["posthoc"]["sweep"]], marker="o", color="tab:green", label="FID")
        if floor is not None:
            ax.axhline(1.1 * floor, color="grey", lw=0.8, ls="-.", label="1.1 x floor")
        ax.axhline(_final(r, 1.0)["fid"], color="tab:green", lw=0.8, ls=":", label="FID of the EMA 0.995")
        ax.set(xlabel="sigma_rel", ylabel="FID, log scale", yscale="log")
        ax.set_title(f"post-hoc EMA at step {r['steps']}, {r['arm']} seed {r['seed']}, unguided")
        twin = ax.twinx()
        twin.plot(s, [100 * p["accuracy"] for p in r["posthoc"]["sweep"]], marker="s", color="tab:red")
        twin.set_ylabel("conditional accuracy (%)", color="tab:red")
        ax.legend(fontsize=7, loc="center left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- driver ------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=1200, help="training steps (the schedule is stretched)")
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--curve-samples", type=int, default=1000)
    parser.add_argument("--demo-samples", type=int, default=DEMO_SAMPLES)
    parser.add_argument("--heun-steps", type=int, default=16)
    parser.add_argument("--snapshot-every", type=int, default=100)
    parser.add_argument("--sigma-rels", nargs="+", type=float, default=list(SIGMA_RELS))
    parser.add_argument("--no-posthoc", dest="posthoc", action="store_false")
    parser.add_argument(
        "--jobs", type=int, default=2, help="runs in parallel (subprocesses); 0: in this process"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    parser.add_argument("--smoke", action="store_true", help="tiny network and sample counts (CPU seconds)")
    parser.add_argument(
        "--override",
        dest="overrides",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="a config override for every run, e.g. model.objective.init_args.time_sampler '{...}'",
    )
    parser.add_argument(
        "--aggregate",
        action="store_true",
        help="only tabulate and plot the <arm>-s<seed>.json already in --out",
    )
    parser.add_argument(
        "--sweep-run",
        nargs=2,
        type=Path,
        metavar=("CHECKPOINT", "SNAPSHOT_DIR"),
        help="only the post-hoc EMA sweep of a finished fit (its last.ckpt and PostHocEMACallback folder)",
    )
    parser.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # KEY without its leading dashes (argparse would take "--model..." for an option of its own)
    args.overrides = [item for key, value in args.overrides for item in (f"--{key.lstrip('-')}", value)]
    if args.smoke:
        args.steps, args.eval_every = SMOKE["steps"], SMOKE["eval_every"]
        args.curve_samples, args.demo_samples = SMOKE["curve_samples"], SMOKE["demo_samples"]
        args.snapshot_every, args.heun_steps, args.jobs = SMOKE["snapshot_every"], 2, 0
        args.sigma_rels, args.seeds = args.sigma_rels[:2], args.seeds[:1]
        args.overrides += [*SMOKE_ARCH, "--data.init_args.global_batch_size", "32"]
    if args.steps % args.eval_every or (args.posthoc and args.steps % args.snapshot_every):
        parser.error(f"--steps {args.steps} must be a multiple of --eval-every and --snapshot-every")
    return args


def worker_command(args: argparse.Namespace, arm: str, seed: int) -> list[str]:
    cmd = [sys.executable, __file__, "--out", str(args.out), "--one", arm, str(seed)]
    cmd += ["--arms", *args.arms, "--seeds", *map(str, args.seeds), "--steps", str(args.steps)]
    cmd += ["--eval-every", str(args.eval_every), "--curve-samples", str(args.curve_samples)]
    cmd += ["--demo-samples", str(args.demo_samples), "--heun-steps", str(args.heun_steps)]
    cmd += ["--snapshot-every", str(args.snapshot_every), "--sigma-rels", *map(str, args.sigma_rels)]
    cmd += [] if args.posthoc else ["--no-posthoc"]
    for key, value in zip(args.overrides[::2], args.overrides[1::2], strict=True):
        cmd += ["--override", key.lstrip("-"), value]
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep_run is not None:
        sweep = sweep_finished_run(*args.sweep_run, args)
        (args.out / "posthoc_sweep.json").write_text(json.dumps(sweep, indent=1))
        return 0
    if args.one is not None:  # a worker: train, score, write the row
        arm, seed = args.one[0], int(args.one[1])
        row = run_one(arm, seed, args)
        (args.out / f"{arm}-s{seed}.json").write_text(json.dumps(row, indent=1))
        return 0
    queue = [(arm, seed) for seed in args.seeds for arm in args.arms]
    rows: list[dict] = []
    start = time.perf_counter()
    if args.aggregate:
        rows = [json.loads((args.out / f"{arm}-s{seed}.json").read_text()) for arm, seed in queue]
    elif args.jobs == 0:
        rows = [run_one(arm, seed, args) for arm, seed in queue]
    else:
        # the judge, its reference statistics and the encoder are cached by the first run: train them once
        # here, before runs in parallel would each train their own
        from sit_lightning.data import DigitsDataModule

        _ = DigitsDataModule(repa_features=True, repa_cache_dir=str(args.out / "cache")).train_repa_features
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        running: list[tuple[str, int, subprocess.Popen]] = []
        while queue or running:
            while queue and len(running) < args.jobs:
                arm, seed = queue.pop(0)
                with (args.out / f"{arm}-s{seed}.log").open("w") as log:
                    proc = subprocess.Popen(
                        worker_command(args, arm, seed), env=env, stdout=log, stderr=subprocess.STDOUT
                    )
                running.append((arm, seed, proc))
            time.sleep(1.0)
            for item in list(running):
                arm, seed, proc = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                result = args.out / f"{arm}-s{seed}.json"
                if proc.returncode == 0 and result.exists():
                    rows.append(json.loads(result.read_text()))
                else:
                    log_text = (args.out / f"{arm}-s{seed}.log").read_text()
                    rows.append({"arm": arm, "seed": seed, "error": log_text[-2000:]})
                print(f"{arm}-s{seed} done after {time.perf_counter() - start:.0f} s", flush=True)
        rows.sort(key=lambda r: (r["seed"], args.arms.index(r["arm"])))
    summary = {"command": sys.argv, "rows": rows}
    if not args.aggregate:
        summary["wall_seconds"] = time.perf_counter() - start
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    table = markdown(rows)
    (args.out / "results.md").write_text(table)
    plot(rows, args.out / "repa_digits.png")
    print(table)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
