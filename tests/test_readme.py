"""The README's code runs (issue 14, point 3): every ``bash`` and ``python`` block, in order.

The convention is the README's ("Development", "The README's code runs"): a block tagged on the line
before its fence with ``<!-- no-run: <why> -->`` is skipped, and the ``sit-lightning`` lines of a
skipped bash block are parsed by the real command-line parser instead (nothing of them runs); every
other block runs in one scratch folder, with the substitutions of the README's table applied. The
counts below are exact, so a new block or a new tag fails this test until they are updated.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonargparse
import pytest
import torch

from cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

RUN_BLOCKS = 4  # Start here, the two Python blocks, the quality-vs-NFE benchmark
SKIPPED_BLOCKS = 10
PARSED_COMMANDS = 19  # sit-lightning lines of the skipped blocks, each parsed by the real CLI
RUNNABLE = ("bash", "python")
NOT_RUN = ("yaml", "text", "")  # fences that hold no code to run
RESEARCH_LOOP_MARKER = "Tiny run of the whole loop"  # tests/test_research_loop.py's SNIPPET_MARKER
BASH_TIMEOUT_S = 240

FENCE = re.compile(r"^```(\S*)\s*$")
TAG = re.compile(r"^<!-- no-run:(.*)-->\s*$")


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # of the opening fence, 1-based
    skip: str | None  # the no-run reason, None when the block runs


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``, with the no-run tag of the line before its fence."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        tag = TAG.match(lines[i])
        if tag:
            assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), (
                f"README.md:{i + 1}: a no-run tag must be the line just before a fence"
            )
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        language = opening.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None and lines[end].strip() == "```", f"README.md:{i + 1}: unclosed fence"
        previous = TAG.match(lines[i - 1]) if i else None
        skip = previous.group(1).strip() if previous else None
        blocks.append(Block(language, "\n".join(lines[i + 1 : end]) + "\n", i + 1, skip))
        i = end + 1
    return blocks


def readme_overrides(text: str) -> list[tuple[str, str, str]]:
    """(pattern, replacement, why) rows of the README's substitution table (section "Development")."""
    section = text.split("\n## Development\n", 1)[1].split("\n## ", 1)[0]
    header = "| pattern | replacement | why |"
    assert header in section
    rows = []
    for line in section.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3 and all(cells), line
        rows.append((cells[0].strip("`"), cells[1].strip("`"), cells[2]))
    return rows


def cli_commands(block: str) -> list[list[str]]:
    """The argument lists after ``sit-lightning`` (or ``-m sit_lightning.cli``) in a bash block."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if word == "sit-lightning":
                commands.append(words[i + 1 :])
                break
            if word == "-m" and words[i + 1 : i + 2] == ["sit_lightning.cli"]:
                commands.append(words[i + 2 :])
                break
    return commands


class Parsed(BaseException):
    """Raised right after the outermost successful parse: nothing of the command runs."""


def parse_only(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[bool, str]:
    """Parse ``sit-lightning argv`` with the real parsers (``main``) and stop before anything runs."""
    original = jsonargparse.ArgumentParser.parse_args
    depth = 0

    def parse_then_stop(self: jsonargparse.ArgumentParser, *args: object, **kwargs: object) -> object:
        nonlocal depth
        depth += 1
        try:
            result = original(self, *args, **kwargs)
        finally:
            depth -= 1
        if depth == 0:
            raise Parsed
        return result

    with monkeypatch.context() as patch:
        patch.setattr(jsonargparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            code, output = run_cli(argv)
        except Parsed:
            return True, ""
    # --print_config prints the parsed config and exits with 0 from inside the parse
    return code == 0 and "--print_config" in argv, f"exit {code}: {output[-2000:]}"


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The folder the blocks run in: links to the tree's configs, benchmarks and tests; copies of what
    ``pip`` would write into (``src/*.egg-info``)."""
    for name in ("configs", "benchmarks", "tests"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(
        ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks on a shared CPU: threads only contend
    yield tmp_path
    torch.set_num_threads(threads)


def run_bash(text: str, cwd: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", text],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=BASH_TIMEOUT_S,
    )
    assert done.returncode == 0, (
        f"exit {done.returncode}\n{text}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def test_the_readme_blocks_run(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    blocks = readme_blocks(text)
    assert {b.language for b in blocks} <= set(RUNNABLE + NOT_RUN), "a fence language that this test ignores"
    assert all(b.skip is None or b.language in RUNNABLE for b in blocks), (
        "a no-run tag on a block that never runs"
    )
    overrides = readme_overrides(text)
    matched = dict.fromkeys([pattern for pattern, _, _ in overrides], 0)

    ran, skipped, parsed = [], [], []
    for block in (b for b in blocks if b.language in RUNNABLE):
        where = f"README.md:{block.line}"
        if block.skip is not None:
            assert block.skip, f"{where}: a no-run tag needs its reason"
            skipped.append(block)
            if block.language == "bash":
                for argv in cli_commands(block.text):
                    ok, why = parse_only(argv, monkeypatch)
                    assert ok, f"{where}: sit-lightning {shlex.join(argv)}\n{why}"
                    parsed.append(argv)
            continue
        code = block.text
        for pattern, replacement, _ in overrides:
            code, count = re.subn(pattern, replacement, code)
            matched[pattern] += count
        if block.language == "bash":
            run_bash(code, scratch)
        else:
            exec(compile(code, where, "exec"), {"__name__": "__readme__"})  # noqa: S102
        ran.append(block)

    assert not [p for p, n in matched.items() if n == 0], "a substitution that matches no block"
    assert (len(ran), len(skipped), len(parsed)) == (RUN_BLOCKS, SKIPPED_BLOCKS, PARSED_COMMANDS)
    # the demo ran (a report and a checkpoint), and so did the benchmark on that checkpoint
    assert (scratch / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert (scratch / "runs" / "qvn" / "quality_vs_nfe.png").is_file()


def test_the_tiny_loop_block_is_the_one_the_research_loop_test_runs() -> None:
    """The block skipped for tests/test_research_loop.py is the bash block that test reads."""
    text = README.read_text()
    assert (
        f'SNIPPET_MARKER = "{RESEARCH_LOOP_MARKER}"' in (ROOT / "tests" / "test_research_loop.py").read_text()
    )
    after = text.index(RESEARCH_LOOP_MARKER)
    first = next(
        b for b in readme_blocks(text) if b.language == "bash" and b.line > text[:after].count("\n") + 1
    )
    assert first.skip is not None and "tests/test_research_loop.py" in first.skip
    assert [words[0] for words in cli_commands(first.text)] == ["precompute-latents", "fit", "sample", "fid"]


def test_tags_and_substitutions_are_read_as_documented() -> None:
    """The parser of this test on a small README: tags, counts, reasons and the overrides table."""
    sample = (
        "# t\n\n<!-- no-run: needs 8 GPUs -->\n```bash\nsit-lightning fit \\\n    --trainer.devices 8  # x\n```\n\n"
        "```python\nprint(1)\n```\n\n```yaml\na: 1\n```\n\n## Development\n\n"
        "| pattern | replacement | why |\n|---|---|---|\n| `a\\d` | `b` | tiny |\n\n## Next\n"
    )
    blocks = readme_blocks(sample)
    assert [(b.language, b.skip) for b in blocks] == [
        ("bash", "needs 8 GPUs"),
        ("python", None),
        ("yaml", None),
    ]
    assert cli_commands(blocks[0].text) == [["fit", "--trainer.devices", "8"]]
    assert cli_commands("torchrun --nnodes 4 -m sit_lightning.cli fit --config c.yaml\n") == [
        ["fit", "--config", "c.yaml"]
    ]
    assert readme_overrides(sample) == [("a\\d", "b", "tiny")]
    with pytest.raises(AssertionError, match="just before a fence"):
        readme_blocks("<!-- no-run: x -->\n\n```bash\ntrue\n```\n")


def test_a_misspelt_flag_does_not_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parse-only check can fail: a flag the CLI does not have is refused, for fit and a subcommand."""
    monkeypatch.chdir(ROOT)
    assert parse_only(["fit", "--config", "configs/sit_b_gvp.yaml", "--trainer.devices", "8"], monkeypatch)[0]
    assert not parse_only(
        ["fit", "--config", "configs/sit_b_gvp.yaml", "--trainer.device", "8"], monkeypatch
    )[0]
    assert parse_only(["sample", "a.ckpt", "b.npz", "--num_samples", "8"], monkeypatch)[0]
    assert not parse_only(["sample", "a.ckpt", "b.npz", "--num_smples", "8"], monkeypatch)[0]
