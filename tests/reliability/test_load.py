"""Under load: a 2-process DDP fit with data workers leaves no open files or processes behind, and a data
worker killed mid-run ends the run with a non-zero exit naming the worker, not a hang (issue 11, point 7).

One ``torchrun`` launch (2 CPU processes, gloo) runs this file as a script: each rank records its open file
descriptors (``/proc/self/fd``) and child processes, fits a tiny SiT for ``STEPS`` steps on latent shards
with 2 data workers per rank (a fresh pair every epoch), records them again (the process group, which
Lightning keeps for the next fit, is opened before the first record), and then starts a second fit
in which rank 0 kills one of its data workers with SIGKILL after ``KILL_AT`` steps: torchrun must end
both ranks with a non-zero exit, and the output must name the worker's pid, well within ``DEADLINE_S``.
The "after" record follows a ``gc.collect()``: a loader whose epoch the fit cut short shuts its workers
down when it is collected.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

STEPS = 200
KILL_AT = 3
IMAGES = 64
GLOBAL_BATCH = 4  # 16 steps an epoch: the workers of each rank start and stop 13 times
WORKERS = 2
SHAPE = (4, 8, 8)
DEADLINE_S = 60  # from the kill to the exit of every process
LAUNCH_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------- the runner
def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the descriptor of the listing itself, closed by now
            pass
    return fds


def _children(pid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command in parentheses
            children.add(int(entry))
    return children


def _fit(shards: str, root: str, steps: int, callbacks: list) -> int:
    from lightning.pytorch import Trainer

    from sit_lightning.data import LatentDataModule
    from sit_lightning.models import SiTConfig
    from sit_lightning.module import SiTModule

    arch = SiTConfig(input_size=8, num_classes=2, depth=1, hidden_size=32, num_heads=2)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=root,
    )  # fmt: skip
    data = LatentDataModule(shards, global_batch_size=GLOBAL_BATCH, num_workers=WORKERS, pin_memory=False)
    trainer.fit(SiTModule(arch=arch), datamodule=data)
    return trainer.global_step


def run(shards: str, out: str) -> None:
    """Each rank: fds and children before and after a clean fit, then a fit whose data worker rank 0 kills."""
    import torch.distributed as dist
    from lightning.pytorch import Callback

    rank = int(os.environ["RANK"])
    # The process group outlives a fit (Lightning reuses it): open it first, so that what a fit leaves
    # behind is what the comparison sees.
    dist.init_process_group("gloo")
    dist.barrier()
    before = (_open_fds(), _children(os.getpid()))
    steps = _fit(shards, out, STEPS, [])
    no_gc = (_open_fds(), _children(os.getpid()))
    gc.collect()
    after = (_open_fds(), _children(os.getpid()))
    report = {
        "steps": steps,
        "without_gc": {"fds": no_gc[0], "children": sorted(no_gc[1]), "same": no_gc == after},
        "fds_before": before[0], "fds_after": after[0],
        "children_before": sorted(before[1]), "children_after": sorted(after[1]),
    }  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))

    class KillAWorker(Callback):
        def on_train_batch_end(self, trainer, *args: object) -> None:
            if rank == 0 and trainer.global_step == KILL_AT:
                workers = sorted(_children(os.getpid()) - before[1])
                os.kill(workers[0], signal.SIGKILL)
                Path(out, "killed.json").write_text(json.dumps({"pid": workers[0], "time": time.time()}))

    _fit(shards, out, 10 * STEPS, [KillAWorker()])


# ------------------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    from sit_lightning.data import LatentShardWriter

    root = tmp_path_factory.mktemp("load")
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((IMAGES, *SHAPE)).astype(np.float32)
    std = np.full((IMAGES, *SHAPE), 0.1, np.float32)
    writer = LatentShardWriter(root / "shards", SHAPE, shard_size=8, vae_id="test", class_names=["a", "b"])
    writer.add(mean, std, mean, std, np.arange(IMAGES) % 2)
    writer.close()
    out = root / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        __file__, str(root / "shards"), str(out),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    proc.end_time = time.time()  # type: ignore[attr-defined]
    return proc, out


def test_a_ddp_fit_with_workers_leaves_no_files_or_processes(launch) -> None:
    proc, out = launch
    for rank in (0, 1):
        path = out / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} did not finish the clean fit:\n{proc.stderr[-5000:]}"
        report = json.loads(path.read_text())
        assert report["steps"] == STEPS
        opened = {fd: target for fd, target in report["fds_after"].items() if fd not in report["fds_before"]}
        closed = {fd: target for fd, target in report["fds_before"].items() if fd not in report["fds_after"]}
        assert not opened and not closed, f"rank {rank}: file descriptors left open {opened}, closed {closed}"
        assert report["children_after"] == report["children_before"], f"rank {rank}: {report}"


def test_a_killed_data_worker_ends_the_run_naming_it(launch) -> None:
    proc, out = launch
    killed = json.loads((out / "killed.json").read_text())
    assert proc.returncode != 0, "the run went on after its data worker was killed"
    elapsed = proc.end_time - killed["time"]
    print(f"exit {elapsed:.1f} s after the kill")
    assert elapsed < DEADLINE_S, f"the run hung after its data worker was killed ({elapsed:.0f} s)"
    assert f"DataLoader worker (pid(s) {killed['pid']}) exited unexpectedly" in proc.stdout + proc.stderr


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
