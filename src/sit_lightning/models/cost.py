"""Closed-form parameter and FLOP counts of a SiT, without building one.

Used for MFU (training and sampling benchmarks, :class:`~sit_lightning.callbacks.ThroughputCallback`)
and to size a run before allocating it. Both counts are checked against a built network in the tests
(``sum(p.numel())`` and ``torch.utils.flop_counter``).
"""

from __future__ import annotations

from typing import Any

from .config import SiTConfig
from .sit import TIME_FREQUENCY_DIM

__all__ = ["forward_flops", "num_parameters"]


def _config(config: SiTConfig | str, data_fields: dict[str, Any]) -> SiTConfig:
    if isinstance(config, str):
        return SiTConfig.from_preset(config, **data_fields)
    if data_fields:
        raise ValueError(
            f"{', '.join(sorted(data_fields))} given with a complete SiTConfig; set them in the config "
            "(dataclasses.replace(config, ...)) or pass a preset name"
        )
    return config


def num_parameters(config: SiTConfig | str, *, trainable_only: bool = False, **data_fields: Any) -> int:
    """Closed-form parameter count of a SiT (``trainable_only`` leaves out the frozen ``pos_embed``).

    Args:
        config: a :class:`SiTConfig`, or a preset name completed by ``data_fields``
            (e.g. ``num_parameters("SiT-XL/2", input_size=64)``).

    With D = hidden, p = patch, C = in_channels, m = int(D * mlp_ratio), T = (input_size / p)^2,
    K = num_classes + [class_dropout_prob > 0] and O = C * (2 if learn_sigma else 1)::

        T D                       pos_embed
        + D C p^2 + D             patch projection
        + 256 D + D + D^2 + D     time MLP
        + K D                     label table
        + depth * (12 D^2 + 2 m D + 10 D + m)   qkv, proj, fc1, fc2, adaLN (weights + biases)
        + p^2 O D + p^2 O + 2 D^2 + 2 D         final linear and its adaLN
    """
    cfg = _config(config, data_fields)
    d, p, c, m = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.mlp_hidden
    rows = cfg.num_classes + int(cfg.has_null_class)
    out = cfg.out_channels
    block = (3 * d * d + 3 * d) + (d * d + d) + (m * d + m) + (d * m + d) + (6 * d * d + 6 * d)
    count = (
        (d * c * p * p + d)
        + (TIME_FREQUENCY_DIM * d + d + d * d + d)
        + rows * d
        + cfg.depth * block
        + (p * p * out * d + p * p * out + 2 * d * d + 2 * d)
    )
    return count if trainable_only else count + cfg.num_tokens * d


def forward_flops(config: SiTConfig | str, **data_fields: Any) -> int:
    """Matmul FLOPs (2 x multiply-accumulates) of one forward pass for one sample.

    Args:
        config: a :class:`SiTConfig`, or a preset name completed by ``data_fields``.

    Counts every matrix product: the per-token linear layers (patch projection, qkv, attention
    output, MLP, final linear, including the unused learn_sigma half that is still computed), the
    per-sample conditioning layers (time MLP, adaLN), and attention's ``Q K^T`` and ``A V`` (2 T^2 D
    MACs per block). Element-wise work (norms, softmax, GELU, biases) is left out. For SiT-XL/2 at
    input_size 32 this is about 2 x 118.6 G (DiT's "118.6 Gflops", Table 4 of the DiT paper, is a MAC
    count). A training step costs about 3 x this (forward + backward), plus one more forward with
    gradient checkpointing.
    """
    cfg = _config(config, data_fields)
    d, p, depth, m = cfg.hidden_size, cfg.patch_size, cfg.depth, cfg.mlp_hidden
    tokens = cfg.num_tokens
    per_token = d * cfg.in_channels * p * p + depth * (4 * d * d + 2 * m * d) + p * p * cfg.out_channels * d
    attention = depth * 2 * tokens * tokens * d
    per_sample = TIME_FREQUENCY_DIM * d + d * d + depth * 6 * d * d + 2 * d * d
    return 2 * (tokens * per_token + attention + per_sample)
