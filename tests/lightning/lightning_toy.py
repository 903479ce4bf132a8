"""Test helpers: a random-latent DataModule that splits one global batch across ranks, and a tiny SiT.

Random 4x8x8 "latents" stand in for real data; what matters is that the global batch of step s is the
same set of samples for any world size (DistributedSampler over one seeded permutation), so runs on
1 and 2 processes can be compared tensor by tensor.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sit_lightning.models import SiTConfig

#: A SiT small enough for CPU tests; ``SiTConfig(**dict(TINY_ARCH, ...))`` changes a field.
TINY_ARCH: dict[str, Any] = dict(
    input_size=8, in_channels=4, num_classes=3, depth=2, hidden_size=32, num_heads=2, patch_size=2
)
TINY_MODEL: dict[str, Any] = dict(arch=SiTConfig(**TINY_ARCH))


class _Latents(Dataset):
    def __init__(self, n: int, shape: tuple[int, ...], num_classes: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn((n, *shape), generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "key": torch.tensor(i, dtype=torch.long)}


class RandomLatentsDataModule(LightningDataModule):
    """``num_samples`` random latents; ``global_batch_size`` split evenly over the ranks."""

    def __init__(
        self,
        global_batch_size: int = 8,
        num_samples: int = 16,
        latent_shape: tuple[int, int, int] = (4, 8, 8),
        num_classes: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.global_batch_size = global_batch_size
        self.num_samples = num_samples
        self.latent_shape = tuple(latent_shape)
        self.num_classes = num_classes
        self.seed = seed

    def _loader(self, shuffle: bool) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        data = _Latents(self.num_samples, self.latent_shape, self.num_classes, self.seed)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)
        return DataLoader(data, batch_size=self.global_batch_size // world, sampler=sampler, drop_last=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Quiet, deterministic CPU Trainer settings for tests."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


# ------------------------------------------------------------------------------------------------
# One training run (single process, DDP or FSDP2) whose final state can be compared across runs.
# ------------------------------------------------------------------------------------------------
EMA_DECAY = 0.5  # far below the paper's 0.9999 so that a few steps move the EMA visibly
TEST_LR = 1e-2  # large so that a few steps move the weights far from their initial values
# The key part of attn.qkv.bias has an exactly zero true gradient (softmax is shift invariant), so its
# computed gradient is round-off whose sign depends on the summation order (1 vs 2 processes).
# Adam with eps=1e-8 turns that round-off into full +-lr steps; eps=1e-6 keeps it negligible while
# every real gradient (>> 1e-6) is still normalised as usual.
TEST_ADAM_EPS = 1e-6


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def final_state(module: Any, trainer: Any, ema: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Full weights, AdamW moments and EMA keyed by parameter name (collective under FSDP2)."""
    optimizer = trainer.optimizers[0]
    weights, moments = {}, {}
    for name, p in module.named_parameters():
        weights[name] = _full(p)
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                moments[f"{name}.{key}"] = _full(state[key]).float()
    from torch.distributed.tensor import DTensor

    ema_local = sum(t.numel() for t in ema.ema_tensors().values())
    meta = {
        "dtensor_params": torch.tensor(sum(isinstance(p, DTensor) for p in module.parameters())),
        "ema_local_fraction": torch.tensor(ema_local / sum(w.numel() for w in weights.values())),
    }
    return {"weights": weights, "optimizer": moments, "ema": dict(ema.state_dict()["ema"]), "meta": meta}


def make_strategy(kind: str) -> Any:
    if kind == "single":
        return "auto"
    if kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo")
    if kind == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    raise ValueError(f"strategy must be single | ddp | fsdp; got {kind!r}")


def run_training(kind: str, steps: int, split: bool, workdir: str, devices: int = 1) -> dict | None:
    """Train the tiny SiT for ``steps`` steps (or steps/2, checkpoint, resume, steps/2) and return its state.

    Returns the final state on rank 0 and None on the other ranks.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sit_lightning.callbacks import EMACallback
    from sit_lightning.module import SiTModule

    def make(max_steps: int, checkpoint_every: int = 0) -> tuple[Any, Any, Any]:
        module = SiTModule(
            **TINY_MODEL,
            optimizer=lambda params: torch.optim.AdamW(
                params, lr=TEST_LR, eps=TEST_ADAM_EPS, weight_decay=0.0
            ),
        )
        ema = EMACallback(decay=EMA_DECAY)
        callbacks: list[Any] = [ema]
        if checkpoint_every:
            # A checkpoint written during training (as in real runs), not after fit() returned.
            callbacks.append(
                ModelCheckpoint(workdir, filename="half", every_n_train_steps=checkpoint_every, save_top_k=-1)
            )
        trainer = pl.Trainer(
            **trainer_kwargs(
                max_steps=max_steps,
                callbacks=callbacks,
                strategy=make_strategy(kind),
                devices=devices,
                enable_checkpointing=bool(checkpoint_every),
            )
        )
        return module, ema, trainer

    ckpt = None
    if split:
        module, ema, trainer = make(steps // 2, checkpoint_every=steps // 2)
        trainer.fit(module, RandomLatentsDataModule())
        ckpt = f"{workdir}/half.ckpt"
    module, ema, trainer = make(steps)
    trainer.fit(module, RandomLatentsDataModule(), ckpt_path=ckpt)
    state = final_state(module, trainer, ema)
    # Validation on the EMA weights (swapped in shard by shard under FSDP2), then the L_t profile
    # reduced over the ranks: it must not depend on the world size either.
    trainer.limit_val_batches = 1.0
    trainer.validate(module, RandomLatentsDataModule(), verbose=False)
    state["profile"] = {"values": module.loss_profile.values.clone()}
    return state if trainer.global_rank == 0 else None


def assert_same_state(
    expected: dict[str, dict[str, torch.Tensor]], actual: dict[str, dict[str, torch.Tensor]], sections: Any
) -> None:
    """Every tensor of each of ``sections`` of two :func:`final_state` results is bitwise equal."""
    for section in sections:
        assert expected[section].keys() == actual[section].keys(), section
        differ = [k for k in expected[section] if not torch.equal(expected[section][k], actual[section][k])]
        assert not differ, f"{section} differs after resume: {differ[:5]}"


def assert_training_moved(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """An equality of :func:`final_state` results is not vacuous: training moved the weights of a fresh
    ``SiTModule(**TINY_MODEL)`` and the EMA lags behind them. Returns the initial parameters."""
    from sit_lightning.module import SiTModule

    initial = dict(SiTModule(**TINY_MODEL).named_parameters())
    moved = sum((state["weights"][k] - initial[k].detach()).norm() for k in initial)
    lag = sum((state["weights"][k] - state["ema"][k]).norm() for k in initial)
    assert moved > 0.1 and lag > 0.01
    return initial


# ------------------------------------------------------------------------------------------------
# Child processes (one rank each, or a whole run): an environment free of any launcher's variables.
# ------------------------------------------------------------------------------------------------
#: What torchrun and Lightning set for their ranks. A child that inherited them (from an earlier in-process
#: test: a one-process FSDP2 run leaves MASTER_PORT set and its store listening there) would join the wrong
#: group or bind a port in use (EADDRINUSE); SLURM_* would make Lightning take it for a SLURM task.
LAUNCH_VARIABLES = frozenset(
    {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"}
)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``LAUNCH_VARIABLES`` and ``SLURM_*``, one thread, offline, ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
