"""Puts this folder on sys.path so the closed-form helper imports as ``from gaussian_mixture import ...``."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
