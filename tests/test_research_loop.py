"""The README's tiny run of the whole loop, through ``main()``: precompute-latents -> fit -> sample -> fid.

The test reads the commands out of README.md ("Tiny run of the whole loop") and runs exactly those
argument lists, with the README's ``$VARIABLES`` filled in: a two-class ImageFolder of 16x16 PNGs, the
tests' tiny diffusers VAE, and a TorchScript feature extractor (no Inception weights, no network).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from cli_runner import run_cli
from sit_lightning.cli import main
from sit_lightning.data.shards import LatentShards
from sit_lightning.evaluation.fid import feature_statistics, frechet_distance, from_uint8
from tiny_vae import save_tiny_vae

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET_MARKER = "Tiny run of the whole loop"
CLASSES = ("cat", "dog")
PER_CLASS = 4
SIDE = 16  # --image_size in the README
NUM_SAMPLES = 8  # --num_samples in the README
NFE = 8  # heun, 4 steps
FEATURES = 4  # below the sample count, so both covariances have full rank


def readme_commands() -> list[list[str]]:
    """The ``sit-lightning`` command lines of the README's tiny-loop bash block, as argument lists
    (``$VARIABLES`` left in place), continuation lines joined."""
    text = README.read_text()
    start = text.index(SNIPPET_MARKER)
    block_start = text.index("```bash\n", start) + len("```bash\n")
    block = text[block_start : text.index("```", block_start)]
    # bash leaves $VARIABLES in single quotes alone; the test fills in every one, so there must be none
    assert not [quoted for quoted in re.findall(r"'[^']*'", block) if "$" in quoted]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "sit-lightning", line
            commands.append(words[1:])
    return commands


class TinyFeatures(nn.Module):
    """A random conv net, ``(N, 3, H, W)`` in [-1, 1] -> ``(N, 4)``; stands in for Inception."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, FEATURES),
        )
        self.num_features = FEATURES

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _png_stack(folder: Path) -> Tensor:
    files = sorted(folder.glob("*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(
        0, 3, 1, 2
    )


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network on a shared CPU: threads only contend
    yield
    torch.set_num_threads(threads)


def test_the_readme_commands_run_the_whole_loop(tmp_path: Path, one_thread: None) -> None:
    images, real = tmp_path / "images", tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (images / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            image = Image.fromarray(rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8))
            image.save(images / name / f"{i}.png")
            image.save(real / f"{name}-{i}.png")
    vae = save_tiny_vae(tmp_path / "vae", sample_size=SIDE)
    features = tmp_path / "features.pt"
    torch.jit.script(TinyFeatures().eval()).save(str(features))
    run = tmp_path / "run"
    values = {"IMAGES": images, "REAL": real, "VAE": vae, "FEATURES": features, "RUN": run}

    commands = readme_commands()
    assert [c[0] for c in commands] == ["precompute-latents", "fit", "sample", "fid"]
    outputs = []
    for words in commands:
        args = [string.Template(w).substitute({k: str(v) for k, v in values.items()}) for w in words]
        code, text = run_cli(args)
        assert code == 0, f"sit-lightning {' '.join(args)}\n{text[-3000:]}"
        outputs.append(text)

    latents = LatentShards(run / "latents")
    assert len(latents) == len(CLASSES) * PER_CLASS and latents.latent_shape == (4, 8, 8)
    assert (run / "fit" / "checkpoints" / "last.ckpt").is_file()

    # the sample file: ADM's layout, and the JSON of the run beside it
    samples = run / "samples.npz"
    with np.load(samples, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        pixels, labels = npz["arr_0"], npz["arr_1"]
    assert pixels.dtype == np.uint8 and pixels.shape == (NUM_SAMPLES, SIDE, SIDE, 3)
    assert labels.dtype == np.int64 and labels.shape == (NUM_SAMPLES,)
    assert set(labels.tolist()) <= set(range(len(CLASSES)))
    assert len(np.unique(pixels.reshape(NUM_SAMPLES, -1), axis=0)) == NUM_SAMPLES  # not one image 8 times
    meta = json.loads(samples.with_suffix(".json").read_text())
    assert meta["num_samples"] == NUM_SAMPLES and meta["nfe_per_image"] == NFE
    assert meta["settings"]["method"] == "heun" and meta["settings"]["steps"] == 4
    assert meta["weights"] == "ema" and meta["decoder"]["normalization"] is not None
    assert meta["npz_sha256"] == hashlib.sha256(samples.read_bytes()).hexdigest()
    assert not (run / "samples.parts").exists()

    # the FID report: finite, and the Frechet distance of the extractor's features of the two sets
    report = json.loads(outputs[-1].strip().splitlines()[-1])
    assert report["num_samples"] == NUM_SAMPLES and report["extractor"] == str(features)
    assert report["reference_kind"] == f"{len(CLASSES) * PER_CLASS} images"
    assert math.isfinite(report["fid"]) and report["fid"] > 0
    extractor = TinyFeatures().eval()
    with torch.no_grad():
        made = extractor(from_uint8(torch.from_numpy(pixels).permute(0, 3, 1, 2))).double()
        reference = extractor(from_uint8(_png_stack(real))).double()
    expected = frechet_distance(feature_statistics(made), feature_statistics(reference))
    assert report["fid"] == pytest.approx(expected, rel=1e-3)


def test_sample_and_fid_help_through_the_console_script() -> None:
    script = Path(sys.executable).with_name("sit-lightning")
    assert script.is_file(), f"the console script is not installed beside {sys.executable}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command, words in [
        ("sample", ("checkpoint", "--num_samples", "--decoder")),
        ("fid", ("reference", "--extractor", "TorchScript")),
    ]:
        done = subprocess.run(
            [str(script), command, "--help"], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"sit-lightning {command}" in done.stdout and all(w in done.stdout for w in words)


class NoWidth(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def test_a_bad_extractor_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    no_width = tmp_path / "no_width.pt"
    torch.jit.script(NoWidth()).save(str(no_width))
    for extractor, message in [
        ("incpetion", "--extractor must be one of ['inception', 'digits'] or a TorchScript file"),
        (str(no_width), "needs an int attribute `num_features`"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["fid", str(samples), str(samples), "--extractor", extractor])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sit-lightning fid: error:") and message in err and "\n" not in err
