"""CPU smoke test of benchmarks/train_throughput.py, and the training-step properties it relies on.

The benchmark's numbers are only meaningful on a GPU; here a tiny SiT (depth 1, width 32) checks
that every row is measured and written, that the MFU and the ``vs released`` ratio follow their
formulas, and that one training step of a recipe is a real one: the paper's AdamW moves the
weights by its learning rate and the EMA moves by exactly ``(1 - decay) (theta - ema)``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sit_lightning.models import SiTConfig, forward_flops
from sit_lightning.module import PAPER_LR

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
TINY = {"depth": 1, "hidden_size": 32, "num_heads": 2}
TINY_ARGS = ["--device", "cpu", "--depth", "1", "--hidden-size", "32", "--num-heads", "2"]
EMA_DECAY = 0.75  # far from 1 so that the EMA visibly moves after one step


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_throughput", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_rows_json_mfu_and_ratio(bench: ModuleType, tmp_path: Path) -> None:
    peak_tflops = 0.5
    argv = [*TINY_ARGS, "--models", "SiT-B/2:4", "--warmup", "1", "--steps", "1"]
    argv += ["--recipes", "released,bf16", "--peak-tflops", str(peak_tflops), "--out", str(tmp_path)]
    report = bench.main(argv)

    assert [row.recipe for row in report.rows] == ["released", "bf16"]
    flops = forward_flops(SiTConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=32))
    by_recipe = {row.recipe: row for row in report.rows}
    for row in report.rows:
        assert row.error is None, row.error
        assert row.images_per_sec is not None and math.isfinite(row.images_per_sec) and row.images_per_sec > 0
        assert row.images_per_sec == pytest.approx(4 / (row.ms_per_step / 1e3))
        assert row.final_loss is not None and math.isfinite(row.final_loss)
        # MFU = 3 x forward FLOPs x img/s / peak
        assert row.mfu == pytest.approx(3 * flops * row.images_per_sec / (peak_tflops * 1e12))
    assert by_recipe["released"].vs_released == pytest.approx(1.0)
    expected_ratio = by_recipe["bf16"].images_per_sec / by_recipe["released"].images_per_sec
    assert by_recipe["bf16"].vs_released == pytest.approx(expected_ratio)

    written = json.loads((tmp_path / "train_throughput.json").read_text())
    assert [(r["recipe"], r["images_per_sec"]) for r in written["rows"]] == [
        (row.recipe, row.images_per_sec) for row in report.rows
    ]
    assert written["peak_tflops"] == pytest.approx(peak_tflops)
    table = (tmp_path / "train_throughput.md").read_text()
    assert "| SiT-B/2 | 4 | released |" in table and "| SiT-B/2 | 4 | bf16 |" in table


def test_time_budget_and_cpu_compile_skip(bench: ModuleType) -> None:
    argv = [*TINY_ARGS, "--models", "SiT-S/2:2", "--recipes", "bf16_compile,released", "--steps", "1"]
    report = bench.main(argv)
    # the released row runs first whatever the order asked for; compile is skipped on CPU
    assert [row.recipe for row in report.rows] == ["released", "bf16_compile"]
    assert report.rows[0].images_per_sec is not None and report.rows[0].mfu is None  # no peak on CPU
    assert report.rows[1].images_per_sec is None and "skipped on CPU" in report.rows[1].note

    skipped = bench.main([*argv[:-2], "--steps", "1", "--time-budget", "-1"])
    assert all(row.images_per_sec is None and "time budget" in row.note for row in skipped.rows)


def test_a_failing_recipe_gives_an_error_row_and_the_run_goes_on(bench: ModuleType) -> None:
    argv = ["--device", "cpu", "--depth", "1", "--hidden-size", "32", "--num-heads", "3"]  # 32 % 3 != 0
    report = bench.main([*argv, "--models", "SiT-B/2:2", "--recipes", "released,bf16", "--steps", "1"])
    assert [row.recipe for row in report.rows] == ["released", "bf16"]
    for row in report.rows:
        assert row.images_per_sec is None and row.error is not None and "divisible by num_heads" in row.error


def test_unknown_recipe_is_refused(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main([*TINY_ARGS, "--recipes", "released,bf17"])
    assert "bf16_compile_unkeyed" in capsys.readouterr().err  # the message lists the choices


@pytest.mark.parametrize("recipe", ["released", "bf16"])
def test_one_step_moves_weights_by_lr_and_ema_by_one_minus_decay(bench: ModuleType, recipe: str) -> None:
    device = torch.device("cpu")
    run = bench.TrainingRun(recipe, "SiT-B/2", device, bench.ArchOverrides(**TINY), ema_decay=EMA_DECAY)
    data = bench.FixedBatch.make(4, device, seed=0)
    params = list(run.module.parameters())
    theta_before = [p.detach().double().clone() for p in params]
    ema_before = [e.double().clone() for e in run.ema_tensors()]
    for before, e in zip(theta_before, ema_before, strict=True):
        torch.testing.assert_close(e, before, rtol=0, atol=0)  # the EMA starts as the initial weights

    loss = run.step(data, 0)

    assert math.isfinite(float(loss))
    theta = [p.detach().double() for p in params]
    # Adam's first step moves every weight with a nonzero gradient by lr * g / (|g| + eps) ~ lr.
    largest = max(float((a - b).abs().max()) for a, b in zip(theta, theta_before, strict=True))
    assert largest == pytest.approx(PAPER_LR, rel=1e-2)
    ema = [e.double() for e in run.ema_tensors()]
    moved = 0.0
    for before, after, weight in zip(ema_before, ema, theta, strict=True):
        expected = before + (1 - EMA_DECAY) * (weight - before)
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-8)
        moved = max(moved, float((after - before).abs().max()))
    assert moved == pytest.approx((1 - EMA_DECAY) * largest, rel=1e-2)


def test_keyed_draws_benchmark_runs_and_its_reference_is_the_old_per_sample_law(capsys) -> None:
    """benchmarks/keyed_draws.py: every row measured; its 'before' reference draws the same laws."""
    path = BENCHMARK.parent / "keyed_draws.py"
    spec = importlib.util.spec_from_file_location("keyed_draws", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--batches", "8x1x4x4,2x4x8x8", "--device", "cpu", "--warmup", "0", "--reps", "1"]
    rows = bench.main([*argv, "--posterior", "16x4x8x8"])
    assert [row["batch"] for row in rows] == ["8x1x4x4", "2x4x8x8", "16x4x8x8", "16x4x8x8"]
    for row in rows[:2]:
        assert all(row[k] > 0 for k in ("per_sample_generator", "philox", "unkeyed"))
    assert rows[2]["table"] == "posterior" and rows[3]["table"] == "load"
    assert all(rows[2][k] > 0 for k in ("per_sample_generator", "philox_v1", "philox_v2", "philox_v3"))
    assert rows[3]["previous_load"] > 0 and rows[3]["load"] > 0
    out = capsys.readouterr().out
    assert "| cpu | 2x4x8x8 |" in out and "| 16x4x8x8 |" in out and "LatentSource.load" in out
    keys = torch.arange(2000)
    t, x_0, drop = bench.per_sample_generator_draws(torch.zeros(2000, 1, 4, 4), keys, step=1)
    assert t.shape == (2000,) and x_0.shape == (2000, 1, 4, 4) and drop.shape == (2000,)
    assert abs(t.mean().item() - 0.5) < 5 / math.sqrt(12 * 2000)
    assert abs(x_0.std().item() - 1) < 0.05


def test_quality_vs_nfe_smoke_rows_and_scores_equal_fid_callback(tmp_path: Path) -> None:
    """benchmarks/quality_vs_nfe.py --smoke on a 2-step checkpoint: one row per family x NFE x cfg with the
    budgeted NFE, the markdown table, and the Euler rows score exactly what FIDCallback logged for the
    same EMA weights, noise and settings (the benchmark scores as the demo does)."""
    import lightning.pytorch as pl

    from sit_lightning.callbacks import EMACallback, FIDCallback
    from sit_lightning.data import DigitsDataModule
    from sit_lightning.module import SiTModule
    from sit_lightning.sampling import SamplerSettings

    spec = importlib.util.spec_from_file_location("quality_vs_nfe", BENCHMARK.parent / "quality_vs_nfe.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(bench)

    torch.manual_seed(0)
    arch = SiTConfig(**TINY, input_size=8, in_channels=1, num_classes=10, patch_size=4, learn_sigma=False)
    module = SiTModule(arch=arch)
    with torch.no_grad():  # adaLN-zero output layers: untrained, every sampler would return its noise
        for p in module.network.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    cache = tmp_path / "cache"
    callback = FIDCallback(
        num_samples=bench.SMOKE_NUM_SAMPLES,
        settings=SamplerSettings(sampler="ode", method="euler", steps=bench.SMOKE_NFE[0]),
        cfg_scales=list(bench.CFG_SCALES),
        cache_dir=str(cache),
        floor=False,
        report=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EMACallback(decay=0.5), callback],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DigitsDataModule(global_batch_size=16))
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)

    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--smoke", "--cache_dir", str(cache)]
    report = bench.main([*argv, "--device", "cpu"])

    rows = report["rows"]
    expected = [(f, n, s) for s in bench.CFG_SCALES for f in bench.SMOKE_FAMILIES for n in bench.SMOKE_NFE]
    assert [(r["family"], r["nfe_budget"], r["cfg_scale"]) for r in rows] == expected
    for row in rows:
        assert row["nfe"] == row["nfe_budget"] and row["nfe_per_batch"] == [row["nfe_budget"]]
        assert 0.0 <= row["conditional_accuracy"] <= 1.0 and math.isfinite(row["fid"])
    logged = {r.cfg_scale: r for _, r in callback.history}
    same_as_callback = [
        r for r in rows if r["family"] == "ode-euler" and r["nfe_budget"] == bench.SMOKE_NFE[0]
    ]
    assert [r["cfg_scale"] for r in same_as_callback] == list(bench.CFG_SCALES)
    for row in same_as_callback:
        assert row["fid"] == pytest.approx(logged[row["cfg_scale"]].fid, rel=1e-9)
        assert row["conditional_accuracy"] == logged[row["cfg_scale"]].conditional_accuracy
    assert logged[1.0].fid != logged[1.5].fid  # guidance reached the samples

    assert json.loads((out / "quality_vs_nfe.json").read_text())["rows"] == rows
    table = (out / "quality_vs_nfe.md").read_text()
    assert "### cfg 1.5" in table and "| sampler | NFE 4 | NFE 8 |" in table
    assert table.count("| ODE Euler | ") == 2 and table.count("| SDE Euler-Maruyama, w_KL | ") == 2


def test_sampler_error_vs_nfe_rows_orders_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/sampler_error_vs_nfe.py at two budgets on few samples: one row per sampler and budget
    with the NFE it spent, the ODE errors fall with the method's order (Euler halves, Heun quarters), the
    printed table holds every row, and ``--plot`` writes a PNG."""
    spec = importlib.util.spec_from_file_location(
        "sampler_error_vs_nfe", BENCHMARK.parent / "sampler_error_vs_nfe.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(bench)

    png = tmp_path / "error.png"
    rows = bench.main(["--samples", "400", "--sde-samples", "400", "--nfe", "16,32", "--plot", str(png)])
    ode = {
        (r.sampler, r.nfe): r.trajectory
        for r in rows
        if r.sampler.startswith("ODE ") and "dopri5" not in r.sampler
    }
    assert set(ode) == {
        (f"ODE {m}", n) for m in ("euler", "midpoint", "heun", "rk4", "rk4_38") for n in (16, 32)
    }
    assert 1.7 < ode[("ODE euler", 16)] / ode[("ODE euler", 32)] < 2.3  # first order
    assert 2.5 < ode[("ODE heun", 16)] / ode[("ODE heun", 32)] < 5.0  # second order
    sde = [(r.sampler, r.nfe) for r in rows if r.sampler.startswith("SDE ")]
    assert sde == [("SDE euler", 16), ("SDE euler", 32), ("SDE heun", 15), ("SDE heun", 31)]
    table = capsys.readouterr().out
    assert all("| " + " | ".join(r.cells()) + " |" in table for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_repa_study_smoke_writes_both_arms_curves_and_the_posthoc_sweep(tmp_path: Path) -> None:
    """benchmarks/digits_repa_study.py --smoke (a 2-block width-32 SiT, 4 steps, 20 samples): both arms are
    trained and scored along the way and at the end (unguided and cfg 1.5), REPA changes the run, the
    post-hoc EMA sweep synthesises each sigma_rel from the snapshots, and JSON, markdown and PNG are written."""
    spec = importlib.util.spec_from_file_location(
        "digits_repa_study", BENCHMARK.parent / "digits_repa_study.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["arm"], r["seed"]) for r in rows] == [("base", 0), ("repa", 0)]
    for row in rows:
        assert [p["step"] for p in row["curve"]] == [2, 4] and row["steps"] == 4
        assert [f["cfg"] for f in row["final"]] == [1.0, 1.5]
        assert all(math.isfinite(f["fid"]) and 0 <= f["accuracy"] <= 1 for f in row["curve"] + row["final"])
    base, repa = rows
    assert base["final"][0]["fid"] != repa["final"][0]["fid"]  # the REPA term moved the weights
    sweep = base["posthoc"]["sweep"]
    assert [p["sigma_rel"] for p in sweep] == [0.03, 0.05] and "posthoc" not in repa
    assert all(math.isfinite(p["fid"]) and 0 <= p["fit_error"] < 1 for p in sweep)
    table = (tmp_path / "results.md").read_text()
    assert "| repa | 0 |" in table and "| 0.05 |" in table
    assert (tmp_path / "repa_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARK.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_lightning_overhead_smoke_times_both_recipes_and_writes_the_overhead(tmp_path: Path) -> None:
    """benchmarks/lightning_overhead.py: the plain loop and Trainer.fit each time their steps; the overhead
    is Lightning / plain - 1 of the best rounds; the plain loop really trains (weights and EMA move)."""
    bench = _load_benchmark("lightning_overhead")
    argv = [*TINY_ARGS, "--models", "SiT-B/2:2", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)]
    (row,) = bench.main(argv)
    assert row.error is None, row.error
    assert len(row.plain_rounds_ms) == len(row.lightning_rounds_ms) == 1
    assert row.overhead == pytest.approx(row.lightning_ms / row.plain_ms - 1)
    assert row.lightning_images_per_sec == pytest.approx(2 / (row.lightning_ms / 1e3))
    flops = forward_flops(SiTConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=32))
    assert row.train_flops_per_image == pytest.approx(3 * flops)
    written = json.loads((tmp_path / "lightning_overhead.json").read_text())
    assert written["rows"][0]["overhead"] == pytest.approx(row.overhead)
    assert "| SiT-B/2 | 2 |" in (tmp_path / "lightning_overhead.md").read_text()

    tt = sys.modules["train_throughput"]
    module = tt._build_module("SiT-B/2", torch.device("cpu"), tt.ArchOverrides(**TINY), seed=0)
    batches = bench.DeviceBatches(tt.FixedBatch.make(2, torch.device("cpu"), seed=0), total=2)
    assert [b["key"].tolist() for b in batches] == [[0, 1], [2, 3]]  # keyed by step * N + row
    before = [p.detach().clone() for p in module.parameters()]
    assert bench.plain_loop(module, batches, warmup=1, steps=1) > 0
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(module.parameters(), before, strict=True))
    assert moved == pytest.approx(2 * PAPER_LR, rel=0.05)  # two Adam steps of about lr each, at most


def test_sample_throughput_smoke_released_heun2_is_our_heun_and_bf16_is_close(tmp_path: Path) -> None:
    """benchmarks/sample_throughput.py --smoke: every variant timed; the released heun2 re-implementation
    (torchdiffeq on 3 grid points, forward_with_cfg on the doubled batch) gives our fp32 Heun samples."""
    bench = _load_benchmark("sample_throughput")
    report = bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    rows = {row.variant: row for row in report.rows}
    assert list(rows) == ["released", "fp32", "bf16", "bf16_compile"]
    for name in ("released", "fp32", "bf16"):
        assert rows[name].error is None and rows[name].images_per_sec > 0, rows[name]
        assert rows[name].nfe == 4  # 2 Heun steps, one doubled (guided) batch per evaluation
    assert "skipped on CPU" in rows["bf16_compile"].note
    assert rows["released"].vs_released == pytest.approx(1.0)
    assert rows["fp32"].latent_mad == 0.0
    assert rows["released"].latent_mad < 1e-5  # same scheme, same guidance (3 channels), same noise
    assert 0 < rows["bf16"].latent_mad < 0.05  # bf16 matmuls moved the samples, a little
    assert rows["bf16"].uint8_mad is None  # no VAE: latents only
    written = json.loads((tmp_path / "sample_throughput.json").read_text())
    assert written["summary"]["goal_speedup"] == 2.0 and len(written["rows"]) == 4

    # the released guidance: channels 0-2 guided, channel 3 conditional on the first half, null on the second
    net = lambda x, t, y: x * (1 + y.view(-1, 1, 1, 1).float())  # noqa: E731
    x = torch.ones(4, 4, 1, 1)
    out = bench.forward_with_cfg(net, x, torch.zeros(4), torch.tensor([1, 1, 0, 0]), 1.5)
    assert out[:, :3].flatten().unique().tolist() == [2.5]  # 1 + 1.5 * (2 - 1)
    assert out[:, 3].flatten().tolist() == [2.0, 2.0, 1.0, 1.0]
    # the written-out heun2 (for machines without torchdiffeq) is torchdiffeq's, bit for bit
    import torchdiffeq

    field = lambda t, y: torch.sin(3 * t) * y + torch.cos(y)  # noqa: E731
    y0, grid = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), torch.linspace(0, 1, 6)
    expected = torchdiffeq.odeint(field, y0, grid, method="heun2", atol=[1e-6], rtol=[1e-3])
    torch.testing.assert_close(bench.torchdiffeq_heun2(field, y0, grid), expected, rtol=0, atol=0)


def test_issue12_summary_judges_each_goal_from_the_session_files(tmp_path: Path) -> None:
    """benchmarks/issue12_summary.py: fit's img/s over the released recipe's, MFU against the measured rate,
    keyed / unkeyed, the Lightning overhead, peak memory and the sampling goals; n/a where not measured."""
    bench = _load_benchmark("issue12_summary")
    train = {
        "peak_tflops": 800.0,
        "rows": [
            {"model": "SiT-XL/2", "batch": 64, "recipe": "released", "images_per_sec": 170.0},
            {"model": "SiT-XL/2", "batch": 64, "recipe": "bf16_compile", "images_per_sec": 600.0,
             "vs_released": 600 / 170, "peak_gib": 30.0},
            {"model": "SiT-XL/2", "batch": 64, "recipe": "bf16_compile_unkeyed", "images_per_sec": 605.0},
            {"model": "SiT-B/2", "batch": 256, "recipe": "released", "images_per_sec": 765.0},
        ],
    }  # fmt: skip
    flops = 3 * 2 * 118.6e9
    fit = {"rows": [{"model": "SiT-XL/2", "batch": 64, "lightning_images_per_sec": 600.0, "plain_ms": 100.0,
                     "lightning_ms": 102.0, "overhead": 0.02, "peak_gib": 33.0, "train_flops_per_image": flops}]}  # fmt: skip
    sample = {"summary": {"best_variant": "bf16_compile", "speedup_vs_released": 2.5, "uint8_mad_vs_fp32": None,
                          "latent_mad_vs_fp32": 0.01}}  # fmt: skip
    for name, payload in (
        ("train_throughput", train),
        ("lightning_overhead", fit),
        ("sample_throughput", sample),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    goals = {g.name: g for g in bench.main(["--results", str(tmp_path)])}

    xl = goals["SiT-XL/2 b64: fit's step vs released"]
    assert xl.measured == pytest.approx(600 / 170) and xl.passed is True  # 3.53 >= 3.5
    assert goals["SiT-XL/2 b64: MFU through fit"].measured == pytest.approx(600 * flops / 800e12)
    assert goals["SiT-XL/2 b64: MFU through fit"].passed is False  # 0.534 < 0.55
    assert goals["SiT-XL/2 b64: peak memory (GiB)"].measured == 33.0  # fit's run, the larger
    assert goals["SiT-XL/2 b64: peak memory (GiB)"].passed is False
    assert goals["SiT-XL/2: keyed / unkeyed draws (img/s)"].passed is True  # 600 / 605 > 0.98
    assert goals["SiT-B/2: keyed / unkeyed draws (img/s)"].passed is None  # not measured
    assert goals["SiT-B/2 b256: fit's step vs released"].passed is None  # no fit row
    assert goals["SiT-XL/2 b64: Lightning overhead vs plain loop"].passed is True
    assert goals["sampling: guided Heun 250 NFE img/s vs released heun2 (bf16_compile)"].passed is True
    assert goals["sampling: uint8 MAD of bf16_compile vs our fp32"].passed is None  # no VAE
    assert "| FAIL |" in (tmp_path / "issue12_summary.md").read_text()


INDUCTOR_VARIABLES = (
    "TORCHINDUCTOR_CACHE_DIR",
    "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "TORCHINDUCTOR_AUTOGRAD_CACHE",
)
SESSION_PARTS = ("data", "train_xl", "fit_xl", "train_b2", "fit_b2", "sample", "draws_cuda")


def _unset_inductor_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset for the test; whatever the session sets is undone after it (setenv records the old state)."""
    for name in INDUCTOR_VARIABLES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_issue12_session_smoke_runs_every_part_in_one_process_and_ends_with_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/issue12_session.py --smoke: the inductor cache variables set (to OUT/inductor_cache), every
    part ``ok`` on the CPU but the CUDA draws (``skipped on CPU``), each part's JSON written, the per-model
    files joined by the summary, and session.json + issue12_summary.md with the goals and the parts."""
    import os

    _unset_inductor_variables(monkeypatch)
    session = _load_benchmark("issue12_session")
    result = session.main(["--smoke", "--out", str(tmp_path)])

    expected_env = {INDUCTOR_VARIABLES[0]: str(tmp_path / "inductor_cache")} | dict.fromkeys(
        INDUCTOR_VARIABLES[1:], "1"
    )
    assert {name: os.environ[name] for name in INDUCTOR_VARIABLES} == expected_env
    assert result["inductor"] == expected_env
    assert json.loads((tmp_path / "session.json").read_text()) == result and result["finished"]
    statuses = {part["name"]: part["status"] for part in result["parts"]}
    assert statuses == dict.fromkeys(SESSION_PARTS[:-1], "ok") | {"draws_cuda": "skipped on CPU"}
    for part in result["parts"][:-1]:
        assert 0 < part["seconds"] <= part["limit_s"] and part["started_s"] >= 0
    assert result["elapsed_s"] < 15 and result["options"]["smoke"] is True

    draws = json.loads((tmp_path / "keyed_draws.json").read_text())
    assert [row["table"] for row in draws["rows"]] == ["posterior", "load"]  # the data path, on the CPU
    assert draws["settings"]["threads"] == 1
    for name, model in (("xl", "SiT-XL/2"), ("b2", "SiT-B/2")):
        train = json.loads((tmp_path / f"train_throughput_{name}.json").read_text())
        rows = {row["recipe"]: row for row in train["rows"]}
        assert rows["released"]["model"] == model and rows["released"]["images_per_sec"] > 0
        assert rows["bf16"]["images_per_sec"] > 0 and "skipped on CPU" in rows["bf16_compile"]["note"]
        (fit,) = json.loads((tmp_path / f"lightning_overhead_{name}.json").read_text())["rows"]
        assert fit["model"] == model and fit["overhead"] is not None
    sample = json.loads((tmp_path / "sample_throughput.json").read_text())
    assert sample["summary"]["speedup_vs_released"] is not None

    goals = {goal["name"]: goal for goal in json.loads((tmp_path / "issue12_summary.json").read_text())}
    assert goals["SiT-XL/2 b2: fit's step vs released"]["measured"] is not None  # _xl files joined
    assert goals["SiT-B/2 b4: fit's step vs released"]["measured"] is not None  # _b2 files joined
    assert goals["data: posterior noise draw (CPU) / per-sample generators"]["measured"] > 0
    table = (tmp_path / "issue12_summary.md").read_text()
    assert "| goal | measured | asked | verdict | detail |" in table and "| data: posterior noise" in table
    assert "| part | status | limit s | seconds |" in table and "| draws_cuda | skipped on CPU |" in table
    assert result["parts_table"] in table


def test_issue12_session_cuts_a_part_at_its_limit_skips_what_cannot_start_and_still_summarizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part past its hard limit is ``cut`` (also when it swallows the PartTimeout), a failing one is
    ``error: ...`` and the run goes on, a part whose minimum no longer fits is ``not reached``; the run
    ends near its budget with session.json and the summary; with a tiny budget nothing starts."""
    import time

    _unset_inductor_variables(monkeypatch)
    session = _load_benchmark("issue12_session")
    budgets: list[float] = []

    def fails(_session: object, budget: float) -> None:
        raise RuntimeError("boom\nsecond line")

    def sleeps(_session: object, budget: float) -> None:
        budgets.append(budget)
        time.sleep(30)

    def swallows(_session: object, budget: float) -> None:
        try:
            time.sleep(30)
        except session.PartTimeout:
            pass  # as a library that caught it might: the part still counts as cut

    parts = [
        session.Part("fails", 10, 0.01, fails),
        session.Part("sleeps", 100, 0.1, sleeps, next_row_s=0.2),
        session.Part("swallows", 100, 0.1, swallows),
        session.Part("late", 80, 50, sleeps),
    ]
    monkeypatch.setattr(session, "plan_parts", lambda smoke: parts)
    start = time.perf_counter()
    result = session.main(["--smoke", "--budget", "2", "--out", str(tmp_path)])
    assert time.perf_counter() - start < 2.5

    statuses = {part["name"]: part["status"] for part in result["parts"]}
    assert statuses == {
        "fails": "error: RuntimeError: boom",
        "sleeps": "cut",
        "swallows": "cut",
        "late": "not reached",
    }
    by_name = {part["name"]: part for part in result["parts"]}
    assert by_name["sleeps"]["seconds"] == pytest.approx(by_name["sleeps"]["limit_s"], abs=0.15)
    assert budgets == [
        pytest.approx(by_name["sleeps"]["limit_s"] - 0.2, abs=0.05)
    ]  # the benchmark's --time-budget
    assert (
        by_name["late"]["seconds"] is None and json.loads((tmp_path / "session.json").read_text())["finished"]
    )
    table = (tmp_path / "issue12_summary.md").read_text()
    assert "| goal |" in table and "| sleeps | cut |" in table and "| late | not reached |" in table

    monkeypatch.undo()  # the real plan, with a budget too small for any part's minimum
    _unset_inductor_variables(monkeypatch)
    result = session.main(["--smoke", "--budget", "0.5", "--out", str(tmp_path / "tiny")])
    statuses = {part["name"]: part["status"] for part in result["parts"]}
    assert statuses == dict.fromkeys(SESSION_PARTS[:-1], "not reached") | {"draws_cuda": "skipped on CPU"}
    assert (tmp_path / "tiny" / "issue12_summary.md").is_file()


def test_time_budgets_of_lightning_overhead_rounds_and_sample_variants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lightning_overhead.py keeps a model's first round and skips the rest once its --time-budget is spent;
    sample_throughput.py skips the variants that would start after it; --result-name names the files."""
    import time

    overhead = _load_benchmark("lightning_overhead")
    fit = overhead.lightning_fit

    def slow_fit(
        *args: object,
    ) -> float:  # the first round outlasts the budget, whatever this machine's speed
        seconds = fit(*args)
        time.sleep(1.0)
        return seconds

    monkeypatch.setattr(overhead, "lightning_fit", slow_fit)
    argv = [*TINY_ARGS, "--models", "SiT-B/2:2", "--warmup", "1", "--steps", "1", "--rounds", "3"]
    (row,) = overhead.main([*argv, "--time-budget", "0.5", "--out", str(tmp_path), "--result-name", "fit_b2"])
    assert len(row.plain_rounds_ms) == len(row.lightning_rounds_ms) == 1 and row.overhead is not None
    assert row.note.startswith("1 of 3 rounds: time budget")
    assert json.loads((tmp_path / "fit_b2.json").read_text())["rows"][0]["note"] == row.note

    sample = _load_benchmark("sample_throughput")
    report = sample.main(["--smoke", "--device", "cpu", "--time-budget", "-1", "--variants", "released,fp32"])
    assert all(r.images_per_sec is None and r.note.startswith("skipped: time budget") for r in report.rows)
