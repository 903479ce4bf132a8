"""Loading released SiT weights: file formats, training checkpoints, layout inference and its errors."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sit_lightning.models import (
    SiT,
    build_sit,
    load_released_sit,
    load_released_state_dict,
    sit_from_state_dict,
)
from sit_lightning.models.checkpoint import read_layout

TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)


class Untrusted:
    """A class a weights-only unpickler must refuse to build."""


def random_tiny(seed: int, **overrides) -> SiT:
    torch.manual_seed(seed)
    model = SiT(**{**TINY, **overrides})
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.1)
    return model.eval()


def inputs(n: int = 3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 4, 8, 8, generator=g), torch.rand(n, generator=g), torch.tensor([1, 10, 4][:n])


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bare_state_dict_round_trip(tmp_path):
    model = random_tiny(0)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    assert same_weights(load_released_state_dict(path), model.state_dict())
    loaded = load_released_sit(path, num_heads=4, input_size=8)
    assert not loaded.training
    assert not loaded.pos_embed.requires_grad
    assert all(p.requires_grad for n, p in loaded.named_parameters() if n != "pos_embed")
    assert (loaded.num_classes, loaded.class_dropout_prob, loaded.learn_sigma) == (10, 0.1, True)
    x, t, y = inputs()
    assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = random_tiny(0)
    path = tmp_path / "ddp_compiled.pth"
    torch.save({f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}, path)
    assert same_weights(load_released_state_dict(path), model.state_dict())


def test_training_checkpoint_with_namespace_args_takes_ema_by_default(tmp_path):
    raw, ema = random_tiny(1), random_tiny(2)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=1e-4)
    path = tmp_path / "0050000.pt"
    args = argparse.Namespace(model="SiT-XL/2", image_size=256, path_type="Linear", global_seed=0)
    torch.save(
        {"model": raw.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(), "args": args},
        path,
    )
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):  # why the fallback exists
        torch.load(path, weights_only=True)
    assert same_weights(load_released_state_dict(path), ema.state_dict())
    assert same_weights(load_released_state_dict(path, which="model"), raw.state_dict())
    x, t, y = inputs()
    assert torch.equal(load_released_sit(path, num_heads=4, input_size=8)(x, t, y), ema(x, t, y))
    with pytest.raises(ValueError, match=r"which must be one of \('ema', 'model'\), got 'best'"):
        load_released_state_dict(path, which="best")


def test_only_namespace_is_allowed_never_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"ema": random_tiny(0).state_dict(), "args": argparse.Namespace(a=1), "x": Untrusted()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Untrusted"):
        load_released_state_dict(path)


def test_checkpoint_without_requested_weights(tmp_path):
    path = tmp_path / "ema_only.pt"
    torch.save({"ema": random_tiny(0).state_dict(), "steps": 10}, path)
    with pytest.raises(
        ValueError, match=r"without 'model' weights; its top-level keys are \['ema', 'steps'\]"
    ):
        load_released_state_dict(path, which="model")


def test_safetensors(tmp_path):
    model = random_tiny(3)
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_released_sit(path, num_heads=4, input_size=None)
    assert loaded.input_size == 8
    x, t, y = inputs()
    assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_bf16_file_loads_as_float32_model(tmp_path):
    model = random_tiny(3)
    path = tmp_path / "half.pt"
    torch.save({k: v.bfloat16() for k, v in model.state_dict().items()}, path)
    loaded = load_released_sit(path, num_heads=4, input_size=8)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.final_layer.linear.weight, model.final_layer.linear.weight.bfloat16().float())


def test_golden_file_through_the_loader(tmp_path, golden):
    # ``golden`` is the root conftest's fixture: a skip locally, a failure under CI when it is missing
    path = tmp_path / "golden_model.pt"
    torch.save({k.removeprefix("model."): v for k, v in golden.items() if k.startswith("model.")}, path)
    model = load_released_sit(path, num_heads=4, input_size=8, num_classes=10)
    out = model(golden["forward.x"], golden["forward.t"], golden["forward.y"])
    assert ((out - golden["forward.out"]).norm() / golden["forward.out"].norm()).item() < 1e-5


def test_learn_sigma_is_inferred_and_checked(tmp_path):
    path = tmp_path / "no_sigma.pt"
    torch.save(random_tiny(0, learn_sigma=False).state_dict(), path)
    assert load_released_sit(path, num_heads=4, input_size=8).learn_sigma is False
    with pytest.raises(
        ValueError, match=r"learn_sigma=True expects final_layer.linear with 32 rows, found 16"
    ):
        load_released_sit(path, num_heads=4, input_size=8, learn_sigma=True)
    state = random_tiny(0).state_dict()
    state["final_layer.linear.weight"] = state["final_layer.linear.weight"][:24]
    with pytest.raises(ValueError, match=r"has 24 rows; expected 32 \(learn_sigma=True\) or 16"):
        sit_from_state_dict(state, num_heads=4, input_size=8)


def test_class_count_is_inferred_and_checked():
    with_null = random_tiny(0).state_dict()
    assert sit_from_state_dict(with_null, num_heads=4, input_size=8).num_classes == 10
    without_null = random_tiny(0, class_dropout_prob=0.0).state_dict()
    model = sit_from_state_dict(without_null, num_heads=4, input_size=8, num_classes=10)
    assert (model.num_classes, model.class_dropout_prob) == (10, 0.0)
    with pytest.raises(ValueError, match=r"num_classes=1000 expects a label table of 1001 rows .* found 11"):
        sit_from_state_dict(with_null, num_heads=4, input_size=8, num_classes=1000)


def test_wrong_layout_errors_name_expected_and_found():
    state = random_tiny(0).state_dict()
    with pytest.raises(
        ValueError,
        match=r"does not fit SiT-S/2: expected depth=12, hidden_size=384, patch_size=2, "
        r"found depth=2, hidden_size=64, patch_size=2",
    ):
        sit_from_state_dict(state, "SiT-S/2")
    with pytest.raises(ValueError, match=r"matches no preset; pass num_heads"):
        sit_from_state_dict(state, input_size=8)
    with pytest.raises(ValueError, match=r"unknown SiT preset 'SiT-M/2'; choose one of SiT-XL/2"):
        sit_from_state_dict(state, "SiT-M/2")
    with pytest.raises(
        ValueError,
        match=r"input_size=32 with patch_size=2 expects pos_embed of 256 tokens, found 16 \(input_size=8",
    ):
        sit_from_state_dict(state, num_heads=4)
    del state["pos_embed"]
    with pytest.raises(ValueError, match=r"not a SiT state dict: missing \['pos_embed'\]"):
        sit_from_state_dict(state, num_heads=4)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"expected a suffix in \('.pt', '.pth', '.safetensors'\), got '.bin'"
    ):
        load_released_state_dict(path)


def test_released_xl2_layout_is_recognised_without_arguments():
    # The published SiT-XL-2-256x256.pt layout, on the meta device: everything is read from shapes.
    with torch.device("meta"):
        state = build_sit("SiT-XL/2").state_dict()
        state_512 = build_sit("SiT-XL/2", input_size=64).state_dict()
    layout = read_layout(state)
    assert (layout.depth, layout.hidden_size, layout.patch_size, layout.num_tokens) == (28, 1152, 2, 256)
    assert (layout.label_rows, layout.final_rows, layout.mlp_hidden) == (1001, 32, 4608)
    model = sit_from_state_dict(state, device="meta")
    assert (model.num_heads, model.num_classes, model.learn_sigma, model.input_size) == (16, 1000, True, 32)
    assert model.mlp_ratio == 4.0
    with pytest.raises(
        ValueError, match=r"expects pos_embed of 256 tokens, found 1024 \(input_size=64, 512 px"
    ):
        sit_from_state_dict(state_512, "SiT-XL/2", device="meta")
    assert sit_from_state_dict(state_512, "SiT-XL/2", input_size=64, device="meta").num_tokens == 1024
    with pytest.raises(ValueError, match=r"SiT-L/2: expected depth=24, hidden_size=1024"):
        sit_from_state_dict(state, "SiT-L/2", device="meta")
