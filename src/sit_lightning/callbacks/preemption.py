"""Preemption: on SIGTERM or SIGUSR1, save ``last.ckpt`` at the next step boundary and exit with status 75.

What Lightning 2.6 does on its own, and why this callback replaces it:

- SIGTERM sets ``trainer.received_sigterm``; the loops then raise ``SIGTERMException`` (a bare
  ``SystemExit``) after the batch, so the process exits with status 0 and saves nothing. Under DDP its
  handler also calls ``dist.broadcast`` *inside* the signal handler.
- SIGUSR1 is handled only under SLURM with ``SLURMEnvironment(auto_requeue=True)`` (the default there):
  the handler saves ``hpc_ckpt_<n>.ckpt`` *inside* the signal handler, i.e. in the middle of a step,
  then runs ``scontrol requeue``.

Here both signals only set a flag. At the next step boundary (``on_train_batch_end`` after an optimizer
step, once every other callback, EMA included, has finished that step) every rank saves, through
``trainer.save_checkpoint``, the ``last.ckpt`` that ``--ckpt_path last`` resumes from, rank 0 prints one
line on stderr, and the process exits with :data:`PREEMPTED_EXIT_STATUS`. A signal received during
step ``s`` (``trainer.global_step == s`` before it) gives a checkpoint with ``global_step == s + 1``.
An ordinary exception never writes a checkpoint here.

Which signals: SIGTERM and SIGUSR1, plus the ``requeue_signal`` of a SLURM environment with
``auto_requeue`` if that is another signal. The callback owns them from ``setup("fit")`` to the end of
fit: Lightning's signal connector then sees a handler on SIGUSR1 and installs no requeue handler, and
its SIGTERM handler is replaced right after Lightning registers it. Handlers are installed in the
main process before the dataloaders start, so DataLoader workers forked later inherit the flag-only
handler instead of dying from a SIGUSR1 sent to the whole job step. The previous handlers come back
when fit ends, normally or with an exception.

Distributed: a signal does not reach every rank at the same moment (or at all, when only one is
signalled), so the ranks all-reduce (max) the signal number they received, one integer, on a CPU-side
``gloo`` process group made at setup: launched without waiting after each step's backward pass
(``on_before_optimizer_step``) and awaited at the step boundary, where every rank reads the same
value and saves and exits at the same step. A signal that arrives before a step's backward pass ends is
honoured at the end of that step, a later one at the end of the next. The exchange never touches the
device, so the host keeps running ahead of it (no host-device sync), and it replaces Lightning's
own per-step SIGTERM broadcast, which read a device tensor back every step under DDP and which is
switched off while this callback owns the signals (Lightning's handler, whose flag it broadcast, is
not installed then). On one process there is no collective at all.

SLURM: ``#SBATCH --signal=USR1@180`` asks for SIGUSR1 180 s before the time limit; SIGTERM arrives only
``KillWait`` (often 30 s) before SIGKILL, shorter than an XL step plus its save. After saving on SIGUSR1
under ``SLURMEnvironment(auto_requeue=True)`` rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (as
Lightning's handler did, but after a consistent save); ``requeue=False`` or ``auto_requeue: false``
turns that off. See docs/training.md, "Preemption".
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["PREEMPTED_EXIT_STATUS", "Preempted", "PreemptionCallback"]

#: Exit status of a process that saved after SIGTERM / SIGUSR1: ``EX_TEMPFAIL`` of sysexits.h
#: ("temporary failure; the user is invited to retry"), distinct from 0 (done), 1 (error) and
#: 128 + signal (killed by that signal).
PREEMPTED_EXIT_STATUS = 75
#: Signals that request a save-and-exit (besides a SLURM environment's own requeue signal).
PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
#: What ``--ckpt_path last`` looks for when no ModelCheckpoint defines the name.
LAST_NAME = "last"
_NO_SIGNAL = 0

_Handler = Callable[[int, FrameType | None], Any] | int | None


class Preempted(SystemExit):
    """Raised at the step boundary after the preemption checkpoint is saved; exits with ``code``."""

    def __init__(self, message: str, code: int = PREEMPTED_EXIT_STATUS) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionCallback(Callback):
    """Save ``last.ckpt`` at the next optimizer step after SIGTERM / SIGUSR1, then exit with status 75.

    Args:
        requeue: under SLURM with ``SLURMEnvironment(auto_requeue=True)``, after saving on the requeue
            signal (SIGUSR1 by default), rank 0 runs ``scontrol requeue <job id>`` so the job restarts
            and resumes with ``--ckpt_path last``. No effect outside SLURM.
        exit_status: the process's exit status after a preemption save.
    """

    def __init__(self, requeue: bool = True, exit_status: int = PREEMPTED_EXIT_STATUS) -> None:
        if not 0 < exit_status < 256:
            raise ValueError(
                f"exit_status must be in 1..255 (0 would read as a finished run); got {exit_status}"
            )
        self.requeue = requeue
        self.exit_status = exit_status
        self._received = _NO_SIGNAL
        self._previous: dict[signal.Signals, _Handler] = {}
        self._step_before = -1
        self._requeue_signal: signal.Signals | None = None
        self._group: Any = None  # the CPU (gloo) group of the flag exchange, None on one process
        self._pending: tuple[torch.Tensor, Any] | None = None  # (flag, its all-reduce in flight)

    # ---- signal handling ------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: a signal handler runs between two bytecodes of whatever the main thread was doing
        # (a forward pass, a collective, a checkpoint write), so nothing else is safe here.
        self._received = max(self._received, signum)

    def _install(self) -> None:
        for signum in self._signals:
            signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:  # None: installed from C, cannot be set back from Python
                signal.signal(signum, handler)

    def _take_over_from_lightning(self, trainer: pl.Trainer) -> None:
        """Re-install our handlers right after Lightning registers its own, and restore after its teardown.

        ``Trainer._run`` registers Lightning's handlers after ``setup`` and ``on_fit_start`` and before the
        dataloaders start, with no hook in between; its teardown puts back what it found (ours) after
        ``on_exception`` has run. Wrapping the two methods of this trainer's connector is the only way to
        own the signals over the whole of fit.
        """
        connector = getattr(trainer, "_signal_connector", None)
        if connector is None or "register_signal_handlers" in vars(connector):
            return
        register, teardown = connector.register_signal_handlers, connector.teardown

        def register_then_take_over() -> None:
            register()
            self._install()

        def teardown_then_restore() -> None:
            teardown()
            self._restore()
            del connector.register_signal_handlers, connector.teardown
            vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)

        connector.register_signal_handlers = register_then_take_over
        connector.teardown = teardown_then_restore
        # Lightning's training loop broadcasts `trainer.received_sigterm` from rank 0 and reads it back
        # (`.item()`) before every batch under DDP; only its own SIGTERM handler sets that flag, and ours
        # replaces it, so the broadcast would only ever carry 0. Our exchange covers every rank instead.
        epoch_loop = trainer.fit_loop.epoch_loop
        if callable(getattr(epoch_loop, "_broadcast_sigterm_tensor", None)):
            epoch_loop._broadcast_sigterm_tensor = _no_sigterm_broadcast  # type: ignore[method-assign]

    @property
    def _signals(self) -> tuple[signal.Signals, ...]:
        extra = (self._requeue_signal,) if self._requeue_signal not in (None, *PREEMPTION_SIGNALS) else ()
        return PREEMPTION_SIGNALS + extra

    # ---- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCallback: not in the main thread, so signals cannot be handled.")
            return
        environment = _slurm_environment(trainer)
        self._requeue_signal = environment.requeue_signal if environment is not None else None
        self._received = _NO_SIGNAL
        self._previous = {signum: signal.getsignal(signum) for signum in self._signals}
        self._install()
        self._take_over_from_lightning(trainer)
        self._pending = None
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            self._group = torch.distributed.new_group(backend="gloo")  # every rank runs setup: collective
        # Save after every other callback has finished the step (the EMA update above all). A new list:
        # Lightning is iterating over the old one to call `setup`.
        trainer.callbacks = [callback for callback in trainer.callbacks if callback is not self] + [self]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()
            group, self._group, self._pending = self._group, None, None
            if group is not None:  # one per fit: a later fit may run on a new default process group
                with contextlib.suppress(Exception):
                    torch.distributed.destroy_process_group(group)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path, owner = _last_checkpoint(trainer)  # here, after ModelCheckpoint.setup resolved its dirpath
        if owner is None:
            rank_zero_warn(
                f"PreemptionCallback: no ModelCheckpoint, so a preemption checkpoint goes to {path}, "
                "which --ckpt_path last does not look at."
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_before = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._launch()  # after the backward pass; awaited at the step boundary

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_before:  # gradient accumulation: not a step boundary
            return
        signum = self._agreed_signal(trainer)
        if signum == _NO_SIGNAL:
            return
        path, owner = _last_checkpoint(trainer)
        if trainer.is_global_zero and os.path.islink(path):
            os.unlink(path)  # save_last="link" made it a link to another checkpoint: do not write through it
        if owner is not None:
            owner.last_model_path = path  # part of the saved state, as when ModelCheckpoint saves last
        trainer.save_checkpoint(path)
        name = signal.Signals(signum).name
        message = (
            f"sit-lightning: {name} received; saved {path} at step {trainer.global_step}; "
            f"exiting with status {self.exit_status} (resume with --ckpt_path last)"
        )
        if trainer.is_global_zero:
            if self.requeue and self._requeue_signal is not None and signum == self._requeue_signal:
                message += _requeue_slurm_job()
            print(message, file=sys.stderr, flush=True)
        raise Preempted(message, self.exit_status)

    def _launch(self) -> None:
        """Start the all-reduce (max) of this rank's signal number on the CPU group, without waiting."""
        if self._group is None or self._pending is not None:
            return
        flag = torch.tensor([self._received], dtype=torch.int64)
        work = torch.distributed.all_reduce(
            flag, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True
        )
        self._pending = (flag, work)

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        """The largest signal number any rank received (0: none); the same on every rank."""
        if trainer.world_size == 1 or self._group is None:
            return self._received
        self._launch()  # launched here when no optimizer hook ran (manual optimization)
        assert self._pending is not None
        flag, work = self._pending
        self._pending = None
        work.wait()  # a CPU tensor on a gloo group: waits for the other ranks, never for the device
        return int(flag[0])


def _no_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-batch SIGTERM broadcast while :class:`PreemptionCallback` owns SIGTERM."""


def _slurm_environment(trainer: pl.Trainer) -> Any:
    """Lightning's SLURMEnvironment of this trainer if it auto-requeues, else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    connector = getattr(trainer, "_accelerator_connector", None)
    environment = getattr(connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment
    return None


def _last_checkpoint(trainer: pl.Trainer) -> tuple[str, ModelCheckpoint | None]:
    """``<dirpath>/last.ckpt`` of the first ModelCheckpoint that saves ``last`` (else of the first one).

    If that ModelCheckpoint already wrote its last checkpoint under another name in that folder
    (``last-v1.ckpt`` when a ``last.ckpt`` was already there), that name.

    ``--ckpt_path last`` takes the newest ``last*.ckpt`` in the folders of all ModelCheckpoints, so the
    checkpoint written at preemption is the one it resumes from. Without a ModelCheckpoint:
    ``<default_root_dir>/last.ckpt`` (resume from it by path).
    """
    checkpoints = [
        cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath
    ]
    if not checkpoints:
        return os.path.join(str(trainer.default_root_dir), LAST_NAME + ModelCheckpoint.FILE_EXTENSION), None
    owner = next((cb for cb in checkpoints if cb.save_last), checkpoints[0])
    if owner.last_model_path and os.path.dirname(owner.last_model_path) == os.path.normpath(owner.dirpath):
        return owner.last_model_path, owner  # e.g. last-v1.ckpt: keep ModelCheckpoint's own name
    step = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)}
    return owner.format_checkpoint_name(step, owner.CHECKPOINT_NAME_LAST), owner


def _requeue_slurm_job() -> str:
    """Runs ``scontrol requeue`` for this job; returns what to add to the exit message."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        return "; not requeued (no SLURM_JOB_ID)"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return f"; requeue of job {job} failed (no scontrol)"
    if result.returncode != 0:
        return f"; requeue of job {job} failed: {result.stderr.strip() or result.returncode}"
    return f"; requeued job {job}"
