"""Our samplers against the released SiT code's outputs on its tiny network (../shared/golden).

ODE: released fixed-grid ``euler``, ``heun2`` and torchdiffeq's ``rk4`` (the 3/8 rule) with
``num_steps=9`` grid points = our ``euler``, ``heun``, ``rk4_38`` with ``steps=8``.
SDE: released ``num_steps=9`` = 8 stochastic steps, then the last step if any: our ``steps=9`` with a
last step (8 stochastic + 1), ``steps=8`` without; the released ``diffusion_form``/``diffusion_norm``
become our coefficient through :func:`from_released` (w = 2 D), and the recorded standard normals
are fed in through ``normals``.
"""

from __future__ import annotations

import pytest
import torch

from sit_lightning.interpolants import GVP, VP, Linear
from sit_lightning.models import SiT
from sit_lightning.sampling import ModelField, from_released, sample_ode, sample_sde

TOLERANCE = 1e-5  # norm-relative, float32 (golden/README.md)
PATHS = {"Linear": Linear(), "GVP": GVP(), "VP": VP()}
ODE_METHODS = {"euler": "euler", "heun2": "heun", "rk4": "rk4_38"}  # released name -> ours
RELEASED_NUM_STEPS = 9
VP_ODE_T1 = 1 - 1e-3
RELEASED_FORM_NAMES = {"sigma": "sigma", "linear": "linear", "sbdm": "SBDM"}


def relative_error(ours: torch.Tensor, released: torch.Tensor) -> float:
    return float((ours - released).norm() / released.norm())


@pytest.fixture(scope="module")
def tiny_sit(golden: dict) -> SiT:
    model = SiT(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        depth=2,
        num_heads=4,
        num_classes=10,
        learn_sigma=True,
    )
    model.load_state_dict({k.removeprefix("model."): v for k, v in golden.items() if k.startswith("model.")})
    return model.eval()


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("released_method", list(ODE_METHODS))
def test_fixed_grid_ode_matches_released(
    golden: dict, tiny_sit: SiT, path_name: str, released_method: str
) -> None:
    path = PATHS[path_name]
    field = ModelField(tiny_sit, path, "velocity", y=golden["ode.y"])
    t1 = VP_ODE_T1 if path_name == "VP" else 1.0
    result = sample_ode(
        field,
        golden["ode.noise"],
        method=ODE_METHODS[released_method],
        steps=RELEASED_NUM_STEPS - 1,
        t0=0.0,
        t1=t1,
    )
    expected = golden[f"ode.{path_name}.{released_method}"]
    assert relative_error(result.samples, expected) < TOLERANCE
    assert result.nfe == {"euler": 1, "heun2": 2, "rk4": 4}[released_method] * (RELEASED_NUM_STEPS - 1)


def sde_keys(golden_keys) -> list[str]:
    return sorted({k.split(".")[1] for k in golden_keys if k.startswith("sde.")})


SDE_RUNS = [
    "GVP_heun_sigma_mean",
    "Linear_euler_linear_none",
    "Linear_euler_sigma_mean",
    "VP_euler_sbdm_mean",
]


def test_golden_holds_the_sde_runs_we_check(golden: dict) -> None:
    assert sde_keys(golden) == SDE_RUNS


@pytest.mark.parametrize("run", SDE_RUNS)
def test_sde_with_recorded_normals_matches_released(golden: dict, tiny_sit: SiT, run: str) -> None:
    path_name, method, form, last_step = run.split("_")
    recorded = golden[f"sde.{run}.normals"]
    field = ModelField(tiny_sit, PATHS[path_name], "velocity", y=golden["ode.y"])
    has_last = last_step != "none"
    result = sample_sde(
        field,
        golden["ode.noise"],
        method=method,
        steps=RELEASED_NUM_STEPS if has_last else RELEASED_NUM_STEPS - 1,
        diffusion=from_released(RELEASED_FORM_NAMES[form], 1.0),
        last_step=last_step,
        last_step_size=0.04,
        t0=0.0,
        t1=1.0,
        normals=recorded,
    )
    assert recorded.shape[0] == RELEASED_NUM_STEPS - 1
    assert relative_error(result.samples, golden[f"sde.{run}.out"]) < TOLERANCE
    # one network call per drift (the released code made two)
    per_step = 2 if method == "heun" else 1
    assert result.nfe == per_step * (RELEASED_NUM_STEPS - 1) + has_last


@pytest.mark.parametrize("path_name", list(PATHS))
def test_w_kl_is_twice_released_sbdm_and_score_conversion_matches(golden: dict, path_name: str) -> None:
    path = PATHS[path_name]
    t = golden["paths.t"]
    torch.testing.assert_close(
        from_released("SBDM", 1.0)(t, path), 2 * golden[f"paths.{path_name}.sbdm_D"], rtol=1e-10, atol=1e-10
    )
    # a velocity model seen through ModelField gives the released score_from_velocity
    v, x = golden["paths.v"], golden["paths.x"]
    lookup = {float(ti): vi for ti, vi in zip(t, v, strict=True)}
    field = ModelField(lambda x_, t_: torch.stack([lookup[float(ti)] for ti in t_]), path, "velocity")
    score = field.velocity_and_score(x, t).score
    torch.testing.assert_close(score, golden[f"paths.{path_name}.score_from_velocity"], rtol=1e-9, atol=1e-9)
