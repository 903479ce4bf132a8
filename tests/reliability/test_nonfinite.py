"""Non-finite steps (issue 11, point 3): a NaN batch is skipped on every rank alike, and a run of them stops.

A tiny SiT trains a few good steps (so Adam's moments and the EMA are non-zero), then one batch is
poisoned with NaN. What a user relies on: the step counter, the data position and the learning-rate
schedule advance through the skipped step; the weights, AdamW's ``exp_avg`` / ``exp_avg_sq`` / ``step``
and the EMA after it are bit for bit those before it (AdamW's weight decay is on, so a zeroed gradient
would still move the weights); the next good step trains; ``train/nonfinite_skips`` reads 1 and
``train/grad_norm`` is logged every step. Both skip mechanisms are checked: fused AdamW (decided on the
device, no host sync) and the default ``PaperAdamW`` on CPU (not fused: decided on the host).
``max_consecutive_nonfinite`` bad steps in a row stop the run with one line and leave the last
checkpoint, finite, in place. Every run also clips gradients (``trainer.gradient_clip_val``).

Two processes (torchrun, gloo; this file is the workers' script): NaN in rank 1's half of one global
batch only. Under DDP and FSDP2 both ranks skip that step (rank 0's data were finite), end with identical
weights, and match the single-process run with the same skip; under FSDP2 the clipped gradient norm is
``gradient_clip_val``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MAX_STEPS = 6  # 16 samples, global batch 8: 3 epochs of 2 steps
POISONED = 3  # global_step of the NaN batch: 3 good steps train first
LR = 1e-2
WEIGHT_DECAY = 0.1  # non-zero: AdamW would move the weights even with zero gradients
CLIP = 0.4  # within the tiny SiT's gradient norms (0.3-0.45): some steps are clipped, some not
EMA_DECAY = 0.5
REL_TOL = 1e-5  # 1 vs 2 processes: float32 summation order only (as in test_lightning_resume.py)
WORKER_TIMEOUT_S = 300


def _lr_lambda(step: int) -> float:
    return 1.0 / (1.0 + step)  # a new learning rate every step: the schedule's position is visible


def _local(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _train(
    workdir: Path,
    *,
    fused: bool,
    poison_steps: tuple[int, ...] = (POISONED,),
    poison_ranks: tuple[int, ...] = (0, 1),
    kind: str = "single",
    devices: int = 1,
    max_consecutive: int = 10,
    checkpoints: bool = False,
) -> dict[str, Any]:
    """One run; returns what each step left behind (this rank's view) and the final full state."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers.logger import Logger
    from lightning_toy import TEST_ADAM_EPS, TINY_MODEL, RandomLatentsDataModule, final_state, make_strategy
    from lightning_toy import trainer_kwargs as toy_trainer_kwargs

    from sit_lightning.callbacks import EMACallback
    from sit_lightning.module import NonFiniteSteps, PaperAdamW, SiTModule

    record: dict[str, Any] = {"keys": [], "lr": [], "after": [], "metrics": [], "clipped_norm": []}

    class ClipProbe(SiTModule):
        """Observes the gradient norm after clipping (a collective under FSDP2, so on every rank)."""

        def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
            super().configure_gradient_clipping(optimizer, *args, **kwargs)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            record["clipped_norm"].append(float(NonFiniteSteps.grad_norm(params)))

    class Poison(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            record["keys"].append(batch["key"].tolist())
            record["lr"].append(trainer.optimizers[0].param_groups[0]["lr"])
            if trainer.global_step in poison_steps and trainer.global_rank in poison_ranks:
                batch["x"].fill_(float("nan"))

    class Snapshot(pl.Callback):  # after the EMA's update (listed after it)
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            optimizer = trainer.optimizers[0]
            state = {f"weight/{n}": _local(p) for n, p in pl_module.named_parameters()}
            for n, p in pl_module.named_parameters():
                for key, value in optimizer.state.get(p, {}).items():
                    state[f"{key}/{n}"] = _local(value)
            state |= {f"ema/{n}": e.clone() for n, e in ema.ema_tensors().items()}
            record["after"].append(state)

    class Metrics(Logger):
        name, version = "memory", 0

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            record["metrics"].append(dict(metrics))

    def optimizer(params: Any) -> torch.optim.Optimizer:  # fused=False on CPU: PaperAdamW's own choice
        return PaperAdamW(params, lr=LR, eps=TEST_ADAM_EPS, weight_decay=WEIGHT_DECAY, fused=fused or None)

    module = ClipProbe(
        **TINY_MODEL,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda),
        max_consecutive_nonfinite=max_consecutive,
    )
    ema = EMACallback(decay=EMA_DECAY)
    callbacks: list[Any] = [Poison(), ema, Snapshot()]
    if checkpoints:
        callbacks.append(
            ModelCheckpoint(
                dirpath=workdir / "checkpoints", every_n_train_steps=1, save_top_k=-1, save_last=True
            )
        )
    trainer = pl.Trainer(
        **toy_trainer_kwargs(
            max_steps=MAX_STEPS,
            callbacks=callbacks,
            logger=Metrics(),
            log_every_n_steps=1,
            gradient_clip_val=CLIP,
            enable_checkpointing=checkpoints,
            default_root_dir=workdir,
            strategy=make_strategy(kind),
            devices=devices,
        )
    )
    try:
        trainer.fit(module, RandomLatentsDataModule())
    except Exception as err:  # the stop: returned for the test to read
        record["error"] = err
    record["global_step"] = trainer.global_step
    record["scheduler_epoch"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch
    if "error" not in record:
        record["final"] = final_state(module, trainer, ema)
    return record


def _worker(workdir: Path) -> None:
    """Under torchrun: DDP, then FSDP2 (same processes), NaN in rank 1's half of batch POISONED only."""
    sys.path.insert(0, str(REPO / "src"))
    sys.path.append(str(REPO / "tests" / "lightning"))
    import torch

    torch.use_deterministic_algorithms(True)
    rank = int(os.environ["RANK"])
    for kind in ("ddp", "fsdp"):
        record = _train(workdir / kind, fused=True, poison_ranks=(1,), kind=kind, devices=2)
        record.pop("error", None)
        torch.save(record, workdir / f"{kind}_rank{rank}.pt")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


# ------------------------------------------------------------------------------------------------
# The tests.
# ------------------------------------------------------------------------------------------------
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sit_lightning.errors import ConfigurationError  # noqa: E402
from sit_lightning.module import NonFiniteTrainingError  # noqa: E402

if str(REPO / "tests" / "lightning") not in sys.path:  # lightning_toy; appended, never shadowing
    sys.path.append(str(REPO / "tests" / "lightning"))

MODES = {"fused AdamW (device)": True, "PaperAdamW on CPU (host)": False}


@pytest.fixture(scope="module")
def runs(deterministic, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Per skip mechanism, one single-process run with the NaN batch at step POISONED, one without."""
    out = {}
    for name, fused in MODES.items():
        out[name] = _train(tmp_path_factory.mktemp("run"), fused=fused)
        out[f"clean, {name}"] = _train(tmp_path_factory.mktemp("clean"), fused=fused, poison_steps=())
    return out


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("mode", MODES)
def test_a_nan_batch_is_skipped_exactly(runs, mode) -> None:
    run, clean = runs[mode], runs[f"clean, {mode}"]
    after = run["after"]
    assert "error" not in run and run["global_step"] == MAX_STEPS
    # the network was training: good steps move every part of the state, the gradients were non-zero
    before_skip, skipped, next_good = after[POISONED - 1], after[POISONED], after[POISONED + 1]
    parts = {"weight", "exp_avg", "exp_avg_sq", "step", "ema"}
    assert {k.split("/")[0] for k in _differing(after[POISONED - 2], before_skip)} == parts
    norms = [m["train/grad_norm"] for m in run["metrics"]]
    assert all(n > 0 and math.isfinite(n) for i, n in enumerate(norms) if i != POISONED)
    assert math.isnan(norms[POISONED])
    assert any(torch.count_nonzero(v) for k, v in before_skip.items() if k.startswith("exp_avg/"))
    # the skipped step: weights, AdamW moments and step counts, EMA bit for bit unchanged
    assert not _differing(before_skip, skipped), f"{mode}: the skipped step changed state"
    assert {k.split("/")[0] for k in before_skip} == parts
    # the next good step trains normally: every weight and the EMA move, and stay finite
    moved = _differing(skipped, next_good)
    assert {k for k in skipped if k.startswith(("weight/", "ema/"))} - set(moved) <= {
        "weight/network.pos_embed",
        "ema/network.pos_embed",  # frozen
    }
    assert all(torch.isfinite(v).all() for v in next_good.values())
    # step counter, data position and schedule went on: the clean run's keys and learning rates
    assert run["keys"] == clean["keys"] and run["lr"] == clean["lr"]
    assert run["lr"] == [LR * _lr_lambda(s) for s in range(MAX_STEPS)]
    assert run["scheduler_epoch"] == clean["scheduler_epoch"] == MAX_STEPS
    # the skip counter, logged every step (log_every_n_steps: 1)
    skips = [m["train/nonfinite_skips"] for m in run["metrics"]]
    assert skips == [0.0] * POISONED + [1.0] * (MAX_STEPS - POISONED)
    # up to the poisoned step the run was the clean one; clipping acted (norm > CLIP -> norm CLIP)
    assert not _differing(after[POISONED - 1], clean["after"][POISONED - 1])
    for pre, post in [
        (n, c) for i, (n, c) in enumerate(zip(norms, run["clipped_norm"], strict=True)) if i != POISONED
    ]:
        assert post == pytest.approx(min(pre, CLIP), rel=1e-4)
    good = [n for i, n in enumerate(norms) if i != POISONED]
    assert min(good) < CLIP < max(good)


@pytest.mark.parametrize("mode", MODES)
def test_consecutive_nan_batches_stop_the_run_and_keep_the_last_checkpoint(
    deterministic, tmp_path, mode
) -> None:
    run = _train(tmp_path, fused=MODES[mode], poison_steps=(2, 3, 4), max_consecutive=2, checkpoints=True)
    err = run.get("error")
    assert isinstance(err, NonFiniteTrainingError)
    assert isinstance(err, ConfigurationError)  # the CLI prints it as one line (sit-lightning: error: ...)
    message = str(err)
    assert "\n" not in message
    assert message.startswith("training stopped at step 4: 2 consecutive optimizer steps had a non-finite")
    assert "model.max_consecutive_nonfinite: 2" in message
    assert run["global_step"] == 3  # the stopping step (4) raised before Lightning counted it
    # checkpoints of steps 1..3 (step 3 was skipped: it holds step 2's weights), none of the stopping step
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=1-step=3.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 3
    good = run["after"][1]  # the state after step 2, the last finite step
    for name, value in last["state_dict"].items():
        assert torch.equal(value, good[f"weight/{name}"]), name
    ema = last["callbacks"]["EMACallback"]["ema"] if "EMACallback" in last["callbacks"] else None
    assert ema is not None and all(torch.equal(v, good[f"ema/{k}"]) for k, v in ema.items())


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("nonfinite_dist")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(Path(__file__).resolve()), str(workdir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return workdir


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_nan_on_one_rank_is_skipped_on_both(runs, distributed, kind) -> None:
    ranks = [torch.load(distributed / f"{kind}_rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        assert rank["global_step"] == MAX_STEPS
        # rank 0's half of the batch was finite, yet it skipped too (its shard of the state under FSDP2)
        assert not _differing(rank["after"][POISONED - 1], rank["after"][POISONED])
        assert _differing(rank["after"][POISONED], rank["after"][POISONED + 1])
        assert [m["train/nonfinite_skips"] for m in rank["metrics"]][-1] == 1.0
        assert rank["lr"] == [LR * _lr_lambda(s) for s in range(MAX_STEPS)]
        # gradient_clip_val under DDP and FSDP2: the clipped norm is min(norm, CLIP)
        norms = [m["train/grad_norm"] for m in rank["metrics"]]
        for i, (pre, post) in enumerate(zip(norms, rank["clipped_norm"], strict=True)):
            if i != POISONED:
                assert post == pytest.approx(min(pre, CLIP), rel=1e-4), (i, pre, post)
    # both ranks hold the same (full) state, and it is the single-process run's with the same skip
    final = [rank["final"] for rank in ranks]
    reference = runs["fused AdamW (device)"]["final"]
    for section in ("weights", "optimizer", "ema"):
        assert not _differing(final[0][section], final[1][section]), section
        for key, ref in reference[section].items():
            error = ((final[0][section][key] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            assert error <= REL_TOL, f"{kind} {section}/{key} differs by {error:.2e} from one process"
