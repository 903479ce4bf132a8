"""``sit-lightning fid``: a sample file scores what FIDCallback scored; references, IS, the hybrid note."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sit_lightning import fid_cli
from sit_lightning.callbacks.fid import FIDCallback
from sit_lightning.cli import main
from sit_lightning.data import DigitsDataModule
from sit_lightning.evaluation.fid import (
    FeatureStatistics,
    feature_statistics,
    frechet_distance,
    from_uint8,
    inception_score,
    through_uint8,
    to_adm_uint8,
)
from sit_lightning.sampling import SamplerSettings
from tiny_digits import fit_module, quiet_trainer

NUM_FID = 40


def run_fid(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["fid", *args, "--format", "json", "--device", "cpu"]) == 0
    return json.loads(out.getvalue())


def save_npz(path, images: torch.Tensor, labels: torch.Tensor | None = None):
    """An ADM-style sample file: arr_0 uint8 (N, H, W, C) by the released expression, arr_1 labels."""
    arrays = {"arr_0": to_adm_uint8(images).permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.numpy()
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def callback_run(tmp_path_factory):
    """A tiny digits fit whose FIDCallback scores 40 samples; the samples it scored, as floats."""
    root = tmp_path_factory.mktemp("fit")
    module = fit_module()
    fid = FIDCallback(
        num_samples=NUM_FID, seed=4, batch_size=16, cache_dir=str(root / "cache"),
        settings=SamplerSettings(sampler="ode", steps=2, method="euler"), report=False,
    )  # fmt: skip
    generated = []
    original = fid.generate

    def recorded(pl_module, indices, labels, **changes):
        images = original(pl_module, indices, labels, **changes)
        generated.append((images.detach().cpu().clone(), labels.detach().cpu().clone()))
        return images

    fid.generate = recorded
    trainer = quiet_trainer(root, max_steps=2, callbacks=[fid])
    trainer.fit(module, datamodule=DigitsDataModule(global_batch_size=16))
    (_, result), = fid.history  # fmt: skip
    images, labels = generated[-1]
    return result, images, labels, root


def test_fid_of_the_npz_equals_fidcallbacks_number(callback_run, tmp_path):
    result, images, labels, root = callback_run
    assert images.abs().max() > 1  # PRECONDITION: samples outside [-1, 1], so clamping matters
    samples = save_npz(tmp_path / "samples.npz", images, labels)
    cache = str(root / "cache")  # the judge and reference the callback cached
    report = run_fid(str(samples), "digits-test", "--extractor", "digits", "--cache_dir", cache)
    assert report["fid"] == result.fid
    assert report["conditional_accuracy"] == result.conditional_accuracy
    assert report["classifier"] == "digits judge" and report["extractor"] == "digits"
    assert "digits judge" in report["extractor_name"] and report["note"] is None
    # the callback's cached reference statistics are a reference too, with the same number
    (cached,) = (root / "cache").glob("fid_stats-DigitsDataModule-test-*.pt")
    assert (
        run_fid(str(samples), str(cached), "--extractor", "digits", "--cache_dir", cache)["fid"] == result.fid
    )
    # the float samples themselves score otherwise: the .npz levels are what both measure
    judge = fid_cli._digits_judge(cache)
    from sit_lightning.evaluation.digits_classifier import DigitsFeatures

    features = DigitsFeatures(judge)
    test = DigitsDataModule().test_images().x
    floats = frechet_distance(feature_statistics(features(images)), feature_statistics(features(test)))
    assert abs(floats - result.fid) > 1


def test_the_uint8_map_is_the_released_expression():
    x = torch.tensor([-2.0, -1.0, -0.5, -1 / 255, 0.0, 0.3, 1 / 255, 0.99, 1.0, 3.0]).reshape(1, 1, 2, 5)
    x = torch.cat([x, torch.randn(1, 1, 2, 5) * 2])
    # released sample.py: torch.clamp(127.5 * samples + 128.0, 0, 255).to(torch.uint8)
    released = np.clip(127.5 * x.numpy() + 128.0, 0, 255).astype(np.uint8)
    assert np.array_equal(to_adm_uint8(x).numpy(), released)
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_adm_uint8(from_uint8(levels)), levels)  # the 256 levels survive the round trip
    assert torch.equal(through_uint8(through_uint8(x)), through_uint8(x))


def test_sample_files_of_the_sample_command_hold_the_same_levels():
    npz = pytest.importorskip("sit_lightning.evaluation.npz", reason="the sample command's writer")
    x = torch.randn(4, 3, 5, 5) * 1.5
    assert np.array_equal(npz.released_uint8(x), to_adm_uint8(x).permute(0, 2, 3, 1).numpy())


def test_inception_score_closed_forms():
    confident = torch.eye(10).repeat(3, 1) * 60.0  # each of 10 classes predicted with certainty, evenly
    assert inception_score(confident).mean == pytest.approx(10.0, rel=1e-9)
    assert inception_score(torch.zeros(30, 10)).mean == pytest.approx(1.0)  # no information
    two = inception_score(torch.cat([confident[:10], torch.zeros(10, 10)]), split_size=10)
    assert two.splits == 2 and two.mean == pytest.approx(5.5) and two.std == pytest.approx(4.5)


class RowMeans(nn.Module):
    """A stand-in for Inception (torch-fidelity is not installed): 8 features, a fixed 'fc'."""

    num_features = 8

    def __init__(self, weights_path=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1, 1, 8 * 5).reshape(5, 8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 3))  # (N, 8) for (N, 1, 8, 8)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T


def test_inception_against_adm_statistics_is_called_hybrid_and_gives_is(tmp_path, monkeypatch):
    monkeypatch.setattr(fid_cli, "InceptionFeatures", RowMeans)
    test = DigitsDataModule().test_images()
    samples = save_npz(tmp_path / "s.npz", test.x[:100], test.y[:100])
    mu, sigma = np.linspace(-0.5, 0.5, 8), np.diag(np.linspace(0.1, 0.3, 8))
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=mu, sigma=sigma, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    report = run_fid(str(samples), str(tmp_path / "VIRTUAL_ref.npz"), "--extractor", "inception")
    assert report["note"] == fid_cli.HYBRID_NOTE and "TensorFlow" in report["reference_kind"]
    features = RowMeans()(from_uint8(to_adm_uint8(test.x[:100])))
    reference = FeatureStatistics.from_mean_cov(torch.from_numpy(mu), torch.from_numpy(sigma), 50_000)
    assert report["fid"] == pytest.approx(frechet_distance(feature_statistics(features), reference), rel=1e-6)
    expected_is = inception_score(RowMeans().logits(features))
    assert report["inception_score"]["mean"] == pytest.approx(expected_is.mean, rel=1e-6)
    assert report["conditional_accuracy"] is None  # Inception without --classifier: no judge
    # our own statistics file (it records num_samples) is no ADM reference: no hybrid note
    own = tmp_path / "own.npz"
    np.savez(own, mu=mu, sigma=sigma, num_samples=100)
    assert run_fid(str(samples), str(own), "--extractor", "inception")["note"] is None


def test_png_folders_and_torchscript_classifiers(tmp_path, callback_run):
    _, _, _, root = callback_run
    test = DigitsDataModule().test_images()
    folder = tmp_path / "png"
    folder.mkdir()
    for i, image in enumerate(to_adm_uint8(test.x[:60])):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:06d}.png")
    npz = save_npz(tmp_path / "s.npz", test.x[:60], test.y[:60])
    cache = str(root / "cache")
    from_png = run_fid(str(folder), "digits-test", "--extractor", "digits", "--cache_dir", cache)
    from_npz = run_fid(str(npz), "digits-test", "--extractor", "digits", "--cache_dir", cache)
    assert from_png["fid"] == from_npz["fid"] and from_png["conditional_accuracy"] is None  # PNGs: no labels
    assert abs(run_fid(str(npz), str(folder), "--extractor", "digits", "--cache_dir", cache)["fid"]) < 1e-6
    judge = torch.jit.trace(fid_cli._digits_judge(cache), torch.zeros(2, 1, 8, 8))
    judge.save(str(tmp_path / "judge.pt"))
    scripted = run_fid(
        str(npz), "digits-test", "--extractor", "digits", "--classifier", str(tmp_path / "judge.pt"),
        "--cache_dir", cache,
    )  # fmt: skip
    assert scripted["conditional_accuracy"] == from_npz["conditional_accuracy"] > 0.9
    assert scripted["classifier"] == str(tmp_path / "judge.pt")


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    test = DigitsDataModule().test_images()
    unlabelled = save_npz(tmp_path / "u.npz", test.x[:10])
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    unknown = tmp_path / "unknown.npz"  # labels -1: how evaluation.npz reads the released files (none)
    np.savez(unknown, arr_0=np.load(unlabelled)["arr_0"], arr_1=np.full(10, -1))
    for args, message in [
        ([str(unlabelled), "digits-test", "--classifier", "digits"], "needs labels"),
        ([str(unknown), "digits-test", "--classifier", "digits"], "needs labels"),
        ([str(unlabelled), str(tmp_path / "wide.npz"), "--extractor", "digits"], "2048 features"),
        ([str(tmp_path / "missing.npz"), "digits-test"], "missing.npz"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["fid", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sit-lightning fid: error:") and message in err and "\n" not in err
