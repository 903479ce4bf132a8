"""Post-hoc EMA (EDM2): power-function EMA profiles, their snapshots, and the synthesis of any profile.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (CVPR 2024), Sec. 3
and App. C; the released ``training/phema.py`` of NVlabs/edm2. Plain PyTorch and numpy, no Lightning:
:class:`~sit_lightning.callbacks.PostHocEMACallback` keeps the tracks and writes the snapshots,
``sit-lightning posthoc-ema`` (:func:`posthoc_ema_main`) synthesises. Derivations: docs/training.md,
"Post-hoc EMA".

Time is the optimizer step ``t = 1, 2, ...``; ``theta_t`` are the weights after step ``t``.

- A *power-function EMA* with exponent ``gamma`` averages ``theta_1 .. theta_t`` with the profile
  ``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]`` (EDM2 Eq. 121). It is tracked by
  ``ema <- beta_t ema + (1 - beta_t) theta_t`` with ``beta_t = (1 - 1/t)^(gamma + 1)`` (Eq. 127). This
  is exact, not an approximation: the weight of ``theta_k`` in ``ema_t`` is
  ``(1 - beta_k) prod_{j>k} beta_j = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1)``, the integral of
  ``p_t`` over ``[k-1, k]``, so ``ema_t`` is the profile applied to the step-wise constant path.
- Its width relative to ``t`` is ``sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))`` (Eq. 123).
  Squaring and clearing the denominator gives the cubic (Eq. 126, Algorithm 2)
  ``gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0``, whose largest real root
  is the ``gamma >= 0`` branch; it exists for ``0 < sigma_rel <= 1/sqrt(12)`` (``gamma = 0``: the uniform
  average of all steps so far).
- Two profiles ``(t_a, gamma_a)``, ``(t_b, gamma_b)`` have the inner product (Eq. 151, Algorithm 3)
  ``<p_a, p_b> = (gamma_a+1)(gamma_b+1) / ((gamma_a+gamma_b+1) max(t_a, t_b)) * (t_a/t_b)^e`` with
  ``e = gamma_b`` when ``t_a < t_b``, else ``-gamma_a``
  (integrate ``tau^(gamma_a+gamma_b)`` up to ``min(t_a, t_b)``).
- Synthesis: the snapshots' profiles ``p_k`` span a space; the target profile's least-squares
  projection onto it, ``x = argmin || sum_k x_k p_k - p_target ||_2``, solves ``A x = b`` with
  ``A_jk = <p_j, p_k>``, ``b_j = <p_j, p_target>`` (float64 ``lstsq``), and since the snapshots are
  linear in the weights, ``sum_k x_k snapshot_k`` is the EMA with the profile ``sum_k x_k p_k``. As in
  EDM2, ``x`` is rescaled to sum to 1 (a constant path stays constant).

Snapshots are one ``.safetensors`` file per track and step, ``phema-<step:09d>-<sigma_rel>.safetensors``,
written atomically (``<name>.tmp`` in the folder, fsync, rename); ``step``, ``sigma_rel`` and ``gamma``
are in the file's metadata, which is what the synthesis reads (the name is for people).

A *sharded* snapshot (an FSDP2 run: each rank holds its own shard of every track) is one such file per
rank, ``phema-<step:09d>-<sigma_rel>-rank<r:05d>-of-<w:05d>.safetensors``, holding that rank's local
shards; its metadata adds the rank, the number of ranks and, per tensor, the full tensor's shape and the
offset of the shard in it (:data:`LAYOUT_KEY`). The synthesis is linear, so it adds each shard, times its
snapshot's coefficient, into its place in the full tensor: the result is the full tensor, as from
single-file snapshots, and snapshots of runs with different numbers of ranks mix freely.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .atomic import write_atomically

__all__ = [
    "DEFAULT_SIGMA_RELS",
    "MAX_SIGMA_REL",
    "POSTHOC_EMA_SUBCOMMAND",
    "ShardPlace",
    "Snapshot",
    "Synthesis",
    "SynthesisResult",
    "gamma_to_sigma_rel",
    "list_snapshots",
    "posthoc_ema_main",
    "power_ema_beta",
    "profile_fit_error",
    "profile_inner_products",
    "save_snapshot",
    "save_snapshot_shard",
    "shard_name",
    "sigma_rel_to_gamma",
    "snapshot_name",
    "synthesis_coefficients",
    "synthesize",
    "synthesize_posthoc_ema",
]

#: Subcommand name (dispatched by ``sit-lightning``'s ``main`` before LightningCLI).
POSTHOC_EMA_SUBCOMMAND = "posthoc-ema"
#: The two tracks EDM2 trains with (Sec. 3.2).
DEFAULT_SIGMA_RELS: tuple[float, ...] = (0.05, 0.10)
#: sigma_rel of gamma = 0 (the uniform average); wider profiles have no gamma >= 0.
MAX_SIGMA_REL = 12.0**-0.5
SNAPSHOT_PREFIX = "phema"
SNAPSHOT_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth")
#: Metadata keys of a snapshot file (safetensors metadata holds strings only).
STEP_KEY = "posthoc_ema_step"
SIGMA_REL_KEY = "posthoc_ema_sigma_rel"
GAMMA_KEY = "posthoc_ema_gamma"
#: Metadata of a shard file (one rank's part of a sharded snapshot): its rank, the number of ranks, and
#: JSON ``{name: {"shape": full shape, "offset": where the shard starts in it}}``.
RANK_KEY = "posthoc_ema_rank"
WORLD_SIZE_KEY = "posthoc_ema_world_size"
LAYOUT_KEY = "posthoc_ema_layout"
#: Coefficients summing to less than this cannot be rescaled to 1: the target is far outside the snapshots' span.
_MIN_COEFFICIENT_SUM = 1e-3
#: The leading coefficients of the cubic in gamma (Eq. 126): gamma^3 + 7 gamma^2 + ...
_CUBIC_LEADING = (1.0, 7.0)


# ---- the profiles ------------------------------------------------------------------------------------
def _check_sigma_rel(sigma_rel: float) -> float:
    sigma_rel = float(sigma_rel)
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(
            f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}] (1/sqrt(12): the uniform average); got {sigma_rel}"
        )
    return sigma_rel


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma >= 0`` of the power-function EMA of relative width ``sigma_rel`` (EDM2 Eq. 126).

    The largest real root of ``gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2)`` with ``s = sigma_rel``
    (Algorithm 2), in float64. 0.05 -> 16.97, 0.10 -> 6.94.

    Raises:
        ValueError: ``sigma_rel`` is not in ``(0, 1/sqrt(12)]``.
    """
    inverse_square = _check_sigma_rel(sigma_rel) ** -2
    roots = np.roots([*_CUBIC_LEADING, 16.0 - inverse_square, 12.0 - inverse_square])
    return float(roots.real[np.abs(roots.imag) <= 1e-9 * np.abs(roots).max()].max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """``sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))``: the profile's standard deviation over its length (Eq. 123)."""
    gamma = float(gamma)
    if gamma < 0.0:
        raise ValueError(f"gamma must be >= 0; got {gamma}")
    return math.sqrt((gamma + 1.0) / (gamma + 2.0) ** 2 / (gamma + 3.0))


def power_ema_beta(step: int, gamma: float) -> float:
    """``beta_t = (1 - 1/t)^(gamma + 1)``, the decay of the update after optimizer step ``t >= 1`` (Eq. 127).

    ``beta_1 = 0``: the track starts as ``theta_1``, whatever it held before.
    """
    if step < 1:
        raise ValueError(f"step counts optimizer steps from 1; got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(
    steps_a: Sequence[float], gammas_a: Sequence[float], steps_b: Sequence[float], gammas_b: Sequence[float]
) -> np.ndarray:
    """``<p_a, p_b>`` for every pair: a ``(len(steps_a), len(steps_b))`` float64 matrix (EDM2 Eq. 151).

    ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]``; the integral of the product is
    ``(gamma_a+1)(gamma_b+1) min(t_a,t_b)^(gamma_a+gamma_b+1) / ((gamma_a+gamma_b+1) t_a^(gamma_a+1) t_b^(gamma_b+1))``,
    written with ``t_a / t_b`` to the power of the exponent of the longer profile so that nothing overflows.
    """
    t_a = np.asarray(steps_a, dtype=np.float64).reshape(-1, 1)
    g_a = np.asarray(gammas_a, dtype=np.float64).reshape(-1, 1)
    t_b = np.asarray(steps_b, dtype=np.float64).reshape(1, -1)
    g_b = np.asarray(gammas_b, dtype=np.float64).reshape(1, -1)
    exponent = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** exponent / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def synthesis_coefficients(
    steps: Sequence[int], sigma_rels: Sequence[float], target_step: int, target_sigma_rel: float
) -> np.ndarray:
    """The coefficients ``x`` with ``sum_k x_k snapshot_k`` closest (L2 over the profiles) to the target EMA.

    Args:
        steps: the step of each snapshot (optimizer steps averaged, >= 1), shape ``(K,)``.
        sigma_rels: the track of each snapshot, shape ``(K,)``.
        target_step: the step the synthesised EMA ends at (the snapshots after it are of no use: give
            only those at or before it).
        target_sigma_rel: the width of the synthesised profile.

    Returns:
        ``x``, float64 of shape ``(K,)``, summing to 1 (EDM2 Algorithm 3, with ``lstsq`` in place of
        ``solve`` so that duplicate snapshots do not make ``A`` singular).
    """
    if len(steps) != len(sigma_rels) or not len(steps):
        raise ValueError(
            f"need one sigma_rel per snapshot and at least one; got {len(steps)}, {len(sigma_rels)}"
        )
    if min(steps) < 1 or target_step < 1:
        raise ValueError(f"steps count optimizer steps from 1; got {min(steps)} and target {target_step}")
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    target_gamma = sigma_rel_to_gamma(target_sigma_rel)
    gram = profile_inner_products(steps, gammas, steps, gammas)  # (K, K)
    rhs = profile_inner_products(steps, gammas, [target_step], [target_gamma])[:, 0]  # (K,)
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    total = x.sum()
    if not abs(total) >= _MIN_COEFFICIENT_SUM:
        raise ValueError(
            f"the snapshots cannot represent sigma_rel {target_sigma_rel} at step {target_step} (the coefficients"
            f" sum to {total:.3g}): take more snapshots, or a target step and width closer to them"
        )
    return x / total


def profile_fit_error(
    steps: Sequence[int],
    sigma_rels: Sequence[float],
    coefficients: Sequence[float],
    target_step: int,
    target_sigma_rel: float,
) -> float:
    """``||sum_k x_k p_k - p_target|| / ||p_target||`` (L2 over tau): how well the snapshots reach the target.

    Closed form from the inner products, ``(x^T A x - 2 x^T b + c) / c`` with ``c = <p_target, p_target>``;
    0 for a tracked profile at a snapshot's step, near 1 for a target the snapshots cannot express.
    """
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    target_gamma = sigma_rel_to_gamma(target_sigma_rel)
    x = np.asarray(coefficients, dtype=np.float64)
    gram = profile_inner_products(steps, gammas, steps, gammas)
    rhs = profile_inner_products(steps, gammas, [target_step], [target_gamma])[:, 0]
    norm = profile_inner_products([target_step], [target_gamma], [target_step], [target_gamma])[0, 0]
    return math.sqrt(max(float(x @ gram @ x - 2.0 * x @ rhs + norm), 0.0) / norm)


# ---- snapshot files ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """One snapshot: the EMA of the track ``sigma_rel`` after ``step`` optimizer steps.

    ``path`` is its file; a sharded snapshot has one file per rank, ``shards`` (rank 0 first, ``path`` is
    rank 0's), and ``()`` otherwise.
    """

    path: Path
    step: int
    sigma_rel: float
    shards: tuple[Path, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file of the snapshot: the shards, or the one file."""
        return self.shards or (self.path,)


class ShardPlace(NamedTuple):
    """Where a local shard sits in its full tensor: the full ``shape`` and the ``offset`` of the shard's first element."""

    shape: tuple[int, ...]
    offset: tuple[int, ...]


def snapshot_name(step: int, sigma_rel: float) -> str:
    """``phema-<step:09d>-<sigma_rel>.safetensors`` (sigma_rel with 6 significant digits)."""
    return f"{SNAPSHOT_PREFIX}-{step:09d}-{sigma_rel:.6g}{SNAPSHOT_SUFFIX}"


def shard_name(step: int, sigma_rel: float, rank: int, world_size: int) -> str:
    """``phema-<step:09d>-<sigma_rel>-rank<rank:05d>-of-<world_size:05d>.safetensors``: one rank's shard file."""
    return f"{SNAPSHOT_PREFIX}-{step:09d}-{sigma_rel:.6g}-rank{rank:05d}-of-{world_size:05d}{SNAPSHOT_SUFFIX}"


def save_snapshot(tensors: Mapping[str, Tensor], directory: str | Path, step: int, sigma_rel: float) -> Path:
    """Write one track's tensors as ``directory/phema-<step>-<sigma_rel>.safetensors``, atomically.

    A crash while writing leaves the file complete or absent (and a ``.tmp`` only if the process dies
    between write and rename). Tensors are copied to the CPU and made contiguous.
    """
    return _write_snapshot_file(
        tensors, Path(directory) / snapshot_name(step, sigma_rel), step, sigma_rel, {}
    )


def _write_snapshot_file(
    tensors: Mapping[str, Tensor], path: Path, step: int, sigma_rel: float, extra: Mapping[str, str]
) -> Path:
    """The one writer of snapshot files: CPU contiguous copies, the step / sigma_rel / gamma metadata
    (plus ``extra``), atomically (:func:`~sit_lightning.atomic.write_atomically`)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    metadata = {
        "format": "pt",
        STEP_KEY: str(int(step)),
        SIGMA_REL_KEY: repr(float(sigma_rel)),
        GAMMA_KEY: repr(sigma_rel_to_gamma(sigma_rel)),
        **extra,
    }
    return write_atomically(path, lambda staging: save_file(cpu, str(staging), metadata=metadata))


def save_snapshot_shard(
    tensors: Mapping[str, Tensor],
    places: Mapping[str, ShardPlace],
    directory: str | Path,
    step: int,
    sigma_rel: float,
    rank: int,
    world_size: int,
) -> Path:
    """Write one rank's shards of one track as ``directory/`` :func:`shard_name`, atomically.

    Args:
        tensors: the rank's local shard of each tensor (an empty shard is fine).
        places: for each tensor, the full shape and the shard's offset in it (a tensor every rank
            holds whole: its shape and zeros).
        rank, world_size: this file's rank among the ``world_size`` files of the snapshot.

    Raises:
        ValueError: a shard does not fit inside its full tensor at its offset, or a place is missing.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got {rank}")
    if tensors.keys() != places.keys():
        raise ValueError(f"need one place per shard; differ: {sorted(tensors.keys() ^ places.keys())[:5]}")
    layout = {}
    for name, t in tensors.items():
        shape, offset = (tuple(int(n) for n in v) for v in places[name])
        _check_place(name, tuple(t.shape), shape, offset, f"rank {rank}")
        layout[name] = {"shape": list(shape), "offset": list(offset)}
    extra = {
        RANK_KEY: str(int(rank)),
        WORLD_SIZE_KEY: str(int(world_size)),
        LAYOUT_KEY: json.dumps(layout, separators=(",", ":")),
    }
    path = Path(directory) / shard_name(step, sigma_rel, rank, world_size)
    return _write_snapshot_file(tensors, path, step, sigma_rel, extra)


def _check_place(
    name: str, local: tuple[int, ...], shape: tuple[int, ...], offset: tuple[int, ...], where: str
) -> None:
    if not (len(local) == len(shape) == len(offset)) or any(
        o < 0 or o + n > s for n, s, o in zip(local, shape, offset, strict=True)
    ):
        raise ValueError(
            f"{where}: shard {name!r} of shape {list(local)} at offset {list(offset)} does not fit its full "
            f"shape {list(shape)}"
        )


@dataclass(frozen=True)
class _ShardFile:
    path: Path
    step: int
    sigma_rel: float
    rank: int
    world_size: int


def _read_header(path: Path) -> tuple[int, float, dict[str, str], dict[str, tuple[int, ...]]]:
    """A snapshot file's step, sigma_rel, metadata and tensor shapes (its header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    if STEP_KEY not in metadata or SIGMA_REL_KEY not in metadata:
        raise ValueError(f"{path} has no {STEP_KEY} / {SIGMA_REL_KEY} metadata: not a post-hoc EMA snapshot")
    return int(metadata[STEP_KEY]), float(metadata[SIGMA_REL_KEY]), metadata, shapes


def _shard_layout(path: Path, metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The checked ``{name: ShardPlace}`` of a shard file."""
    try:
        layout = json.loads(metadata[LAYOUT_KEY])
        places = {name: ShardPlace(tuple(v["shape"]), tuple(v["offset"])) for name, v in layout.items()}
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{path} has no readable {LAYOUT_KEY} metadata: not a post-hoc EMA shard file"
        ) from None
    if places.keys() != shapes.keys():
        raise ValueError(f"{path}: its {LAYOUT_KEY} names other tensors than the file holds")
    for name, place in places.items():
        _check_place(name, shapes[name], place.shape, place.offset, str(path))
    return places


def _check_shard_set(files: Sequence[_ShardFile], directory: Path) -> tuple[Path, ...]:
    """The files of one sharded snapshot in rank order, or a one-line error naming what is missing or mixed."""
    head = files[0]
    what = f"{directory}: the sharded snapshot of step {head.step}, sigma_rel {head.sigma_rel:g}"
    sizes = sorted({f.world_size for f in files})
    if len(sizes) > 1:
        raise ValueError(f"{what} mixes shard files of runs with {sizes} ranks: keep the files of one run")
    world_size = sizes[0]
    ranks = [f.rank for f in files]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"{what} has several files of one rank: {sorted(f.path.name for f in files)}")
    missing = sorted(set(range(world_size)) - set(ranks))
    if missing:
        names = ", ".join(shard_name(head.step, head.sigma_rel, r, world_size) for r in missing[:3])
        raise ValueError(
            f"{what} lacks the file of rank {missing[0]} of {world_size} ({len(missing)} missing: {names}"
            f"{', ...' if len(missing) > 3 else ''}): copy every rank's files into the folder"
        )
    return tuple(f.path for f in sorted(files, key=lambda f: f.rank))


def list_snapshots(directory: str | Path) -> list[Snapshot]:
    """The snapshots of ``directory``, sorted by step and sigma_rel (reads only the files' headers).

    One-file snapshots and sharded ones (one file per rank, see the module docstring) both count; the
    shard files of a snapshot are checked to be complete (every rank of one run) and to place their
    shards inside the full tensors.

    Raises:
        ValueError: ``directory`` is not a folder or holds no snapshot; a sharded snapshot lacks a rank's
            file or mixes the files of runs with different numbers of ranks; a step and sigma_rel has
            both a one-file and a sharded snapshot.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a folder of post-hoc EMA snapshots")
    pattern = re.compile(rf"{SNAPSHOT_PREFIX}-\d+-.+{re.escape(SNAPSHOT_SUFFIX)}")
    whole: dict[tuple[int, float], Path] = {}
    sharded: dict[tuple[int, float], list[_ShardFile]] = {}
    for path in sorted(directory.iterdir()):
        if not pattern.fullmatch(path.name):
            continue
        step, sigma_rel, metadata, shapes = _read_header(path)
        if RANK_KEY not in metadata:
            whole[(step, sigma_rel)] = path
            continue
        _shard_layout(path, metadata, shapes)
        try:
            rank, world_size = int(metadata[RANK_KEY]), int(metadata[WORLD_SIZE_KEY])
        except (KeyError, ValueError):
            raise ValueError(f"{path} has no readable {RANK_KEY} / {WORLD_SIZE_KEY} metadata") from None
        sharded.setdefault((step, sigma_rel), []).append(_ShardFile(path, step, sigma_rel, rank, world_size))
    both = sorted(whole.keys() & sharded.keys())
    if both:
        step, sigma_rel = both[0]
        raise ValueError(
            f"{directory} holds both a one-file and a sharded snapshot of step {step}, sigma_rel {sigma_rel:g}:"
            " keep the files of one run"
        )
    found = [Snapshot(path, step, sigma_rel) for (step, sigma_rel), path in whole.items()]
    for (step, sigma_rel), files in sharded.items():
        shards = _check_shard_set(files, directory)
        found.append(Snapshot(shards[0], step, sigma_rel, shards))
    if not found:
        raise ValueError(f"{directory} holds no {SNAPSHOT_PREFIX}-*{SNAPSHOT_SUFFIX} snapshot")
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


@dataclass(frozen=True)
class Synthesis:
    """A synthesised EMA: its weights (float32, by parameter name), and the snapshots and coefficients used."""

    weights: dict[str, Tensor]
    step: int
    sigma_rel: float
    snapshots: tuple[Snapshot, ...]
    coefficients: np.ndarray  # (len(snapshots),) float64, summing to 1
    fit_error: float  # profile_fit_error of the coefficients


@torch.no_grad()
def synthesize(snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None) -> Synthesis:
    """The EMA of width ``sigma_rel`` at ``step`` as ``sum_k x_k snapshot_k`` (float64 sums, float32 out).

    Args:
        snapshots: the files (:func:`list_snapshots`).
        sigma_rel: the target width.
        step: the target step, one of the snapshots' steps (``None``: the latest); snapshots after it are
            left out.

    Raises:
        ValueError: ``step`` has no snapshot, the snapshots hold different tensors (names or full
            shapes), or a sharded snapshot's shards overlap or leave part of a tensor uncovered.

    Sharded snapshots are reassembled while summing: each shard, times its snapshot's coefficient, is
    added into its place in the full tensor (the same float64 sums as from one-file snapshots).
    """
    steps = sorted({s.step for s in snapshots})
    if not steps:
        raise ValueError("no snapshots to synthesise from")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise ValueError(f"step {step} has no snapshot; the snapshots are at steps {steps}")
    used = [s for s in snapshots if s.step <= step]
    x = synthesis_coefficients([s.step for s in used], [s.sigma_rel for s in used], step, sigma_rel)
    weights: dict[str, Tensor] = {}
    with ExitStack() as stack:  # one tensor at a time over all files: memory of one float64 tensor
        readers = [_SnapshotReader(s, stack) for s in used]
        shapes = readers[0].shapes
        for s, reader in zip(used, readers, strict=True):
            if reader.shapes != shapes:
                differ = sorted(
                    k for k in shapes.keys() | reader.shapes.keys() if shapes.get(k) != reader.shapes.get(k)
                )
                raise ValueError(
                    f"{s.path} holds other tensors than {used[0].path} (names or full shapes differ: {differ[:5]})"
                )
        for name, shape in shapes.items():
            total = torch.zeros(shape, dtype=torch.float64)
            for coefficient, reader in zip(x, readers, strict=True):
                reader.add_into(total, name, float(coefficient))
            weights[name] = total.float()
    used_steps, used_sigmas = [s.step for s in used], [s.sigma_rel for s in used]
    error = profile_fit_error(used_steps, used_sigmas, x, step, sigma_rel)
    return Synthesis(weights, step, float(sigma_rel), tuple(used), x, error)


class _SnapshotReader:
    """The open files of one snapshot: the full shape of each tensor, and its (reassembled) sum into a total."""

    def __init__(self, snapshot: Snapshot, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.snapshot = snapshot
        self.files = [stack.enter_context(safe_open(str(p), framework="pt")) for p in snapshot.files]
        self.places: list[dict[str, ShardPlace]] | None = None
        local = [{name: tuple(f.get_slice(name).get_shape()) for name in f.keys()} for f in self.files]
        if not snapshot.shards:
            self.shapes = local[0]
            return
        self.places = [
            _shard_layout(p, f.metadata() or {}, shapes)
            for p, f, shapes in zip(snapshot.shards, self.files, local, strict=True)
        ]
        self.shapes = {name: place.shape for name, place in self.places[0].items()}
        for path, places in zip(snapshot.shards[1:], self.places[1:], strict=True):
            if {name: place.shape for name, place in places.items()} != self.shapes:
                raise ValueError(
                    f"{path} holds other tensors (names or full shapes) than {snapshot.shards[0]}, the same"
                    " snapshot's rank 0: keep the files of one run"
                )

    def add_into(self, total: Tensor, name: str, coefficient: float) -> None:
        """``total += coefficient * snapshot[name]`` (float64), placing each shard where it belongs."""
        if self.places is None:
            total.add_(self.files[0].get_tensor(name).double(), alpha=coefficient)
            return
        covered = torch.zeros(total.shape, dtype=torch.bool)
        seen: set[tuple[Any, ...]] = set()
        for path, f, places in zip(self.snapshot.shards, self.files, self.places, strict=True):
            shard = f.get_tensor(name)
            key = (places[name].offset, tuple(shard.shape))
            if key in seen:  # a replica's copy (e.g. HSDP: the same shard on every replica)
                continue
            seen.add(key)
            box = tuple(slice(o, o + n) for o, n in zip(places[name].offset, shard.shape, strict=True))
            if covered[box].any():
                raise ValueError(
                    f"{path}: the shard of {name!r} overlaps another rank's in the same snapshot"
                )
            covered[box] = True
            total[box].add_(shard.double(), alpha=coefficient)
        if not covered.all():
            raise ValueError(
                f"the shards of {name!r} in the snapshot of step {self.snapshot.step}, sigma_rel "
                f"{self.snapshot.sigma_rel:g} leave {int((~covered).sum())} of its {covered.numel()} elements uncovered"
            )


# ---- the command -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthesisResult:
    """One synthesis: the file written, the target, and the snapshots with their coefficients."""

    output: Path
    sigma_rel: float
    step: int
    coefficients: tuple[tuple[int, float, float], ...]  # (step, sigma_rel, coefficient) per snapshot
    fit_error: float  # relative L2 distance of the synthesised profile from the requested one


def synthesize_posthoc_ema(
    snapshot_dir: str,
    output: str,
    *,
    sigma_rel: float,
    step: int | None = None,
    strip_prefix: str = "network.",
) -> SynthesisResult:
    """Synthesise the EMA of width ``sigma_rel`` from the snapshots of a post-hoc EMA run.

    Args:
        snapshot_dir: the callback's folder (``<log dir>/posthoc_ema`` by default); an FSDP2 run's shard
            files (one per rank and snapshot) are reassembled into full tensors.
        output: the state dict to write (atomically): ``.safetensors``, or ``.pt`` / ``.pth`` (a bare state
            dict); both are what ``load_released_sit`` and ``sit-lightning convert`` read.
        sigma_rel: the EMA width relative to the training length, in ``(0, 0.2887]``; EDM2 finds the best
            near 0.05-0.15. The released decay 0.9999 is ``sigma_rel ~ 1e4 / step`` (docs/training.md).
        step: the optimizer step to synthesise at, one with snapshots (default: the latest).
        strip_prefix: removed from every name that starts with it (``SiTModule`` keeps the network under
            ``network.``), which gives the released layout.
    """
    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in (SNAPSHOT_SUFFIX, *TORCH_SUFFIXES):
        raise ValueError(f"output must end in {SNAPSHOT_SUFFIX}, .pt or .pth; got {out.name!r}")
    synthesis = synthesize(list_snapshots(snapshot_dir), _check_sigma_rel(sigma_rel), step)
    state = {_strip(name, strip_prefix): t for name, t in synthesis.weights.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == SNAPSHOT_SUFFIX:
        from safetensors.torch import save_file

        # no STEP_KEY: the output is not a snapshot, and list_snapshots must not take it for one
        metadata = {"format": "pt", "posthoc_ema": f"sigma_rel {sigma_rel!r} at step {synthesis.step}"}
        write_atomically(out, lambda staging: save_file(state, str(staging), metadata=metadata))
    else:
        write_atomically(out, lambda staging: torch.save(state, staging))
    rows = tuple(
        (s.step, s.sigma_rel, float(c))
        for s, c in zip(synthesis.snapshots, synthesis.coefficients, strict=True)
    )
    return SynthesisResult(out, float(sigma_rel), synthesis.step, rows, synthesis.fit_error)


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def _largest(rows: Iterable[tuple[int, float, float]], count: int) -> list[tuple[int, float, float]]:
    return sorted(rows, key=lambda row: -abs(row[2]))[:count]


def posthoc_ema_main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``sit-lightning posthoc-ema SNAPSHOT_DIR OUTPUT --sigma_rel S [--step N]``.

    ``argv`` holds the arguments after the subcommand name. A bad folder, file or value exits with
    status 2 and a one-line message.
    """
    from jsonargparse import auto_cli

    from .errors import exit_in_one_line, subcommand_argv

    argv = subcommand_argv(POSTHOC_EMA_SUBCOMMAND, argv)
    with exit_in_one_line(POSTHOC_EMA_SUBCOMMAND, ValueError, OSError):
        result = auto_cli(
            synthesize_posthoc_ema,
            args=argv,
            prog=f"sit-lightning {POSTHOC_EMA_SUBCOMMAND}",
            allow_abbrev=False,
        )
    largest = ", ".join(f"step {t} sigma_rel {s:g}: {c:+.4f}" for t, s, c in _largest(result.coefficients, 4))
    print(
        f"wrote {result.output} (EMA sigma_rel {result.sigma_rel:g} at step {result.step}, from "
        f"{len(result.coefficients)} snapshots; profile error {result.fit_error:.2%}; largest coefficients {largest})"
    )
    return 0
