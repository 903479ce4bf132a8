"""On a GPU: the periodic and final FID and the grid run on the training device (skipped without CUDA).

Two bugs of this kind were found only on an H100: the final evaluation ran after Lightning's teardown
had moved the module to the CPU, and the CPU train split met a GPU extractor.
"""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from lightning.pytorch import Trainer

from sit_lightning.callbacks import EMACallback
from sit_lightning.callbacks.fid import FIDCallback, conditional_accuracy
from sit_lightning.callbacks.sample_grid import SampleGridCallback
from sit_lightning.data import DigitsDataModule
from sit_lightning.evaluation.fid import through_uint8
from sit_lightning.models import SiTConfig
from sit_lightning.module import SiTModule
from sit_lightning.sampling import SamplerSettings
from tiny_digits import DIGITS_ARCH

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def full_float32():
    """No TF32 on the GPU, so that its classifier logits match the CPU's up to round-off."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fid_and_grid_sample_on_the_gpu(tmp_path, monkeypatch, full_float32):
    module = SiTModule(arch=SiTConfig(**DIGITS_ARCH))
    settings = SamplerSettings(sampler="ode", steps=2, method="euler")
    fid = FIDCallback(
        every_n_steps=2, num_samples=40, cfg_scales=[1.0, 2.0], batch_size=16, settings=settings
    )
    grid = SampleGridCallback(every_n_steps=2, num_per_class=1, settings=settings)
    devices: list[str] = []
    for owner, name in ((fid, "evaluate"), (grid, "log_grid")):
        original = getattr(owner, name)

        def recorded(trainer, pl_module, _original=original):
            devices.append(next(pl_module.parameters()).device.type)
            return _original(trainer, pl_module)

        setattr(owner, name, recorded)
    # the images and labels the callback scores, one entry per guidance scale and evaluation
    generated: list[tuple[torch.Tensor, torch.Tensor]] = []
    original_generate = fid.generate

    def recorded_generate(pl_module, indices, labels, **changes):
        images = original_generate(pl_module, indices, labels, **changes)
        generated.append((images.detach().cpu().clone(), labels.detach().cpu().clone()))
        return images

    monkeypatch.setattr(fid, "generate", recorded_generate)
    trainer = Trainer(
        max_steps=3, accelerator="gpu", devices=1, callbacks=[EMACallback(decay=0.9), fid, grid],
        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(module, datamodule=DigitsDataModule(global_batch_size=16))
    assert devices == ["cuda"] * 4, devices  # step 2 (FID, grid) and the end (FID, grid)
    final = [r for step, r in fid.history if step == 3]
    assert [r.cfg_scale for r in final] == [1.0, 2.0]
    assert len(generated) == 4 and all(images.shape[0] == 40 for images, _ in generated)
    # the accuracy the callback logged is that of its own samples, recomputed on the CPU
    judge = copy.deepcopy(fid.judge).cpu()
    for result, (images, labels) in zip(final, generated[2:], strict=True):
        assert torch.equal(labels, torch.arange(40) % 10)
        expected = conditional_accuracy(judge, through_uint8(images), labels)  # the .npz levels it scores
        # a share of 40 samples: abs=1e-12 only absorbs the callback's float64 count * 40 / 40
        assert result.conditional_accuracy == pytest.approx(expected, abs=1e-12)
