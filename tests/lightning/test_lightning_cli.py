"""The ``sit-lightning`` CLI: every config parses to what its name says, typos fail with the choices,
data that does not fit fails with one line, and the digits demo trains through ``main()``.

The paper configs say only what differs from ``configs/base/`` (``base:``); each still resolves to
exactly the ``--print_config`` text in ``tests/fixtures/print_config/`` (regenerate with
``.venv/bin/python tests/fixtures/print_config/regenerate.py`` and review the diff)."""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import json
import re
from pathlib import Path

import torch
import yaml

from sit_lightning.cli import expand_config_bases, main
from sit_lightning.interpolants import GVP
from sit_lightning.models import SIT_PRESETS, SiTConfig
from sit_lightning.module import SiTModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "print_config"
REGENERATE = ".venv/bin/python tests/fixtures/print_config/regenerate.py"
PAPER_CONFIG = re.compile(
    r"sit_(s|b|l|xl)_(linear|gvp|vp)(_512|_score|_score_lambda|_score_likelihood|_noise|_repa)?\.yaml"
)
ARCH = {"s": "SiT-S/2", "b": "SiT-B/2", "l": "SiT-L/2", "xl": "SiT-XL/2"}
WEIGHT = {"_score_lambda": "velocity", "_score_likelihood": "likelihood"}


def _run(args: list[str]) -> tuple[int, str, str]:
    """``main(args)`` -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@functools.cache
def _printed(config: Path, *extra: str) -> str:
    """``sit-lightning fit --config CONFIG *EXTRA --print_config`` -> stdout (parsed once per session)."""
    code, out, err = _run(["fit", "--config", str(config), *extra, "--print_config"])
    assert code == 0, err[-2000:]
    return out


def _resolved(config: Path, *extra: str) -> dict:
    return yaml.safe_load(_printed(config, *extra))


def _paper_configs() -> list[Path]:
    configs = [p for p in sorted(CONFIGS.glob("*.yaml")) if PAPER_CONFIG.fullmatch(p.name)]
    assert len(configs) == 20, [p.name for p in configs]
    return configs


def _arch(model: dict) -> SiTConfig:
    """The network a resolved ``model:`` section builds (``arch`` is a preset name or SiTConfig's fields)."""
    return SIT_PRESETS[model["arch"]] if isinstance(model["arch"], str) else SiTConfig(**model["arch"])


def test_every_config_parses_and_matches_its_name() -> None:
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert {"digits.yaml", "sit_b_gvp.yaml", "sit_xl_linear_512.yaml", "sit_b_vp_noise.yaml"} <= set(names)
    for name in names:
        if name == "strategy_fsdp2.yaml":  # an overlay: parse it on top of a model config
            config = _resolved(CONFIGS / "sit_xl_linear.yaml", "--config", str(CONFIGS / name))
            assert config["trainer"]["strategy"]["class_path"].endswith("ModelParallelStrategy")
            continue
        config = _resolved(CONFIGS / name)
        match = PAPER_CONFIG.fullmatch(name)
        if match is None:
            assert name == "digits.yaml", f"unexpected config {name}"
            assert config["data"]["class_path"] == "sit_lightning.data.DigitsDataModule"
            assert _arch(config["model"]).in_channels == 1 and _arch(config["model"]).input_size == 8
            continue
        size, path, variant = match.group(1), match.group(2), match.group(3) or ""
        objective = config["model"]["objective"]["init_args"]
        assert _arch(config["model"]).preset_name == ARCH[size], name
        assert objective["path"] == path, name
        assert objective["prediction"] == (
            "noise" if variant == "_noise" else "score" if "score" in variant else "velocity"
        )
        assert objective["loss_weight"] == WEIGHT.get(variant, "none"), name
        assert _arch(config["model"]).input_size == (64 if variant == "_512" else 32), name
        assert config["data"]["init_args"]["global_batch_size"] == 256, name
        assert config["trainer"]["precision"] == "bf16-mixed", name
        ema = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EMACallback")]
        assert ema and ema[0]["init_args"]["decay"] == 0.9999, name


def test_every_paper_config_prints_exactly_its_fixture() -> None:
    # the fixtures were printed before the configs moved what they share to configs/base/
    for config in _paper_configs():
        printed, expected = _printed(config), (FIXTURES / config.name).read_text()
        diff = "".join(
            difflib.unified_diff(expected.splitlines(True), printed.splitlines(True), "fixture", "now")
        )
        assert printed == expected, f"{config.name} resolves differently; if meant, run {REGENERATE}\n{diff}"
        assert "base" not in yaml.safe_load(printed)  # merged away: not a setting of the run


def test_experiment_configs_say_only_what_differs_from_their_base() -> None:
    for config in _paper_configs():
        content = yaml.safe_load(config.read_text())
        assert set(content) == {"base", "model"}, f"{config.name}: {sorted(content)}"
    shared = yaml.safe_load((CONFIGS / "base" / "imagenet256.yaml").read_text())
    assert {"trainer", "data"} <= set(shared) and "base" not in shared


def test_bases_come_first_depth_first_each_once(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    root, left, right, leaf = (
        tmp_path / n for n in ("root.yaml", "sub/left.yaml", "right.yaml", "leaf.yaml")
    )
    leaf.write_text("trainer: {max_steps: 1}\n")
    left.write_text("base: ../leaf.yaml\n")  # relative to the file, not to the working directory
    right.write_text("base: leaf.yaml\n")
    root.write_text("base: [sub/left.yaml, right.yaml]\n")
    assert expand_config_bases(["fit", "-c", str(root), "--config=x: 1", "--trainer.max_steps", "2"]) == [
        "fit", "--config", str(leaf), "--config", str(left), "--config", str(right), "--config", str(root),
        "--config", "x: 1", "--trainer.max_steps", "2",
    ]  # fmt: skip
    assert expand_config_bases(["fit", "--config", str(leaf)]) == ["fit", "--config", str(leaf)]


def test_a_file_overrides_its_base_key_by_key(tmp_path) -> None:
    config = tmp_path / "short.yaml"
    config.write_text(f"base: {CONFIGS / 'sit_b_gvp.yaml'}\ntrainer:\n  max_steps: 10\n")
    resolved = _resolved(config)
    assert resolved["trainer"]["max_steps"] == 10
    assert resolved["trainer"]["precision"] == "bf16-mixed"  # from the base's base
    assert [c["class_path"].rsplit(".", 1)[-1] for c in resolved["trainer"]["callbacks"]] == [
        "EMACallback", "AtomicModelCheckpoint"
    ]  # fmt: skip
    assert resolved["model"]["objective"]["init_args"]["path"] == "gvp"


def test_a_missing_or_circular_base_is_a_one_line_error(tmp_path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text("base: base/nowhere.yaml\nmodel: {arch: SiT-B/2}\n")
    code, _, err = _run(["fit", "--config", str(config), "--print_config"])
    assert code == 2 and "Traceback" not in err
    assert f"sit-lightning: error: {config}: base file 'base/nowhere.yaml' does not exist" in err
    assert str(tmp_path / "base" / "nowhere.yaml") in err
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: [a.yaml]\n")
    code, _, err = _run(["fit", "--config", str(a)])
    assert code == 2 and f"config bases form a cycle: {a} -> {b} -> {a}" in err
    a.write_text("base: {trainer: 1}\n")
    code, _, err = _run(["fit", "--config", str(a)])
    assert code == 2 and "'base' must be a path or a list of paths" in err
    code, _, err = _run(["fit", "--base", str(b)])
    assert code == 2 and "'base' is a key of config files, not an option" in err
    code, _, err = _run(["fit", "--config", "{base: b.yaml}"])
    assert code == 2 and "'base' is read from config files only" in err


def test_a_later_config_overrides_an_earlier_one_bases_included() -> None:
    # sit_xl_linear.yaml sets what sit_b_linear.yaml sets, so the pair resolves to sit_xl_linear.yaml alone
    pair = _printed(CONFIGS / "sit_b_linear.yaml", "--config", str(CONFIGS / "sit_xl_linear.yaml"))
    assert pair == (FIXTURES / "sit_xl_linear.yaml").read_text()
    overlay = _resolved(CONFIGS / "sit_xl_linear.yaml", "--config", str(CONFIGS / "strategy_fsdp2.yaml"))
    assert overlay["trainer"]["strategy"]["class_path"].endswith("ModelParallelStrategy")
    assert overlay["trainer"]["max_steps"] == 7_000_000 and len(overlay["trainer"]["callbacks"]) == 2


def test_print_config_shows_the_full_resolved_configuration() -> None:
    config = _resolved(CONFIGS / "sit_b_gvp.yaml")
    model = config["model"]
    assert model["optimizer"] == {
        "class_path": "sit_lightning.module.PaperAdamW",
        "init_args": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "fused": None},
    }
    assert model["lr_scheduler"] is None  # constant learning rate
    assert model["arch"] == "SiT-B/2"
    arch = _arch(model)
    assert (arch.class_dropout_prob, arch.learn_sigma, arch.num_classes) == (0.1, True, 1000)
    assert model["objective"]["init_args"]["time_sampler"] is None  # uniform
    assert config["seed_everything"] == 0
    assert config["trainer"]["max_steps"] == 400_000
    assert config["data"]["init_args"]["data_dir"] == "data/imagenet256_latents"
    assert "num_workers" in config["data"]["init_args"]  # defaults of the datamodule are listed too


def test_typos_fail_at_parse_time_listing_the_choices(tmp_path) -> None:
    code, _, err = _run(["fit", "--config", str(CONFIGS / "sit_b_gvp.yaml"), "--model.arch", "SiT-M/2"])
    assert code != 0 and "SiT-XL/2" in err and "SiT-M/2" in err
    code, _, err = _run(
        [
            "fit",
            "--config",
            str(CONFIGS / "sit_b_gvp.yaml"),
            "--model.objective.init_args.prediction",
            "velocty",
        ]
    )
    assert code != 0 and all(choice in err for choice in ("velocity", "score", "noise"))
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        (CONFIGS / "sit_b_gvp.yaml")
        .read_text()
        .replace("  arch:", "  archh:")
        .replace("base: ", f"base: {CONFIGS}/")
    )
    code, _, err = _run(["fit", "--config", str(typo), "--print_config"])
    assert code != 0 and "archh" in err


def test_help_lists_every_subcommand() -> None:
    code, out, _ = _run(["--help"])
    assert code == 0
    assert (
        "{fit,validate,test,predict,precompute-latents,convert,sample,fid,posthoc-ema}" in out
    )  # a choice like the Trainer's, listed last
    assert "Encode an ImageFolder tree into VAE latent shards" in " ".join(out.split())  # however wrapped
    code, out, _ = _run(["precompute-latents", "--help"])
    assert code == 0 and "image_root" in out and "output_dir" in out


def test_data_that_does_not_fit_the_model_is_a_one_line_error(tmp_path) -> None:
    code, _, err = _run(
        ["fit", "--config", str(CONFIGS / "digits.yaml"), "--model.arch.input_size", "16",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    )  # fmt: skip
    assert code == 2
    assert "sit-lightning: error: the data's latent shape (1, 8, 8) does not fit the model" in err
    assert "Traceback" not in err


def test_a_schedule_shorter_than_the_run_is_a_one_line_error(tmp_path) -> None:
    # the demo's OneCycleLR lasts 1,200 steps; torch itself would fail only at step 1,201
    code, _, err = _run(
        ["fit", "--config", str(CONFIGS / "digits.yaml"), "--trainer.max_steps", "1201",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    )  # fmt: skip
    assert code == 2
    assert "OneCycleLR lasts total_steps=1200 optimizer steps but trainer.max_steps is 1201" in err
    assert "Traceback" not in err


def test_the_demo_checkpoints_its_final_weights() -> None:
    # the report scores the weights of the last step; the notebook loads the newest checkpoint
    config = yaml.safe_load((CONFIGS / "digits.yaml").read_text())
    trainer = config["trainer"]
    (checkpoint,) = [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert trainer["max_steps"] % checkpoint["init_args"]["every_n_train_steps"] == 0
    assert config["model"]["lr_scheduler"]["init_args"]["total_steps"] == trainer["max_steps"]


def _smoke_callbacks() -> str:
    """The demo's callbacks (same order, same classes) with sizes small enough for CI."""
    demo = yaml.safe_load((CONFIGS / "digits.yaml").read_text())["trainer"]["callbacks"]
    small = {
        "SampleGridCallback": {
            "every_n_steps": 3,
            "num_per_class": 1,
            "settings": {"method": "heun", "steps": 2},
        },
        "FIDCallback": {"num_samples": 40, "settings": {"method": "heun", "steps": 2}, "batch_size": 20},
    }
    for callback in demo:
        callback.setdefault("init_args", {}).update(small.get(callback["class_path"].rsplit(".", 1)[-1], {}))
    return yaml.safe_dump(demo, default_flow_style=True, width=10_000).strip()


def test_digits_demo_trains_a_few_steps_through_main(tmp_path) -> None:
    """fit 3 steps with a validation at step 3 and a checkpoint, then validate from that checkpoint.

    The demo's own callbacks run too (grid, FID report with and without guidance, throughput), shrunk.
    """
    args = [
        "--config", str(CONFIGS / "digits.yaml"), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.check_val_every_n_epoch", "1",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--model.objective.init_args.path", "gvp",
    ]  # fmt: skip
    probe = tmp_path / "wiring.json"
    callbacks = (
        _smoke_callbacks()[:-1]
        + f", {{class_path: wiring_probe.WiringProbe, init_args: {{path: '{probe}'}}}}]"
    )
    code, out, err = _run(["fit", *args, "--trainer.callbacks", callbacks])
    assert code == 0, err[-3000:]
    # what the CLI adds to every fit: atomic checkpoint writes and the preemption handler
    wiring = json.loads(probe.read_text())
    assert wiring["checkpoint_io"] == "AtomicCheckpointIO"
    assert "PreemptionCallback" in wiring["callbacks"] and "AtomicModelCheckpoint" in wiring["callbacks"]
    report = out + err
    assert "conditional accuracy" in report.lower(), report[-3000:]
    assert sorted(tmp_path.rglob("*.png")), "the demo writes a PNG grid of samples"
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert checkpoints, f"no checkpoint under {tmp_path}"
    checkpoint = torch.load(checkpoints[-1], weights_only=False)
    assert checkpoint["global_step"] == 3
    assert checkpoint["loss_profile"]["values"].shape == (20,)
    assert torch.isfinite(checkpoint["loss_profile"]["values"]).all()
    ema_state = next(v for k, v in checkpoint["callbacks"].items() if "EMACallback" in k)
    assert ema_state["num_updates"] == 3
    assert ema_state["ema"].keys() == {k for k in checkpoint["state_dict"]}
    code, _, err = _run(["validate", *args, "--ckpt_path", str(checkpoints[-1])])
    assert code == 0, err[-3000:]
    # load_from_checkpoint rebuilds the configured objective (GVP here), weights and loss profile
    module = SiTModule.load_from_checkpoint(checkpoints[-1], weights_only=False)
    assert isinstance(module.objective.interpolant, GVP)
    trained = checkpoint["state_dict"]["network.final_layer.linear.weight"]
    assert trained.abs().sum() > 0  # moved away from its zero initialisation
    assert all(torch.equal(v, checkpoint["state_dict"][k]) for k, v in module.state_dict().items())
    assert torch.equal(module.loss_profile.values, checkpoint["loss_profile"]["values"])
