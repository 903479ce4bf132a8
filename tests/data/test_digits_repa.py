"""REPA on the digits: the conv encoder's per-patch features, in SiT/2's token order, as batch["repa_features"]."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from sit_lightning.data import DigitsDataModule
from sit_lightning.errors import ConfigurationError
from sit_lightning.evaluation.digits_encoder import DIGITS_ENCODER_FEATURES, DigitsEncoder
from sit_lightning.models.sit import PatchEmbed
from sit_lightning.module import SiTModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GRID = 4  # 8x8 pixels in 2x2 patches


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("digits_encoder")


def _changed_tokens(tokens_of, image: torch.Tensor, row: int, col: int) -> set[int]:
    """Indices of the tokens that change when the 2x2 pixel patch (row, col) of ``image`` changes."""
    perturbed = image.clone()
    perturbed[:, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2] += 0.7
    with torch.no_grad():
        delta = (tokens_of(perturbed) - tokens_of(image)).abs().amax(dim=-1)[0]  # (T,)
    return set(torch.nonzero(delta > 1e-6).flatten().tolist())


def test_encoder_tokens_are_sit_patch_tokens_in_sit_order() -> None:
    """Token n of both SiT/2's PatchEmbed and the encoder is the patch (n // 4, n % 4), row-major.

    SiT's token of a patch depends on that patch alone; the encoder's on the 5x5 patches around it
    (two 3x3 convolutions), which pins the order: a transposed (column-major) flattening changes
    tokens outside that window for every patch off the diagonal.
    """
    torch.manual_seed(0)
    encoder = DigitsEncoder().eval()
    embed = PatchEmbed(patch_size=2, in_channels=1, hidden_size=8)
    image = torch.rand(1, 1, 8, 8) * 2 - 1
    assert encoder.tokens(image).shape == (1, GRID * GRID, DIGITS_ENCODER_FEATURES)
    assert encoder.feature_map(image).shape == (1, DIGITS_ENCODER_FEATURES, GRID, GRID)
    for row in range(GRID):
        for col in range(GRID):
            n = GRID * row + col
            assert _changed_tokens(embed, image, row, col) == {n}
            changed = _changed_tokens(encoder.tokens, image, row, col)
            assert n in changed
            window = {
                GRID * i + j
                for i in range(GRID)
                for j in range(GRID)
                if abs(i - row) <= 2 and abs(j - col) <= 2
            }
            assert changed <= window, (row, col, sorted(changed - window))


def test_batches_carry_the_features_of_their_own_images(cache_dir: Path) -> None:
    datamodule = DigitsDataModule(global_batch_size=64, repa_features=True, repa_cache_dir=str(cache_dir))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["repa_features"].shape == (64, GRID * GRID, DIGITS_ENCODER_FEATURES)
    assert batch["repa_features"].dtype == torch.float32
    cached = sorted(cache_dir.glob("digits_encoder-*.pt"))
    assert len(cached) == 1
    encoder = DigitsEncoder()
    encoder.load_state_dict(torch.load(cached[0], weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(batch["repa_features"], encoder.tokens(batch["x"]), rtol=1e-5, atol=1e-5)
    # the trained encoder is a real digits model: it classifies the held-out split (its head)
    test = datamodule.test_images()
    with torch.no_grad():
        accuracy = (encoder(test.x).argmax(dim=1) == test.y).float().mean().item()
    assert accuracy > 0.9
    # opt-in: without the flag the batches are the plain contract, and a REPA module refuses it before step 1
    plain = DigitsDataModule(global_batch_size=64)
    plain.setup("fit")
    assert "repa_features" not in next(iter(plain.train_dataloader()))
    assert (datamodule.repa_inputs, plain.repa_inputs) == ("features", "none")
    arch = {
        "input_size": 8,
        "in_channels": 1,
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 2,
        "learn_sigma": False,
    }
    module = SiTModule(
        arch=arch, repa={"encoder": None, "encoder_depth": 2, "projector_dim": 8, "feature_dim": 64}
    )
    module.check_repa_inputs(datamodule.repa_inputs)
    with pytest.raises(ConfigurationError, match="data.repa_inputs is 'none'"):
        module.check_repa_inputs(plain.repa_inputs)


def test_a_repa_digits_fit_runs_through_the_cli(tmp_path: Path, cache_dir: Path) -> None:
    repa = "{encoder: null, encoder_depth: 2, projector_dim: 32, feature_dim: 64, loss_weight: 0.5}"
    logger = f"{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: '{tmp_path}'}}}}"
    code, out = run_cli(
        ["fit", "--config", str(CONFIGS / "digits.yaml"), "--trainer.max_steps", "2",
         "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(tmp_path),
         "--trainer.enable_checkpointing", "false", "--trainer.logger", logger,
         "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.limit_val_batches", "0", "--model.arch.depth", "2", "--model.arch.hidden_size", "32",
         "--model.arch.num_heads", "2", "--model.repa", repa,
         "--data.init_args.repa_features", "true", "--data.init_args.repa_cache_dir", str(cache_dir)]
    )  # fmt: skip
    assert code == 0, out[-3000:]
    rows = (next(tmp_path.rglob("metrics.csv"))).read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("train/repa_loss")
    values = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert len(values) == 2
    # minus a mean cosine: in [-1, 1], and not exactly 0 (the projector is not zero-initialised)
    assert all(-1.0 <= v <= 1.0 and v != 0.0 for v in values), values
