"""``sit-lightning convert`` and models/convert.py: the released layouts, exact round trips, Lightning checkpoints.

Every equality is checked on networks whose output is far from zero (random final and adaLN layers, or
a fit with a large learning rate): SiT's adaLN-Zero initialisation outputs exactly 0, which would make
any two fresh networks "equal".
"""

from __future__ import annotations

import argparse
import pickle
from dataclasses import asdict

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from sit_lightning.callbacks import EMACallback
from sit_lightning.cli import main
from sit_lightning.models import SiT, SiTConfig, load_released_sit, load_released_state_dict
from sit_lightning.models.convert import (
    learn_sigma_rows,
    save_torch,
    to_learn_sigma,
    to_released_sample,
    to_released_training,
)
from sit_lightning.module import ConfigurationError, SiTModule

TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
C = 4  # latent channels
LIGHTNING_ARCH = SiTConfig(input_size=8, in_channels=4, num_classes=3, depth=2, hidden_size=32, num_heads=2)
#: The output must be this far from zero for an equality to mean something.
NONZERO = 1e-2


def random_released(seed: int, **overrides) -> dict[str, torch.Tensor]:
    """A released-layout state dict with every trainable tensor random (adaLN and final layer included)."""
    torch.manual_seed(seed)
    model = SiT(**{**TINY, **overrides})
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def inputs(num_classes: int = 10, n: int = 3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, C, 8, 8, generator=g), torch.rand(n, generator=g), torch.arange(n) % num_classes


def forward(model: torch.nn.Module, num_classes: int = 10) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(*inputs(num_classes))
    assert out.abs().max() > NONZERO  # adaLN-Zero would make every comparison trivially equal
    return out


def exact(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def convert(*args: str) -> None:
    assert main(["convert", *map(str, args)]) == 0


# ---- the state-dict functions ------------------------------------------------------------------


def test_sample_layout_keeps_the_rows_whose_channel_is_below_C_and_gives_the_same_output():
    state = random_released(0)
    sample = to_released_sample(state, in_channels=C)
    kept = [row for row in range(2 * 2 * 2 * C) if row % (2 * C) < C]  # p*p*2C rows, channel fastest
    assert learn_sigma_rows(C, 2).nonzero().flatten().tolist() == kept
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        assert torch.equal(sample[key], state[key][kept])
    assert all(sample[k] is state[k] for k in state if not k.startswith("final_layer.linear"))
    ours = SiT(**TINY)
    ours.load_state_dict(state, strict=True)
    released_style = SiT(**TINY, learn_sigma=False)  # what released sample.py builds for --ckpt
    released_style.load_state_dict(sample, strict=True)
    assert torch.equal(forward(released_style), forward(ours))
    # the other half feeds the unused variance channels: changing it changes nothing
    with torch.no_grad():
        ours.final_layer.linear.weight[~learn_sigma_rows(C, 2)] += 1.0
    assert torch.equal(forward(ours), forward(released_style))


def test_to_learn_sigma_is_the_exact_inverse_and_keeps_the_output():
    sample = to_released_sample(random_released(1))
    padded = to_learn_sigma(sample)
    assert exact(to_released_sample(padded), sample)
    assert torch.count_nonzero(padded["final_layer.linear.weight"][~learn_sigma_rows(C, 2)]) == 0
    a, b = SiT(**TINY, learn_sigma=False), SiT(**TINY)
    a.load_state_dict(sample, strict=True)
    b.load_state_dict(padded, strict=True)
    assert torch.equal(forward(a), forward(b))
    with pytest.raises(ValueError, match="in_channels=3, but x_embedder.proj.weight has 4"):
        to_released_sample(sample, in_channels=3)


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("the write fails half-way")


def test_released_training_dict_and_atomic_writes(tmp_path):
    model, ema = random_released(2), random_released(3)
    checkpoint = to_released_training(model, ema, args=argparse.Namespace(model=None))
    assert sorted(checkpoint) == ["args", "ema", "model"]
    assert exact(checkpoint["model"], model) and exact(checkpoint["ema"], ema)
    path = save_torch(checkpoint, tmp_path / "0000100.pt")
    assert exact(load_released_state_dict(path), ema)
    with pytest.raises(ValueError, match="differ in keys or shapes"):
        to_released_training(model, to_released_sample(ema))
    with pytest.raises(RuntimeError, match="fails half-way"):  # the old file stays, no .tmp is left
        save_torch({"x": torch.zeros(3), "y": _FailsToPickle()}, path)
    assert exact(load_released_state_dict(path), ema)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000100.pt"]


# ---- released -> ours -> released ---------------------------------------------------------------


def test_released_training_checkpoint_round_trips_exactly_through_a_lightning_checkpoint(tmp_path):
    model, ema = random_released(4), random_released(5)
    source = tmp_path / "0400000.pt"
    args = argparse.Namespace(model="SiT-XL/2", image_size=256, global_seed=0)
    torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args}, source)
    convert(source, tmp_path / "init.ckpt", "--to", "lightning-init", "--num_heads", "4")
    convert(tmp_path / "init.ckpt", tmp_path / "back.pt", "--to", "released-train")
    assert exact(load_released_state_dict(tmp_path / "back.pt", which="model"), model)
    assert exact(load_released_state_dict(tmp_path / "back.pt", which="ema"), ema)

    # ours: SiTModule loads the trained weights; its EMA is the released EMA
    module = SiTModule.load_from_checkpoint(tmp_path / "init.ckpt")
    assert exact(module.network.state_dict(), model)
    released = load_released_sit(source, num_heads=4, input_size=8, which="model")
    assert torch.equal(forward(module.network), forward(released))
    init = torch.load(tmp_path / "init.ckpt", weights_only=True)
    ema_state = {k.removeprefix("network."): v for k, v in init["callbacks"]["EMACallback"]["ema"].items()}
    assert exact(ema_state, ema)


def test_sample_layout_round_trips_exactly(tmp_path):
    sample = to_released_sample(random_released(6))
    source = tmp_path / "sample.pt"
    torch.save(sample, source)  # a bare learn_sigma=False state dict, as released sample.py loads
    convert(source, tmp_path / "init.ckpt", "--to", "lightning-init", "--num_heads", "4")
    convert(tmp_path / "init.ckpt", tmp_path / "back.pt", "--to", "released-sample")
    assert exact(load_released_state_dict(tmp_path / "back.pt"), sample)
    module = SiTModule.load_from_checkpoint(tmp_path / "init.ckpt")
    assert module.network.learn_sigma is False
    expected = forward(load_released_sit(source, num_heads=4, input_size=8))
    assert torch.equal(forward(module.network), expected)
    # released-train pads the variance half with zeros; the output is the same
    convert(source, tmp_path / "train.pt", "--to", "released-train", "--num_heads", "4")
    assert torch.equal(forward(load_released_sit(tmp_path / "train.pt", num_heads=4, input_size=8)), expected)
    assert exact(to_released_sample(load_released_state_dict(tmp_path / "train.pt")), sample)


def test_fit_starts_from_a_lightning_init_checkpoint(tmp_path):
    model = random_released(7, num_classes=3, hidden_size=32, num_heads=2)
    ema = random_released(8, num_classes=3, hidden_size=32, num_heads=2)
    source = tmp_path / "0400000.pt"
    torch.save({"model": model, "ema": ema, "args": argparse.Namespace()}, source)
    convert(source, tmp_path / "init.ckpt", "--to", "lightning-init", "--num_heads", "2")

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.weights = {k: v.clone() for k, v in pl_module.network.state_dict().items()}
            self.ema = {k.removeprefix("network."): v.clone() for k, v in callback.ema_tensors().items()}
            self.step = trainer.global_step

    callback, at_start = EMACallback(decay=0.5), AtStart()
    trainer = Trainer(**_trainer_kwargs(max_steps=1, callbacks=[callback, at_start]))
    trainer.fit(SiTModule(arch=LIGHTNING_ARCH), _Latents(), ckpt_path=str(tmp_path / "init.ckpt"))
    assert at_start.step == 0 and trainer.global_step == 1
    assert exact(at_start.weights, model) and exact(at_start.ema, ema)
    wider = SiTModule(arch=SiTConfig(**{**asdict(LIGHTNING_ARCH), "hidden_size": 64}))
    with pytest.raises(ConfigurationError, match="the checkpoint's network is"):
        Trainer(**_trainer_kwargs(max_steps=1)).fit(wider, _Latents(), ckpt_path=str(tmp_path / "init.ckpt"))


# ---- Lightning -> released ------------------------------------------------------------------------


class _LatentSet(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "key": torch.tensor(i)}


class _Latents(LightningDataModule):
    latent_shape = (4, 8, 8)
    num_classes = 3

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_LatentSet(), batch_size=8)


def _trainer_kwargs(**overrides) -> dict:
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **overrides,
    )


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory) -> tuple:
    """A SiTModule fitted 2 steps with an EMACallback (large lr: the output is far from zero)."""
    module = SiTModule(arch=LIGHTNING_ARCH, optimizer=lambda params: torch.optim.AdamW(params, lr=0.05))
    ema = EMACallback(decay=0.5)
    trainer = Trainer(**_trainer_kwargs(max_steps=2, callbacks=[ema]))
    trainer.fit(module, _Latents())
    path = tmp_path_factory.mktemp("lightning") / "last.ckpt"
    trainer.save_checkpoint(path)
    raw = {k: v.clone() for k, v in module.network.state_dict().items()}
    averaged = {k.removeprefix("network."): v.clone() for k, v in ema.ema_tensors().items()}
    assert not exact(raw, averaged)
    return path, raw, averaged


def test_lightning_to_released_train_safetensors_and_sample(lightning_checkpoint, tmp_path):
    path, raw, averaged = lightning_checkpoint
    load = dict(num_heads=2, input_size=8)
    convert(path, tmp_path / "train.pt", "--to", "released-train")
    convert(path, tmp_path / "ema.safetensors", "--to", "safetensors")
    convert(path, tmp_path / "sample.pt", "--to", "released-sample")
    convert(path, tmp_path / "raw.safetensors", "--to", "safetensors", "--which", "model")
    assert exact(load_released_state_dict(tmp_path / "train.pt"), averaged)  # EMA by default
    assert exact(load_released_state_dict(tmp_path / "train.pt", which="model"), raw)
    assert exact(load_file(tmp_path / "ema.safetensors"), averaged)
    assert exact(load_file(tmp_path / "raw.safetensors"), raw)
    args = torch.load(tmp_path / "train.pt", weights_only=False)["args"]
    assert vars(args) == {"model": None, "image_size": 64, "num_classes": 3}

    reference = SiT(LIGHTNING_ARCH)
    reference.load_state_dict(averaged, strict=True)
    expected = forward(reference, num_classes=3)
    for name in ("train.pt", "ema.safetensors", "sample.pt"):
        assert torch.equal(forward(load_released_sit(tmp_path / name, **load), num_classes=3), expected), name
    assert load_released_sit(tmp_path / "sample.pt", **load).learn_sigma is False


def test_lightning_checkpoint_with_a_pickled_objective_is_read(tmp_path):
    from sit_lightning.interpolants import GVP
    from sit_lightning.objective import TrainingObjective

    module = SiTModule(arch=LIGHTNING_ARCH, objective=TrainingObjective(path=GVP()))
    trainer = Trainer(**_trainer_kwargs(max_steps=1))
    trainer.fit(module, _Latents())
    trainer.save_checkpoint(tmp_path / "gvp.ckpt")
    with pytest.raises(pickle.UnpicklingError):  # the objective object is pickled in the hyperparameters
        torch.load(tmp_path / "gvp.ckpt", weights_only=True)
    convert(tmp_path / "gvp.ckpt", tmp_path / "w.safetensors", "--to", "safetensors", "--which", "model")
    assert exact(load_file(tmp_path / "w.safetensors"), module.network.state_dict())


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_name", "output_name", "args", "message"),
    [
        ("notes.txt", "out.safetensors", ["--to", "safetensors"], "expected a suffix in"),
        ("released.ckpt", "out.safetensors", ["--to", "safetensors"], "is not a Lightning checkpoint"),
        ("weights.pt", "out.pt", ["--to", "released-train", "--which", "ema"], "--which applies to"),
        ("weights.pt", "out.safetensors", ["--to", "released-sample"], "writes .pt or .pth files"),
        ("missing.pt", "out.safetensors", ["--to", "safetensors"], "does not exist"),
    ],
)
def test_wrong_inputs_fail_with_one_line(tmp_path, capsys, source_name, output_name, args, message):
    source, output = tmp_path / source_name, tmp_path / output_name
    if source_name != "missing.pt":
        torch.save(random_released(9), source)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(source), str(output), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sit-lightning convert: error:") and message in err and "\n" not in err
    assert not output.exists()


class Untrusted:
    """A class no checkpoint allow-list holds."""


def test_a_checkpoint_pickling_a_foreign_class_is_refused_with_one_line(tmp_path, capsys):
    source = tmp_path / "evil.ckpt"
    state = {f"network.{k}": v for k, v in random_released(10).items()}
    torch.save({"state_dict": state, "hyper_parameters": {"x": Untrusted()}}, source)
    with pytest.raises(SystemExit):
        main(["convert", str(source), str(tmp_path / "w.safetensors"), "--to", "safetensors"])
    err = capsys.readouterr().err.strip()
    assert "Untrusted" in err and "nothing was run" in err and "\n" not in err


def test_a_lightning_checkpoint_without_ema_needs_which_model(tmp_path, capsys):
    module = SiTModule(arch=LIGHTNING_ARCH)
    trainer = Trainer(**_trainer_kwargs(max_steps=1))
    trainer.fit(module, _Latents())
    trainer.save_checkpoint(tmp_path / "no_ema.ckpt")
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "no_ema.ckpt"), str(tmp_path / "w.pt"), "--to", "released-sample"])
    assert "has no EMACallback state; pass --which model" in capsys.readouterr().err


def test_help_lists_convert(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "convert" in capsys.readouterr().out
