"""Grid and FID callbacks under 2-process DDP (torchrun, gloo) equal a single-process computation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from sit_lightning.callbacks.fid import conditional_accuracy
from sit_lightning.data import DigitsDataModule
from sit_lightning.evaluation.digits_classifier import DigitsFeatures, load_or_train_digits_classifier
from sit_lightning.evaluation.fid import feature_statistics, frechet_distance, through_uint8
from sit_lightning.evaluation.images import image_grid, to_uint8

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"  # the checkout under test, not whatever sit_lightning is installed
sys.path.insert(0, str(HERE))

from eval_dist_run import (  # noqa: E402
    CFG_SCALES,
    GRID_LABELS,
    NUM_FID,
    SAMPLER,
    TRAIN_STEPS,
    build_module,
)

#: DDP samples in batches of 3 (grid) and 5 (FID), the recomputation all at once.
LATENT_ATOL = 1e-5
#: A wrong label or guidance scale must move every sample by far more than the tolerance.
SENSITIVITY = 100 * LATENT_ATOL


def per_sample_gap(a: Tensor, b: Tensor) -> Tensor:
    """``(N,)`` largest absolute difference of each sample."""
    return (a - b).flatten(1).abs().amax(dim=1)


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory) -> tuple[dict, Path]:
    workdir = tmp_path_factory.mktemp("ddp_eval")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "eval_dist_run.py"), str(workdir),
    ]  # fmt: skip
    path = [str(SRC), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return torch.load(workdir / "result.pt", weights_only=False), workdir


def test_ddp_scores_and_grid_equal_one_process(ddp_result):
    result, workdir = ddp_result
    assert Path(result["sit_lightning_file"]).resolve().is_relative_to(SRC.resolve())
    assert result["global_step"] == TRAIN_STEPS
    module = build_module()
    module.network.load_state_dict(result["state_dict"])
    # the grid: every cell, in order, although each rank sampled only its interleaved share
    labels = torch.tensor(GRID_LABELS)
    latents = module.sample(labels, seed=3, **SAMPLER).samples
    shifted = module.sample((labels + 1) % 10, seed=3, **SAMPLER).samples
    assert per_sample_gap(latents, shifted).min() > SENSITIVITY, (
        "PRECONDITION: every grid cell must depend on its label, or a rank with wrong labels passes"
    )
    torch.testing.assert_close(result["grid_latents"], latents, rtol=0, atol=LATENT_ATOL)
    expected = image_grid(to_uint8(latents))
    png = torch.from_numpy(np.array(Image.open(result["grid_path"])))
    assert torch.equal(png, expected[0])
    # FID and accuracy over all 31 samples (not 2 x 16, not twice the reference)
    data = DigitsDataModule()
    judge = load_or_train_digits_classifier(data.train_images().x, data.train_images().y, workdir / "cache")
    features = DigitsFeatures(judge)
    reference = feature_statistics(features(data.test_images().x))
    scores = {r["cfg_scale"]: r for _, r in result["history"]}
    assert set(scores) == set(CFG_SCALES) == {1.0, 2.0}
    fid_labels = torch.arange(NUM_FID) % 10
    images = {}
    for scale, r in scores.items():
        images[scale] = module.sample(fid_labels, seed=4, cfg_scale=scale, **SAMPLER).samples
        scored = through_uint8(images[scale])  # the callback scores what an .npz of its samples holds
        assert r["num_samples"] == NUM_FID
        assert r["conditional_accuracy"] == pytest.approx(conditional_accuracy(judge, scored, fid_labels))
        assert r["fid"] == pytest.approx(
            frechet_distance(feature_statistics(features(scored)), reference), rel=1e-4
        )
    assert per_sample_gap(images[1.0], images[2.0]).min() > SENSITIVITY, (
        "PRECONDITION: every FID sample must depend on the guidance scale, or a rank that ignores it passes"
    )
