"""What the benchmarks here record beside their measurements, written once.

The environment a number was measured in, the command that measured it, a failed row's error (an OOM or
a compile failure is that row's result, and the run goes on), a table cell of a value that may be
missing, the JSON + markdown pair that a benchmark rewrites after every row (a run cut off by its time
limit keeps what it measured), and matplotlib for the optional plots.

Not a script: the benchmarks beside it import it (``python benchmarks/NAME.py`` puts this folder first
on ``sys.path``; each benchmark also adds it, for a test that loads the benchmark from its file).
"""

from __future__ import annotations

import json
import platform
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ERROR_CHARS = 300  # a row's error: the exception's type and the first line of its message, cut here


def say(text: str) -> None:
    """Print a line of progress now (the benchmarks run under ``timeout`` with their output in a log)."""
    print(text, flush=True)


def resolve_device(device: torch.device | None) -> torch.device:
    """``device``, CUDA when there is one and none was asked for; a CUDA device without an index gets the
    current one (so that memory statistics and names refer to one device)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def environment(device: torch.device) -> dict[str, Any]:
    """Python, torch and CUDA versions and the device measured on (its name; cuDNN on CUDA, threads on CPU)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that ran: ``sys.argv``, or ``script`` and ``argv`` when ``main(argv)`` was called."""
    return " ".join(sys.argv if argv is None else [script, *argv])


def failure(err: BaseException) -> str:
    """Print the traceback of ``err`` (being handled) on stderr; return its one-line summary for a row."""
    traceback.print_exc()
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:ERROR_CHARS]


def cell(value: float | None, spec: str) -> str:
    """A markdown table cell: ``n/a`` for a value not measured, else ``format(value, spec)``."""
    return "n/a" if value is None else format(value, spec)


def write_result(out: Path, name: str, payload: dict[str, Any], markdown: str) -> None:
    """``out/NAME.json`` (``payload``) and ``out/NAME.md`` (``markdown``), replacing the previous pair."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend; without matplotlib, exit saying which extra has it."""
    try:
        import matplotlib
    except ImportError as err:  # the plot is optional: say which extra holds it
        raise SystemExit(
            'the plot needs matplotlib: pip install "sit-lightning[notebook]" (or matplotlib)'
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
