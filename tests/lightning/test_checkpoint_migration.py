"""Checkpoints written by sit-lightning 0.1 (arch preset + overrides) load, resume and sample exactly.

The files in tests/fixtures/checkpoints/ were written by the code of 0.1.0 (commit ba940e3), with
the samples that code drew from them; see the README there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file

from sit_lightning.data import DigitsDataModule
from sit_lightning.interpolants import GVP, VP
from sit_lightning.models import SiTConfig
from sit_lightning.module import ConfigurationError, SiTModule, migrate_hparams

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
#: The network both 0.1 files hold: SiT-S/2 overridden to depth 1, width 32, 2 heads, patch 4.
LEGACY_ARCH = dict(
    input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2, patch_size=4
)


def test_migrate_hparams_folds_the_preset_and_its_overrides_into_one_config() -> None:
    legacy = {
        "arch": "SiT-S/2", "input_size": 8, "in_channels": 1, "num_classes": 10, "learn_sigma": False,
        "class_dropout_prob": 0.1, "depth": 1, "hidden_size": 48, "num_heads": None, "patch_size": 4,
        "grad_checkpointing": False, "seed": 3,
    }  # fmt: skip
    migrated = migrate_hparams(legacy)  # num_heads None: the preset's (6), as 0.1 built it
    expected = SiTConfig(**dict(LEGACY_ARCH, hidden_size=48, num_heads=6, learn_sigma=False))
    assert migrated["arch"] == dataclasses.asdict(expected)
    assert {k: v for k, v in migrated.items() if k != "arch"} == {"grad_checkpointing": False, "seed": 3}
    # today's form passes through unchanged
    assert migrate_hparams(migrated) == migrated
    assert migrate_hparams({"arch": "SiT-B/2", "seed": 0}) == {"arch": "SiT-B/2", "seed": 0}


def _check_samples(module: SiTModule, reference: dict[str, torch.Tensor]) -> None:
    labels = reference["labels"]
    ode = module.sample(labels, steps=3, method="heun", seed=1).samples
    # precondition: the stored samples are not their noise (the network had trained, not adaLN-Zero)
    assert (reference["ode_heun3"] - module.sample_noise(torch.arange(len(labels)), 1)).abs().max() > 0.1
    assert torch.equal(ode, reference["ode_heun3"])
    if "sde_em4" in reference:
        sde = module.sample(labels, sampler="sde", steps=4, seed=1).samples
        assert torch.equal(sde, reference["sde_em4"])


def test_a_cli_checkpoint_of_0_1_loads_and_samples_identically() -> None:
    module = SiTModule.load_from_checkpoint(FIXTURES / "v0_1_cli.ckpt", map_location="cpu")
    assert module.config == SiTConfig(**LEGACY_ARCH, learn_sigma=False)
    assert isinstance(module.objective.interpolant, GVP)
    assert module.hparams["arch"] == dataclasses.asdict(module.config)
    assert "depth" not in module.hparams
    _check_samples(module, load_file(FIXTURES / "v0_1_cli_samples.safetensors"))


def test_a_python_checkpoint_of_0_1_loads_and_samples_identically() -> None:
    # its hparams hold a pickled TrainingObjective, which torch.load reads only with weights_only=False
    path = FIXTURES / "v0_1_python.ckpt"
    module = SiTModule.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    assert module.config == SiTConfig(**LEGACY_ARCH, learn_sigma=True)
    objective = module.objective
    assert isinstance(objective.interpolant, VP)
    assert (objective.prediction, objective.loss_weight) == ("score", "likelihood")
    _check_samples(module, load_file(FIXTURES / "v0_1_python_samples.safetensors"))
    # from an open file as well
    with open(path, "rb") as handle:
        again = SiTModule.load_from_checkpoint(handle, map_location="cpu", weights_only=False)
    assert again.config == module.config
    # the default loader needs no weights_only=False: it allows exactly the objective's classes
    trusted = SiTModule.load_from_checkpoint(path, map_location="cpu")
    assert trusted.config == module.config and isinstance(trusted.objective.interpolant, VP)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in trusted.state_dict().items())


def _trainer(root: Path, max_steps: int) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip


def test_a_0_1_checkpoint_resumes_with_the_migrated_config(tmp_path: Path) -> None:
    path = FIXTURES / "v0_1_cli.ckpt"
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert stored["global_step"] == 6 and "depth" in stored["hyper_parameters"]
    module = SiTModule(
        arch=SiTConfig(**LEGACY_ARCH, learn_sigma=False),
        objective=SiTModule.load_from_checkpoint(path, map_location="cpu").objective,
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.0),
    )
    trainer = _trainer(tmp_path, max_steps=7)
    trainer.fit(module, DigitsDataModule(global_batch_size=16), ckpt_path=path)
    assert trainer.global_step == 7
    saved = tmp_path / "resumed.ckpt"
    trainer.save_checkpoint(saved)
    hparams = torch.load(saved, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["arch"] == dataclasses.asdict(module.config) and "depth" not in hparams


def test_resuming_into_another_architecture_names_both(tmp_path: Path) -> None:
    module = SiTModule(arch=SiTConfig(**dict(LEGACY_ARCH, depth=2), learn_sigma=False))
    with pytest.raises(
        ConfigurationError, match=r"checkpoint's network is SiTConfig\(.*depth=1.*built as .*depth=2"
    ):
        _trainer(tmp_path, max_steps=7).fit(
            module, DigitsDataModule(global_batch_size=16), ckpt_path=FIXTURES / "v0_1_cli.ckpt"
        )
