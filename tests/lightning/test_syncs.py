"""Host-device syncs and collectives per training step of ``sit-lightning fit`` (issue 12).

A GPU step runs ahead of the GPU only while the host never waits for it: every ``.item()``,
``.cpu()``, ``.tolist()`` or ``bool()`` of a device tensor, and every collective whose result the host
reads, drains the queue. This test counts them in a real 2-process DDP fit (gloo, CPU) of a tiny SiT
with what every fit gets (EMA, preemption, a ModelCheckpoint, a logger, the progress bar) plus the
throughput callback, by patching the ``torch.distributed`` functions and the tensor methods that read
values on the host. DDP's own gradient all-reduce runs in C++ and is not counted (it never blocks the
host).

The documented minimum (docs/performance.md, "Syncs per training step"), per optimizer step:

- a step that writes no logs: **no** host read of a device tensor and **no** collective on the training
  process group; one 8-byte all-reduce of the preemption flag on a CPU (gloo) side group, launched
  after the backward pass and awaited at the step's end, which never waits for the device;
- a logging step (every ``trainer.log_every_n_steps``): the logged tensors are read (Lightning converts
  them for the loggers and the progress bar) and the non-finite count is checked.

The optimizer is ``PaperAdamW(fused=True)``, as on CUDA (torch's fused AdamW also runs on the CPU):
non-finite steps are skipped on the device. A non-fused optimizer adds one host read per step
(``NonFiniteSteps``, documented there; not counted here).

This file is also the two ranks' script (``LOCAL_RANK=r ... python test_syncs.py OUT``).
"""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MAX_STEPS = 8
LOG_EVERY = 4  # logging steps: global_step 3 and 7 (0-based), Lightning's (n + 1) % 4 == 0
MEASURED = range(1, MAX_STEPS - 1)  # step 0 sets things up; the last step saves and tears down
LOGGING_STEPS = {s for s in MEASURED if (s + 1) % LOG_EVERY == 0}
CHILD_TIMEOUT_S = 120

#: The torch.distributed functions a Python caller can block on.
COLLECTIVES = (
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "barrier", "monitored_barrier",
    "broadcast_object_list", "all_to_all", "all_to_all_single", "_broadcast_coalesced",
)  # fmt: skip
#: Code that reads CPU tensors which stay on the CPU on a GPU too (file, function): the keyed draws'
#: numpy Philox (taken only for keys on the CPU; CUDA keys take the torch path) and the preemption
#: flag of the CPU (gloo) side group.
HOST_ONLY_SITES = {("randomness.py", "keyed_bits"), ("preemption.py", "_agreed_signal")}
#: Progress-bar metrics, which Lightning converts to numbers on every step: each is logged as a CPU
#: tensor (SiTModule's loss, copied at logging steps; ThroughputCallback's rates), so that conversion
#: reads host memory. Any other progress-bar metric makes every read of the conversion count.
HOST_PROGRESS_BAR = {"loss", "throughput/images_per_sec"}
#: Tensor methods that read a tensor's values on the host.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


# ------------------------------------------------------------------------------------------------
# The child: one DDP fit under the counters.
# ------------------------------------------------------------------------------------------------
def _child(out: Path) -> None:
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
    from lightning_toy import TINY_MODEL, RandomLatentsDataModule, trainer_kwargs

    from sit_lightning.callbacks import EMACallback, PreemptionCallback, ThroughputCallback
    from sit_lightning.module import PaperAdamW, SiTModule

    counts: dict[int, Counter[str]] = {}
    step = [-1]  # the optimizer step being counted; -1: outside training steps
    side_groups: list[Any] = []
    progress_bars: set[str] = set()

    def callers() -> set[tuple[str, str]]:
        frame, found = sys._getframe(2), set()
        while frame is not None:
            found.add((Path(frame.f_code.co_filename).name, frame.f_code.co_name))
            frame = frame.f_back
        return found

    def counting(kind: str, original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if step[0] >= 0:
                host_only = kind.startswith("read") and bool(callers() & HOST_ONLY_SITES)
                side = kwargs.get("group") is not None and kwargs.get("group") in side_groups
                key = ("side " if side else "") + ("host-only " if host_only else "") + kind
                counts.setdefault(step[0], Counter())[key] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counting(f"collective {name}", getattr(dist, name)))
    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(f"read {name}", getattr(torch.Tensor, name)))

    metrics = _ResultCollection.metrics

    def host_progress_bar_metrics(self: _ResultCollection, on_step: bool) -> Any:
        names = {v.meta.forked_name(on_step) for _, v in self.valid_items() if v.meta.prog_bar}
        progress_bars.update(names)
        if not names <= HOST_PROGRESS_BAR:
            return metrics(self, on_step)
        HOST_ONLY_SITES.add(("result.py", "metrics"))
        try:
            return metrics(self, on_step)
        finally:
            HOST_ONLY_SITES.discard(("result.py", "metrics"))

    _ResultCollection.metrics = host_progress_bar_metrics  # type: ignore[method-assign]

    class StepMark(pl.Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            pl_module.network.check_label_range = False  # as SiTModule.setup does on CUDA
            side_groups.append(getattr(preemption, "_group", None))

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            step[0] = trainer.global_step

        def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
            step[0] = -1

    preemption = PreemptionCallback()
    # fused: non-finite steps skipped on the device, as PaperAdamW does on CUDA
    module = SiTModule(**TINY_MODEL, optimizer=functools.partial(PaperAdamW, lr=1e-3, fused=True))
    trainer = pl.Trainer(
        **trainer_kwargs(
            max_steps=MAX_STEPS,
            devices=2,
            strategy=DDPStrategy(process_group_backend="gloo"),
            log_every_n_steps=LOG_EVERY,
            logger=CSVLogger(out / "logs"),
            enable_progress_bar=True,
            enable_checkpointing=True,
            callbacks=[
                StepMark(),
                EMACallback(),
                preemption,
                ThroughputCallback(window=2, warmup=1),
                ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=1000, save_last=True),
            ],
            default_root_dir=out,
        )
    )
    trainer.fit(module, RandomLatentsDataModule(global_batch_size=8, num_samples=64))
    result = {
        "counts": {s: dict(c) for s, c in sorted(counts.items())},
        "progress_bar": sorted(progress_bars),
    }
    (out / f"counts_{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.path.append(str(HERE))
    _child(Path(sys.argv[1]))
    raise SystemExit(0)


# ------------------------------------------------------------------------------------------------
# The test.
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(out: Path) -> list[tuple[int, str]]:
    """Both ranks, started as Lightning's own launcher starts them (LOCAL_RANK set: no relaunch)."""
    from lightning_toy import child_env

    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", NODE_RANK="0")
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(out)],
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append((proc.returncode, stderr))
    return results


def test_a_ddp_step_reads_nothing_back_and_runs_no_collective_outside_logging_steps(tmp_path: Path) -> None:
    for returncode, stderr in _launch(tmp_path):
        assert returncode == 0, stderr[-5000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"counts_{rank}.json").read_text())
        assert set(result["progress_bar"]) <= HOST_PROGRESS_BAR, result["progress_bar"]
        for s in MEASURED:
            counts = Counter(result["counts"][str(s)])
            device = {k: n for k, n in counts.items() if not k.startswith(("side ", "host-only "))}
            side = {k: n for k, n in counts.items() if k.startswith("side ")}
            # every step: the preemption flag's all-reduce on the CPU side group, nothing on the training group
            assert side == {"side collective all_reduce": 1}, (rank, s, counts)
            if s in LOGGING_STEPS:
                # the progress bar's CPU copy of the loss, the non-finite run length, and the logger's
                # conversion of the five logged metrics (train/loss, train/lr, train/grad_norm,
                # train/nonfinite_skips, throughput/images_per_sec)
                assert device == {"read cpu": 1, "read __int__": 1, "read item": 5}, (rank, s, counts)
            else:
                assert device == {}, (rank, s, counts)
