"""REPA: representation alignment of a SiT's hidden tokens with a frozen image encoder's patch features.

Yu et al., "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than
You Think" (ICLR 2025; released code ``sihyun-yu/REPA``). The hidden tokens ``h`` after the first
``encoder_depth`` blocks of the network go through a small MLP projector ``h_phi``, and each projected
token is pulled towards the frozen encoder's feature ``y_*`` of the same patch of the clean image
(paper Sec. 3.2, eq. 8):

    L_REPA = - E[ 1/T sum_n  cos(y_*^[n], h_phi(h_t^[n])) ],     loss = L_objective + lambda L_REPA

It is a term added to whatever objective trains the network (any path x prediction x loss weight x
time sampler); the objective itself is unchanged. The defaults are the paper's SiT-XL/2 recipe
(Sec. 4.1 "Implementation details", Table 2 and App. C; released ``train.py``): alignment after the 8th
block, projector ``Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU -> Linear(2048, 768)``,
``lambda = 0.5``, DINOv2 ViT-B/14 (768 channels) fed the clean image at 224 px, so 16 x 16 = 256 patch
tokens, the token count of SiT/2 at 256 px.

Nothing here imports Lightning; :class:`sit_lightning.module.SiTModule` wires it (``repa:`` in the
``model:`` section; docs/training.md, "REPA").
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigurationError, ShapeMismatchError

__all__ = [
    "HiddenCapture",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REPA_ENCODER_DEPTH",
    "REPA_ENCODER_RESOLUTION",
    "REPA_FEATURE_DIM",
    "REPA_LOSS_WEIGHT",
    "REPA_PROJECTOR_DIM",
    "RepaConfig",
    "RepaProjector",
    "build_encoder",
    "encode_images",
    "repa_loss",
    "resample_position_embedding",
]

#: The paper's SiT-XL/2 recipe (Sec. 4.1; released train.py --encoder-depth 8 --proj-coeff 0.5).
REPA_ENCODER_DEPTH = 8
REPA_PROJECTOR_DIM = 2048
REPA_FEATURE_DIM = 768  # DINOv2 ViT-B/14's width
REPA_LOSS_WEIGHT = 0.5
#: The side the encoder sees (released ``preprocess_raw_image``: bicubic to 224 for DINOv2).
REPA_ENCODER_RESOLUTION = 224
#: ImageNet normalisation of the encoder's input (timm's IMAGENET_DEFAULT_MEAN / _STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: uint8 pixels -> [0, 1].
PIXEL_MAX = 255.0
#: Tokens before the patch grid in a ViT's ``pos_embed`` (the class token; DINOv2 without registers).
VIT_PREFIX_TOKENS = 1
#: The key of DINOv2's ``forward_features`` output the paper aligns to.
DINOV2_PATCH_TOKENS = "x_norm_patchtokens"


@dataclass(frozen=True)
class RepaConfig:
    """REPA settings: the ``repa:`` block of the ``model:`` section (``SiTModule(repa=...)``).

    Args:
        encoder: the frozen encoder, as the dotted import path of a class or function that returns an
            ``nn.Module`` (e.g. ``dinov2.hub.backbones.dinov2_vitb14`` from a local clone of
            facebookresearch/dinov2). It maps ``(N, 3, R, R)`` ImageNet-normalised images to patch
            features: ``forward_features(x)["x_norm_patchtokens"]`` (DINOv2) when it has that, else
            ``encoder(x)`` as ``(N, T, C)``. None: no encoder; every batch carries precomputed features
            ``batch["repa_features"]`` of shape ``(N, T, feature_dim)``. It is imported and built only
            when training starts, never when a config is parsed or a checkpoint loaded.
        encoder_init_args: keyword arguments of ``encoder`` (``{pretrained: false}`` for DINOv2's hub
            functions, so that nothing is downloaded).
        encoder_weights: a local file of the encoder's state dict (``.pt`` / ``.pth`` read with
            ``torch.load(weights_only=True)``, or ``.safetensors``), loaded with ``strict=True``; None
            keeps what ``encoder`` built.
        encoder_depth: align the tokens after the first k blocks (8: after ``blocks[7]``).
        projector_dim: hidden width of the projector MLP.
        feature_dim: channels of the encoder's features (768 for ViT-B).
        loss_weight: ``lambda``, the weight of the REPA term added to the objective's loss.
        encoder_resolution: side of the (bicubic-resized) image the encoder sees.
        resample_pos_embed: resample the encoder's ``pos_embed`` (class token + a square grid) once,
            bicubically, to the network's patch grid, as the released code does for DINOv2 (16 x 16);
            no-op for an encoder without one or with that grid already.

    Raises:
        ValueError: at construction (so when a config is parsed) for a value out of range.
    """

    encoder: str | None = None
    encoder_init_args: dict[str, Any] = field(default_factory=dict)
    encoder_weights: str | None = None
    encoder_depth: int = REPA_ENCODER_DEPTH
    projector_dim: int = REPA_PROJECTOR_DIM
    feature_dim: int = REPA_FEATURE_DIM
    loss_weight: float = REPA_LOSS_WEIGHT
    encoder_resolution: int = REPA_ENCODER_RESOLUTION
    resample_pos_embed: bool = True

    def __post_init__(self) -> None:
        for name in ("encoder_depth", "projector_dim", "feature_dim", "encoder_resolution"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"repa.{name} must be a positive integer; got {getattr(self, name)}")
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise ValueError(f"repa.loss_weight must be a finite number >= 0; got {self.loss_weight}")
        if self.encoder is not None and (not self.encoder or "." not in self.encoder):
            raise ValueError(
                f"repa.encoder must be a dotted import path such as dinov2.hub.backbones.dinov2_vitb14, "
                f"or null for precomputed features; got {self.encoder!r}"
            )
        if self.encoder is None and (self.encoder_weights is not None or self.encoder_init_args):
            raise ValueError(
                "repa.encoder_weights / encoder_init_args need repa.encoder (null: precomputed features)"
            )
        object.__setattr__(self, "encoder_init_args", dict(self.encoder_init_args))

    @classmethod
    def from_value(cls, value: RepaConfig | Mapping[str, Any]) -> RepaConfig:
        """A config, or its fields as a mapping (hyperparameters read back from a checkpoint)."""
        return value if isinstance(value, RepaConfig) else cls(**value)

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain data (what a checkpoint's hyperparameters hold)."""
        return dataclasses.asdict(self)


class RepaProjector(nn.Module):
    """``h_phi``: (N, T, D) hidden tokens -> (N, T, feature_dim), a 3-layer SiLU MLP per token.

    The released ``build_mlp``; initialised like every SiT linear layer (Xavier-uniform, zero bias).
    """

    def __init__(self, hidden_size: int, projector_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, feature_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.mlp(hidden)


def repa_loss(projected: Tensor, features: Tensor) -> Tensor:
    """``(N,)`` per-sample REPA loss: minus the cosine similarity per token, averaged over tokens.

    The mean over the batch is the paper's eq. 8 (released ``loss.py``: ``-(normalize(z) *
    normalize(z_tilde)).sum(-1)``, averaged over tokens and samples).

    Args:
        projected: (N, T, C) projected hidden tokens ``h_phi(h_t)``.
        features: (N, T, C) the encoder's patch features ``y_*`` of the clean images (no gradient).

    Raises:
        ShapeMismatchError: when the token counts or channels differ (e.g. a SiT/4 or /8 network,
            64 or 16 tokens, against DINOv2's 256 at 224 px).
    """
    if projected.ndim != 3 or projected.shape != features.shape:
        raise ShapeMismatchError(
            f"REPA aligns the network's tokens with the encoder's patch features one to one, but the network "
            f"gives (N, T, C) = {tuple(projected.shape)} and the encoder {tuple(features.shape)}; use a "
            "network whose patch grid is the encoder's (SiT/2 at 256 px: 16 x 16 = 256 tokens, as DINOv2 "
            "ViT-B/14 at 224 px; SiT/4 and /8 have 64 and 16) or set model.repa.encoder_resolution / "
            "feature_dim to match"
        )
    cosine = F.cosine_similarity(projected.float(), features.float(), dim=-1, eps=1e-12)  # (N, T)
    return -cosine.mean(dim=1)


def encode_images(encoder: nn.Module, images: Tensor, resolution: int) -> Tensor:
    """``(N, T, C)`` patch features of clean images, as the released ``preprocess_raw_image`` feeds DINOv2.

    Pixels ``/ 255`` (uint8; floating images are taken as already in [0, 1]), ImageNet normalisation,
    then a bicubic resize to ``resolution``; no gradient.

    Args:
        encoder: the frozen encoder (see :class:`RepaConfig`).
        images: (N, 3, H, W) uint8 RGB images (or float in [0, 1]).
        resolution: the side the encoder sees (224).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ShapeMismatchError(f"REPA needs (N, 3, H, W) RGB images; got shape {tuple(images.shape)}")
    with torch.no_grad():
        x = images.float() / PIXEL_MAX if images.dtype == torch.uint8 else images.float()
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if x.shape[-2:] != (resolution, resolution):
            x = F.interpolate(x, size=(resolution, resolution), mode="bicubic")
        forward_features = getattr(encoder, "forward_features", None)
        out = forward_features(x) if callable(forward_features) else encoder(x)
        if isinstance(out, Mapping):
            if DINOV2_PATCH_TOKENS not in out:
                raise ConfigurationError(
                    f"the REPA encoder's forward_features returned the keys {sorted(out)}; expected "
                    f"{DINOV2_PATCH_TOKENS!r} (DINOv2) or a (N, T, C) tensor"
                )
            out = out[DINOV2_PATCH_TOKENS]
        if not isinstance(out, Tensor) or out.ndim != 3:
            raise ConfigurationError(
                "the REPA encoder must return (N, T, C) patch features (or DINOv2's forward_features dict); "
                f"got {type(out).__name__} {tuple(out.shape) if isinstance(out, Tensor) else ''}"
            )
        return out.detach()


def resample_position_embedding(encoder: nn.Module, grid_size: int) -> None:
    """Resample ``encoder.pos_embed`` (1, 1 + g*g, C) in place to a ``grid_size`` x ``grid_size`` grid.

    What the released code does to DINOv2 (timm ``resample_abs_pos_embed``: bicubic with antialiasing,
    in float32, the class token kept), so that the encoder at 224 px uses a 16 x 16 table directly
    instead of interpolating its 37 x 37 one at every call. No-op without a square ``pos_embed`` or when
    the grid already matches.
    """
    pos_embed = getattr(encoder, "pos_embed", None)
    if not isinstance(pos_embed, Tensor) or pos_embed.ndim != 3:
        return
    prefix, grid = pos_embed[:, :VIT_PREFIX_TOKENS], pos_embed[:, VIT_PREFIX_TOKENS:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1] or old == grid_size:
        return
    table = grid.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
    table = F.interpolate(table, size=(grid_size, grid_size), mode="bicubic", antialias=True)
    table = table.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, -1).to(pos_embed.dtype)
    with torch.no_grad():
        resampled = torch.cat([prefix, table], dim=1)
    if isinstance(pos_embed, nn.Parameter):
        encoder.pos_embed = nn.Parameter(resampled, requires_grad=False)
    else:
        encoder.pos_embed = resampled


def build_encoder(config: RepaConfig, grid_size: int | None) -> nn.Module:
    """The frozen encoder of ``config``: imported, built, weights loaded, pos_embed resampled, eval, no grad.

    ``grid_size`` is the network's patch grid; None (``precompute-latents``, which knows no network):
    the encoder's own grid at ``encoder_resolution`` (``encoder_resolution // patch_size``), which
    ``pos_embed`` is resampled to; an encoder without an integer ``patch_size`` is then not resampled.

    Raises:
        ConfigurationError: when the import path does not resolve or the weights file is missing.
        ShapeMismatchError: when the encoder has an integer ``patch_size`` and its token grid at
            ``encoder_resolution`` is not the network's ``grid_size`` (before any step runs).
    """
    if config.encoder is None:
        raise ConfigurationError("repa.encoder is null: the batches must carry repa_features")
    factory = _import(config.encoder)
    encoder = factory(**config.encoder_init_args)
    if not isinstance(encoder, nn.Module):
        raise ConfigurationError(
            f"repa.encoder {config.encoder} built a {type(encoder).__name__}, not an nn.Module"
        )
    if config.encoder_weights is not None:
        encoder.load_state_dict(_read_state_dict(Path(config.encoder_weights)), strict=True)
    patch = getattr(encoder, "patch_size", None)  # DINOv2 and timm ViTs say it
    if grid_size is None:
        grid_size = config.encoder_resolution // patch if isinstance(patch, int) else None
    if isinstance(patch, int) and config.encoder_resolution // patch != grid_size:
        side = config.encoder_resolution // patch
        raise ShapeMismatchError(
            f"REPA aligns token by token, but the encoder sees {config.encoder_resolution} px in {patch}-px "
            f"patches, {side} x {side} = {side * side} tokens, and the network has {grid_size} x {grid_size} = "
            f"{grid_size * grid_size}; use a network whose patch grid is the encoder's (SiT/2 at 256 px: "
            "16 x 16 = 256 tokens, as DINOv2 ViT-B/14 at 224 px; SiT/4 and /8 have 64 and 16) or set "
            "model.repa.encoder_resolution to match"
        )
    if config.resample_pos_embed and grid_size is not None:
        resample_position_embedding(encoder, grid_size)
    encoder.requires_grad_(False)
    return encoder.eval()


def _import(path: str) -> Callable[..., Any]:
    module_name, _, name = path.rpartition(".")
    try:
        target: Any = importlib.import_module(module_name)
        for part in name.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"repa.encoder {path!r} does not import ({type(exc).__name__}: {exc}); install the encoder's "
            "package from a local copy (docs/training.md, 'REPA') or give another import path"
        ) from exc
    if not callable(target):
        raise ConfigurationError(f"repa.encoder {path!r} is not a class or function")
    return target


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigurationError(f"repa.encoder_weights {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) and "model" in state else state


class HiddenCapture:
    """``network`` as the objective calls it, ``(x_t, t, **kwargs) -> field``, keeping the hidden tokens.

    After a call, :attr:`hidden` holds the ``(N, T, D)`` tokens after the first ``depth`` blocks
    (``SiT.forward(..., return_hidden_at=depth)``), so that REPA adds its term to any objective without
    the objective knowing about it.
    """

    def __init__(self, network: Callable[..., Any], depth: int) -> None:
        self.network = network
        self.depth = depth
        self.hidden: Tensor | None = None

    def __call__(self, x_t: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        out = self.network(x_t, t, return_hidden_at=self.depth, **kwargs)
        self.hidden = out.hidden
        return out.field
