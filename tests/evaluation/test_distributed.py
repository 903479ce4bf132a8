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

from sit_lightning.callbacks.fid import conditional_accuracy
from sit_lightning.data import DigitsDataModule
from sit_lightning.evaluation.digits_classifier import DigitsFeatures, load_or_train_digits_classifier
from sit_lightning.evaluation.fid import feature_statistics, frechet_distance
from sit_lightning.evaluation.images import image_grid, to_uint8
from sit_lightning.module import SiTModule

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from eval_dist_run import GRID_LABELS, NUM_FID, SAMPLER  # noqa: E402


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory) -> tuple[dict, Path]:
    workdir = tmp_path_factory.mktemp("ddp_eval")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "eval_dist_run.py"), str(workdir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return torch.load(workdir / "result.pt", weights_only=False), workdir


def test_ddp_scores_and_grid_equal_one_process(ddp_result):
    result, workdir = ddp_result
    module = SiTModule(
        arch="SiT-S/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False,
        depth=1, hidden_size=32, num_heads=2, patch_size=4,
    )  # fmt: skip
    module.network.load_state_dict(result["state_dict"])
    # the grid: every cell, in order, although each rank sampled only its interleaved share
    labels = torch.tensor(GRID_LABELS)
    expected = image_grid(to_uint8(module.sample(labels, seed=3, **SAMPLER).samples))
    png = torch.from_numpy(np.array(Image.open(result["grid_path"])))
    assert torch.equal(png, expected[0])
    # FID and accuracy over all 31 samples (not 2 x 16, not twice the reference)
    data = DigitsDataModule()
    judge = load_or_train_digits_classifier(data.train_images().x, data.train_images().y, workdir / "cache")
    features = DigitsFeatures(judge)
    reference = feature_statistics(features(data.test_images().x))
    scores = {r["cfg_scale"]: r for _, r in result["history"]}
    assert set(scores) == {1.0, 2.0}
    for scale, r in scores.items():
        fid_labels = torch.arange(NUM_FID) % 10
        images = module.sample(fid_labels, seed=4, cfg_scale=scale, **SAMPLER).samples
        assert r["num_samples"] == NUM_FID
        assert r["conditional_accuracy"] == pytest.approx(conditional_accuracy(judge, images, fid_labels))
        assert r["fid"] == pytest.approx(
            frechet_distance(feature_statistics(features(images)), reference), rel=1e-4
        )
