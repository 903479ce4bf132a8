"""The SiT network: a Diffusion Transformer (DiT) with adaLN-Zero conditioning on time and class.

SiT (arXiv 2401.08740) keeps DiT's backbone (Peebles & Xie, arXiv 2212.09748) and changes only what
the network is trained to predict. Parameter names and shapes are exactly those of the released SiT
checkpoints (the released ``models.py``), so ``build_sit("SiT-XL/2").load_state_dict(released,
strict=True)`` works. Internals differ where the numbers stay the same: attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (Flash / memory-efficient kernels on GPU), there
is no timm dependency, and the dead ``learn_sigma`` half of the output is dropped inside ``forward``.

Time convention (see ``sit_lightning.interpolants``): ``t = 0`` is noise, ``t = 1`` is data, and the
network sees the raw ``t`` in ``[0, 1]`` (not ``1000 t`` as in DiT).

Layout, parts before the whole: embeddings (patch, time, label), the 2-D sin-cos positional table,
attention and MLP, one adaLN-Zero block, the final layer, the network, then the preset builder. The
architecture record and the presets are in ``config.py``; parameter and FLOP counts in ``cost.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import SIT_PRESETS, SiTConfig

__all__ = ["SiT", "SiTOutput", "SiT_models", "build_sit", "sincos_pos_embed_2d", "timestep_embedding"]

#: Width of the sinusoidal time features fed to the time MLP (GLIDE / DiT).
TIME_FREQUENCY_DIM = 256
#: Longest period of the sinusoidal time features.
TIME_MAX_PERIOD = 10_000.0
#: Longest period of the 2-D sin-cos positional table (MAE).
POS_EMBED_MAX_PERIOD = 10_000.0
#: LayerNorm epsilon of every norm in the released model.
NORM_EPS = 1e-6
#: Standard deviation of the label and time-MLP weight initialisation (DiT).
EMBED_INIT_STD = 0.02


# ------------------------------------------------------------------------------------------------
# Embeddings
# ------------------------------------------------------------------------------------------------
def timestep_embedding(
    t: Tensor, dim: int = TIME_FREQUENCY_DIM, max_period: float = TIME_MAX_PERIOD
) -> Tensor:
    """Sinusoidal time features ``[cos(t w_k), sin(t w_k)]`` (cos first, as released).

    Computed in float32 (float64 for float64 ``t``), whatever autocast says or how low the precision
    of ``t`` is: the features of nearby times differ in low bits that bfloat16 would round away.

    Args:
        t: (N,) times in [0, 1] (raw, 0 = noise, 1 = data).
        dim: number of features; ``w_k = max_period ** (-k / (dim // 2))`` for ``k < dim // 2``.
        max_period: longest period.

    Returns:
        (N, dim) float32 (or float64) features; a zero column is appended when ``dim`` is odd.
    """
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    k = torch.arange(half, dtype=dtype, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)  # (half,)
    args = t.to(dtype)[:, None] * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """The fixed 2-D sin-cos positional table of MAE / DiT, in float64.

    Tokens are row-major over the ``(h, w)`` patch grid. The first half of the channels encodes the
    column index ``w`` and the second half the row index ``h`` (MAE's ``meshgrid(grid_w, grid_h)``
    order, which the released weights were trained with). Each half is ``[sin(pos w_k), cos(pos w_k)]``
    with ``w_k = 10000 ** (-k / (embed_dim / 4))``.

    Args:
        embed_dim: channels D, divisible by 4.
        grid_size: patches per side.

    Returns:
        (grid_size ** 2, embed_dim) float64 table.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos table, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / POS_EMBED_MAX_PERIOD ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # token (h, w) -> row h, column w

    def one_axis(pos: Tensor) -> Tensor:
        args = pos.reshape(-1, 1) * omega[None]  # (T, D/4)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (T, D/2)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1)  # (T, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: (N, C, H, W) -> (N, (H/p)(W/p), D), row-major."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Time ``t`` in [0, 1] -> (N, D): float32 sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = TIME_FREQUENCY_DIM) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_embedding(t, self.frequency_dim)  # (N, 256), float32
        # To the weights' dtype: a no-op for float32 weights (autocast then casts per matmul); needed
        # when the weights themselves are float64 or bfloat16 (e.g. FSDP2 mixed precision).
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (N, D) by table lookup; row ``num_classes`` is the null (unconditional) class.

    The null row exists only when ``dropout_prob > 0``, as in the released checkpoints (1001 rows).
    Dropping (replacing a label by the null class) is decided by the caller, :meth:`SiT.forward`.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


# ------------------------------------------------------------------------------------------------
# Transformer parts
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (timm layout, no q/k norm)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D/heads)) v
        return self.proj(x.transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as released) -> fc2."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample (N, D) shift/scale over (N, T, D) tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SiTBlock(nn.Module):
    """A transformer block whose LayerNorms are modulated and whose branches are gated by ``c``.

    adaLN-Zero (DiT, Sec. 3.2): ``c -> (shift, scale, gate) x 2``; the gates start at zero, so every
    block starts as the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map from each token to its p x p x out_channels patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------
class SiTOutput(NamedTuple):
    """What :meth:`SiT.forward` returns when asked for hidden tokens (``return_hidden_at=k``).

    Attributes:
        field: (N, C, H, W) the network field, as the plain forward returns it.
        hidden: (N, T, D) the tokens after the first k blocks (before the final layer).
    """

    field: Tensor
    hidden: Tensor


class SiT(nn.Module):
    """Scalable Interpolant Transformer: latent image, time and class -> a field of the same shape.

    What the output means (velocity, score or noise) is decided by the training objective, not here.

    Args:
        config: the architecture (:class:`SiTConfig`; its docstring documents every field).
        grad_checkpointing: recompute each block in the backward pass (activation checkpointing)
            while training, trading about one extra forward for activation memory. Not part of the
            config: it changes memory and time, never the weights or the numbers.
        **fields: instead of ``config``, its fields as keywords, as the released class takes them
            (``SiT(input_size=32, depth=28, ...)``).

    ``forward`` returns only the first C channels: SiT never uses the ``learn_sigma`` half.

    Attributes:
        check_label_range: check label values in eager mode (default True). The check reads the
            labels back (one device sync per call); set it False to keep an eager GPU loop fully
            asynchronous. It never runs under ``torch.compile``.
    """

    def __init__(
        self, config: SiTConfig | None = None, *, grad_checkpointing: bool = False, **fields: Any
    ) -> None:
        super().__init__()
        if config is not None and fields:
            raise ValueError(f"give a SiTConfig or its fields ({', '.join(sorted(fields))}), not both")
        config = SiTConfig(**fields) if config is None else config
        self.config = config
        # Every architecture field is also an attribute (model.depth, model.num_classes, ...), as in the
        # released class.
        for name, value in dataclasses.asdict(config).items():
            setattr(self, name, value)
        self.grad_checkpointing = grad_checkpointing
        self.check_label_range = True
        self.out_channels = config.out_channels
        self.grid_size = config.grid_size
        self.num_tokens = config.num_tokens
        hidden_size, patch_size = config.hidden_size, config.patch_size

        self.x_embedder = PatchEmbed(patch_size, config.in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, hidden_size, config.class_dropout_prob)
        # A parameter (not a buffer) so that it is saved under "pos_embed" as in the released
        # checkpoints; frozen because it is the fixed sin-cos table.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            SiTBlock(hidden_size, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def has_null_class(self) -> bool:
        """Whether label ``num_classes`` (unconditional, for guidance) is a valid input."""
        return self.class_dropout_prob > 0

    def initialize_weights(self) -> None:
        """DiT / released initialisation; also usable after ``to_empty`` from the meta device.

        Linear layers: Xavier-uniform weights, zero biases. Patch projection: Xavier-uniform on its
        (D, C p p) view. Label table and time MLP weights: N(0, 0.02^2). Positional table: fixed
        sin-cos. adaLN-Zero: every modulation layer and the final linear start at zero, so the
        network output is exactly zero at initialisation.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            table = sincos_pos_embed_2d(self.hidden_size, self.grid_size)
            self.pos_embed.copy_(table.to(self.pos_embed.dtype).unsqueeze(0))
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=EMBED_INIT_STD)
        modulations = [block.adaLN_modulation[-1] for block in self.blocks]
        for layer in [*modulations, self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- forward -----------------------------------------------------------------------------------
    def _validate(self, x: Tensor, t: Tensor, y: Tensor, drop_labels: Tensor | None) -> None:
        # Only shapes and dtypes here: they are static under torch.compile (guards, no graph break).
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        n = x.shape[0]
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},) to match x, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"t must be a floating-point tensor of times in [0, 1], got dtype {t.dtype}")
        if y.shape != (n,):
            raise ValueError(f"y must have shape ({n},) to match x, got {tuple(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must hold integer class labels (int64 or int32), got dtype {y.dtype}")
        if drop_labels is not None:
            if drop_labels.shape != (n,) or drop_labels.dtype != torch.bool:
                raise ValueError(
                    f"drop_labels must be a bool tensor of shape ({n},), "
                    f"got dtype {drop_labels.dtype} and shape {tuple(drop_labels.shape)}"
                )
            if not self.has_null_class:
                raise ValueError("drop_labels needs a null class, but this model has class_dropout_prob=0")
        # The range check reads label values, i.e. a device sync; it is skipped under torch.compile
        # (where it would break the graph), on the meta device and when switched off. nn.Embedding
        # still fails on an out-of-range index there (IndexError on CPU, a device-side assert on CUDA).
        check = self.check_label_range and y.device.type != "meta" and n > 0
        if check and not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.aminmax(y))
            top = self.num_classes if self.has_null_class else self.num_classes - 1
            if low < 0 or high > top:
                null = f" ({self.num_classes} = null class)" if self.has_null_class else ""
                raise ValueError(f"labels must be in [0, {top}]{null}, got values in [{low}, {high}]")

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        drop_labels: Tensor | None = None,
        return_hidden_at: int | None = None,
    ) -> Tensor | SiTOutput:
        """Evaluate the network.

        Label dropout (classifier-free guidance training): ``drop_labels`` (bool (N,)), when given,
        replaces the marked labels by the null class ``num_classes`` in any mode; the LightningModule
        passes a mask keyed by (seed, step, sample), so single-process and DDP runs drop the same
        labels. Without it, in training mode with ``class_dropout_prob > 0``, each label is dropped
        with that probability using ``torch.rand`` (the released behaviour). In eval mode without a
        mask nothing is dropped. Labels equal to ``num_classes`` are accepted as unconditional input
        when the null row exists.

        Args:
            x: (N, C, H, W) latents with C = in_channels and H = W = input_size.
            t: (N,) float times in [0, 1]; 0 = noise, 1 = data (raw, not scaled by 1000).
            y: (N,) int64 labels in [0, num_classes] (num_classes = null class, if it exists).
            drop_labels: optional (N,) bool mask of labels to replace by the null class.
            return_hidden_at: also return the (N, T, D) tokens after the first k blocks (k = 8: after
                ``blocks[7]``, REPA's ``encoder_depth``), for a representation-alignment loss
                (``sit_lightning.repa``); ``1 <= k <= depth``. None (default): the plain forward.

        Returns:
            (N, C, H, W): the network field (the ``learn_sigma`` half is dropped); with
            ``return_hidden_at``, a :class:`SiTOutput` of that field and the hidden tokens.

        Raises:
            ValueError: wrong shapes or dtypes, or labels out of range (value check skipped while
                compiling, see ``_validate``).
        """
        self._validate(x, t, y, drop_labels)
        if return_hidden_at is not None and not 1 <= return_hidden_at <= self.depth:
            raise ValueError(
                f"return_hidden_at must be in [1, {self.depth}] (the depth); got {return_hidden_at}"
            )
        if drop_labels is None and self.training and self.class_dropout_prob > 0:
            drop_labels = torch.rand(y.shape, device=y.device) < self.class_dropout_prob
        if drop_labels is not None:
            y = torch.where(drop_labels, torch.full_like(y, self.num_classes), y)

        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        hidden = None
        for k, block in enumerate(self.blocks, start=1):
            h = checkpoint(block, h, c, use_reentrant=False) if use_checkpoint else block(h, c)
            if k == return_hidden_at:
                hidden = h  # (N, T, D) after the first k blocks
        h = self.final_layer(h, c)  # (N, T, p * p * out_channels)
        field = self.unpatchify(h, self.in_channels)  # (N, C, H, W): the learn_sigma half is dropped
        return field if return_hidden_at is None else SiTOutput(field=field, hidden=hidden)

    def unpatchify(self, tokens: Tensor, channels: int | None = None) -> Tensor:
        """(N, T, p * p * c) -> (N, channels, H, W), keeping the first ``channels`` of c (default all).

        Each token holds its patch as (row, column, channel). The result is a fresh tensor, not a
        view of ``tokens`` (FSDP2 warns about a module that returns a view).
        """
        n, p, g = tokens.shape[0], self.patch_size, self.grid_size
        c = tokens.shape[-1] // (p * p)
        x = tokens.reshape(n, g, g, p, p, c)[..., : c if channels is None else channels]
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, x.shape[1], g * p, g * p)

    # -- cost ----------------------------------------------------------------------------------------
    def flops_per_sample(self) -> int:
        """Matmul FLOPs of one forward for one sample at this model's size; see :func:`forward_flops`."""
        from .cost import forward_flops

        return forward_flops(self.config)


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------
def build_sit(name: str, *, grad_checkpointing: bool = False, **data_fields: Any) -> SiT:
    """Build a preset, e.g. ``build_sit("SiT-XL/2", input_size=64)``: the one way to build one by name.

    Args:
        name: a key of :data:`SIT_PRESETS`.
        grad_checkpointing: recompute each block in the backward pass.
        **data_fields: the fields the preset does not fix (input_size, in_channels, num_classes,
            class_dropout_prob, learn_sigma, mlp_ratio); see :meth:`SiTConfig.from_preset`.

    Raises:
        ValueError: unknown name (the message lists the presets) or a field the preset fixes.
    """
    return SiT(SiTConfig.from_preset(name, **data_fields), grad_checkpointing=grad_checkpointing)


#: The released name for :func:`build_sit`: ``SiT_models["SiT-XL/2"](input_size=32, num_classes=1000)``.
SiT_models: dict[str, Callable[..., SiT]] = {name: functools.partial(build_sit, name) for name in SIT_PRESETS}
