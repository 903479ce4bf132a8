"""Untrusted files: a checkpoint whose pickle carries a code payload is refused by every loader with
one line, and nothing in it runs; the checkpoints sit-lightning writes load through the same allow-list.

The payload is real: unpickled without the allow-list it runs ``touch <sentinel>`` (the first test
shows it); every other test asserts the sentinel file was never created.
"""

from __future__ import annotations

import functools
import os
import pathlib
import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from sit_lightning.callbacks import EMACallback
from sit_lightning.data import DigitsDataModule
from sit_lightning.interpolants import GVP, VP, Linear
from sit_lightning.models import SiTConfig, load_released_sit, load_released_state_dict
from sit_lightning.module import SiTModule
from sit_lightning.objective import LogitNormalTimeSampler, TrainingObjective, UniformTimeSampler
from sit_lightning.trusted_loading import (
    TRUSTED_CLASSES,
    UntrustedCheckpointError,
    load_checkpoint,
    trusted_globals,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
#: The network of the 0.1 fixtures, as today's SiTConfig.
FIXTURE_ARCH = dict(
    input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2, patch_size=4
)


class Payload:
    """Unpickling this calls ``function(*args)``: what a malicious checkpoint does."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.function, self.args


#: the name the refusal reports -> a payload that creates the sentinel file when unpickled.
PAYLOADS: dict[str, Callable[[Path], Payload]] = {
    "posix.system": lambda sentinel: Payload(os.system, f"touch {sentinel}"),
    # torch.save writes pickle protocol 2, which stores subprocess under its Python 2 name
    "commands.run": lambda sentinel: Payload(subprocess.run, ["touch", str(sentinel)]),
    # through a method of an allowed class: pickle reaches Path.touch with getattr, which is refused
    "getattr": lambda sentinel: Payload(pathlib.Path.touch, sentinel),
}


def _evil_checkpoint(tmp_path: Path, payload: str, place: str) -> tuple[Path, Path]:
    """The CLI-written 0.1 checkpoint with a payload in its hyperparameters or its state dict."""
    sentinel = tmp_path / "payload-ran"
    checkpoint = torch.load(FIXTURES / "v0_1_cli.ckpt", map_location="cpu", weights_only=True)
    if place == "hparams":
        checkpoint["hyper_parameters"]["objective"] = PAYLOADS[payload](sentinel)
    else:
        checkpoint["state_dict"]["network.pos_embed"] = PAYLOADS[payload](sentinel)
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    return path, sentinel


def _assert_refused(error: pytest.ExceptionInfo[Exception], path: Path, payload: str, sentinel: Path) -> None:
    message = str(error.value)
    assert isinstance(error.value, (ValueError, pickle.UnpicklingError))
    assert "\n" not in message, message
    assert message.startswith(f"refused to load {path}: it names {payload}"), message
    assert "nothing was run" in message and "weights_only=False" in message, message
    assert not sentinel.exists(), "the payload ran"


def test_the_payload_runs_when_unpickled_without_the_allow_list(tmp_path: Path) -> None:
    # precondition of every refusal below: the file really is dangerous
    path, sentinel = _evil_checkpoint(tmp_path, "posix.system", "hparams")
    torch.load(path, weights_only=False)
    assert sentinel.exists()


LIGHTNING_LOADERS: dict[str, Callable[[Path], Any]] = {
    "load_checkpoint": load_checkpoint,
    "SiTModule.load_from_checkpoint": SiTModule.load_from_checkpoint,
    # arch given: the stored hyperparameters are not peeked, Lightning's own loader reads the file
    "SiTModule.load_from_checkpoint(arch=...)": functools.partial(
        SiTModule.load_from_checkpoint, arch=SiTConfig(**FIXTURE_ARCH, learn_sigma=False)
    ),
    "SiTModule.load_from_checkpoint(weights_only=True)": functools.partial(
        SiTModule.load_from_checkpoint, weights_only=True
    ),
}


@pytest.mark.parametrize("place", ["hparams", "state_dict"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("loader", sorted(LIGHTNING_LOADERS))
def test_lightning_checkpoint_loaders_refuse_a_code_payload(
    tmp_path: Path, loader: str, payload: str, place: str
) -> None:
    path, sentinel = _evil_checkpoint(tmp_path, payload, place)
    with pytest.raises(UntrustedCheckpointError) as error:
        LIGHTNING_LOADERS[loader](path)
    _assert_refused(error, path, payload, sentinel)


def test_an_open_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path, sentinel = _evil_checkpoint(tmp_path, "commands.run", "hparams")
    with open(path, "rb") as handle, pytest.raises(UntrustedCheckpointError) as error:
        SiTModule.load_from_checkpoint(handle)
    _assert_refused(error, path, "commands.run", sentinel)


def _released_weights() -> dict[str, torch.Tensor]:
    checkpoint = torch.load(FIXTURES / "v0_1_python.ckpt", map_location="cpu", weights_only=False)
    return {k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items()}


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("layout", ["bare state dict", "training checkpoint"])
def test_the_released_weights_loaders_refuse_a_code_payload(
    tmp_path: Path, layout: str, payload: str
) -> None:
    sentinel = tmp_path / "payload-ran"
    weights = _released_weights()
    if layout == "bare state dict":
        content: dict[str, Any] = {
            **weights,
            "y_embedder.embedding_table.weight": PAYLOADS[payload](sentinel),
        }
    else:  # the released train.py's layout, its args replaced by the payload
        content = {"model": weights, "ema": weights, "opt": {}, "args": PAYLOADS[payload](sentinel)}
    path = tmp_path / "SiT-evil.pt"
    torch.save(content, path)
    for load in (load_released_state_dict, functools.partial(load_released_sit, num_heads=2, input_size=8)):
        with pytest.raises(UntrustedCheckpointError) as error:
            load(path)
        _assert_refused(error, path, payload, sentinel)


def test_the_allow_list_holds_only_plain_data_classes() -> None:
    ours = {TrainingObjective, Linear, GVP, VP, UniformTimeSampler, LogitNormalTimeSampler}
    assert set(TRUSTED_CLASSES) == ours | {pathlib.PosixPath, pathlib.WindowsPath}
    # unpickling one of ours is __new__ plus a __dict__ update (or the class's own validating
    # __init__): no class in their MRO may hook in code of its own
    for cls in ours:
        for base in cls.__mro__[:-1]:  # all but object
            hooks = {"__setstate__", "__reduce__", "__reduce_ex__", "__new__", "__getattr__"} & set(
                vars(base)
            )
            assert not hooks, f"{cls.__name__} inherits {hooks} from {base.__name__}"
    for executing in (functools.partial, getattr, eval, exec, os.system, subprocess.run):
        assert executing not in TRUSTED_CLASSES


def test_trusted_globals_leaves_what_the_user_allowed(tmp_path: Path) -> None:
    torch.serialization.add_safe_globals([VP])
    try:
        with trusted_globals():
            pass
        assert VP in torch.serialization.get_safe_globals()
        assert TrainingObjective not in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()


@pytest.fixture(scope="module")
def fresh_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 steps from Python with EMA, OneCycleLR, a monitoring ModelCheckpoint and a validation."""
    root = tmp_path_factory.mktemp("fresh")
    module = SiTModule(
        arch=SiTConfig(**FIXTURE_ARCH, learn_sigma=True),
        objective=TrainingObjective("vp", "score", "likelihood", LogitNormalTimeSampler(0.5, 1.0)),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3, total_steps=10),
    )
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0,
        default_root_dir=root, callbacks=[
            EMACallback(decay=0.9), ModelCheckpoint(dirpath=root, monitor="val/loss", save_last=True)
        ],
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(global_batch_size=8))
    return root / "last.ckpt"


def test_the_checkpoints_we_write_load_through_the_allow_list(fresh_checkpoint: Path) -> None:
    for path in (FIXTURES / "v0_1_cli.ckpt", FIXTURES / "v0_1_python.ckpt", fresh_checkpoint):
        assert torch.load(path, weights_only=False).keys() == load_checkpoint(path).keys()
    checkpoint = load_checkpoint(fresh_checkpoint)
    objective = checkpoint["hyper_parameters"]["objective"]
    assert isinstance(objective.interpolant, VP) and isinstance(
        objective.time_sampler, LogitNormalTimeSampler
    )
    (ema,) = [state for name, state in checkpoint["callbacks"].items() if name.startswith("EMACallback")]
    assert ema["num_updates"] == 2 and ema["ema"].keys() == checkpoint["state_dict"].keys()
    (monitor,) = [
        state for name, state in checkpoint["callbacks"].items() if name.startswith("ModelCheckpoint")
    ]
    assert torch.is_tensor(monitor["best_model_score"])
    assert checkpoint["lr_schedulers"][0]["_step_count"] == 3
    assert checkpoint["loss_profile"]["values"].shape == (20,)
    # the module loads with the default (trusted) loader, weights and loss profile included
    module = SiTModule.load_from_checkpoint(fresh_checkpoint)
    assert (module.objective.prediction, module.objective.loss_weight) == ("score", "likelihood")
    assert all(torch.equal(v, checkpoint["state_dict"][k]) for k, v in module.state_dict().items())
    assert torch.equal(module.loss_profile.values, checkpoint["loss_profile"]["values"])


def test_lightning_resumes_a_python_checkpoint_inside_trusted_globals(fresh_checkpoint: Path) -> None:
    """Trainer.fit(ckpt_path=...) reads with torch's default weights_only=True: the objective needs the list."""

    def resume() -> int:
        module = SiTModule.load_from_checkpoint(fresh_checkpoint)
        module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
        trainer = Trainer(
            accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            default_root_dir=fresh_checkpoint.parent,
        )  # fmt: skip
        trainer.fit(module, DigitsDataModule(global_batch_size=8), ckpt_path=fresh_checkpoint)
        return trainer.global_step

    with pytest.raises(pickle.UnpicklingError, match="TrainingObjective"):
        resume()
    with trusted_globals():
        assert resume() == 3


def test_fit_resuming_from_a_payload_is_one_line_and_runs_nothing(tmp_path: Path) -> None:
    import contextlib
    import io

    from sit_lightning.cli import main

    path, sentinel = _evil_checkpoint(tmp_path, "posix.system", "hparams")
    arch = "{" + ", ".join(f"{k}: {v}" for k, v in FIXTURE_ARCH.items()) + ", learn_sigma: false}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--model.arch", arch, "--data.class_path", "sit_lightning.data.DigitsDataModule",
             "--trainer.max_steps", "7", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
             "--ckpt_path", str(path)]
        )  # fmt: skip
    lines = [line for line in err.getvalue().splitlines() if line.startswith("sit-lightning: error:")]
    assert exit_info.value.code == 2
    assert lines == [
        "sit-lightning: error: the checkpoint holds posix.system, which sit-lightning does not load (nothing "
        "from the file was run); if you trust the file, see docs/training.md, 'Which files are trusted'"
    ], err.getvalue()[-2000:]
    assert not sentinel.exists(), "the payload ran"
