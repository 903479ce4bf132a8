"""Sampler presets named after their source (issue 10, point 2).

What a user relies on: every preset is valid settings whose NFE is what a run spends (counted on a
toy network, a guided pair being one call on a doubled batch); a misspelt preset stops a YAML config
when it is parsed and names the choices; a preset's name means exactly its settings in
``SiTModule.sample`` and in the callbacks; the released SDE default maps onto our ``w = 2 D``; the
README's table states each preset's NFE and targets.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
import yaml

from sit_lightning.callbacks import FIDCallback, SampleGridCallback
from sit_lightning.errors import ConfigurationError
from sit_lightning.evaluation.sample_plan import LABEL_MODES
from sit_lightning.interpolants import make_interpolant
from sit_lightning.models import SiTConfig
from sit_lightning.module import SiTModule
from sit_lightning.sampling import ModelField, SamplerSettings, from_released, make_diffusion
from sit_lightning.sampling.guidance import ClassifierFreeGuidance
from sit_lightning.sampling.presets import (
    SAMPLER_PRESET_NAMES,
    SAMPLER_PRESETS,
    PresetLabels,
    SamplerPresetName,
    sampler_preset,
)

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 3
SHAPE = (4, 2, 2)  # 4 channels, so that three-channel guidance leaves one unguided
PERTURB_STD = 0.2  # a fresh SiT outputs zero (adaLN-Zero): move every weight


# ---- what each preset is ---------------------------------------------------------------------------
def test_the_names_are_the_literal_and_each_name_gives_its_settings() -> None:
    assert tuple(SAMPLER_PRESETS) == SAMPLER_PRESET_NAMES == get_args(SamplerPresetName)
    for name, preset in SAMPLER_PRESETS.items():
        assert preset.name == name
        assert isinstance(preset.settings, SamplerSettings)
        assert sampler_preset(name) is preset.settings
        SamplerSettings(**vars(preset.settings))  # validates again, field by field


def test_an_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ConfigurationError, match=r"sampler preset must be one of \('released-sde', ") as err:
        sampler_preset("relased-sde")
    assert "got 'relased-sde'" in str(err.value) and "table6-sin2" in str(err.value)


def test_each_preset_states_its_source_targets_and_uniform_labels() -> None:
    assert set(get_args(PresetLabels)) == set(LABEL_MODES)  # restated from evaluation (layering)
    for name, preset in SAMPLER_PRESETS.items():
        assert preset.source and preset.targets, name
        assert preset.labels == "uniform", name  # as the released sample_ddp.py and ADM drew them
        for target in preset.targets:
            assert target.cfg_scale == preset.settings.cfg_scale, (name, target)
            assert target.fid > 0 and target.where, (name, target)
        guided = preset.settings.cfg_scale != 1.0
        repa = name.startswith("repa-")  # named after REPA's evaluation: its scale is in the name
        assert (
            name.endswith("cfg1.5")
            or name.startswith("table7")
            or (repa and f"-cfg{preset.settings.cfg_scale:g}-" in name)
            or not guided
        ), name
        # released forward_with_cfg guides three channels; REPA's samplers.py guides all of them
        assert preset.settings.guidance_channels == (3 if guided and not repa else None), name
        assert ("interval" in name) == (preset.settings.guidance_interval is not None), name


def test_the_released_sde_is_the_released_scripts_default_with_w_equal_2d() -> None:
    """train_utils.py parse_sde_args defaults: Euler, sigma, norm 1, Mean, 0.04; 250 sampling steps."""
    settings = sampler_preset("released-sde")
    linear = make_interpolant("linear")
    t = torch.linspace(0.0, 0.99, 7, dtype=torch.float64)
    ours = make_diffusion(settings.diffusion, settings.diffusion_norm)
    released_d = 1.0 * linear.sigma(t)  # the released D of form 'sigma' at norm 1
    torch.testing.assert_close(ours(t, linear), 2.0 * released_d)  # w = 2 D
    torch.testing.assert_close(ours(t, linear), from_released("sigma", 1.0)(t, linear))
    assert (settings.method, settings.steps, settings.last_step, settings.last_step_size) == (
        "euler",
        250,
        "mean",
        0.04,
    )
    # the paper's w_t = sigma_t (Table 6) is half of it
    paper = sampler_preset("table6-sigma")
    torch.testing.assert_close(
        make_diffusion(paper.diffusion, paper.diffusion_norm)(t, linear), linear.sigma(t)
    )


# ---- NFE: documented, and counted on a toy network -------------------------------------------------
class CountingNetwork:
    """``(x, t, y) -> velocity`` of N(0, I) data on the Linear path, counting calls and rows."""

    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
        velocity = (2 * t - 1) / (t**2 + (1 - t) ** 2) * x  # E[x_1 - x_0 | x_t] for x_1 ~ N(0, I)
        return velocity + 0.1 * y.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)  # labels matter


WITHOUT_INTERVAL = [n for n in SAMPLER_PRESET_NAMES if SAMPLER_PRESETS[n].settings.guidance_interval is None]


@pytest.mark.parametrize("name", WITHOUT_INTERVAL)
def test_a_presets_nfe_is_what_a_run_spends(name: str) -> None:
    preset = SAMPLER_PRESETS[name]
    nfe = preset.nfe_per_image()
    assert nfe == preset.settings.nfe_per_image() == 250  # the README's table
    network = CountingNetwork()
    guided = preset.settings.guided(network, null_class=NUM_CLASSES)
    labels = torch.tensor([0, 2])
    noise = torch.randn(len(labels), *SHAPE, generator=torch.Generator().manual_seed(0))
    result = preset.settings.sample(
        ModelField(guided, "linear", y=labels), noise, generator=torch.Generator().manual_seed(1)
    )
    assert torch.isfinite(result.samples).all()
    assert result.nfe == nfe == network.calls  # a guided pair is ONE call ...
    pair = 2 if preset.settings.cfg_scale != 1.0 else 1
    assert network.rows == pair * len(labels) * nfe  # ... on a doubled batch
    if pair == 2:
        assert isinstance(guided, ClassifierFreeGuidance)
        assert guided.calls.main == guided.calls.doubled == nfe


def test_the_repa_preset_is_repas_generate_sde_with_its_interval_in_our_time() -> None:
    """REPA README: generate.py --mode sde --num_steps 250 --cfg-scale 1.8 --guidance_high 0.7.

    Written out from REPA's samplers.py (its time t_R: 0 data, 1 noise): Euler-Maruyama on
    linspace(1, 0.04, 250), a noise-free last step to 0, diffusion 2 t_R, full-channel CFG where
    0 <= t_R <= 0.7 at the step's start; in our time t = 1 - t_R.
    """
    assert set(SAMPLER_PRESET_NAMES) - set(WITHOUT_INTERVAL) == {"repa-sde-cfg1.8-interval"}
    preset = SAMPLER_PRESETS["repa-sde-cfg1.8-interval"]
    settings = preset.settings
    assert (settings.sampler, settings.method, settings.steps) == ("sde", "euler", 250)
    assert (settings.last_step, settings.last_step_size) == ("mean", 0.04)
    assert settings.cfg_scale == 1.8 and settings.guidance_channels is None
    assert settings.guidance_interval == pytest.approx((1 - 0.7, 1 - 0.0))
    assert [(t.cfg_scale, t.fid, t.training_steps) for t in preset.targets] == [(1.8, 1.42, "4M")]
    linear = make_interpolant("linear")
    t = torch.linspace(0.0, 0.96, 9, dtype=torch.float64)
    w = make_diffusion(settings.diffusion, settings.diffusion_norm)(t, linear)
    torch.testing.assert_close(w, 2.0 * (1.0 - t))  # REPA's compute_diffusion(t_R) = 2 t_R, t_R = 1 - t

    network = CountingNetwork()
    guided = settings.guided(network, null_class=NUM_CLASSES)
    labels = torch.tensor([0, 2])
    noise = torch.randn(len(labels), *SHAPE, generator=torch.Generator().manual_seed(0))
    result = settings.sample(
        ModelField(guided, "linear", y=labels), noise, generator=torch.Generator().manual_seed(1)
    )
    assert torch.isfinite(result.samples).all()
    # the times REPA evaluates the model at: t_steps[:-1] of linspace(1, 0.04, 250) + [0]
    repa_times = torch.linspace(1.0, 0.04, 250, dtype=torch.float64)
    torch.testing.assert_close(result.times[:-1], 1.0 - repa_times)  # the same grid, in our time
    assert float(result.times[-1]) == 1.0
    repa_guided = int(((repa_times >= 0.0) & (repa_times <= 0.7)).sum())  # 172 of the 250 calls
    assert repa_guided == 172
    assert result.nfe == preset.nfe_per_image() == network.calls == 250
    assert isinstance(guided, ClassifierFreeGuidance)
    assert guided.calls.main == 250 and guided.calls.doubled == repa_guided
    assert network.rows == len(labels) * (250 + repa_guided)  # doubled rows only inside the interval


# ---- YAML: a preset by name, a misspelt one stops the parse ------------------------------------------
def _parser() -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SampleGridCallback, "grid")
    parser.add_class_arguments(FIDCallback, "fid")
    return parser


def test_a_preset_name_in_the_callbacks_yaml_means_its_settings() -> None:
    parser = _parser()
    text = yaml.safe_dump({"grid": {"settings": "released-ode-heun250"}, "fid": {"settings": "table7-sde"}})
    init = parser.instantiate_classes(parser.parse_string(text))
    assert init.grid.settings == sampler_preset("released-ode-heun250")
    assert init.fid.settings == sampler_preset("table7-sde") and init.fid.cfg_scales == [1.5]
    # a mapping of fields still means SamplerSettings of those fields
    init = parser.instantiate_classes(
        parser.parse_string(yaml.safe_dump({"grid": {"settings": {"steps": 7}}}))
    )
    assert init.grid.settings == SamplerSettings(steps=7)


def test_a_misspelt_preset_fails_when_parsed_listing_the_choices() -> None:
    from jsonargparse import ArgumentError

    with pytest.raises(ArgumentError) as err:
        _parser().parse_string(yaml.safe_dump({"grid": {"settings": "released-ode-heun25"}}))
    message = str(err.value)
    assert "released-ode-heun25" in message
    assert all(name in message for name in SAMPLER_PRESET_NAMES), message


def test_a_misspelt_preset_stops_the_demo_config_before_training() -> None:
    from sit_lightning.cli import main

    callback = {
        "class_path": "sit_lightning.callbacks.SampleGridCallback",
        "init_args": {"settings": "tabel8-ode"},
    }
    args = ["fit", "--config", str(ROOT / "configs" / "digits.yaml")]
    args += ["--trainer.callbacks", yaml.safe_dump([callback], default_flow_style=True, width=10_000).strip()]
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    output = out.getvalue()
    assert code == 2, output[-2000:]
    assert "tabel8-ode" in output and "table8-ode" in output and "released-sde" in output, output[-2000:]
    assert "Epoch" not in output


# ---- SiTModule.sample(labels, "<preset>") -------------------------------------------------------------
@pytest.fixture(scope="module")
def module() -> SiTModule:
    arch = SiTConfig(
        input_size=4, in_channels=4, num_classes=NUM_CLASSES, depth=1, hidden_size=16, num_heads=2
    )
    module = SiTModule(arch=arch, seed=3)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.network.parameters():
            p.add_(PERTURB_STD * torch.randn(p.shape, generator=generator))
    return module


@pytest.mark.parametrize("name", ["released-sde-cfg1.5", "table7-ode"])
def test_sample_with_a_preset_name_equals_sample_with_its_settings(module: SiTModule, name: str) -> None:
    labels = torch.tensor([0, 2, 1])
    by_name = module.sample(labels, name, use_ema=False)
    by_settings = module.sample(labels, sampler_preset(name), use_ema=False)
    assert torch.equal(by_name.samples, by_settings.samples)
    assert by_name.nfe == SAMPLER_PRESETS[name].nfe_per_image()
    noise = module.sample_noise(torch.arange(len(labels)), module.seed)
    assert not torch.allclose(by_name.samples, noise, atol=1e-2)  # the network moved the samples


def test_sample_with_a_misspelt_preset_names_the_choices(module: SiTModule) -> None:
    with pytest.raises(ConfigurationError, match=re.escape("got 'released-ode'")):
        module.sample([0], "released-ode", use_ema=False)  # type: ignore[arg-type]


# ---- README ----------------------------------------------------------------------------------------
def test_the_readme_table_lists_every_preset_with_its_nfe_and_figures() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Sampler presets", 1)[1].split("\n## ", 1)[0]
    rows = {
        line.split("|")[1].strip().strip("`"): line for line in section.splitlines() if line.startswith("| `")
    }
    assert set(rows) == set(SAMPLER_PRESET_NAMES)
    for name, row in rows.items():
        preset = SAMPLER_PRESETS[name]
        assert f"| {preset.nfe_per_image()} |" in row, row
        for target in preset.targets:
            assert f"{target.fid:g}" in row, (name, target.fid)
