"""Classifier-free guidance and autoguidance: exactness, interval, call counts, golden released CFG."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from sit_lightning.interpolants import GVP, PREDICTIONS, Linear
from sit_lightning.sampling.field import ModelField
from sit_lightning.sampling.guidance import ClassifierFreeGuidance
from sit_lightning.sampling.ode import sample_ode

F64 = torch.float64
NUM_CLASSES = 10
NULL = NUM_CLASSES
SHAPE = (4, 2, 2)  # (C, H, W) of the toy data


class ToyModel:
    """A nonlinear, row-independent "network" ``(x, t, y) -> (N, C, H, W)`` that records its batch sizes."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(NUM_CLASSES + 1, SHAPE[0], 1, 1, generator=g, dtype=F64)
        self.weight = torch.randn(SHAPE[0], SHAPE[0], generator=g, dtype=F64)
        self.batches: list[int] = []
        self.labels: list[Tensor] = []

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, shift: Tensor | None = None) -> Tensor:
        self.batches.append(x.shape[0])
        self.labels.append(y.clone())
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        # elementwise only, so every row is bitwise independent of the batch size (unlike a matmul)
        mixed = x * self.weight[0].reshape(1, -1, 1, 1) + x.flip(1) * self.weight[1].reshape(1, -1, 1, 1)
        out = torch.tanh(mixed) * (1 + t) + self.table[y] * (2 - t)
        if shift is not None:
            out = out + shift.reshape(-1, 1, 1, 1)
        return out


def batch(n: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g, dtype=F64), torch.randint(0, NUM_CLASSES, (n,), generator=g)


# ---- exactness -----------------------------------------------------------------------------------
def test_scale_one_is_bitwise_the_conditional_model_with_one_undoubled_call() -> None:
    model = ToyModel()
    x, y = batch()
    t = torch.linspace(0.1, 0.9, 6, dtype=F64)
    cfg = ClassifierFreeGuidance(model, 1.0, null_class=NULL)
    out = cfg(x, t, y)
    assert torch.equal(out, model(x, t, y))
    assert model.batches[0] == 6 and cfg.calls.main == 1 and cfg.calls.doubled == 0
    guide = ToyModel(seed=5)
    auto = ClassifierFreeGuidance(model, 1.0, guide=guide)
    assert torch.equal(auto(x, t, y), model(x, t, y)) and auto.calls.guide == 0 and guide.batches == []


@pytest.mark.parametrize("scale", [0.0, 0.5, 4.0])
def test_guided_output_is_uncond_plus_scale_times_difference_in_one_doubled_call(scale: float) -> None:
    model = ToyModel()
    x, y = batch()
    t = torch.full((6,), 0.4, dtype=F64)
    cfg = ClassifierFreeGuidance(model, scale, null_class=NULL)
    out = cfg(x, t, y)
    assert model.batches == [12]  # cond and uncond rows in ONE call
    assert torch.equal(model.labels[0][6:], torch.full((6,), NULL))
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    assert torch.allclose(out, uncond + scale * (cond - uncond), rtol=1e-14, atol=1e-14)
    if scale == 0.0:
        assert torch.equal(out, uncond)
    assert (cfg.calls.main, cfg.calls.doubled, cfg.calls.main_rows) == (1, 1, 12)


def test_guidance_channels_keep_the_conditional_output_in_the_other_channels() -> None:
    model = ToyModel()
    x, y = batch()
    t = torch.full((6,), 0.5, dtype=F64)
    full = ClassifierFreeGuidance(model, 3.0, null_class=NULL)(x, t, y)
    three = ClassifierFreeGuidance(model, 3.0, null_class=NULL, guidance_channels=3)(x, t, y)
    assert torch.equal(three[:, :3], full[:, :3])
    assert torch.equal(three[:, 3:], model(x, t, y)[:, 3:])
    assert not torch.allclose(three[:, 3:], full[:, 3:])
    with pytest.raises(ValueError, match="exceeds the model output's 4 channels"):
        ClassifierFreeGuidance(model, 3.0, null_class=NULL, guidance_channels=5)(x, t, y)


# ---- interval --------------------------------------------------------------------------------------
def test_interval_guides_inside_only_and_doubles_only_those_rows() -> None:
    model = ToyModel()
    x, y = batch()
    t = torch.tensor([0.0, 0.2, 0.3, 0.5, 0.7, 0.95], dtype=F64)  # 0.3 and 0.7 are the (closed) bounds
    shift = torch.arange(6, dtype=F64)  # a per-sample keyword must follow its rows
    cfg = ClassifierFreeGuidance(model, 2.5, null_class=NULL, interval=(0.3, 0.7))
    out = cfg(x, t, y, shift=shift)
    inside = torch.tensor([False, False, True, True, True, False])
    assert model.batches == [6 + 3]  # one call: all conditional rows + the 3 rows inside
    cond = model(x, t, y, shift=shift)
    uncond = model(x, t, torch.full_like(y, NULL), shift=shift)
    assert torch.equal(out[~inside], cond[~inside])  # outside: the conditional output, bitwise
    guided = uncond + 2.5 * (cond - uncond)
    assert torch.allclose(out[inside], guided[inside], rtol=1e-14, atol=1e-14)
    assert cfg.calls.doubled == 1 and cfg.calls.main_rows == 9


@pytest.mark.parametrize(("t", "rows_seen"), [(0.1, 6), (0.3, 12), (0.7, 12), (0.71, 6)])
def test_interval_with_a_scalar_time(t: float, rows_seen: int) -> None:
    model = ToyModel()
    x, y = batch()
    cfg = ClassifierFreeGuidance(model, 2.0, null_class=NULL, interval=(0.3, 0.7))
    out = cfg(x, torch.tensor(t, dtype=F64), y)
    assert model.batches == [rows_seen]
    if rows_seen == 6:
        assert torch.equal(out, model(x, torch.tensor(t, dtype=F64), y))


def test_interval_saves_the_predicted_number_of_doubled_calls_on_a_heun_grid() -> None:
    model = ToyModel()
    x, y = batch()
    lo, hi = 0.25, 0.6
    cfg = ClassifierFreeGuidance(model, 1.5, null_class=NULL, interval=(lo, hi))
    field = ModelField(cfg, Linear(), prediction="velocity", y=y)
    result = sample_ode(field, x, method="heun", steps=10)
    grid = result.times.tolist()
    # Heun evaluates at the start and the end of every step.
    eval_times = [t for a, b in zip(grid[:-1], grid[1:], strict=True) for t in (a, b)]
    predicted = sum(lo <= t <= hi for t in eval_times)
    assert 0 < predicted < len(eval_times)
    assert result.nfe == field.nfe == cfg.calls.main == 20  # a doubled pair is one call
    assert cfg.calls.doubled == predicted
    assert cfg.calls.main_rows == 6 * (20 + predicted)
    assert model.batches.count(12) == predicted and model.batches.count(6) == 20 - predicted


# ---- autoguidance ---------------------------------------------------------------------------------
def test_autoguidance_uses_the_guide_with_the_same_labels_and_counts_each_model() -> None:
    main, guide = ToyModel(seed=0), ToyModel(seed=3)
    x, y = batch()
    t = torch.full((6,), 0.5, dtype=F64)
    auto = ClassifierFreeGuidance(main, 2.0, guide=guide)
    out = auto(x, t, y)
    cond, weak = main(x, t, y), guide(x, t, y)
    assert torch.allclose(out, weak + 2.0 * (cond - weak), rtol=1e-14, atol=1e-14)
    assert torch.equal(guide.labels[0], y)  # the guide sees the real labels, not the null class
    assert main.batches[0] == 6 and guide.batches[0] == 6  # no doubled batch

    main2, guide2 = ToyModel(seed=0), ToyModel(seed=3)
    auto = ClassifierFreeGuidance(main2, 2.0, guide=guide2, interval=(0.0, 0.5))
    field = ModelField(auto, GVP(), y=y)
    result = sample_ode(field, x, method="euler", steps=8)
    predicted = sum(t <= 0.5 for t in result.times[:-1].tolist())
    assert (auto.calls.main, auto.calls.guide) == (8, predicted) == (result.nfe, len(guide2.batches))
    assert auto.calls.doubled == 0 and auto.calls.guide_rows == 6 * predicted


# ---- linearity: guiding then converting == converting then guiding ---------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_guidance_commutes_with_the_conversion_to_velocity(prediction: str) -> None:
    model = ToyModel()
    x, y = batch()
    t = torch.linspace(0.2, 0.8, 6, dtype=F64)
    scale = 3.0
    guided = ModelField(ClassifierFreeGuidance(model, scale, null_class=NULL), GVP(), prediction, y=y)
    cond = ModelField(model, GVP(), prediction, y=y).velocity(x, t)
    uncond = ModelField(model, GVP(), prediction, y=torch.full_like(y, NULL)).velocity(x, t)
    assert torch.allclose(guided.velocity(x, t), uncond + scale * (cond - uncond), rtol=1e-12, atol=1e-12)
    if prediction != "velocity":  # and the guided velocity is not the guided raw output
        assert not torch.allclose(
            guided.velocity(x, t), ClassifierFreeGuidance(model, scale, null_class=NULL)(x, t, y)
        )


# ---- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": -0.5, "null_class": NULL}, "finite and >= 0"),
        ({"scale": float("nan"), "null_class": NULL}, "finite and >= 0"),
        ({"scale": float("inf"), "null_class": NULL}, "finite and >= 0"),
        ({"scale": 2.0}, "needs null_class"),
        ({"scale": 2.0, "null_class": NULL, "guide": ToyModel()}, "null_class=None"),
        ({"scale": 2.0, "null_class": NULL, "interval": (0.6, 0.4)}, "0 <= t_lo <= t_hi <= 1"),
        ({"scale": 2.0, "null_class": NULL, "interval": (-0.1, 0.4)}, "0 <= t_lo <= t_hi <= 1"),
        ({"scale": 2.0, "null_class": NULL, "interval": (0.1, 1.5)}, "0 <= t_lo <= t_hi <= 1"),
        ({"scale": 2.0, "null_class": NULL, "guidance_channels": 0}, "guidance_channels"),
    ],
)
def test_invalid_settings_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassifierFreeGuidance(ToyModel(), **kwargs)


# ---- golden: the released three-channel forward_with_cfg ------------------------------------------
def tiny_released_sit(golden: dict) -> torch.nn.Module:
    from sit_lightning.models import SiT

    model = SiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
        learn_sigma=True,
    )  # fmt: skip
    state = {k.removeprefix("model."): v for k, v in golden.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model.eval()


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_three_channel_mode_reproduces_released_cfg(golden: dict) -> None:
    model = tiny_released_sit(golden)
    x, t, y, ref = golden["cfg3.x"], golden["cfg3.t"], golden["cfg3.y"], golden["cfg3.out"]
    n = x.shape[0] // 2  # the released input is [cond half; uncond half (y = 10)] with equal x and t
    assert torch.equal(x[:n], x[n:]) and torch.equal(y[n:], torch.full((n,), NULL))
    seen: list[int] = []
    counted = lambda x_, t_, y_: (seen.append(x_.shape[0]), model(x_, t_, y_))[1]  # noqa: E731
    cfg = ClassifierFreeGuidance(counted, 4.0, null_class=NULL, guidance_channels=3)
    with torch.no_grad():
        out = cfg(x[:n], t[:n], y[:n])
        uncond = model(x[:n], t[:n], y[n:])
        full = ClassifierFreeGuidance(model, 4.0, null_class=NULL)(x[:n], t[:n], y[:n])
    assert seen == [2 * n]
    assert rel_err(out, ref[:n]) < 1e-5
    # The released second half: the same guided channels 0-2, and channel 3 = the raw unconditional output.
    assert rel_err(out[:, :3], ref[n:, :3]) < 1e-5
    assert rel_err(uncond[:, 3], ref[n:, 3]) < 1e-5
    # Our default guides all channels: equal on channels 0-2, different on channel 3.
    assert torch.equal(full[:, :3], out[:, :3])
    assert rel_err(full[:, 3], ref[:n, 3]) > 1e-2  # measured 0.04, i.e. 4000 x the agreement above
