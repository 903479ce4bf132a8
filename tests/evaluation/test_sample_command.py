"""``sit-lightning sample``: the ADM ``.npz`` it writes, on 1 and 2 processes, after a crash, from released files.

Every equality below is between samples of a network whose output is not zero (all weights perturbed,
the zero-initialised adaLN and final layers included; each test asserts its samples differ from the
noise), so equal files cannot come from a network that leaves the noise as it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import lightning
from sit_lightning.cli import main
from sit_lightning.data.shards import LatentShards, LatentShardWriter
from sit_lightning.evaluation import npz as npz_module
from sit_lightning.evaluation.images import SD_VAE_SCALE, LatentNormalization
from sit_lightning.evaluation.npz import ChunkStore, read_adm_npz, released_uint8
from sit_lightning.evaluation.sample_plan import sample_labels
from sit_lightning.models import SiT, SiTConfig
from sit_lightning.module import SiTModule
from sit_lightning.sampling import SamplerSettings

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"  # the checkout under test, not whatever sit_lightning is installed
#: Digits-like pixel data: 1x8x8, 10 classes, no VAE.
PIXELS = SiTConfig(
    input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
    learn_sigma=False, class_dropout_prob=0.1,
)  # fmt: skip
SETTINGS = SamplerSettings(sampler="ode", method="heun", steps=4)
SETTINGS_ARG = "{sampler: ode, method: heun, steps: 4}"
NUM = 30  # 3 chunks of 10; balanced labels: 3 per class
CHUNK = 10
#: Samples must differ from their starting noise by far more than a pixel level.
MOVED = 0.1


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network on a shared CPU: threads only contend
    yield
    torch.set_num_threads(threads)


def perturbed(network: torch.nn.Module, seed: int, size: float = 0.2) -> dict[str, Tensor]:
    """The network's state with every float tensor moved (zero-initialised layers become non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: v + size * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in network.state_dict().items()
    }


def save_lightning_checkpoint(path: Path, config: SiTConfig) -> tuple[dict, dict]:
    """A SiTModule checkpoint whose EMA (EMACallback state) differs from its trained weights."""
    network = SiT(config)
    model = perturbed(network, seed=1)
    ema = perturbed(network, seed=2)
    torch.save(
        {
            "pytorch-lightning_version": lightning.__version__,
            "epoch": 0,
            "global_step": 5,
            "state_dict": {f"network.{k}": v for k, v in model.items()},
            "hyper_parameters": {"arch": dataclasses.asdict(config), "seed": 0},
            "callbacks": {
                "EMACallback": {"num_updates": 5, "ema": {f"network.{k}": v for k, v in ema.items()}}
            },
        },
        path,
    )
    return model, ema


def run_sample(*args: str | Path) -> None:
    assert main(["sample", *map(str, args), "--progress", "false"]) == 0


def module_with(config: SiTConfig, weights: dict) -> SiTModule:
    module = SiTModule(arch=config)
    module.network.load_state_dict(weights)
    return module.eval()


def expected_floats(module: SiTModule, batch_size: int, labels: str = "balanced") -> tuple[Tensor, Tensor]:
    """The run's samples recomputed in the run's batches (chunks of CHUNK cut into ``batch_size``)."""
    out, noise = [], []
    for start in range(0, NUM, CHUNK):
        indices = torch.arange(start, min(start + CHUNK, NUM))
        chunk_labels = sample_labels(indices, module.network.num_classes, labels, 0)
        for idx, lab in zip(indices.split(batch_size), chunk_labels.split(batch_size), strict=True):
            out.append(module.sample(lab, SETTINGS, seed=0, indices=idx, use_ema=False).samples)
            noise.append(module.sample_noise(idx, seed=0))
    return torch.cat(out), torch.cat(noise)


def assert_same_samples(a: Path, b: Path) -> None:
    """Byte-identical files. Where summation order differs (another BLAS blocking for another batch
    size), the tolerance is: pixels at most 1/255 apart in at most 0.1% of them, labels equal."""
    if a.read_bytes() == b.read_bytes():
        return
    first, second = read_adm_npz(a), read_adm_npz(b)
    np.testing.assert_array_equal(first.labels, second.labels)
    gap = np.abs(first.images.astype(np.int16) - second.images.astype(np.int16))
    assert gap.max() <= 1 and (gap > 0).mean() <= 1e-3, f"max gap {gap.max()}, share {(gap > 0).mean():.4%}"


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory) -> dict:
    """One process, batch 7: the reference file (and the checkpoint it came from)."""
    folder = tmp_path_factory.mktemp("sample")
    checkpoint = folder / "tiny.ckpt"
    model, ema = save_lightning_checkpoint(checkpoint, PIXELS)
    out = folder / "one.npz"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sample(checkpoint, out, "--num_samples", NUM, "--settings", SETTINGS_ARG, "--labels", "balanced",
                   "--batch_size", 7, "--chunk_size", CHUNK)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return {"folder": folder, "checkpoint": checkpoint, "out": out, "model": model, "ema": ema}


def test_layout_pixels_labels_and_ema_weights(pixel_run):
    samples = read_adm_npz(pixel_run["out"])
    with np.load(pixel_run["out"]) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
    assert samples.images.dtype == np.uint8 and samples.images.shape == (NUM, 8, 8, 1)  # 1 channel: NHW1
    assert samples.labels.dtype == np.int64
    np.testing.assert_array_equal(samples.labels, np.arange(NUM) % 10)
    assert np.bincount(samples.labels).tolist() == [NUM // 10] * 10  # balanced: exact per-class counts
    assert samples.images.min() < 64 and samples.images.max() > 192  # the range is used, not a flat image
    # pixels = the released expression, written out here, on the same floats (EMA weights, same batches)
    floats, noise = expected_floats(module_with(PIXELS, pixel_run["ema"]), batch_size=7)
    assert (floats - noise).abs().mean() > MOVED, "PRECONDITION: the network must move the noise"
    released = torch.clamp(127.5 * floats.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8)
    np.testing.assert_array_equal(samples.images, released.numpy())
    trained, _ = expected_floats(module_with(PIXELS, pixel_run["model"]), batch_size=7)
    assert not np.array_equal(released_uint8(trained), samples.images), "the EMA weights are the default"
    # the JSON beside it
    meta = json.loads(pixel_run["out"].with_suffix(".json").read_text())
    assert meta["nfe_per_image"] == 8 and meta["batch_size"] == 7 and meta["labels"] == "balanced"
    assert meta["seed"] == 0 and meta["weights"] == "ema" and meta["settings"]["steps"] == 4
    assert meta["checkpoint_sha256"] == npz_module.sha256_file(pixel_run["checkpoint"])
    assert meta["npz_sha256"] == npz_module.sha256_file(pixel_run["out"])
    assert {"torch", "lightning", "sit-lightning", "numpy"} <= set(meta["versions"])
    assert meta["class_counts"] == [3] * 10 and meta["image_shape"] == [8, 8, 1]
    assert not pixel_run["out"].with_suffix(".parts").exists()  # the chunks are gone once assembled


def test_two_processes_and_another_batch_size_write_the_same_file(pixel_run):
    out = pixel_run["folder"] / "two.npz"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "sample_dist_run.py"), str(pixel_run["checkpoint"]), str(out), "--num_samples", str(NUM),
        "--settings", SETTINGS_ARG, "--labels", "balanced", "--batch_size", "3", "--chunk_size", str(CHUNK),
        "--progress", "false",
    ]  # fmt: skip
    path = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert json.loads(out.with_suffix(".json").read_text())["world_size"] == 2
    assert_same_samples(pixel_run["out"], out)


def test_a_run_killed_after_a_chunk_resumes_to_the_same_bytes(pixel_run, monkeypatch):
    out = pixel_run["folder"] / "crash.npz"
    args = [pixel_run["checkpoint"], out, "--num_samples", NUM, "--settings", SETTINGS_ARG,
            "--labels", "balanced", "--chunk_size", CHUNK]  # fmt: skip
    real_write_zip = npz_module._write_zip
    calls = []

    def crash_in_second_chunk(file, members):  # half a file on disk, then the process "dies"
        calls.append(1)
        if len(calls) == 2:
            file.write(b"PK\x03\x04 half a chunk")
            raise RuntimeError("injected fault")
        real_write_zip(file, members)

    monkeypatch.setattr(npz_module, "_write_zip", crash_in_second_chunk)
    with pytest.raises(RuntimeError, match="injected fault"):
        run_sample(*args, "--batch_size", 4)
    monkeypatch.undo()
    parts = out.with_suffix(".parts")
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert sorted(p.name for p in parts.iterdir()) == ["chunk-000000.npz", "plan.json"]  # no .tmp either
    (parts / "chunk-000001.npz.tmp").write_bytes(b"left by a SIGKILL")  # what a hard kill would leave
    with pytest.raises(SystemExit) as refused:  # other settings: the finished chunk is not mixed in
        run_sample(*args, "--seed", 1)
    assert refused.value.code == 2
    run_sample(*args, "--batch_size", 10)
    assert_same_samples(pixel_run["out"], out)
    assert json.loads(out.with_suffix(".json").read_text())["resumed_chunks"] == 1
    assert not parts.exists()
    run_sample(*args, "--batch_size", 10)  # complete: nothing to do, the file stays
    assert_same_samples(pixel_run["out"], out)


def test_a_released_state_dict_samples(tmp_path):
    """A random released-layout file (learn_sigma=True, torch.save) through ``sample``, no preset: --num_heads."""
    config = dataclasses.replace(PIXELS, learn_sigma=True)
    weights = perturbed(SiT(config), seed=3)
    torch.save(weights, tmp_path / "released.pt")
    out = tmp_path / "released.npz"
    run_sample(tmp_path / "released.pt", out, "--num_samples", NUM, "--settings", SETTINGS_ARG,
               "--labels", "balanced", "--batch_size", 10, "--chunk_size", CHUNK, "--num_heads", 2)  # fmt: skip
    floats, noise = expected_floats(module_with(config, weights), batch_size=10)
    assert (floats - noise).abs().mean() > MOVED, "PRECONDITION: the network must move the noise"
    np.testing.assert_array_equal(read_adm_npz(out).images, released_uint8(floats))
    assert json.loads(out.with_suffix(".json").read_text())["weights"] == "the file's only set"


def test_an_adaptive_method_is_refused_unless_batch_dependence_is_accepted(pixel_run, capsys):
    with pytest.raises(SystemExit) as refused:
        run_sample(pixel_run["checkpoint"], pixel_run["folder"] / "x.npz", "--num_samples", 4,
                   "--settings", "{method: dopri5}")  # fmt: skip
    assert refused.value.code == 2
    assert "--allow_batch_dependence" in capsys.readouterr().err


def save_channel_shards(folder: Path, channels: int) -> LatentNormalization:
    mean, std = [0.3, -0.2, 0.5, 0.1][:channels], [2.0, 0.5, 1.5, 3.0][:channels]
    LatentShardWriter(folder, (channels, 4, 4), vae_id="tiny", class_names=["a", "b"], normalization="channel",
                      channel_mean=mean, channel_std=std).close()  # fmt: skip
    return LatentNormalization("channel", channel_mean=tuple(mean), channel_std=tuple(std))


def test_normalisation_is_undone_as_the_shards_applied_it(tmp_path):
    x = torch.randn(3, 4, 4, 4)
    save_channel_shards(tmp_path / "channel", 4)
    LatentShardWriter(tmp_path / "scale", (4, 4, 4), vae_id="tiny", class_names=["a"]).close()
    for name in ("channel", "scale"):
        shards, read = LatentShards(tmp_path / name), LatentNormalization.read(tmp_path / name)
        assert torch.equal(read.denormalize(x), shards.denormalize(x))
        assert torch.equal(read.normalize(x), shards.normalize(x))
    assert LatentNormalization.read(tmp_path / "scale") == LatentNormalization("scale", SD_VAE_SCALE)


def test_latents_decode_through_the_vae_with_per_channel_statistics(tmp_path):
    from diffusers import AutoencoderKL

    from tiny_vae import save_tiny_vae

    vae_dir = save_tiny_vae(tmp_path / "vae", sample_size=8)
    normalization = save_channel_shards(tmp_path / "shards", 4)
    config = dataclasses.replace(PIXELS, input_size=4, in_channels=4)
    checkpoint = tmp_path / "latent.ckpt"
    _, ema = save_lightning_checkpoint(checkpoint, config)
    out = tmp_path / "latent.npz"
    run_sample(checkpoint, out, "--num_samples", NUM, "--settings", SETTINGS_ARG, "--labels", "balanced",
               "--batch_size", 10, "--chunk_size", CHUNK, "--decoder", vae_dir, "--latents", tmp_path / "shards",
               "--decode_batch_size", 10)  # fmt: skip
    floats, noise = expected_floats(module_with(config, ema), batch_size=10)
    assert (floats - noise).abs().mean() > MOVED, "PRECONDITION: the network must move the noise"
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        decoded = torch.cat([vae.decode(z).sample for z in normalization.denormalize(floats).split(10)])
        scale_only = torch.cat([vae.decode(z).sample for z in (floats / SD_VAE_SCALE).split(10)])
    images = read_adm_npz(out).images
    assert images.shape == (NUM, 8, 8, 3)
    np.testing.assert_array_equal(images, released_uint8(decoded))
    assert not np.array_equal(images, released_uint8(scale_only)), (
        "dividing by the scale alone decodes wrongly"
    )
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["decoder"]["normalization"]["channel_std"] == [2.0, 0.5, 1.5, 3.0]


def test_chunk_store_refuses_a_chunk_of_the_wrong_size(tmp_path):
    store = ChunkStore(tmp_path / "s.npz", num_samples=5, chunk_size=2)
    assert store.num_chunks == 3 and store.chunk_indices(2).tolist() == [4]
    with pytest.raises(ValueError, match="holds 2 samples"):
        store.write_chunk(0, np.zeros((3, 2, 2, 3), np.uint8), np.zeros(3, np.int64))


def test_bf16_samples_are_recorded_and_near_the_float32_ones(pixel_run):
    out = pixel_run["folder"] / "bf16.npz"
    run_sample(pixel_run["checkpoint"], out, "--num_samples", CHUNK, "--settings", SETTINGS_ARG,
               "--labels", "balanced", "--chunk_size", CHUNK, "--precision", "bf16-mixed")  # fmt: skip
    assert json.loads(out.with_suffix(".json").read_text())["precision"] == "bf16-mixed"
    bf16 = read_adm_npz(out).images.astype(np.float64)
    fp32 = read_adm_npz(pixel_run["out"]).images[:CHUNK].astype(np.float64)
    assert 0 < np.abs(bf16 - fp32).mean() < 4  # autocast changed the arithmetic, not the images


def test_tf32_matmuls_are_on_while_sampling_recorded_and_restored(pixel_run, monkeypatch):
    """``--tf32`` (default on, as the released sample_ddp.py) reaches torch.backends while the samples are
    drawn, goes into the JSON, and the caller's setting comes back afterwards."""
    from sit_lightning import sample_cli

    matmul = torch.backends.cuda.matmul
    seen: list[bool] = []
    original = sample_cli._sample_batch

    def spy(*args, **kwargs):
        seen.append(matmul.allow_tf32)
        return original(*args, **kwargs)

    monkeypatch.setattr(sample_cli, "_sample_batch", spy)
    field = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, field)
    try:
        out = pixel_run["folder"] / "tf32_default.npz"
        sample_cli.sample_images(str(pixel_run["checkpoint"]), str(out), num_samples=CHUNK, settings=SETTINGS,
                                 labels="balanced", chunk_size=CHUNK, accelerator="cpu", devices=1,
                                 progress=False)  # fmt: skip
        assert seen == [True] and getattr(matmul, field) == before
        assert json.loads(out.with_suffix(".json").read_text())["tf32"] is True
        matmul.allow_tf32 = True  # the caller's setting; the command turns it off and back on
        on = getattr(matmul, field)
        out = pixel_run["folder"] / "tf32_off.npz"
        run_sample(pixel_run["checkpoint"], out, "--num_samples", CHUNK, "--settings", SETTINGS_ARG,
                   "--labels", "balanced", "--chunk_size", CHUNK, "--tf32", "false")  # fmt: skip
        assert seen == [True, False] and getattr(matmul, field) == on
        assert json.loads(out.with_suffix(".json").read_text())["tf32"] is False
        # on a CPU the flag changes nothing: the same pixels as the reference run's first chunk
        np.testing.assert_array_equal(read_adm_npz(out).images, read_adm_npz(pixel_run["out"]).images[:CHUNK])
    finally:
        setattr(matmul, field, before)
