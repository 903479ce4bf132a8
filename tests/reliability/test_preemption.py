"""Preemption (issue 11): SIGTERM / SIGUSR1 save ``last.ckpt`` at the next step boundary and exit with 75.

What a user sees is checked on real processes: a tiny SiT is trained in a child process that sends
itself the signal during step ``SIGNAL_DURING_STEP``; the child must exit with
``PREEMPTED_EXIT_STATUS``, print one line on stderr, and leave ``last.ckpt`` at the end of that step;
``ckpt_path="last"`` must then finish the run bit-identically (weights, AdamW moments, EMA) to a run
that was never interrupted. The SIGUSR1 run pretends to be a SLURM job (environment variables and a
fake ``scontrol``) to show that Lightning's own requeue handler, which would save ``hpc_ckpt_1.ckpt``
mid-step, is replaced: one save, at the boundary, then ``scontrol requeue``.

This file is also the child's script (``python test_preemption.py <mode> ...``), so that the runs
share one process layout and thread count (bit-identity needs both).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MAX_STEPS = 4  # 2 epochs of 2 steps (16 samples, global batch 8)
# The signal arrives during step 1 (global_step 1 -> 2), so the checkpoint is at global_step 2, an epoch
# boundary: RandomLatentsDataModule's plain DataLoader resumes exactly only there (mid-epoch resume is
# the datamodule's business, tested with DigitsDataModule in tests/lightning/test_lightning_resume.py).
SIGNAL_DURING_STEP = 1
SAVED_STEP = SIGNAL_DURING_STEP + 1
FAIL_DURING_STEP = 1
SLURM_JOB_ID = "4242"
CHILD_TIMEOUT_S = 120


# ------------------------------------------------------------------------------------------------
# The child: one training run (or several, in one process).
# ------------------------------------------------------------------------------------------------
def _train(
    workdir: Path, *, ckpt_path: str | None = None, signum: int = 0, fail: bool = False, devices: int = 1
) -> Any:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_toy import (
        EMA_DECAY,
        TEST_ADAM_EPS,
        TEST_LR,
        TINY_MODEL,
        RandomLatentsDataModule,
        final_state,
        make_strategy,
        trainer_kwargs,
    )

    from sit_lightning.callbacks import EMACallback, PreemptionCallback
    from sit_lightning.module import SiTModule

    class Disturb(pl.Callback):
        """Sends itself ``signum`` (or raises) while step ``SIGNAL_DURING_STEP`` runs."""

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            # under DDP only the last rank is signalled: the ranks must agree by themselves
            if signum and trainer.global_step == SIGNAL_DURING_STEP and trainer.global_rank == devices - 1:
                os.kill(os.getpid(), signum)
            if fail and trainer.global_step == FAIL_DURING_STEP:
                raise RuntimeError("an ordinary failure")

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            # one behaviour: Lightning's own SIGTERM handler (exit 0 without a save) never saw the signal
            assert not trainer.received_sigterm, "Lightning's SIGTERM handler ran"

    module = SiTModule(
        **TINY_MODEL,
        optimizer=lambda p: torch.optim.AdamW(p, lr=TEST_LR, eps=TEST_ADAM_EPS, weight_decay=0.0),
    )
    ema = EMACallback(decay=EMA_DECAY)
    callbacks = [
        Disturb(),
        PreemptionCallback(),  # listed early on purpose: it must still save after the EMA update
        ema,
        ModelCheckpoint(dirpath=workdir / "checkpoints", save_last=True),
    ]
    trainer = pl.Trainer(
        **trainer_kwargs(
            max_steps=MAX_STEPS,
            callbacks=callbacks,
            enable_checkpointing=True,
            default_root_dir=workdir,
            devices=devices,
            strategy=make_strategy("ddp" if devices > 1 else "single"),
        )
    )
    trainer.fit(module, RandomLatentsDataModule(), ckpt_path=ckpt_path)
    return final_state(module, trainer, ema)


def _child(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO / "src"))
    sys.path.append(str(REPO / "tests" / "lightning"))
    import torch

    mode, *dirs = argv
    if mode in ("SIGTERM", "SIGUSR1"):
        _train(Path(dirs[0]), signum=signal.Signals[mode])
        raise SystemExit("the signal did not stop training")
    if mode == "DDP":  # Lightning launches the second rank by running this script again
        _train(Path(dirs[0]), signum=signal.SIGUSR1, devices=2)
        raise SystemExit("the signal did not stop training")
    if mode == "compare":  # dirs: out, then the preempted runs to resume
        out = Path(dirs[0])
        torch.save(_train(out / "straight"), out / "straight.pt")
        for run in dirs[1:]:
            torch.save(_train(Path(run), ckpt_path="last"), Path(run) / "resumed.pt")
        return
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    _child(sys.argv[1:])


# ------------------------------------------------------------------------------------------------
# The tests.
# ------------------------------------------------------------------------------------------------
import pytest  # noqa: E402
import torch  # noqa: E402

from sit_lightning.callbacks import PREEMPTED_EXIT_STATUS, PreemptionCallback  # noqa: E402

if str(REPO / "tests" / "lightning") not in sys.path:  # lightning_toy; appended, never shadowing
    sys.path.append(str(REPO / "tests" / "lightning"))


def _env(**extra: str) -> dict[str, str]:
    from lightning_toy import child_env  # no launcher's variables: see there

    return child_env(PYTHONHASHSEED="0", **extra)


def _fake_slurm(tmp: Path) -> dict[str, str]:
    """Environment of a one-task SLURM job, with an ``scontrol`` that records its arguments."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    return dict(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID=SLURM_JOB_ID,
        SLURM_JOB_NAME="sit",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODELIST="localhost",
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """SIGTERM and SIGUSR1 (under a fake SLURM) runs, then the straight run and both resumes."""
    root = tmp_path_factory.mktemp("preemption")
    script = str(Path(__file__).resolve())
    procs = {}
    for name, extra in [("SIGTERM", {}), ("SIGUSR1", _fake_slurm(root))]:
        (root / name).mkdir()
        procs[name] = subprocess.Popen(
            [sys.executable, script, name, str(root / name)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**extra),
        )  # fmt: skip
    results: dict[str, Any] = {"root": root}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        # what the preempted run left behind, before the resume below adds to it
        results[f"{name} files"] = sorted(
            str(p.relative_to(root / name)) for p in (root / name).rglob("*.ckpt")
        )
        last = root / name / "checkpoints" / "last.ckpt"
        results[f"{name} step"] = (
            torch.load(last, weights_only=False)["global_step"] if last.is_file() else None
        )
    compare = subprocess.run(
        [sys.executable, script, "compare", str(root), str(root / "SIGTERM"), str(root / "SIGUSR1")],
        capture_output=True, text=True, env=_env(), timeout=CHILD_TIMEOUT_S,
    )  # fmt: skip
    assert compare.returncode == 0, compare.stderr[-5000:]
    return results


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_last_checkpoint_at_the_step_boundary_and_exits_75(runs, name) -> None:
    proc, workdir = runs[name], runs["root"] / name
    assert proc.returncode == PREEMPTED_EXIT_STATUS == 75, proc.stderr[-5000:]
    last = workdir / "checkpoints" / "last.ckpt"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sit-lightning:")]
    assert lines == [
        f"sit-lightning: {name} received; saved {last} at step {SAVED_STEP}; exiting with status 75 "
        "(resume with --ckpt_path last)" + (f"; requeued job {SLURM_JOB_ID}" if name == "SIGUSR1" else "")
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert runs[f"{name} step"] == SAVED_STEP
    # the only checkpoint: neither Lightning's SLURM handler (hpc_ckpt_*.ckpt) nor an epoch-end save ran
    assert runs[f"{name} files"] == ["checkpoints/last.ckpt"]


def test_sigusr1_under_slurm_requeues_the_job_once(runs) -> None:
    assert (runs["root"] / "scontrol.log").read_text().splitlines() == [f"requeue {SLURM_JOB_ID}"]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_resume_from_last_is_bit_identical_to_an_uninterrupted_run(runs, name) -> None:
    from lightning_toy import assert_same_state, assert_training_moved

    straight = torch.load(runs["root"] / "straight.pt", weights_only=True)
    resumed = torch.load(runs["root"] / name / "resumed.pt", weights_only=True)
    assert_same_state(straight, resumed, ("weights", "optimizer", "ema"))
    # not vacuous: training moved the weights (the zero-initialised output layer included), the EMA lags
    initial = assert_training_moved(straight)
    final_layer = [k for k in initial if k.startswith("network.final_layer.linear")]
    assert final_layer and all(straight["weights"][k].abs().sum() > 0 for k in final_layer)


def test_an_ordinary_exception_writes_no_checkpoint_and_restores_the_handlers(tmp_path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(RuntimeError, match="an ordinary failure"):
        _train(tmp_path, fail=True)
    assert not list(tmp_path.rglob("*.ckpt"))
    assert {s: signal.getsignal(s) for s in before} == before


def test_exit_status_must_not_read_as_success() -> None:
    with pytest.raises(ValueError, match="exit_status must be in 1..255"):
        PreemptionCallback(exit_status=0)


@pytest.mark.slow
def test_under_ddp_every_rank_saves_and_exits_when_one_rank_is_signalled(tmp_path) -> None:
    """Two CPU ranks (gloo), launched by Lightning as ``--trainer.devices 2`` would; only rank 1 gets SIGUSR1."""
    for _ in range(3):  # Lightning picks a free port, which another process may take before rank 0 binds it
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "DDP", str(tmp_path)],
            capture_output=True, text=True, env=_env(), timeout=CHILD_TIMEOUT_S,
        )  # fmt: skip
        if "EADDRINUSE" not in proc.stderr:
            break
    assert proc.returncode == PREEMPTED_EXIT_STATUS, proc.stderr[-5000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sit-lightning:")]
    assert lines == [  # rank 0 only
        f"sit-lightning: SIGUSR1 received; saved {last} at step {SAVED_STEP}; exiting with status 75 "
        "(resume with --ckpt_path last)"
    ], proc.stderr[-3000:]
    assert torch.load(last, weights_only=False)["global_step"] == SAVED_STEP
