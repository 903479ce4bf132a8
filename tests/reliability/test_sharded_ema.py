"""Sharded EMA (issue 11, point 4): under FSDP2 the EMA is saved in the DCP shards, like the weights.

One torchrun launch (2 processes, gloo; ``sharded_ema_run.py two``) trains, saves ``half.ckpt/`` and
resumes it; this process then resumes the same folder on a 1-rank FSDP2 mesh. What a user relies on:
no rank gathers the EMA to save it; a resume at the same world size is bit-identical; at another world
size the EMA comes back bit for bit and training continues within 1e-5 (norm-relative) of one process;
one consolidated file holds the EMA where ``sample`` and ``convert`` read it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "lightning") not in sys.path:  # lightning_toy; appended, never shadowing
    sys.path.append(str(REPO / "tests" / "lightning"))

from sit_lightning import convert_cli  # noqa: E402
from sit_lightning.callbacks import ema as ema_module  # noqa: E402

HERE = Path(__file__).resolve().parent
REL_TOL = 1e-5  # as tests/lightning/test_lightning_resume.py: float32 summation orders only
SECTIONS = ("weights", "optimizer", "ema")
NETWORK = "network."


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _resume_on_one_rank(workdir: Path) -> None:
    """``sharded_ema_run.one`` in this process (a launch saved); its process group and env are undone."""
    sys.path.insert(0, str(HERE))
    saved_env = dict(os.environ)
    try:
        import sharded_ema_run

        sharded_ema_run.one(workdir)
    finally:
        sys.path.remove(str(HERE))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("sharded_ema")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "sharded_ema_run.py"), "two", str(workdir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _resume_on_one_rank(workdir)
    finally:
        torch.use_deterministic_algorithms(before)
    return workdir


def test_saving_gathers_nothing_and_each_rank_writes_its_own_shards(runs) -> None:
    assert int(_load(runs / "save_gathers.pt")) == 0  # no DTensor.full_tensor() while saving, on any rank
    folder = runs / "half.ckpt"
    meta = torch.load(folder / "meta.pt", weights_only=False)
    assert meta["callbacks"]["EMACallback"] == {
        "decay": 0.5, "num_updates": 2, "ema": None, "ema_prefix": "_ema."
    }  # fmt: skip
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    saved = _load(runs / "saved_ema.pt")
    for name, full in saved.items():
        entry = stored[f"state_dict._ema.{name}"]
        assert tuple(entry.size) == tuple(full.shape)
        # FSDP2 shards dim 0 over the 2 ranks (torch.chunk): each rank wrote its own half, no rank the whole
        rows = sorted(c.sizes[0] for c in entry.chunks)
        assert rows == [full.shape[0] // 2, -(-full.shape[0] // 2)], name


def test_resume_at_the_same_world_size_is_bit_identical(runs) -> None:
    saved, restored = _load(runs / "saved_ema.pt"), _load(runs / "restored2_ema.pt")
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    straight, resumed = _load(runs / "straight2.pt"), _load(runs / "resumed2.pt")
    for section in SECTIONS:
        assert straight[section].keys() == resumed[section].keys()
        differ = [k for k in straight[section] if not torch.equal(straight[section][k], resumed[section][k])]
        assert not differ, f"{section} differs after a 2-process resume: {differ[:5]}"


def test_resume_at_another_world_size(runs) -> None:
    saved, restored = _load(runs / "saved_ema.pt"), _load(runs / "restored1_ema.pt")
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)  # DCP reshards by copying
    # saved by 2 processes, resumed by 1: as the straight 2-process run up to summation order
    straight, resumed = _load(runs / "straight2.pt"), _load(runs / "resumed1.pt")
    for section in SECTIONS:
        assert straight[section].keys() == resumed[section].keys(), section
        for key, ref in straight[section].items():
            error = ((resumed[section][key] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            assert error <= REL_TOL, f"{section}/{key} differs by {error:.2e} (norm-relative)"
    moved = sum((resumed["ema"][k] - restored[k]).norm() for k in restored)
    assert moved > 0.01  # the resumed run went on updating the restored EMA


def test_one_consolidated_file_is_what_sample_and_convert_read(runs, tmp_path) -> None:
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    from sit_lightning.module import SiTModule

    folder = runs / "half.ckpt"
    saved = {k.removeprefix(NETWORK): v for k, v in _load(runs / "saved_ema.pt").items()}
    out = convert_cli.consolidate_checkpoint(folder, tmp_path / "half.consolidated.ckpt")
    checkpoint = _load(out)
    assert not [k for k in checkpoint["state_dict"] if not k.startswith(NETWORK)]  # weights only
    assert "ema_prefix" not in checkpoint["callbacks"]["EMACallback"]
    # what `convert` reads (and `sample`, which reads the weights through it) ...
    for source in (out, folder):
        ema = convert_cli.read_lightning(source).ema
        assert ema is not None and ema.keys() == saved.keys()
        assert all(torch.equal(ema[k], saved[k]) for k in saved), source
    # ... and the module `sample` builds with Lightning's strict loader
    module = SiTModule.load_from_checkpoint(out, map_location="cpu")
    model = convert_cli.read_lightning(folder).model
    assert all(torch.equal(v, model[k]) for k, v in module.network.state_dict().items())
    result = convert_cli.convert_checkpoint(str(folder), str(tmp_path / "ema.safetensors"), to="safetensors")
    from safetensors.torch import load_file

    written = load_file(str(result.output))
    assert all(torch.equal(written[k], saved[k]) for k in saved)
    # a file from Lightning's own consolidation (EMA still under "_ema." in state_dict) reads the same
    raw = tmp_path / "raw.ckpt"
    torch.save(_load_distributed_checkpoint(folder), raw)
    ema = convert_cli.read_lightning(raw).ema
    assert ema is not None and all(torch.equal(ema[k], saved[k]) for k in saved)


def test_convert_names_the_layout_the_callback_writes() -> None:
    assert convert_cli.SHARDED_EMA_PREFIX == ema_module.SHARDED_EMA_PREFIX
    assert convert_cli.SHARDED_EMA_FIELD == ema_module.SHARDED_EMA_FIELD
    assert convert_cli.EMA_STATE_KEY == ema_module.EMACallback().state_key
