"""Sampler presets named after their source: the released scripts' defaults and the paper's tables.

Each :class:`SamplerPreset` holds its :class:`~sit_lightning.sampling.SamplerSettings`, the file or
table it is named after, the figures it targets (model, training steps, cfg, FID-50K) and, where the
source does not say everything, a note of what it leaves open and what the preset chose. Select one
by name wherever settings are taken:

```python
module.sample(labels, "released-sde-cfg1.5")           # SiTModule.sample
sampler_preset("table8-ode").nfe_per_image()            # 250
```
```yaml
settings: released-ode-heun250                          # the sample-grid and FID callbacks
```

A misspelt name fails when the config is parsed (``SamplerPresetName`` is a ``Literal``) and
:func:`sampler_preset` names the choices.

Conventions shared by every preset:

- ``steps`` counts grid intervals (docs/sampling.md, "Counting steps and NFE"): the released
  ``--num-sampling-steps 250`` SDE is ``steps=250`` (249 stochastic steps + the last step, 250 NFE
  here, 500 network calls in the released code); the released ``heun2`` ODE with 126 grid points is
  ``steps=125`` (250 NFE).
- Diffusion coefficients are the paper's ``w_t``; the released code's "diffusion" ``D`` is ``w / 2``
  (``RELEASED_FORMS`` in ``diffusion.py``): released ``--diffusion-form sigma --diffusion-norm 1`` is
  ``w_t = 2 sigma_t``, our ``diffusion="sigma", diffusion_norm=2.0``; the paper's ``w_t = sigma_t``
  (Table 6) is ours at norm 1 (released norm 0.5).
- Guided presets count a guided pair as one evaluation on a doubled batch: the NFE is that of the
  unguided preset, with twice the rows per guided call. The SiT presets (cfg 1.5) guide the first
  three latent channels (``guidance_channels=3``), as the released ``SiT.forward_with_cfg``
  (``models.py``) does; the REPA preset guides all four, as REPA's ``samplers.py`` does, and only
  inside its guidance interval (the rest of its steps are conditional calls on the plain batch).
- Labels: every preset expects uniform random labels, as the released ``sample_ddp.py`` and ADM's
  evaluation drew them (``labels="uniform"``); class-balanced labels are the caller's opt-in.

Time convention: t = 0 is noise, t = 1 is data (``interpolants.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

from ..errors import ConfigurationError
from .diffusion import RELEASED_FORMS
from .sde import DEFAULT_LAST_STEP_SIZE
from .settings import SamplerSettings

__all__ = [
    "SAMPLER_PRESETS",
    "SAMPLER_PRESET_NAMES",
    "PresetLabels",
    "SamplerPreset",
    "SamplerPresetName",
    "TargetFigure",
    "sampler_preset",
]

SamplerPresetName = Literal[
    "released-sde",
    "released-sde-cfg1.5",
    "released-ode-heun250",
    "released-ode-heun250-cfg1.5",
    "table8-ode",
    "table8-sde",
    "table7-ode",
    "table7-sde",
    "table6-wkl",
    "table6-sigma",
    "table6-sin2",
    "repa-sde-cfg1.8-interval",
]
SAMPLER_PRESET_NAMES: tuple[str, ...] = get_args(SamplerPresetName)
#: How the labels of an evaluation are drawn; the values of ``evaluation.sample_plan.LabelMode``
#: (restated here: ``sampling`` may not import ``evaluation``; a test keeps the two equal).
PresetLabels = Literal["balanced", "uniform"]

#: The paper's guidance scale for its headline figures (Table 7) and the released code's choice of
#: guided channels (``forward_with_cfg`` guides channels 0-2, keeps channel 3 conditional).
PAPER_CFG_SCALE = 1.5
RELEASED_GUIDANCE_CHANNELS = 3
#: The released ``train_utils.py parse_sde_args`` defaults, which ``sample.py`` and ``sample_ddp.py``
#: use (the library's ``Sampler.sample_sde`` defaults to ``SBDM`` instead, but neither script relies on it).
RELEASED_SDE_FORM = "sigma"
RELEASED_SDE_NORM = 1.0
RELEASED_NUM_SAMPLING_STEPS = 250
#: The paper's ODE: fixed-step Heun with 250 NFE (released ``heun2`` on 126 grid points).
PAPER_HEUN_STEPS = 125
#: The long last step of the paper's SDE (Alg. 2) and of the released ``--last-step-size`` default.
PAPER_LAST_STEP_SIZE = DEFAULT_LAST_STEP_SIZE  # 0.04
#: REPA's evaluation (its README's ``generate.py`` command for FID 1.42): ``--cfg-scale 1.8
#: --guidance_high 0.7`` (``--guidance_low`` default 0), in REPA's time ``t_REPA`` (0 data, 1 noise).
REPA_CFG_SCALE = 1.8
REPA_GUIDANCE_LOW = 0.0
REPA_GUIDANCE_HIGH = 0.7
#: The same interval in our time, ``t = 1 - t_REPA``: [1 - 0.7, 1 - 0] = [0.3, 1.0].
REPA_GUIDANCE_INTERVAL = (1.0 - REPA_GUIDANCE_HIGH, 1.0 - REPA_GUIDANCE_LOW)


@dataclass(frozen=True)
class TargetFigure:
    """A published FID-50K (ImageNet, ADM suite) that a preset's settings produced, or are said to.

    Attributes:
        model: network and resolution, e.g. ``SiT-XL/2, 256x256``.
        training_steps: training iterations of the weights, e.g. ``7M``.
        cfg_scale: the guidance scale of the figure (1.0: none).
        fid: the FID-50K.
        where: the table (and row/column) or file that reports it.
    """

    model: str
    training_steps: str
    cfg_scale: float
    fid: float
    where: str


@dataclass(frozen=True)
class SamplerPreset:
    """One named sampler setting, with where it comes from and what it should reproduce.

    Attributes:
        name: the preset's name (a :data:`SamplerPresetName`).
        settings: the validated :class:`SamplerSettings`.
        source: what it is named after: a released file and its flags, or the paper's table.
        targets: the figures it targets.
        labels: how the evaluation's labels are drawn (``uniform`` for every paper and released preset).
        note: what the source leaves open and what the preset chose; empty when nothing is.
    """

    name: str
    settings: SamplerSettings
    source: str
    targets: tuple[TargetFigure, ...]
    labels: PresetLabels = "uniform"
    note: str = ""

    def nfe_per_image(self) -> int | None:
        """Network evaluations per image (a guided pair on a doubled batch counts once)."""
        return self.settings.nfe_per_image()


def _released_sde(cfg_scale: float) -> SamplerSettings:
    """Released ``sample_ddp.py SDE`` with every default: Euler-Maruyama, ``--diffusion-form sigma
    --diffusion-norm 1 --last-step Mean --last-step-size 0.04 --num-sampling-steps 250``.

    The released ``D`` of form ``sigma`` at norm 1 is ``sigma_t``, so ``w_t = 2 D = 2 sigma_t``: our
    ``SigmaDiffusion`` at norm 2 (taken from ``RELEASED_FORMS``, the same mapping ``from_released``
    uses), twice the paper's ``w_t = sigma_t``.
    """
    coefficient, factor = RELEASED_FORMS[RELEASED_SDE_FORM]
    return SamplerSettings(
        sampler="sde",
        method="euler",
        steps=RELEASED_NUM_SAMPLING_STEPS,
        diffusion=coefficient.name,  # type: ignore[arg-type]  # a DiffusionName by construction
        diffusion_norm=factor * RELEASED_SDE_NORM,
        last_step="mean",
        last_step_size=PAPER_LAST_STEP_SIZE,
        **_guidance(cfg_scale),
    )


def _repa_sde() -> SamplerSettings:
    """REPA's ``generate.py --mode sde --num_steps 250 --cfg-scale 1.8 --guidance_high 0.7`` (its README).

    REPA's ``samplers.py euler_maruyama_sampler``: Euler-Maruyama on ``t_REPA = linspace(1, 0.04, 250)``
    (249 stochastic steps), then a last step to 0 of the drift without noise, ``x + dt (v - D s)``; the
    diffusion ``compute_diffusion(t) = 2 t_REPA`` enters as ``sqrt(2 t_REPA) dW`` and ``- 0.5 * 2 t_REPA * s``,
    so it is our ``w``, ``w = 2 t_REPA = 2 sigma_t`` on the Linear path: our ``sigma`` at norm 2, the
    released SiT SDE's coefficient. In our time (``t = 1 - t_REPA``) that is exactly ``released-sde``'s
    grid: 249 steps from 0 to 0.96, a Mean last step of 0.04 (250 NFE). Guidance: REPA guides when
    ``guidance_low <= t_REPA <= guidance_high`` at the start of a step, i.e. ``0.3 <= t <= 1`` here,
    and on all four channels (the drift is affine in the velocity, so guiding it is guiding the
    velocity). REPA issue #52 calls ``2 t`` a typo against the paper's ``sigma_t = t``; FID 1.42 is
    what the code ran, so the preset keeps it.
    """
    # the released SDE's grid and coefficient, REPA's guidance (replace() validates again)
    return replace(
        _released_sde(1.0),
        cfg_scale=REPA_CFG_SCALE,
        guidance_interval=REPA_GUIDANCE_INTERVAL,
        guidance_channels=None,
    )


def _paper_sde(
    diffusion: Literal["w_kl", "sigma", "increasing_decreasing"], cfg_scale: float
) -> SamplerSettings:
    """The paper's SDE: Euler-Maruyama, 250 steps, Mean last step h = 0.04 (Alg. 2), ``w_t`` at norm 1."""
    return SamplerSettings(
        sampler="sde",
        method="euler",
        steps=RELEASED_NUM_SAMPLING_STEPS,
        diffusion=diffusion,
        diffusion_norm=1.0,
        last_step="mean",
        last_step_size=PAPER_LAST_STEP_SIZE,
        **_guidance(cfg_scale),
    )


def _heun_ode(cfg_scale: float) -> SamplerSettings:
    """Fixed-step Heun, 125 steps = 250 NFE, on the model's default interval."""
    return SamplerSettings(sampler="ode", method="heun", steps=PAPER_HEUN_STEPS, **_guidance(cfg_scale))


def _guidance(cfg_scale: float) -> dict[str, float | int | None]:
    channels = RELEASED_GUIDANCE_CHANNELS if cfg_scale != 1.0 else None  # unguided: nothing to restrict
    return {"cfg_scale": cfg_scale, "guidance_channels": channels}


_XL_256 = "SiT-XL/2, 256x256"
_B_256 = "SiT-B/2, 256x256"
_TABLE8_ODE = TargetFigure(_XL_256, "7M", 1.0, 9.35, "paper Table 8, ODE column")
_TABLE8_SDE = TargetFigure(_XL_256, "7M", 1.0, 8.26, "paper Table 8, SDE column (Table 1: 8.3)")
_TABLE7_ODE = TargetFigure(_XL_256, "7M", PAPER_CFG_SCALE, 2.15, "paper Table 7, SiT-XL ODE")
_TABLE7_SDE = TargetFigure(_XL_256, "7M", PAPER_CFG_SCALE, 2.06, "paper Table 7, SiT-XL SDE; released README")
_TABLE7_SDE_512 = TargetFigure(
    "SiT-XL/2, 512x512", "3M", PAPER_CFG_SCALE, 2.62, "paper Table 7, 512 SiT-XL SDE"
)

_REPA_XL_4M = TargetFigure(
    "SiT-XL/2 + REPA, 256x256",
    "4M",
    REPA_CFG_SCALE,
    1.42,
    "REPA README (generate.py --mode sde --num_steps 250 --cfg-scale 1.8 --guidance_high 0.7)",
)

_SDE_COEFFICIENT_UNSTATED = (
    "The paper names the sampler (Euler-Maruyama, 250 steps, last step h = 0.04) but not the diffusion "
    "coefficient of this figure; its text names w_KL,eta (eq. 14) the best for SiT-XL without giving eta. "
)
_GUIDED_CHANNELS_UNSTATED = (
    "The paper does not say which channels were guided; this preset guides three, as the released "
    "forward_with_cfg (and DiT, whose 2.27 is in the same table) did. "
)
_JAX_ORIGIN = (
    "The released README ('Differences from JAX') says the weights were trained in JAX on TPUs and "
    "ported, and that sampling on TPU gave 2.15 against the paper's 2.06; the code that sampled the "
    "paper's figures is not released."
)


def _presets() -> dict[str, SamplerPreset]:
    presets = [
        SamplerPreset(
            "released-sde",
            _released_sde(1.0),
            "released sample_ddp.py SDE with the train_utils.py defaults (cfg 1.0, sample_ddp.py's default)",
            (_TABLE8_SDE,),
            note="Released diffusion 'sigma' at norm 1 is w_t = 2 sigma_t (our sigma at norm 2), twice the "
            "paper's sigma_t column. "
            + _SDE_COEFFICIENT_UNSTATED
            + "The maintainer (SiT issue #31) says only that 8.3 came 'from sampling with SDE'.",
        ),
        SamplerPreset(
            "released-sde-cfg1.5",
            _released_sde(PAPER_CFG_SCALE),
            "released sample_ddp.py SDE --cfg-scale 1.5 with the train_utils.py defaults",
            (_TABLE7_SDE,),
            note="The released README lists 2.06 beside the XL/2 weights, not beside a command; this is what "
            "its sample_ddp.py SDE runs at cfg 1.5. " + _JAX_ORIGIN,
        ),
        SamplerPreset(
            "released-ode-heun250",
            _heun_ode(1.0),
            "the maintainer's recipe (SiT issue #18): released sample_ddp.py ODE --sampling-method heun2 "
            "--num-sampling-steps 126, without guidance",
            (_TABLE8_ODE,),
            note="Same settings as table8-ode. The released ODE default is dopri5 (adaptive NFE), not this.",
        ),
        SamplerPreset(
            "released-ode-heun250-cfg1.5",
            _heun_ode(PAPER_CFG_SCALE),
            "the maintainer's recipe (SiT issue #18): Heun, 125 steps (250 NFE), cfg 1.5 = released "
            "sample_ddp.py ODE --sampling-method heun2 --num-sampling-steps 126 --cfg-scale 1.5",
            (_TABLE7_ODE,),
            note="Same settings as table7-ode. The README's TPU figure is also 2.15; whether Table 7's ODE "
            "row is that run is not said.",
        ),
        SamplerPreset(
            "table8-ode",
            _heun_ode(1.0),
            "paper Table 8 (and Tables 4-5), ODE: Heun with 250 NFE, no guidance",
            (_TABLE8_ODE, TargetFigure(_B_256, "400K", 1.0, 34.84, "paper Table 8, SiT-B ODE")),
        ),
        SamplerPreset(
            "table8-sde",
            _paper_sde("w_kl", 1.0),
            "paper Table 8 (and Table 1), SDE: Euler-Maruyama with 250 steps, no guidance",
            (_TABLE8_SDE, TargetFigure(_B_256, "400K", 1.0, 33.02, "paper Table 8, SiT-B SDE")),
            note=_SDE_COEFFICIENT_UNSTATED
            + "This preset uses w_KL, the coefficient of Table 5's SDE column. "
            "Table 8's SiT-B SDE figure, 33.02, is Table 6's Linear-velocity w_KL,eta entry (33.0), not its "
            "w_KL entry (33.6): expect w_KL to land about 0.6 above it at SiT-B.",
        ),
        SamplerPreset(
            "table7-ode",
            _heun_ode(PAPER_CFG_SCALE),
            "paper Table 7, SiT-XL ODE: Heun with 250 NFE, cfg 1.5",
            (_TABLE7_ODE,),
            note=_GUIDED_CHANNELS_UNSTATED + _JAX_ORIGIN,
        ),
        SamplerPreset(
            "table7-sde",
            _paper_sde("w_kl", PAPER_CFG_SCALE),
            "paper Table 7, SiT-XL SDE: Euler-Maruyama with 250 steps, cfg 1.5",
            (_TABLE7_SDE, _TABLE7_SDE_512),
            note=_SDE_COEFFICIENT_UNSTATED
            + "This preset uses w_KL. "
            + _GUIDED_CHANNELS_UNSTATED
            + _JAX_ORIGIN,
        ),
        SamplerPreset(
            "table6-wkl",
            _paper_sde("w_kl", 1.0),
            "paper Table 6, column w_KL (eq. 13): Euler-Maruyama with 250 steps, no guidance",
            (
                TargetFigure(_B_256, "400K", 1.0, 33.6, "paper Table 6, Linear velocity, w_KL"),
                TargetFigure(_B_256, "400K", 1.0, 32.9, "paper Table 6, GVP velocity, w_KL"),
            ),
            note="Same settings as table8-sde.",
        ),
        SamplerPreset(
            "table6-sigma",
            _paper_sde("sigma", 1.0),
            "paper Table 6, column sigma_t: Euler-Maruyama with 250 steps, no guidance",
            (
                TargetFigure(_B_256, "400K", 1.0, 33.5, "paper Table 6, Linear velocity, sigma_t"),
                TargetFigure(_B_256, "400K", 1.0, 33.4, "paper Table 6, GVP velocity, sigma_t"),
            ),
            note="The paper's w_t = sigma_t: our sigma at norm 1, the released 'sigma' at norm 0.5 (the "
            "released default, norm 1, is twice this: released-sde).",
        ),
        SamplerPreset(
            "table6-sin2",
            _paper_sde("increasing_decreasing", 1.0),
            "paper Table 6, column sin^2(pi t): Euler-Maruyama with 250 steps, no guidance",
            (
                TargetFigure(_B_256, "400K", 1.0, 33.3, "paper Table 6, Linear velocity, sin^2(pi t)"),
                TargetFigure(_B_256, "400K", 1.0, 33.6, "paper Table 6, GVP velocity, sin^2(pi t)"),
            ),
            note="sin^2(pi t) is symmetric in t, so the paper's time and ours agree. The released "
            "'increasing-decreasing' would need norm 0.5 and cannot run (its key is misspelt there).",
        ),
        SamplerPreset(
            "repa-sde-cfg1.8-interval",
            _repa_sde(),
            "REPA (Yu et al., ICLR 2025) README evaluation: generate.py --mode sde --num_steps 250 "
            "--cfg-scale 1.8 --guidance_high 0.7 (samplers.py euler_maruyama_sampler)",
            (_REPA_XL_4M,),
            note="REPA's time runs from data (0) to noise (1): its guidance interval t_REPA in [0, 0.7] is "
            "[0.3, 1.0] in ours. Its SDE is released-sde's (w = 2 sigma_t, 249 Euler-Maruyama steps to 0.96, "
            "Mean last step), guided on all four channels inside the interval. generate.py decodes with "
            "--vae ema (its default; the README command does not change it) although REPA's latents are of "
            "sd-vae-ft-mse; REPA issue #52 calls its diffusion 2t a typo, but 1.42 is what the code ran.",
        ),
    ]
    return {preset.name: preset for preset in presets}


#: Every preset by name, in the order of :data:`SamplerPresetName`.
SAMPLER_PRESETS: dict[str, SamplerPreset] = _presets()
assert tuple(SAMPLER_PRESETS) == SAMPLER_PRESET_NAMES, "SamplerPresetName and the presets disagree"


def sampler_preset(name: str) -> SamplerSettings:
    """The :class:`SamplerSettings` of the preset ``name`` (one of :data:`SAMPLER_PRESET_NAMES`).

    Raises:
        ConfigurationError: (a ``ValueError``) naming ``name`` and the presets.
    """
    if name not in SAMPLER_PRESETS:
        raise ConfigurationError(f"sampler preset must be one of {SAMPLER_PRESET_NAMES}; got {name!r}")
    return SAMPLER_PRESETS[name].settings
