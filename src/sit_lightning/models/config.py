"""The architecture of a SiT in one validated record, and the twelve named presets.

:class:`SiTConfig` holds every field that decides a SiT's weights; :class:`~sit_lightning.models.SiT`,
the LightningModule and the cost formulas all take it. A preset name (``"SiT-XL/2"``) fixes depth,
width, heads and patch size (SiT paper, Table 1; the released ``models.py``); the other fields are
about the data (latent size and channels, classes) and have the released defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

__all__ = ["PRESET_FIELDS", "SIT_PRESETS", "SiTConfig", "SiTPreset"]

SiTPreset = Literal[
    "SiT-S/2", "SiT-S/4", "SiT-S/8",
    "SiT-B/2", "SiT-B/4", "SiT-B/8",
    "SiT-L/2", "SiT-L/4", "SiT-L/8",
    "SiT-XL/2", "SiT-XL/4", "SiT-XL/8",
]  # fmt: skip

#: The fields a preset name fixes.
PRESET_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")

#: (depth, hidden_size, num_heads) of each model size (SiT paper, Table 1).
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


@dataclass(frozen=True)
class SiTConfig:
    """Every architecture field of a SiT network; the defaults are the released SiT-XL/2 at 256 px.

    Args:
        input_size: latent side length H = W (32 for 256 px images with the SD VAE, 64 for 512 px).
        patch_size: p; the latent becomes (input_size / p)^2 tokens.
        in_channels: latent channels C (4 for the SD VAE).
        hidden_size: token width D (divisible by num_heads and by 4).
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        class_dropout_prob: training-time probability of replacing a label by the null class
            ``num_classes`` (classifier-free guidance; 0.1 in the paper). The label table has a null
            row iff this is > 0.
        num_classes: number of real classes.
        learn_sigma: keep the released layout whose final layer predicts 2C channels (DiT's variance
            half, unused by SiT). True is needed to load the released checkpoints.

    Raises:
        ValueError: a field out of range, or sizes that do not divide (the message names them).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True

    def __post_init__(self) -> None:
        for name in (
            "input_size",
            "patch_size",
            "in_channels",
            "hidden_size",
            "depth",
            "num_heads",
            "num_classes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} must be divisible by patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos positions)")
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(
                f"mlp_ratio must be > 0 with int(hidden_size * mlp_ratio) >= 1, got {self.mlp_ratio}"
            )
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {self.class_dropout_prob}")
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"learn_sigma must be a bool, got {self.learn_sigma!r}")

    @classmethod
    def from_preset(cls, name: str, **data_fields: Any) -> SiTConfig:
        """The config of a preset, e.g. ``SiTConfig.from_preset("SiT-XL/2", input_size=64)``.

        Args:
            name: one of :data:`SIT_PRESETS`.
            **data_fields: fields the preset does not fix (input_size, in_channels, num_classes,
                class_dropout_prob, learn_sigma, mlp_ratio); for another depth, width, heads or patch
                size write a complete ``SiTConfig`` instead.

        Raises:
            ValueError: unknown name (the message lists the presets) or a field the preset fixes.
        """
        if name not in SIT_PRESETS:
            raise ValueError(f"unknown SiT preset {name!r}; choose one of {', '.join(SIT_PRESETS)}")
        clash = sorted(set(data_fields) & set(PRESET_FIELDS))
        if clash:
            raise ValueError(
                f"{name} fixes {', '.join(clash)}; write a complete SiTConfig(...) for a custom architecture"
            )
        unknown = sorted(set(data_fields) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown SiTConfig field(s) {', '.join(unknown)}")
        preset = SIT_PRESETS[name]
        return cls(**{**{k: getattr(preset, k) for k in PRESET_FIELDS}, **data_fields})

    @property
    def preset_name(self) -> str | None:
        """The preset whose depth, width, heads and patch size this config has, if any."""
        key = tuple(getattr(self, k) for k in PRESET_FIELDS)
        return next(
            (n for n, c in SIT_PRESETS.items() if tuple(getattr(c, k) for k in PRESET_FIELDS) == key), None
        )

    @property
    def has_null_class(self) -> bool:
        """Whether label ``num_classes`` (unconditional, for guidance) has a row in the label table."""
        return self.class_dropout_prob > 0

    @property
    def out_channels(self) -> int:
        """Channels of the final layer: 2C with ``learn_sigma`` (the unused variance half), else C."""
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image, ``grid_size ** 2``."""
        return self.grid_size**2

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP, ``int(hidden_size * mlp_ratio)``."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input latent."""
        return (self.in_channels, self.input_size, self.input_size)


#: The twelve released configurations at 256 px on ImageNet, ``"SiT-XL/2"`` ... ``"SiT-S/8"``.
SIT_PRESETS: dict[str, SiTConfig] = {
    f"SiT-{size}/{patch}": SiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}
assert set(get_args(SiTPreset)) == set(SIT_PRESETS), "SiTPreset must list exactly the presets"
