"""precompute-latents end to end with a tiny AutoencoderKL: crop, moments, flips, interruption and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sit_lightning.data import LatentShards, precompute_latents, precompute_latents_main
from sit_lightning.data import shards as shards_module
from sit_lightning.data.images import center_crop_arr, load_image, scan_image_folder, to_model_input
from tiny_vae import save_tiny_vae

IMAGE_SIZE = 16
CLASSES = ["cat", "ant", "bee"]  # unsorted on purpose: labels follow the sorted names
PER_CLASS = 6
SHARD_SIZE = 5  # 18 images -> shards of 5, 5, 5, 3


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir()
        for i in range(PER_CLASS):
            h, w = rng.integers(12, 70, size=2)
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            ext = ["png", "bmp", "PNG"][i % 3]
            Image.fromarray(pixels).save(
                root / name / f"img{i}.{ext}", format="PNG" if ext != "bmp" else "BMP"
            )
        (root / name / "notes.txt").write_text("not an image")
    # a grey-scale image too: ImageFolder's loader converts to RGB
    Image.fromarray(rng.integers(0, 256, size=(40, 30), dtype=np.uint8)).save(root / "ant" / "grey.png")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), sample_size=32)


def _run(image_root: Path, out: Path, vae_dir: Path, **kwargs: object):
    return precompute_latents(
        str(image_root),
        str(out),
        vae=str(vae_dir),
        image_size=IMAGE_SIZE,
        batch_size=4,
        shard_size=SHARD_SIZE,
        num_workers=0,
        progress=False,
        **{"devices": "cpu", **kwargs},
    )


@pytest.fixture(scope="module")
def complete(image_root: Path, vae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    result = _run(image_root, out, vae_dir)
    assert result.count == 3 * PER_CLASS + 1 and result.resumed_images == 0
    return out


def test_scan_sorts_classes_and_skips_other_files(image_root: Path) -> None:
    scan = scan_image_folder(image_root)
    assert scan.class_names == ["ant", "bee", "cat"]
    assert len(scan) == 3 * PER_CLASS + 1
    assert scan.labels == [0] * (PER_CLASS + 1) + [1] * PER_CLASS + [2] * PER_CLASS
    assert all(
        p.parent.name == scan.class_names[label] for p, label in zip(scan.paths, scan.labels, strict=True)
    )


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image"):
        scan_image_folder(tmp_path)


def test_adm_centre_crop() -> None:
    rng = np.random.default_rng(1)
    # exactly twice the size: one BOX halving (2x2 block means), then an identity resize
    big = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    blocks = big.reshape(16, 2, 16, 2, 3).astype(np.float64).mean(axis=(1, 3))
    out = np.asarray(center_crop_arr(Image.fromarray(big), 16)).astype(np.float64)
    assert np.abs(out - blocks).max() <= 1  # Pillow rounds the box mean
    # already the right size: unchanged
    same = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(center_crop_arr(Image.fromarray(same), 16)), same)
    # a wide image keeps its centre: a bright column in the middle stays in the middle
    wide = np.zeros((16, 40, 3), np.uint8)
    wide[:, 19:21] = 255
    cropped = np.asarray(center_crop_arr(Image.fromarray(wide), 16))
    assert cropped.shape == (16, 16, 3)
    np.testing.assert_array_equal(np.nonzero(cropped[0, :, 0])[0], [7, 8])  # offset (40 - 16) // 2 = 12


def test_moments_are_the_vae_posterior_of_cropped_and_flipped_images(
    complete: Path, image_root: Path, vae_dir: Path
) -> None:
    from diffusers import AutoencoderKL

    shards = LatentShards(complete)
    scan = scan_image_folder(image_root)
    assert shards.latent_shape == (4, 8, 8) and shards.class_names == ["ant", "bee", "cat"]
    np.testing.assert_array_equal(shards.labels, scan.labels)
    index = json.loads((complete / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [5, 5, 5, 4]
    assert index["vae"] == str(vae_dir) and index["image_size"] == IMAGE_SIZE

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    x = to_model_input(np.stack([load_image(p, IMAGE_SIZE) for p in scan.paths]))
    assert x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        plain = vae.encode(x).latent_dist
        flipped = vae.encode(torch.flip(x, dims=[-1])).latent_dist
    m = torch.from_numpy(shards.moments(np.arange(len(scan))))
    torch.testing.assert_close(m[:, 0, 0], plain.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m[:, 0, 1], plain.std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m[:, 1, 0], flipped.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m[:, 1, 1], flipped.std, atol=1e-5, rtol=1e-5)
    assert (m[:, 0, 0] - m[:, 1, 0]).abs().max() > 1e-2  # the flipped image is really another input


def test_interrupted_run_resumes_and_matches(
    complete: Path, image_root: Path, vae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = shards_module._save_npy_atomic
    saved: list[str] = []

    def crash_on_third_moments_shard(path: Path, array: np.ndarray) -> None:
        if path.name.startswith("moments-") and path.name.endswith("2.npy"):
            raise KeyboardInterrupt("simulated interruption")
        saved.append(path.name)
        real_save(path, array)

    monkeypatch.setattr(shards_module, "_save_npy_atomic", crash_on_third_moments_shard)
    with pytest.raises(KeyboardInterrupt):
        _run(image_root, tmp_path, vae_dir)
    assert not (tmp_path / "index.json").exists()
    monkeypatch.setattr(shards_module, "_save_npy_atomic", real_save)

    from diffusers import AutoencoderKL

    encoded = []
    real_encode = AutoencoderKL.encode
    monkeypatch.setattr(
        AutoencoderKL, "encode", lambda self, x, *a, **k: encoded.append(len(x)) or real_encode(self, x)
    )
    result = _run(image_root, tmp_path, vae_dir)
    assert result.resumed_images == 2 * SHARD_SIZE
    assert sum(encoded) == 2 * (3 * PER_CLASS + 1 - 2 * SHARD_SIZE)  # only the rest, plain + flipped
    a, b = LatentShards(complete), LatentShards(tmp_path)
    np.testing.assert_array_equal(a.moments(np.arange(len(a))), b.moments(np.arange(len(b))))
    np.testing.assert_array_equal(a.labels, b.labels)


def test_rerun_validates_and_command_line_entry(complete: Path, image_root: Path, vae_dir: Path) -> None:
    before = (complete / "part-000" / "moments-000000.npy").stat().st_mtime_ns
    argv = [str(image_root), str(complete), f"--vae={vae_dir}", f"--image_size={IMAGE_SIZE}"]
    argv += [f"--shard_size={SHARD_SIZE}", "--devices=cpu", "--num_workers=0", "--progress=false"]
    argv += ["--batch_size=4", "--normalization=channel"]
    assert precompute_latents_main(argv) == 0
    assert (complete / "part-000" / "moments-000000.npy").stat().st_mtime_ns == before  # nothing re-encoded
    shards = LatentShards(complete)
    assert shards.normalization == "channel"
    z = torch.from_numpy(shards.moments(np.arange(len(shards)))[:, :, 0])  # posterior means, both flips
    normalised = shards.normalize(z.flatten(0, 1))
    # standardised per channel: the means alone are centred exactly (the std includes posterior noise)
    torch.testing.assert_close(normalised.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    with pytest.raises(SystemExit):
        precompute_latents_main([*argv[:-1], "--normalization=gauss"])
    with pytest.raises(ValueError, match="other settings or images"):
        _run(image_root, complete, vae_dir, dtype="float16")


def test_two_processes_write_parts_merged_in_image_order(
    complete: Path, image_root: Path, vae_dir: Path, tmp_path: Path
) -> None:
    # the multi-GPU path (one spawned process per device, a part folder each, merged) on two CPU processes
    result = _run(image_root, tmp_path, vae_dir, devices=["cpu", "cpu"])
    assert result.num_processes == 2 and sorted(p.name for p in tmp_path.glob("part-*")) == [
        "part-000",
        "part-001",
    ]
    a, b = LatentShards(complete), LatentShards(tmp_path)
    np.testing.assert_array_equal(b.labels, a.labels)
    np.testing.assert_allclose(b.moments(np.arange(len(b))), a.moments(np.arange(len(a))), atol=1e-5)
