"""Exact resume on CPU, and DDP / FSDP2 runs (2 processes, gloo) equal to one process with the same global batch.

Every random draw of a training sample is keyed by (seed, step, sample key), and the global batch of a
step is the same set of samples for any world size, so the only differences allowed between 1 and 2
processes are float32 summation orders (per tensor within 1e-5, norm-relative). Within one process,
stopping and resuming must not change a single bit of the weights, the AdamW state or the EMA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_toy import TINY_ARCH, assert_same_state, assert_training_moved, run_training

from sit_lightning.models import SiTConfig
from sit_lightning.module import SiTModule

STEPS = 4  # 2 epochs of 2 steps (16 samples, global batch 8); the split run resumes after step 2
REL_TOL = 1e-5
HERE = Path(__file__).resolve().parent
SECTIONS = ("weights", "optimizer", "ema", "profile")


@pytest.fixture(scope="module")
def straight(deterministic, tmp_path_factory) -> dict:
    """STEPS steps in one go, one process."""
    return run_training("single", STEPS, split=False, workdir=str(tmp_path_factory.mktemp("straight")))


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> Path:
    """DDP and FSDP2 on 2 CPU processes (torchrun, gloo), each split in two halves with a resume."""
    workdir = tmp_path_factory.mktemp("distributed")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "lightning_dist_run.py"), "ddp,fsdp", str(STEPS), str(workdir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return workdir


def test_resume_is_bit_identical(straight, tmp_path) -> None:
    resumed = run_training("single", STEPS, split=True, workdir=str(tmp_path))
    assert (tmp_path / "half.ckpt").is_file()
    assert_same_state(straight, resumed, SECTIONS)
    assert_training_moved(straight)  # the comparison is not vacuous


def _relative_errors(reference: dict, other: dict) -> dict[str, float]:
    errors = {}
    for section in SECTIONS:
        assert reference[section].keys() == other[section].keys(), section
        for key, ref in reference[section].items():
            errors[f"{section}/{key}"] = (
                (other[section][key] - ref).norm() / ref.norm().clamp_min(1e-30)
            ).item()
    return errors


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_process_run_with_resume_equals_one_process(kind, straight, distributed) -> None:
    result = torch.load(distributed / kind / "result.pt", weights_only=True)
    errors = _relative_errors(straight, result)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL_TOL, (
        f"{kind}: worst tensor {worst} differs by {errors[worst]:.2e} (norm-relative)"
    )
    if kind == "fsdp":
        # really sharded: every parameter a DTensor, and each rank's EMA holds only its shards
        assert int(result["meta"]["dtensor_params"]) == len(result["weights"])
        assert float(result["meta"]["ema_local_fraction"]) < 0.75
        assert (distributed / kind / "half.ckpt").is_dir()  # a sharded (distributed) checkpoint
    else:
        assert int(result["meta"]["dtensor_params"]) == 0


def test_mid_epoch_resume_with_the_digits_datamodule_is_bit_identical(deterministic, tmp_path) -> None:
    """The real data stack: DigitsDataModule's global-batch stream resumed in the middle of an epoch."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_toy import trainer_kwargs

    from sit_lightning.callbacks import EMACallback
    from sit_lightning.data import DigitsDataModule

    digits_model = dict(arch=SiTConfig(**dict(TINY_ARCH, in_channels=1, num_classes=10)))

    class CountSteps(pl.Callback):
        steps = 0

        def on_train_batch_end(self, *args) -> None:
            self.steps += 1

    def run(max_steps: int, ckpt: str | None = None, save_every: int = 0) -> tuple[dict, dict]:
        module, ema, counter = SiTModule(**digits_model), EMACallback(decay=0.5), CountSteps()
        callbacks = [ema, counter]
        if save_every:
            callbacks.append(ModelCheckpoint(tmp_path, filename="mid", every_n_train_steps=save_every))
        trainer = pl.Trainer(
            **trainer_kwargs(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(save_every))
        )
        trainer.fit(module, DigitsDataModule(global_batch_size=16), ckpt_path=ckpt)
        assert counter.steps == (max_steps - 3 if ckpt else max_steps)  # the resumed run did only the rest
        opt = trainer.optimizers[0]
        moments = {
            n: opt.state[p]["exp_avg_sq"].clone() for n, p in module.named_parameters() if p in opt.state
        }
        return dict(module.state_dict()) | {f"ema/{k}": v for k, v in ema.ema_tensors().items()}, moments

    straight = run(6)
    run(3, save_every=3)  # an epoch is ~90 steps: step 3 is mid-epoch
    resumed = run(6, ckpt=str(tmp_path / "mid.ckpt"))
    for a, b in zip(straight, resumed, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_the_full_global_batch() -> None:
    """Global batch 8 x 2 accumulated micro-batches = global batch 16: the keyed draws follow the samples."""
    import lightning.pytorch as pl
    from lightning_toy import TEST_ADAM_EPS, TEST_LR, trainer_kwargs

    from sit_lightning.data import DigitsDataModule

    digits_model = dict(arch=SiTConfig(**dict(TINY_ARCH, in_channels=1, num_classes=10)))
    initial = SiTModule(**digits_model).state_dict()
    final = []
    for global_batch, accumulate in [(16, 1), (8, 2)]:
        module = SiTModule(
            **digits_model, optimizer=lambda p: torch.optim.AdamW(p, lr=TEST_LR, eps=TEST_ADAM_EPS)
        )
        trainer = pl.Trainer(**trainer_kwargs(max_steps=3, accumulate_grad_batches=accumulate))
        trainer.fit(module, DigitsDataModule(global_batch_size=global_batch))
        final.append(module.state_dict())
    for key, reference in final[0].items():
        update = (reference - initial[key]).norm()
        if update > 0:  # relative to the training update, the strictest scale
            assert (final[1][key] - reference).norm() / update <= REL_TOL, key
