"""The import arrows of docs/architecture.md: every module of the package imports only the layers below it.

Read from the source (every ``import`` and ``from ... import``, relative or absolute, at any depth of
a file), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sit_lightning"

#: layer -> the layers it may import (docs/architecture.md). The lower half imports no Lightning.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),  # the error classes: every layer may raise them
    "atomic": set(),  # write <name>.tmp, fsync, rename: every layer that writes files may use it
    "randomness": {"errors"},
    "interpolants": {"errors"},
    "models": {"errors", "atomic"},
    "objective": {"interpolants", "errors"},
    "repa": {"errors"},  # REPA's projector, loss and frozen-encoder plumbing (no Lightning)
    "sampling": {"interpolants", "errors"},
    "evaluation": {"randomness", "errors", "atomic"},
    "data": {
        "randomness",
        "evaluation",
        "errors",
        "repa",
        "atomic",
    },  # evaluation: the one SD_VAE_SCALE; repa: features
    "posthoc_ema": {
        "atomic",
        "errors",
    },  # post-hoc EMA math, snapshot files and the posthoc-ema command (no Lightning)
    "callbacks": {"data", "evaluation", "sampling", "randomness", "errors", "posthoc_ema"},
    "checkpoint_io": {"atomic"},  # Lightning half: atomic checkpoint writes, a `last` that loads
    "trusted_loading": {"models", "objective", "interpolants"},  # Lightning half, but no Lightning
    "module": {
        "data",
        "models",
        "objective",
        "sampling",
        "randomness",
        "interpolants",
        "trusted_loading",
        "errors",
        "repa",
    },
    "convert_cli": {"models", "module", "trusted_loading", "errors"},  # reads Lightning checkpoints as dicts
    # `sit-lightning sample`: Fabric runs the sampler; the files are evaluation/npz.py's
    "sample_cli": {"convert_cli", "module", "models", "objective", "sampling", "evaluation", "errors"},
    "fid_cli": {
        "evaluation",
        "data",
        "callbacks",
        "errors",
    },  # digits data for its judge; conditional_accuracy
    "cli": {
        "module",
        "data",
        "models",
        "objective",
        "sampling",
        "evaluation",
        "callbacks",
        "errors",
        "convert_cli",
        "checkpoint_io",
        "trusted_loading",
    },
}


def _layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_layers(source: str, package: list[str]) -> set[str]:
    """Top-level subpackages of sit_lightning that ``source``, a file in ``package``, imports."""
    layers = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            names.append(".".join([*base, *([node.module] if node.module else [])]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sit_lightning."):
            names.append(node.module.removeprefix("sit_lightning."))
        elif isinstance(node, ast.Import):
            names += [
                a.name.removeprefix("sit_lightning.")
                for a in node.names
                if a.name.startswith("sit_lightning.")
            ]
        layers.update(name.split(".")[0] for name in names if name)
    return layers


def test_every_layer_imports_only_the_layers_below_it() -> None:
    files = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"]
    assert len(files) > 30
    wrong = []
    for path in files:
        layer = _layer_of(path)
        assert layer in ALLOWED, (
            f"{path.relative_to(PACKAGE)}: layer {layer!r} is not in docs/architecture.md"
        )
        package = list(path.relative_to(PACKAGE).parent.parts)  # where a relative import starts
        for other in _imported_layers(path.read_text(), package) - {layer}:
            if other not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {other}")
    assert not wrong, "imports against the layering of docs/architecture.md:\n" + "\n".join(wrong)


def test_the_checker_sees_relative_absolute_and_lazy_imports() -> None:
    source = (
        "import torch\n"
        "from .grids import time_grid\n"  # same layer
        "from ..interpolants import VP\n"
        "def f():\n    from ..module import SiTModule\n"
        "def g():\n    import sit_lightning.data.stream\n"
    )
    assert _imported_layers(source, ["sampling"]) == {"sampling", "interpolants", "module", "data"}
    assert _imported_layers("from . import fid\n", ["callbacks"]) == {"callbacks"}
