"""SamplerSettings: one typed value for every sampling setting, validated when built.

What a user relies on: a bad value fails at construction (or when a YAML config is parsed) with a
message naming it and the allowed values; every field reaches the sampler through the callbacks'
``settings:``; ``SiTModule.sample(labels, settings)`` draws exactly what the samplers assembled by hand
draw (the previous keyword path), ODE and SDE, with a guidance interval and channels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from sit_lightning.callbacks import EMACallback, FIDCallback, SampleGridCallback
from sit_lightning.callbacks.periodic import DEFAULT_SETTINGS
from sit_lightning.models import SiTConfig
from sit_lightning.module import SiTModule, find_weight_average
from sit_lightning.randomness import keyed_randn
from sit_lightning.sampling import (
    DIFFUSION_NAMES,
    DIFFUSIONS,
    ModelField,
    SamplerSettings,
    WKLEta,
    sample_ode,
    sample_sde,
)
from sit_lightning.sampling.guidance import ClassifierFreeGuidance

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SEED = 5
INDICES = [3, 4, 5, 6]
LABELS = torch.tensor([0, 1, 2, 1])
PERTURB_STD = 0.2  # the zero-initialised adaLN and final layers must move: a fresh SiT outputs zero


# ---- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(sampler="sdE"), "sampler must be one of ('ode', 'sde'); got 'sdE'"),
        (dict(method="heum"), "method must be one of ('euler', 'midpoint', 'heun', 'rk4'"),
        (
            dict(sampler="sde", method="rk4"),
            "method must be one of ('euler', 'heun') for sampler='sde'; got 'rk4'",
        ),
        (dict(steps=0), "steps must be >= 1; got 0"),
        (dict(sampler="sde", steps=1), "steps must be >= 2 (sampler='sde' with last_step='mean'"),
        (dict(steps=2.5), "steps must be an integer or None; got 2.5"),
        (dict(method="dopri5", steps=10), "steps=10 given with the adaptive method 'dopri5'"),
        (dict(grid="cosine"), "grid must be one of ('uniform', 'shifted'); got 'cosine'"),
        (dict(shift=0.3), "shift=0.3 needs grid='shifted'"),
        (dict(grid="shifted", shift=0.0), "shift must be a finite number > 0; got 0.0"),
        (dict(t0=0.6, t1=0.4), "need t0 < t1 (t0 noise, t1 data); got t0=0.6, t1=0.4"),
        (dict(t1=1.5), "t1 must be None or in [0, 1]"),
        (dict(sampler="sde", diffusion="sbdm"), "diffusion must be one of ('constant', 'w_kl'"),
        (dict(sampler="sde", diffusion="w_kl_eta"), "got diffusion='w_kl_eta', eta=None"),
        (dict(sampler="sde", eta=0.5), "got diffusion='w_kl', eta=0.5"),
        (dict(sampler="sde", diffusion="w_kl_eta", eta=-1.0), "eta must be a finite number >= 0; got -1.0"),
        (dict(sampler="sde", diffusion_norm=float("nan")), "diffusion_norm must be a finite number >= 0"),
        (
            dict(sampler="sde", last_step="tweedy"),
            "last_step must be one of ('none', 'mean', 'tweedie', 'euler')",
        ),
        (dict(sampler="sde", last_step_size=1.0), "last_step_size must be in (0, 1); got 1.0"),
        (dict(cfg_scale=-0.5), "cfg_scale must be a finite number >= 0; got -0.5"),
        (dict(guidance_interval=(0.8, 0.2)), "0 <= t_lo <= t_hi <= 1; got (0.8, 0.2)"),
        (dict(guidance_channels=0), "guidance_channels must be None (all) or an integer >= 1; got 0"),
        # a setting the chosen sampler would not read is an error, not a silent no-op
        (dict(diffusion="sigma"), "diffusion='sigma' (applies to sampler='sde')"),
        (dict(last_step="none"), "last_step='none' (applies to sampler='sde')"),
        (dict(atol=1e-3), "atol=0.001 (applies to the adaptive ODE methods"),
        (dict(sampler="sde", rtol=1e-2), "rtol=0.01 (applies to sampler='ode' with one of"),
        (
            dict(sampler="sde", last_step="none", last_step_size=0.1),
            "last_step_size=0.1 (applies to an SDE last",
        ),
    ],
)
def test_a_bad_setting_fails_when_built_and_says_what_is_allowed(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as error:
        SamplerSettings(**fields)
    assert message in str(error.value)


def test_defaults_are_the_samplers_own() -> None:
    """None means the sampler's default, read from the samplers' signatures (one source)."""
    ode, sde = SamplerSettings(), SamplerSettings(sampler="sde")
    for settings, sampler in ((ode, sample_ode), (sde, sample_sde)):
        defaults = inspect.signature(sampler).parameters
        assert settings.resolved_method == defaults["method"].default
        assert settings.resolved_steps == defaults["steps"].default
    sde_defaults = inspect.signature(sample_sde).parameters
    for name in ("diffusion", "last_step", "last_step_size", "grid", "shift"):
        assert getattr(sde, name) == sde_defaults[name].default, name
    assert sde.diffusion_norm == sde_defaults["norm"].default
    ode_defaults = inspect.signature(sample_ode).parameters
    assert (ode.atol, ode.rtol) == (ode_defaults["atol"].default, ode_defaults["rtol"].default)


def test_the_diffusion_literal_names_every_coefficient() -> None:
    assert set(DIFFUSION_NAMES) == {*DIFFUSIONS, WKLEta.name}


@pytest.mark.parametrize(
    ("fields", "nfe"),
    [
        (dict(), 250),  # Heun, 125 steps: the paper's ODE
        (dict(method="euler", steps=16), 16),
        (dict(method="rk4", steps=4), 16),
        (dict(method="dopri5"), None),
        (dict(sampler="sde"), 250),  # Euler-Maruyama, 249 stochastic steps + the last step
        (dict(sampler="sde", method="heun", steps=10), 19),
        (dict(sampler="sde", method="heun", steps=10, last_step="none"), 20),
    ],
)
def test_nfe_per_image_is_the_documented_count(fields: dict[str, Any], nfe: int | None) -> None:
    assert SamplerSettings(**fields).nfe_per_image() == nfe


def test_nfe_per_image_is_what_the_sampler_spends() -> None:
    """Against the field's counter, on a closed-form field (no network)."""
    from sit_lightning.sampling import FunctionField

    field = FunctionField(lambda x, t: -x, "linear", score_fn=lambda x, t: -x)
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    for settings in (
        SamplerSettings(method="rk4", steps=3),
        SamplerSettings(sampler="sde", method="heun", steps=6),
        SamplerSettings(sampler="sde", steps=5, last_step="none", diffusion="constant"),
    ):
        result = settings.sample(field, noise, generator=torch.Generator().manual_seed(1))
        assert result.nfe == settings.nfe_per_image(), settings


def test_a_yaml_list_becomes_the_interval_tuple_and_settings_compare_by_value() -> None:
    settings = SamplerSettings(cfg_scale=2.0, guidance_interval=[0.1, 0.9])  # type: ignore[arg-type]
    assert settings.guidance_interval == (0.1, 0.9)
    assert settings == SamplerSettings(cfg_scale=2.0, guidance_interval=(0.1, 0.9))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.steps = 3  # type: ignore[misc]


# ---- YAML: parse-time failure and every field reachable -----------------------------------------
def _run_cli(args: list[str]) -> tuple[int, str]:
    from sit_lightning.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue() + err.getvalue()


def _grid_callback(settings: dict[str, Any]) -> str:
    callback = {
        "class_path": "sit_lightning.callbacks.SampleGridCallback",
        "init_args": {"settings": settings},
    }
    return yaml.safe_dump([callback], default_flow_style=True, width=10_000).strip()


def test_a_misspelt_method_fails_when_the_demo_config_is_parsed() -> None:
    callbacks = _grid_callback({"sampler": "ode", "method": "huen", "steps": 16})
    code, output = _run_cli(
        ["fit", "--config", str(CONFIGS / "digits.yaml"), "--trainer.callbacks", callbacks]
    )
    assert code == 2, output[-2000:]
    assert "huen" in output and "heun" in output  # the bad value and the allowed ones
    assert "Epoch" not in output  # nothing trained


def test_a_method_of_the_other_family_stops_the_cli_with_one_line() -> None:
    """Fields that do not fit together fail when the callbacks are built, before any step, as one line."""
    callbacks = _grid_callback({"sampler": "sde", "method": "rk4", "steps": 16})
    code, output = _run_cli(
        ["fit", "--config", str(CONFIGS / "digits.yaml"), "--trainer.callbacks", callbacks]
    )
    assert code == 2, output[-2000:]
    expected = "sit-lightning: error: method must be one of ('euler', 'heun') for sampler='sde'; got 'rk4'"
    assert expected in output and "Traceback" not in output, output[-2000:]


#: A value other than the default for every field (an SDE, so that the SDE-only fields may be set).
EVERY_FIELD = dict(
    sampler="sde", method="heun", steps=12, grid="shifted", shift=0.5, t0=0.01, t1=0.99,
    diffusion="w_kl_eta", diffusion_norm=0.5, eta=0.25, last_step="tweedie", last_step_size=0.05,
    cfg_scale=1.5, guidance_interval=[0.2, 0.8], guidance_channels=2,
)  # fmt: skip
#: The fields left at their defaults above (they apply to adaptive ODE methods), set in a second run.
ADAPTIVE = dict(sampler="ode", method="dopri5", atol=1e-5, rtol=1e-4)


def test_every_field_is_reachable_from_the_callbacks_yaml() -> None:
    from jsonargparse import ArgumentParser

    assert {f.name for f in dataclasses.fields(SamplerSettings)} == {*EVERY_FIELD, *ADAPTIVE}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SampleGridCallback, "grid")
    parser.add_class_arguments(FIDCallback, "fid")
    for fields in (EVERY_FIELD, ADAPTIVE):
        text = yaml.safe_dump({"grid": {"settings": fields}, "fid": {"settings": fields}})
        init = parser.instantiate_classes(parser.parse_string(text))
        expected = SamplerSettings(**fields)
        assert init.grid.settings == expected and init.fid.settings == expected
        for name, value in fields.items():
            assert getattr(init.grid.settings, name) == (tuple(value) if isinstance(value, list) else value)


def test_a_yaml_mapping_means_the_settings_of_its_fields() -> None:
    """The fields a mapping leaves out take SamplerSettings' defaults, not values of another default."""
    from jsonargparse import ArgumentParser

    assert DEFAULT_SETTINGS == SamplerSettings()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SampleGridCallback, "grid")
    for fields in (dict(sampler="sde"), dict(method="dopri5"), dict(steps=7)):
        text = yaml.safe_dump({"grid": {"settings": fields}})
        init = parser.instantiate_classes(parser.parse_string(text))
        assert init.grid.settings == SamplerSettings(**fields)


def test_the_demo_samples_with_the_same_settings_as_before() -> None:
    """configs/digits.yaml: the grid and the FID report still use 16 Heun ODE steps, guidance 1 and 1.5."""
    callbacks = yaml.safe_load((CONFIGS / "digits.yaml").read_text())["trainer"]["callbacks"]
    by_name = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in callbacks}
    for name in ("SampleGridCallback", "FIDCallback"):
        settings = SamplerSettings(**by_name[name]["settings"])
        assert settings == SamplerSettings(sampler="ode", method="heun", steps=16), name
    assert by_name["FIDCallback"]["cfg_scales"] == [1.0, 1.5]


def test_fid_takes_the_guidance_scale_once() -> None:
    with pytest.raises(ValueError, match="give the guidance scale once"):
        FIDCallback(settings=SamplerSettings(cfg_scale=2.0), cfg_scales=[1.0, 2.0])
    assert FIDCallback(settings=SamplerSettings(cfg_scale=2.0)).cfg_scales == [2.0]


# ---- SiTModule.sample(labels, settings) ------------------------------------------------------------
@pytest.fixture(scope="module")
def module() -> SiTModule:
    arch = SiTConfig(
        input_size=8, in_channels=4, num_classes=3, depth=1, hidden_size=32, num_heads=2, patch_size=4
    )
    module = SiTModule(arch=arch, seed=SEED)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.network.parameters():
            if p.requires_grad:
                p.add_(PERTURB_STD * torch.randn(p.shape, generator=g))
    times = (torch.arange(20, dtype=torch.float32) + 0.5) / 20
    module.on_load_checkpoint({"loss_profile": {"times": times, "values": 0.05 + 2.0 * (1.0 - times) ** 2}})
    return module


def _noise(module: SiTModule) -> torch.Tensor:
    return keyed_randn(module.latent_shape, SEED, "sample", 0, INDICES)


def _by_hand(module: SiTModule, settings: dict[str, Any]) -> torch.Tensor:
    """The samples the keyword form assembled before SamplerSettings: sampler, field, guidance, keyed normals."""
    s = dict(settings)
    sampler, scale = s.pop("sampler"), s.pop("cfg_scale")
    interval, channels = s.pop("guidance_interval"), s.pop("guidance_channels")
    network = module.network.eval()
    if scale != 1.0:
        network = ClassifierFreeGuidance(
            network,
            scale,
            null_class=module.network.num_classes,
            interval=interval,
            guidance_channels=channels,
        )
    objective = module.objective
    field = ModelField(network, objective.interpolant, objective.prediction, y=LABELS)
    with torch.no_grad():
        if sampler == "ode":
            t0, t1 = objective.sample_interval()
            return sample_ode(field, _noise(module), t0=t0, t1=t1, **s).samples
        if s.get("diffusion") == WKLEta.name:
            profile = module.loss_profile
            s["diffusion"] = WKLEta(s.pop("eta"), profile.times.tolist(), profile.values.tolist())

        def normals(k: int, shape: torch.Size) -> torch.Tensor:
            return keyed_randn(shape[1:], SEED, "sample", k + 1, INDICES)

        return sample_sde(field, _noise(module), normals=normals, **s).samples


GUIDED = dict(cfg_scale=2.5, guidance_interval=(0.3, 0.7), guidance_channels=2)
CASES = {
    "ode": dict(sampler="ode", method="euler", steps=4, **GUIDED),
    "sde": dict(sampler="sde", method="euler", steps=5, diffusion="sigma", last_step="euler", **GUIDED),
    "sde_w_kl_eta": dict(sampler="sde", method="heun", steps=4, diffusion="w_kl_eta", eta=0.1, **GUIDED),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_with_settings_equals_the_keyword_path_and_the_hand_built_samples(module, case) -> None:
    fields = CASES[case]
    settings = SamplerSettings(**fields)
    result = module.sample(LABELS, settings, seed=SEED, indices=INDICES)
    assert result.nfe == settings.nfe_per_image()
    by_keywords = module.sample(LABELS, seed=SEED, indices=INDICES, **fields).samples
    assert torch.equal(result.samples, by_keywords)
    assert torch.equal(result.samples, _by_hand(module, fields))
    # precondition: the guidance settings change these samples, so a module that dropped one would fail
    for change in (dict(guidance_interval=None), dict(guidance_channels=None), dict(cfg_scale=1.0)):
        other = module.sample(LABELS, dataclasses.replace(settings, **change), seed=SEED, indices=INDICES)
        assert not torch.allclose(other.samples, result.samples, atol=1e-4), change


def test_sample_rejects_keywords_that_are_not_settings(module) -> None:
    with pytest.raises(
        ValueError, match=r"unknown sampler settings \['norm'\]; the settings are \['sampler'"
    ):
        module.sample(LABELS, sampler="sde", norm=2.0)
    with pytest.raises(ValueError, match="pass either settings or its fields as keywords"):
        module.sample(LABELS, SamplerSettings(), steps=3)


def test_sample_finds_the_trainers_ema_through_the_public_lookup(module) -> None:
    ema = EMACallback(decay=0.5)
    ema.update(module, step=0)
    with torch.no_grad():
        module.network.final_layer.linear.weight.add_(0.5)  # the live weights move away from the EMA
    try:
        settings = SamplerSettings(method="euler", steps=2)
        explicit = module.sample(LABELS, settings, ema=ema).samples
        trainer = SimpleNamespace(callbacks=[object(), ema])
        assert EMACallback.find(trainer) is ema and find_weight_average(trainer) is ema
        module._trainer = trainer  # type: ignore[assignment]  # what a fit attaches
        try:
            assert torch.equal(module.sample(LABELS, settings).samples, explicit)
        finally:
            module._trainer = None
        assert not torch.allclose(module.sample(LABELS, settings).samples, explicit, atol=1e-4)
        with pytest.raises(ValueError, match="2 EMACallbacks"):
            EMACallback.find(SimpleNamespace(callbacks=[ema, EMACallback()]))
    finally:
        with torch.no_grad():
            module.network.final_layer.linear.weight.sub_(0.5)
