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
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .atomic import write_atomically

__all__ = [
    "DEFAULT_SIGMA_RELS",
    "MAX_SIGMA_REL",
    "POSTHOC_EMA_SUBCOMMAND",
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
    """One snapshot file: the EMA of the track ``sigma_rel`` after ``step`` optimizer steps."""

    path: Path
    step: int
    sigma_rel: float


def snapshot_name(step: int, sigma_rel: float) -> str:
    """``phema-<step:09d>-<sigma_rel>.safetensors`` (sigma_rel with 6 significant digits)."""
    return f"{SNAPSHOT_PREFIX}-{step:09d}-{sigma_rel:.6g}{SNAPSHOT_SUFFIX}"


def save_snapshot(tensors: Mapping[str, Tensor], directory: str | Path, step: int, sigma_rel: float) -> Path:
    """Write one track's tensors as ``directory/phema-<step>-<sigma_rel>.safetensors``, atomically.

    A crash while writing leaves the file complete or absent (and a ``.tmp`` only if the process dies
    between write and rename). Tensors are copied to the CPU and made contiguous.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    metadata = {
        "format": "pt",
        STEP_KEY: str(int(step)),
        SIGMA_REL_KEY: repr(float(sigma_rel)),
        GAMMA_KEY: repr(sigma_rel_to_gamma(sigma_rel)),
    }
    path = directory / snapshot_name(step, sigma_rel)
    return write_atomically(path, lambda staging: save_file(cpu, str(staging), metadata=metadata))


def list_snapshots(directory: str | Path) -> list[Snapshot]:
    """The snapshot files of ``directory``, sorted by step and sigma_rel (reads only their headers).

    Raises:
        ValueError: ``directory`` is not a folder, or holds no snapshot.
    """
    from safetensors import safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a folder of post-hoc EMA snapshots")
    pattern = re.compile(rf"{SNAPSHOT_PREFIX}-\d+-.+{re.escape(SNAPSHOT_SUFFIX)}")
    found = []
    for path in sorted(directory.iterdir()):
        if not pattern.fullmatch(path.name):
            continue
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if STEP_KEY not in metadata or SIGMA_REL_KEY not in metadata:
            raise ValueError(
                f"{path} has no {STEP_KEY} / {SIGMA_REL_KEY} metadata: not a post-hoc EMA snapshot"
            )
        found.append(Snapshot(path, int(metadata[STEP_KEY]), float(metadata[SIGMA_REL_KEY])))
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
        ValueError: ``step`` has no snapshot, or the files hold different tensors.
    """
    from contextlib import ExitStack

    from safetensors import safe_open

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
        files = [stack.enter_context(safe_open(str(s.path), framework="pt")) for s in used]
        names = list(files[0].keys())
        for s, f in zip(used, files, strict=True):
            if sorted(f.keys()) != sorted(names):
                raise ValueError(f"{s.path} holds other tensors than {used[0].path}")
        for name in names:
            total = torch.zeros(files[0].get_slice(name).get_shape(), dtype=torch.float64)
            for coefficient, f in zip(x, files, strict=True):
                total.add_(f.get_tensor(name).double(), alpha=float(coefficient))
            weights[name] = total.float()
    used_steps, used_sigmas = [s.step for s in used], [s.sigma_rel for s in used]
    error = profile_fit_error(used_steps, used_sigmas, x, step, sigma_rel)
    return Synthesis(weights, step, float(sigma_rel), tuple(used), x, error)


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
        snapshot_dir: the callback's folder (``<log dir>/posthoc_ema`` by default).
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

    if argv is None:
        argv = sys.argv[1:]
        if argv[:1] == [POSTHOC_EMA_SUBCOMMAND]:
            argv = argv[1:]
    try:
        result = auto_cli(synthesize_posthoc_ema, args=argv, prog=f"sit-lightning {POSTHOC_EMA_SUBCOMMAND}")
    except (ValueError, OSError) as err:
        print(f"sit-lightning {POSTHOC_EMA_SUBCOMMAND}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    largest = ", ".join(f"step {t} sigma_rel {s:g}: {c:+.4f}" for t, s, c in _largest(result.coefficients, 4))
    print(
        f"wrote {result.output} (EMA sigma_rel {result.sigma_rel:g} at step {result.step}, from "
        f"{len(result.coefficients)} snapshots; profile error {result.fit_error:.2%}; largest coefficients {largest})"
    )
    return 0
