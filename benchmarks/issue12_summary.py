"""Issue 12's goals against one GPU session's results (``benchmarks/issue12_session.py`` writes them).

Usage::

    python benchmarks/issue12_summary.py --results $OUT        # writes $OUT/issue12_summary.{json,md}

Reads ``train_throughput.json`` (released and compiled recipes, keyed and unkeyed draws, peak
memory, the bf16 matmul rate measured in the same run), ``lightning_overhead.json`` (``Trainer.fit``
against a plain loop over the same module), ``sample_throughput.json`` (guided Heun 250 NFE
against the released heun2 path) and ``keyed_draws.json`` (the data workers' posterior noise on the
CPU against the per-sample generators; ``LatentSource.load`` now against before), each also as
``NAME_*.json`` (one file per model, as the session writes them; their rows are joined, the suffixed
files first), and writes one row per goal: the measured value, the goal, and
``pass`` / ``FAIL`` / ``n/a`` (not measured). "Through fit" means the Lightning row of
``lightning_overhead`` (``sit-lightning fit``'s own step, keyed draws); "vs released" divides by the
``released`` row of ``train_throughput`` for the same model, measured on the same card in the same session.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Goal", "main", "summarize"]

GIB_LIMIT_XL = 32.0
RESULT_NAME = "issue12_summary"


@dataclass
class Goal:
    """One goal of the issue: what was measured against what is asked."""

    name: str
    measured: float | None
    goal: str
    passed: bool | None
    detail: str = ""

    def markdown(self) -> str:
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[self.passed]
        value = "n/a" if self.measured is None else f"{self.measured:.4g}"
        return f"| {self.name} | {value} | {self.goal} | {verdict} | {self.detail} |"


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _load_joined(results: Path, name: str) -> dict[str, Any] | None:
    """``NAME_*.json`` (sorted) then ``NAME.json``: their rows joined, the other keys of the first that has them."""
    stems = sorted(path.stem for path in results.glob(f"{name}_*.json")) + [name]
    payloads = [p for p in (_load(results, stem) for stem in stems) if p is not None]
    if not payloads:
        return None
    joined: dict[str, Any] = {"rows": [row for p in payloads for row in p.get("rows", [])]}
    for payload in payloads:
        for key, value in payload.items():
            if joined.get(key) is None:
                joined[key] = value
    return joined


def _row(rows: list[dict[str, Any]], model: str, **match: Any) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r.get("model") == model and all(r.get(k) == v for k, v in match.items())), None
    )


def _at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def summarize(results: Path) -> list[Goal]:
    """The goals of issue 12, measured from the JSON files in ``results``."""
    train = _load_joined(results, "train_throughput") or {"rows": [], "peak_tflops": None}
    overhead = _load_joined(results, "lightning_overhead") or {"rows": []}
    sampling = _load(results, "sample_throughput")
    peak_tflops = train.get("peak_tflops")
    goals: list[Goal] = []

    for model, speedup in (("SiT-XL/2", 3.5), ("SiT-B/2", 3.9)):
        released = _row(train["rows"], model, recipe="released")
        fit = _row(overhead["rows"], model)
        released_ips = released and released.get("images_per_sec")
        fit_ips = fit and fit.get("lightning_images_per_sec")
        ratio = fit_ips / released_ips if fit_ips and released_ips else None
        batch = fit["batch"] if fit else (released or {}).get("batch")
        detail = f"fit {fit_ips or 0:.0f} img/s, released {released_ips or 0:.0f} img/s"
        goals.append(
            Goal(
                f"{model} b{batch}: fit's step vs released",
                ratio,
                f">= {speedup}x",
                _at_least(ratio, speedup),
                detail,
            )
        )
        compiled = _row(train["rows"], model, recipe="bf16_compile")
        plain = compiled and compiled.get("vs_released")
        goals.append(
            Goal(f"{model} b{batch}: bf16+compile plain step vs released", plain, "(for reference)", None)
        )
        if model == "SiT-XL/2":
            flops = fit and fit.get("train_flops_per_image")
            mfu = fit_ips * flops / (peak_tflops * 1e12) if fit_ips and flops and peak_tflops else None
            detail = f"against {peak_tflops or 0:.0f} TFLOP/s bf16 matmuls measured in the same run"
            goals.append(
                Goal(f"{model} b{batch}: MFU through fit", mfu, ">= 0.55", _at_least(mfu, 0.55), detail)
            )
            peaks = [r.get("peak_gib") for r in (fit, compiled) if r and r.get("peak_gib")]
            peak = max(peaks) if peaks else None
            passed = None if peak is None else peak < GIB_LIMIT_XL
            detail = "max of fit's run and the bf16+compile recipe"
            goals.append(
                Goal(f"{model} b{batch}: peak memory (GiB)", peak, f"< {GIB_LIMIT_XL:.0f}", passed, detail)
            )

    for model in ("SiT-XL/2", "SiT-B/2"):
        keyed = _row(train["rows"], model, recipe="bf16_compile")
        unkeyed = _row(train["rows"], model, recipe="bf16_compile_unkeyed")
        k, u = keyed and keyed.get("images_per_sec"), unkeyed and unkeyed.get("images_per_sec")
        ratio = k / u if k and u else None
        goals.append(
            Goal(f"{model}: keyed / unkeyed draws (img/s)", ratio, ">= 0.98", _at_least(ratio, 0.98))
        )

    for row in overhead["rows"]:
        value = row.get("overhead")
        passed = None if value is None else value <= 0.03
        detail = f"plain {row.get('plain_ms') or 0:.1f} ms, Lightning {row.get('lightning_ms') or 0:.1f} ms per step"
        goals.append(
            Goal(
                f"{row['model']} b{row['batch']}: Lightning overhead vs plain loop",
                value,
                "<= 0.03",
                passed,
                detail,
            )
        )

    summary = (sampling or {}).get("summary", {})
    speedup = summary.get("speedup_vs_released")
    best = summary.get("best_variant")
    goals.append(
        Goal(
            f"sampling: guided Heun 250 NFE img/s vs released heun2 ({best})",
            speedup,
            ">= 2x",
            _at_least(speedup, 2.0),
        )
    )
    mad = summary.get("uint8_mad_vs_fp32")
    latent = summary.get("latent_mad_vs_fp32")
    detail = (
        "decoded"
        if mad is not None
        else f"no VAE given: latent MAD {latent if latent is not None else 'n/a'}"
    )
    goals.append(
        Goal(
            f"sampling: uint8 MAD of {best} vs our fp32",
            mad,
            "<= 2",
            None if mad is None else mad <= 2.0,
            detail,
        )
    )

    draws = (_load(results, "keyed_draws") or {}).get("rows", [])
    posterior = next((r for r in draws if r.get("table") == "posterior"), None)
    before, now = (posterior or {}).get("per_sample_generator"), (posterior or {}).get("philox_v3")
    ratio = now / before if now and before else None
    detail = f"{posterior['batch']}: {1e3 * now:.2f} ms vs {1e3 * before:.2f} ms" if ratio else ""
    goals.append(
        Goal(
            "data: posterior noise draw (CPU) / per-sample generators",
            ratio,
            "<= 1",
            None if ratio is None else ratio <= 1.0,
            detail,
        )
    )
    load = next((r for r in draws if r.get("table") == "load"), None)
    before, now = (load or {}).get("previous_load"), (load or {}).get("load")
    ratio = now / before if now and before else None
    detail = f"{load['batch']}: {1e3 * now:.2f} ms vs {1e3 * before:.2f} ms" if ratio else ""
    goals.append(
        Goal("data: LatentSource.load now / before version 3", ratio, "(for reference)", None, detail)
    )
    return goals


def main(argv: Sequence[str] | None = None) -> list[Goal]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="folder of the session's JSON files")
    args = parser.parse_args(argv)
    goals = summarize(args.results)
    table = "| goal | measured | asked | verdict | detail |\n|---|---:|---|---|---|\n"
    table += "\n".join(goal.markdown() for goal in goals) + "\n"
    print(table, flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{RESULT_NAME}.md").write_text(table)
    (args.results / f"{RESULT_NAME}.json").write_text(json.dumps([asdict(g) for g in goals], indent=1) + "\n")
    return goals


if __name__ == "__main__":
    main()
