"""Every one-line error of the project: one bad input, one line naming the bad value, no traceback.

Each CLI case runs ``main([...])`` with one bad input and expects exit status 2 and exactly one
non-empty line on stderr, ``sit-lightning: error: ...``, naming the bad value and what was expected;
the fits fail before their first step. Each Python-API case (what the CLI does not reach) expects the
exception's message on one line, naming the bad value. A new one-line error belongs in ``CASES``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pytest
import torch

from sit_lightning import errors
from sit_lightning.cli import main
from sit_lightning.data import LatentDataModule, LatentShardWriter
from sit_lightning.data.contract import TrainingData, require
from sit_lightning.errors import ConfigurationError
from sit_lightning.models import SiT, SiTConfig
from sit_lightning.models.checkpoint import load_released_sit
from sit_lightning.module import SiTModule
from sit_lightning.sampling import ModelField, sample_ode

SHAPE = (4, 8, 8)
IMAGES = 8
SHARD_SIZE = 4  # two shards: the messages must name the right file and row
CLASSES = ("cat", "dog")
NAN_IMAGE = 5  # moments-000001.npy, row 1
BAD_LABEL_IMAGE, BAD_LABEL = 6, 7  # labels-000001.npy, row 2
ARCH = "{input_size: 8, num_classes: 2, depth: 1, hidden_size: 32, num_heads: 2}"
TINY = SiTConfig(input_size=8, num_classes=2, depth=1, hidden_size=32, num_heads=2)


class Inputs(NamedTuple):
    root: Path
    shards: Path
    nan_shards: Path
    bad_labels: Path
    blocker: Path  # a regular file where an output folder should go
    weights: Path  # a tiny network's state dict, not the preset it is loaded as


def _write_shards(path: Path, *, nan_at: int | None = None, labels: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((IMAGES, *SHAPE)).astype(np.float32)
    std = np.full((IMAGES, *SHAPE), 0.1, np.float32)
    if nan_at is not None:
        mean[nan_at] = np.nan
    writer = LatentShardWriter(path, SHAPE, shard_size=SHARD_SIZE, vae_id="test", class_names=CLASSES)
    writer.add(mean, std, mean[:, :, :, ::-1], std, np.arange(IMAGES) % 2 if labels is None else labels)
    writer.close()
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("bad_input")
    labels = np.arange(IMAGES) % 2
    labels[BAD_LABEL_IMAGE] = BAD_LABEL
    blocker = root / "blocker"
    blocker.write_text("a file, not a folder\n")
    weights = root / "tiny.pt"
    torch.manual_seed(0)
    torch.save(SiT(TINY).state_dict(), weights)
    (root / "a.yaml").write_text("base: b.yaml\n")
    (root / "b.yaml").write_text("base: [a.yaml]\n")
    (root / "missing_base.yaml").write_text("base: base/nowhere.yaml\nmodel: {arch: SiT-B/2}\n")
    (root / "dict_base.yaml").write_text("base: {trainer: 1}\n")
    (root / "empty").mkdir()
    return Inputs(
        root,
        _write_shards(root / "shards"),
        _write_shards(root / "nan_shards", nan_at=NAN_IMAGE),
        _write_shards(root / "bad_labels", labels=labels),
        blocker,
        weights,
    )


def _fit(data_dir: Path | str, out: Path, *extra: str) -> list[str]:
    """A one-step CPU fit of a tiny SiT on ``data_dir``; ``extra`` overrides (later flags win)."""
    return [
        "fit", "--model.arch", ARCH, "--data.class_path", "sit_lightning.data.LatentDataModule",
        "--data.init_args.data_dir", str(data_dir), "--data.init_args.global_batch_size", "4",
        "--data.init_args.num_workers", "0", "--data.init_args.pin_memory", "false",
        "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(out), *extra,
    ]  # fmt: skip


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda _: usage._replace(free=1024))


def _short_worker_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # The failed run leaves its data worker to the garbage collector, whose shutdown waits out torch's
    # status interval (5 s) for it: shorten the wait, not the check (issue 11, point 7).
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)


def _checkpoint_of_another_network() -> None:
    module = SiTModule(arch=TINY)
    other = {**dataclasses.asdict(TINY), "depth": 2}
    module.on_load_checkpoint({SiTModule.CHECKPOINT_HYPER_PARAMS_KEY: {"arch": other}})


@dataclass(frozen=True)
class Case:
    """One bad input. ``run`` gives the CLI arguments (``kind="cli"``) or is the API call that must fail."""

    kind: Literal["cli", "api"]
    run: Callable[[Inputs, Path], list[str] | None]
    expected: tuple[str, ...]  # substrings of the one line: the bad value and what was expected
    error: type[Exception] = ConfigurationError
    setup: Callable[[pytest.MonkeyPatch], None] | None = None


CASES: dict[str, Case] = {
    # ---- data (point 5 of issue 11)
    "missing data folder": Case(
        "cli",
        lambda i, out: _fit(i.root / "nowhere", out),
        (
            "latent shard folder",
            "nowhere' does not exist",
            "sit-lightning precompute-latents IMAGE_ROOT",
            "nowhere --vae",
        ),
    ),  # fmt: skip
    "data folder without an index": Case(
        "cli",
        lambda i, out: _fit(i.root / "empty", out),
        (
            "empty/index.json not found",
            "precompute-latents has not finished",
            "sit-lightning precompute-latents",
        ),
    ),
    "label outside num_classes": Case(
        "cli",
        lambda i, out: _fit(i.bad_labels, out),
        ("labels-000001.npy: label 7 at row 2 (sample 6) is outside [0, 2)", "lists 2 class_names"),
    ),
    "non-finite latent": Case(
        "cli",
        lambda i, out: _fit(i.nan_shards, out, "--data.init_args.global_batch_size", "8"),
        ("non-finite latent", "moments-000001.npy, row 1 (sample 5 of", "validate_shards"),
    ),
    "non-finite latent in a data worker": Case(
        "cli",
        lambda i, out: _fit(
            i.nan_shards, out, "--data.init_args.global_batch_size", "8", "--data.init_args.num_workers", "1"
        ),
        ("non-finite latent", "moments-000001.npy, row 1 (sample 5 of"),
        setup=_short_worker_timeout,
    ),
    "val_fraction out of range": Case(
        "cli",
        lambda i, out: _fit(i.shards, out, "--data.init_args.val_fraction", "1.5"),
        ("val_fraction must be in [0, 1), got 1.5",),
    ),
    # ---- steps
    "zero max_steps": Case(
        "cli", lambda i, out: _fit(i.shards, out, "--trainer.max_steps", "0"), ("trainer.max_steps is 0",)
    ),
    "zero max_steps on the digits": Case(
        "cli",
        lambda i, out: [
            "fit",
            "--config",
            str(Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"),
            "--trainer.max_steps",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(out),
        ],  # fmt: skip
        ("trainer.max_steps is 0",),
    ),
    "negative max_steps": Case(
        "cli",
        lambda i, out: _fit(i.shards, out, "--trainer.max_steps", "-2"),
        ("`max_steps` must be a non-negative integer or -1", "You passed in -2"),
    ),
    "zero sampler steps": Case(
        "api",
        lambda i, out: sample_ode(
            ModelField(lambda x, t: x, "linear"), torch.zeros(1, 2), method="euler", steps=0
        ),
        ("steps must be an integer >= 1; got 0",),
        ValueError,
    ),
    "zero sampler steps in a callback": Case(
        "cli",
        lambda i, out: _fit(
            i.shards,
            out,
            "--trainer.callbacks",
            "[{class_path: sit_lightning.callbacks.SampleGridCallback, init_args: {settings: {steps: 0}}}]",
        ),
        ("steps must be >= 1; got 0",),
    ),  # fmt: skip
    # ---- output folders
    "default_root_dir under a file": Case(
        "cli",
        lambda i, out: _fit(i.shards, out, "--trainer.default_root_dir", str(i.blocker / "run")),
        ("trainer.default_root_dir", "blocker/run' cannot be created", "is a file, not a folder"),
    ),
    "checkpoint dirpath under a file": Case(
        "cli",
        lambda i, out: _fit(
            i.shards,
            out,
            "--trainer.callbacks",
            "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
            f"init_args: {{dirpath: {i.blocker}/ckpt}}}}]",
        ),
        ("ModelCheckpoint dirpath", "blocker/ckpt' cannot be created"),
    ),  # fmt: skip
    "full output folder": Case(
        "cli",
        lambda i, out: _fit(i.shards, out),
        ("trainer.default_root_dir", "has 0.0 MiB free", "a checkpoint needs about"),
        setup=_full_disk,
    ),
    "logger folder under a file": Case(
        "cli",
        lambda i, out: _fit(
            i.shards, out, "--trainer.logger", "true", "--trainer.default_root_dir", str(i.blocker / "run")
        ),
        ("blocker",),
    ),
    # ---- data against the network, schedule against the run (existing)
    "latent shape does not fit the model": Case(
        "cli",
        lambda i, out: _fit(i.shards, out, "--model.arch.input_size", "16"),
        ("the data's latent shape (4, 8, 8) does not fit the model", "(4, 16, 16)"),
    ),
    "num_classes too small": Case(
        "cli",
        lambda i, out: _fit(i.shards, out, "--model.arch.num_classes", "1"),
        ("the data has 2 classes but the model's label table has 1", "num_classes: 2"),
    ),
    "schedule shorter than max_steps": Case(
        "cli",
        lambda i, out: _fit(
            i.shards,
            out,
            "--trainer.max_steps",
            "3",
            "--model.lr_scheduler",
            "{class_path: torch.optim.lr_scheduler.OneCycleLR, init_args: {max_lr: 0.001, total_steps: 2}}",
        ),
        ("OneCycleLR lasts total_steps=2 optimizer steps but trainer.max_steps is 3",),
    ),  # fmt: skip
    # ---- config files (existing)
    "missing config base": Case(
        "cli",
        lambda i, out: ["fit", "--config", str(i.root / "missing_base.yaml")],
        ("missing_base.yaml: base file 'base/nowhere.yaml' does not exist",),
    ),
    "config base cycle": Case(
        "cli",
        lambda i, out: ["fit", "--config", str(i.root / "a.yaml")],
        ("config bases form a cycle", "a.yaml -> ", "b.yaml -> "),
    ),
    "config base not a path": Case(
        "cli",
        lambda i, out: ["fit", "--config", str(i.root / "dict_base.yaml")],
        ("'base' must be a path or a list of paths, got {'trainer': 1}",),
    ),
    "--base on the command line": Case(
        "cli", lambda i, out: ["fit", "--base", "b.yaml"], ("'base' is a key of config files, not an option",)
    ),
    "base in an inline config": Case(
        "cli",
        lambda i, out: ["fit", "--config", "{base: b.yaml}"],
        ("'base' is read from config files only, not from --config '{base: b.yaml}'",),
    ),
    # ---- Python API (existing)
    "released file for the wrong preset": Case(
        "api",
        lambda i, out: load_released_sit(i.weights, "SiT-S/2", input_size=8),
        ("SiT-S/2", "depth=12, hidden_size=384", "depth=1, hidden_size=32"),
        ValueError,
    ),
    "checkpoint of another network": Case(
        "api", lambda i, out: _checkpoint_of_another_network(), ("depth=2", "depth=1")
    ),
    "data module without the training contract": Case(
        "api",
        lambda i, out: require(object(), TrainingData, for_what="SiTModule"),
        ("object", "latent_shape"),
        TypeError,
    ),
    "val_dir and val_fraction together": Case(
        "api",
        lambda i, out: LatentDataModule(str(i.shards), val_dir=str(i.shards), val_fraction=0.5),
        ("either val_dir or val_fraction",),
    ),
}


def _main(args: list[str]) -> tuple[int, str]:
    """``main(args)`` -> (exit status, stderr); warnings are recorded, not printed (they are not errors)."""
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            try:
                main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_the_value(
    name: str, inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    if case.setup is not None:
        case.setup(monkeypatch)
    if case.kind == "cli":
        code, stderr = _main(case.run(inputs, tmp_path / "run"))
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, f"{name}: exit status {code}\n{stderr[-3000:]}"
        assert len(lines) == 1, f"{name}: {len(lines)} lines on stderr\n{stderr[-3000:]}"
        (line,) = lines
        assert line.startswith("sit-lightning: error: "), line
        assert not list((tmp_path / "run").rglob("*.ckpt")), "failed before any step: nothing saved"
        gc.collect()  # a failed run's data workers go now, while the case's settings hold
    else:
        with pytest.raises(case.error) as info:
            case.run(inputs, tmp_path)
        line = str(info.value)
        assert len(line.splitlines()) == 1, f"{name}: {line}"
    for part in case.expected:
        assert part in line, f"{name}: {part!r} not in {line!r}"


def test_a_worker_traceback_is_unwrapped_to_its_message() -> None:
    # what torch's DataLoader raises in the main process for an exception in a worker
    wrapped = errors.DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise\nsit_lightning.errors.DataError: the message\n'
    )
    assert errors.one_line_message(wrapped) == "the message"
    assert errors.one_line_message(ConfigurationError("two\nlines")) == "two lines"


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["fit", "--config", "configs/digits.yaml", "--trainer.max_ste", "1"], "--trainer.max_ste"),
        (["sample", "model.ckpt", "out.npz", "--num_sam", "4"], "--num_sam"),
        (["fid", "samples.npz", "reference.npz", "--batch_si", "4"], "--batch_si"),
        (["convert", "model.ckpt", "out.pt", "--to", "safetensors", "--whi", "ema"], "--whi"),
        (["precompute-latents", "images", "latents", "--image_si", "256"], "--image_si"),
        (["posthoc-ema", "snapshots", "out.pt", "--sigma_rel", "0.05", "--ste", "100"], "--ste"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)
def test_an_abbreviated_flag_is_refused_not_guessed(args: list[str], flag: str) -> None:
    """argparse would take --trainer.max_ste for --trainer.max_steps: a typo must not pass as a request."""
    code, stderr = _main(args)
    assert code == 2, stderr[-2000:]
    assert f"unrecognized arguments: {flag}" in stderr, stderr[-2000:]
