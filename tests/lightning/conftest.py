"""Puts this folder on sys.path so the helpers import as ``from lightning_toy import ...``.

(Append, not prepend: this folder is named ``lightning`` and must never shadow the real package.)
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)
