"""Import hygiene: the math layers load without Lightning; the package re-exports lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("lightning", "pytorch_lightning", "lightning.pytorch", "torchmetrics", "diffusers", "tensorboard")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(filter(None, out.stdout.strip().split(",")))


def test_math_layers_do_not_import_lightning() -> None:
    loaded = _loaded_after("import sit_lightning.models, sit_lightning.interpolants, sit_lightning.objective")
    assert loaded == set(), f"importing the math layers pulled in {loaded}"


def test_sampling_does_not_import_lightning() -> None:
    pytest.importorskip("sit_lightning.sampling")
    loaded = _loaded_after("import sit_lightning.sampling")
    assert "lightning" not in loaded and "pytorch_lightning" not in loaded, loaded


def test_package_import_is_light_and_reexports_lazily() -> None:
    assert _loaded_after("import sit_lightning") == set()
    pytest.importorskip("sit_lightning.module")
    code = "from sit_lightning import SiTModule; import lightning; assert issubclass(SiTModule, lightning.LightningModule)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_attribute_is_an_attribute_error() -> None:
    import sit_lightning

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        sit_lightning.Nope  # noqa: B018


def test_every_public_name_resolves_and_internals_stay_internal() -> None:
    import sit_lightning
    import sit_lightning.sampling as sampling

    for name in sit_lightning.__all__:
        assert getattr(sit_lightning, name) is not None, name
    for name in sampling.__all__:
        assert getattr(sampling, name) is not None, name
    # step functions, drift formulas and constants are reached through their modules only
    internals = {"SIGMA_AT_DATA", "sde_drift", "time_vector", "last_step_update", "ode_step"}
    assert not internals & set(sampling.__all__)
    assert not any(hasattr(sampling, name) for name in internals)
