"""Shared test fixtures: the golden data of the released SiT code, and float64 defaults.

Golden data missing is a skip on a developer's machine but a failure under CI (``CI`` set to a true
value, as GitHub Actions and ``.ci/run`` do): a CI run that silently skips every golden comparison
would pass a wrong loss, path or sampler (issue 9). ``SIT_GOLDEN_DIR`` points the tests at another
golden folder (or at none, to check that the remaining tests still pin the math on their own).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS_DIR = Path(__file__).resolve().parent
# helpers shared by several test files (closed-form Gaussians) live next to this file
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

GOLDEN_DIR = Path(os.environ.get("SIT_GOLDEN_DIR") or TESTS_DIR.parents[1] / "shared" / "golden")
GOLDEN_FILE = GOLDEN_DIR / "sit_released_golden.safetensors"
GOLDEN_JSON = GOLDEN_DIR / "sit_released_golden.json"
#: values of ``CI`` that mean "running under CI" (GitHub Actions sets ``true``, .ci/run sets ``1``)
CI_TRUE_VALUES = ("1", "true", "yes", "on")


def running_in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``CI`` is set to a true value (case-insensitive)."""
    return environ.get("CI", "").strip().lower() in CI_TRUE_VALUES


def require_golden(path: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """``path`` if it exists; otherwise skip the test, or fail it when running under CI."""
    if path.exists():
        return path
    message = f"golden data not found at {path} (it lives in the shared/ folder beside the repo)"
    if running_in_ci(environ):
        pytest.fail(f"{message}; CI is set, so missing golden data fails instead of skipping", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def golden_policy() -> Callable[..., Path]:
    """:func:`require_golden`, for tests of the policy itself (conftest is not importable by name)."""
    return require_golden


@pytest.fixture(scope="session")
def golden() -> dict:
    """Tensors of the released code on a tiny model (see ../shared/golden/README.md)."""
    from safetensors.torch import load_file

    return load_file(str(require_golden(GOLDEN_FILE)))


@pytest.fixture(scope="session")
def golden_model_config() -> dict:
    """Constructor arguments of the golden tiny SiT, read from the golden JSON."""
    import json

    text = json.loads(require_golden(GOLDEN_JSON).read_text())["tensors"]["model.*"]
    return json.loads(text[text.index("{") : text.index("}") + 1])


@pytest.fixture(scope="module")
def deterministic():
    """Deterministic torch algorithms for one test module (the resume and skip equality runs), then as before."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)
