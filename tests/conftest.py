"""Shared test fixtures: the golden data of the released SiT code, and float64 defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS_DIR = Path(__file__).resolve().parent
# helpers shared by several test files (closed-form Gaussians) live next to this file
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

GOLDEN_DIR = TESTS_DIR.parents[1] / "shared" / "golden"
GOLDEN_FILE = GOLDEN_DIR / "sit_released_golden.safetensors"


@pytest.fixture(scope="session")
def golden() -> dict:
    """Tensors of the released code on a tiny model (see ../shared/golden/README.md)."""
    if not GOLDEN_FILE.exists():
        pytest.skip(
            f"golden data not found at {GOLDEN_FILE} (it lives in the shared/ folder beside the repo)"
        )
    from safetensors.torch import load_file

    return load_file(str(GOLDEN_FILE))


@pytest.fixture(scope="session")
def golden_model_config() -> dict:
    """Constructor arguments of the golden tiny SiT, read from the golden JSON."""
    import json

    path = GOLDEN_DIR / "sit_released_golden.json"
    if not path.exists():
        pytest.skip(f"golden data not found at {path}")
    text = json.loads(path.read_text())["tensors"]["model.*"]
    return json.loads(text[text.index("{") : text.index("}") + 1])
