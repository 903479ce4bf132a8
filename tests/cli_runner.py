"""Test helper: run ``sit-lightning`` through ``main()`` and capture what it printed."""

from __future__ import annotations

import contextlib
import io

from sit_lightning.cli import main


def run_cli(args: list[str]) -> tuple[int, str]:
    """``main(args)`` -> (exit status, stdout and stderr together)."""
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            result = main(args)
            code = result if isinstance(result, int) else 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue()
