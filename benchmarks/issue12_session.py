"""Issue 12 on one GPU in one process, in at most 5 minutes: every figure, in priority order.

Usage (from the repository root; ``benchmarks/gpu_session.sh`` runs the same)::

    PYTHONPATH=src python benchmarks/issue12_session.py --out results/gpu_session        # lent GPU
    PYTHONPATH=src python benchmarks/issue12_session.py --out results/gpu_session \\
        --checkpoint SiT-XL-2-256x256.pt --vae path/to/sd-vae-ft-ema                    # optional inputs
    PYTHONPATH=src python benchmarks/issue12_session.py --smoke --out /tmp/smoke          # CPU rehearsal

One Python process (torch and Lightning are imported once) runs the parts below in priority order
against one deadline, ``--budget`` seconds (290) from the start of ``main``, and always ends with
``issue12_summary.py``'s table: printed, and in ``OUT/issue12_summary.md`` with a table of the parts.
Each part calls a benchmark's ``main(argv)`` here, which rewrites its own JSON + markdown in OUT after
every row; ``OUT/session.json`` (the parts with their planned limit, seconds and status, the
environment, the options) is rewritten atomically before and after every part, so a run killed from
outside still leaves what it measured and which part was running.

Parts (most important first), with the planned seconds of the GPU run:

====  ==============  =====  ==========================================================================
 #    part            plan   what it runs
====  ==============  =====  ==========================================================================
 1    data             8 s   keyed_draws.py on the CPU, one thread: the data workers' posterior noise
                             (per-sample generators, Philox v1/v2/v3) and a whole ``LatentSource.load``
                             (now / before version 3) for 256x4x32x32 -> ``keyed_draws.json``
 2    train_xl        90 s   train_throughput.py, SiT-XL/2 b64: the bf16 matmul rate, then released,
                             bf16_compile (keyed) and bf16_compile_unkeyed -> ``train_throughput_xl``
 3    fit_xl          32 s   lightning_overhead.py, SiT-XL/2 b64 compiled: ``Trainer.fit`` (fit's own
                             step, keyed draws) against a plain loop, 2 rounds -> ``lightning_overhead_xl``
 4    train_b2        42 s   as 2 for SiT-B/2 b256 -> ``train_throughput_b2``
 5    fit_b2          20 s   as 3 for SiT-B/2 b256 -> ``lightning_overhead_b2``
 6    sample          84 s   sample_throughput.py: guided SiT-XL/2 Heun 250 NFE cfg 1.5 on 64 samples:
                             released heun2, our fp32 (the reference), bf16_compile -> ``sample_throughput``
 7    draws_cuda       4 s   keyed_draws.py on CUDA: the training draws per batch -> ``keyed_draws_cuda``
====  ==============  =====  ==========================================================================

The plan adds up to 280 s; the other 10 s are the start (imports of torch and Lightning, CUDA's
initialisation: about 5-7 s) and the summary (well under a second). With ``--budget`` other than 290
every planned share scales with it. A part's hard limit is its planned share plus whatever the parts
before it left unused (so time saved early rolls on to later parts), never past the deadline; a part
whose limit would be below its minimum (30 s for train_xl, 45 s for sample, ...) is not started and
is recorded as ``not reached``. The benchmark inside gets ``--time-budget`` = the limit minus the
least time its next row needs, so that it skips the rows it cannot finish (with a note in their
rows); the hard limit itself is a SIGALRM that raises :class:`PartTimeout` (status ``cut``: the rows
written so far stay). An exception in a part is its status (``error: ...``) and the session goes on.

Estimates behind the plan. Nothing here was measured on a GPU (this was written on a CPU-only
machine; ``--smoke`` is what was run): the numbers below are estimates from the model sizes, the
H100/H200 bf16 and TF32 rates and the usual torch.compile times, to be replaced by the first run's
``session.json``. The released XL recipe runs at about 170 img/s (docs/performance.md, H100), so
3 warm-up + 10 timed steps of b64 take about 5 s; a compiled bf16 step of XL b64 about 0.1 s.
Compiling SiT-XL/2's forward and backward takes roughly 40-70 s with a cold inductor cache and
10-20 s with a warm one (dynamo still traces the 28 blocks; the FX graph and AOT autograd caches
skip the rest); SiT-B/2 about half of that. All compiles share one inductor cache (``--inductor-cache``,
default ``OUT/inductor_cache``): bf16_compile_unkeyed and fit_xl compile the same network graph as
bf16_compile and so hit the cache in the same run, fit_b2 hits train_b2's, and a second run of the
session is warm throughout. Sampling: one guided XL forward of the doubled batch (128) is about
30 TFLOP, 250 of them 7.6 PFLOP: about 25-30 s in TF32 (released and our fp32 each), about 13 s in
bf16 compiled, plus a 20-40 s cold compile of the inference graph. Cold, the parts come to about
3 + 85 + 30 + 40 + 18 + 100 + 2 s, which is the budget with no room; warm (a rerun with the same
cache), about 200 s. What a tight run loses is the tail of the priority order: sample's bf16_compile
variant (the 2x goal then reads ``FAIL`` or ``n/a``), then draws_cuda; rerunning with the cache of the
first run is the remedy. The plain ``bf16`` sampling variant is left out (about 15 s); the issue's
goals need released, fp32 and the fastest of ours.

Why this order: the data part is seconds and needs no GPU; SiT-XL/2's training figures carry most
goals (speed-up, MFU against the rate measured in the same run, memory, keyed / unkeyed, overhead),
then SiT-B/2's cheaper three; sampling is the single most expensive part and carries two goals, so it
comes after them; the GPU draws table has no goal of its own (the keyed / unkeyed goal is measured
through the training step).

``--smoke``: a one-block width-32 SiT on the CPU, batches of 2-4, 1 warm-up and 2 timed steps, the
sampling benchmark's ``--smoke``, tiny draw shapes; the compile recipes and the ``bf16_compile``
sample are skipped on the CPU (their rows say so) and draws_cuda is ``skipped on CPU``. About 5-10 s
in all, with the Python start.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["Part", "PartTimeout", "configure_inductor_cache", "main", "plan_parts"]

HERE = Path(__file__).resolve().parent
DEFAULT_BUDGET_S = 290.0
#: Seconds kept back for the summary at the end (a fraction of it for small budgets).
SUMMARY_RESERVE_S = 3.0
SMOKE_MINIMUM_S = 0.5
#: After a part's hard limit, the alarm goes off again this often until the part has ended.
ALARM_REPEAT_S = 5.0
INDUCTOR_CACHE_VARIABLES = ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")
SESSION_NAME = "session"
SUMMARY_NAME = "issue12_summary"
TINY = ["--device", "cpu", "--depth", "1", "--hidden-size", "32", "--num-heads", "2"]
#: Every file the session writes in OUT (removed at its start, so that no earlier run's rows mix in).
OUTPUTS = (
    "keyed_draws",
    "keyed_draws_cuda",
    "train_throughput_xl",
    "train_throughput_b2",
    "lightning_overhead_xl",
    "lightning_overhead_b2",
    "sample_throughput",
    SUMMARY_NAME,
)


class PartTimeout(BaseException):
    """A part reached its hard limit (raised by SIGALRM).

    A ``BaseException``, like ``KeyboardInterrupt``: the benchmarks catch ``Exception`` per row (an OOM
    is that row's result and they go on), which must not swallow the end of the part.
    """


@dataclass
class Part:
    """One part of the session: ``run(session, time_budget_s)`` runs a benchmark in this process."""

    name: str
    plan_s: float  # planned seconds of the 290-second GPU run (scaled with --budget)
    minimum_s: float  # not started with a shorter limit
    run: Callable[[Session, float], None]
    next_row_s: float = 0.0  # the benchmark's --time-budget is the limit minus this
    cuda_only: bool = False


@dataclass
class PartRecord:
    name: str
    planned_s: float
    status: str = "pending"
    limit_s: float | None = None
    started_s: float | None = None  # since the session's start
    seconds: float | None = None


@dataclass
class Session:
    """What the parts share: the options, the output folder, the device and the records."""

    args: argparse.Namespace
    out: Path
    cuda: bool
    began: float
    deadline: float
    inductor: dict[str, str]
    environment: dict[str, Any] = field(default_factory=dict)
    records: list[PartRecord] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def write(self, finished: bool = False) -> None:
        """``OUT/session.json``, replaced atomically (a temporary file, then ``os.replace``)."""
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()}
        payload = {
            "budget_s": self.args.budget,
            "elapsed_s": round(self.elapsed(), 3),
            "finished": finished,
            "options": options,
            "inductor": self.inductor,
            "environment": self.environment,
            "parts": [asdict(record) for record in self.records],
            "parts_table": parts_table(self.records),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{SESSION_NAME}.json"
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(temporary, path)


def parts_table(records: Sequence[PartRecord]) -> str:
    lines = ["| part | status | limit s | seconds |", "|---|---|---:|---:|"]
    for r in records:
        limit = "" if r.limit_s is None else f"{r.limit_s:.0f}"
        seconds = "" if r.seconds is None else f"{r.seconds:.1f}"
        lines.append(f"| {r.name} | {r.status.replace('|', '/')} | {limit} | {seconds} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The inductor cache and the hard limit
# ------------------------------------------------------------------------------------------------
def configure_inductor_cache(cache: Path, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Point every compile of this process (and of a rerun) at one inductor cache, unless set already.

    Sets ``TORCHINDUCTOR_CACHE_DIR`` (to ``cache``), ``TORCHINDUCTOR_FX_GRAPH_CACHE=1`` and
    ``TORCHINDUCTOR_AUTOGRAD_CACHE=1`` in ``environ`` (``os.environ``) where they are not set; to take
    full effect this runs before torch is imported (inductor reads the cache folder at each use, the
    two switches when its config is first imported). Returns the three values in effect.
    """
    environ = os.environ if environ is None else environ
    environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    for name in INDUCTOR_CACHE_VARIABLES:
        environ.setdefault(name, "1")
    return {name: environ[name] for name in ("TORCHINDUCTOR_CACHE_DIR", *INDUCTOR_CACHE_VARIABLES)}


@dataclass
class Alarm:
    fired: bool = False


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[Alarm]:
    """Raise :class:`PartTimeout` in the block after ``seconds`` (SIGALRM; main thread only, else no limit).

    The signal's handler runs between two Python-level operations: it interrupts the Python code of a
    benchmark (a training loop, torch.compile's tracing), not one CUDA kernel or a C++ call in flight,
    which finish first (a synchronisation waiting on the device returns, then the exception is raised).
    The alarm repeats every ``ALARM_REPEAT_S`` until the block ends, in case code in between turned the
    exception into an ordinary error and went on; ``Alarm.fired`` says whether it went off at all.
    """
    alarm = Alarm()
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield alarm
        return

    def on_alarm(signum: int, frame: Any) -> None:
        alarm.fired = True
        raise PartTimeout(f"hard limit of {seconds:.1f} s reached")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3), ALARM_REPEAT_S)
    try:
        yield alarm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------
# The parts
# ------------------------------------------------------------------------------------------------
def _benchmark(name: str) -> ModuleType:
    """A benchmark beside this file, imported as a module (as they import bench_records)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module(name)


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy (keyed_draws.py prints its tables)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        return self.copy.write(text)

    def flush(self) -> None:
        self.stream.flush()


def _keyed_draws(session: Session, argv: list[str], name: str) -> None:
    import torch

    records = _benchmark("bench_records")
    threads = torch.get_num_threads()
    tee = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(tee):
            rows = _benchmark("keyed_draws").main(argv)
    finally:
        torch.set_num_threads(threads)  # --threads 1 is for this part only
    device = torch.device("cuda" if "cuda" in argv else "cpu")
    payload = {
        "environment": records.environment(device),
        "settings": {
            "threads": 1 if "--threads" in argv else threads,
            "command": records.command_line("keyed_draws.py", argv),
        },
        "rows": rows,
    }
    records.write_result(session.out, name, payload, tee.copy.getvalue())


def run_data(session: Session, budget: float) -> None:
    shape = "16x4x8x8" if session.args.smoke else "256x4x32x32"
    reps = ["--warmup", "0", "--reps", "1"] if session.args.smoke else ["--warmup", "1", "--reps", "5"]
    argv = ["--batches", "", "--device", "cpu", "--posterior", shape, "--threads", "1", *reps]
    _keyed_draws(session, argv, "keyed_draws")


def run_draws_cuda(session: Session, budget: float) -> None:
    argv = ["--batches", "256x4x32x32,64x4x32x32", "--device", "cuda", "--posterior", ""]
    _keyed_draws(session, [*argv, "--warmup", "2", "--reps", "10"], "keyed_draws_cuda")


def _train(model: str, name: str) -> Callable[[Session, float], None]:
    def run(session: Session, budget: float) -> None:
        out = ["--out", str(session.out), "--result-name", name]
        if session.args.smoke:
            argv = [
                *TINY,
                "--models",
                model,
                "--warmup",
                "1",
                "--steps",
                "2",
            ]  # every recipe; compile skipped
        else:
            recipes = "released,bf16_compile,bf16_compile_unkeyed"
            argv = ["--models", model, "--recipes", recipes, "--warmup", "3", "--steps", "10"]
        _benchmark("train_throughput").main([*argv, "--time-budget", f"{budget:.1f}", *out])

    return run


def _fit(model: str, name: str) -> Callable[[Session, float], None]:
    def run(session: Session, budget: float) -> None:
        out = ["--out", str(session.out), "--result-name", name]
        if session.args.smoke:
            argv = [*TINY, "--models", model, "--warmup", "1", "--steps", "2"]
        else:
            argv = ["--models", model, "--compile", "--warmup", "5", "--steps", "15", "--rounds", "2"]
        _benchmark("lightning_overhead").main([*argv, "--time-budget", f"{budget:.1f}", *out])

    return run


def run_sample(session: Session, budget: float) -> None:
    args = session.args
    if args.smoke:
        argv = ["--smoke", "--device", "cpu"]
    else:
        argv = ["--num-samples", "64", "--variants", "released,fp32,bf16_compile"]
    argv += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    argv += ["--vae", args.vae] if args.vae else []
    _benchmark("sample_throughput").main([*argv, "--time-budget", f"{budget:.1f}", "--out", str(session.out)])


def plan_parts(smoke: bool) -> list[Part]:
    """The parts in priority order with their planned seconds of the 290-second GPU run (module docstring)."""
    parts = [
        Part("data", 8, 2, run_data),
        Part(
            "train_xl",
            90,
            30,
            _train("SiT-XL/2:64" if not smoke else "SiT-XL/2:2", "train_throughput_xl"),
            15,
        ),
        Part(
            "fit_xl", 32, 20, _fit("SiT-XL/2:64" if not smoke else "SiT-XL/2:2", "lightning_overhead_xl"), 8
        ),
        Part(
            "train_b2", 42, 15, _train("SiT-B/2:256" if not smoke else "SiT-B/2:4", "train_throughput_b2"), 10
        ),
        Part("fit_b2", 20, 10, _fit("SiT-B/2:256" if not smoke else "SiT-B/2:4", "lightning_overhead_b2"), 5),
        Part("sample", 84, 45, run_sample, 10),
        Part("draws_cuda", 4, 2, run_draws_cuda, cuda_only=True),
    ]
    if smoke:  # tiny models: a part needs well under a second
        for part in parts:
            part.minimum_s, part.next_row_s = SMOKE_MINIMUM_S, 0.0
    return parts


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def _free_memory() -> None:
    """Between parts: drop compiled graphs and cached CUDA blocks (after a cut, let the device finish)."""
    import torch

    gc.collect()
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _limit(session: Session, parts: Sequence[Part], index: int, scale: float, reserve: float) -> float:
    """The hard limit of part ``index``: its planned share plus what the parts before it left unused."""
    remaining = session.deadline - reserve - time.perf_counter()
    planned_rest = sum(p.plan_s * scale for p in parts[index:] if session.cuda or not p.cuda_only)
    unused = max(0.0, remaining - planned_rest)
    return max(0.0, min(parts[index].plan_s * scale + unused, remaining))


def _status(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"error: {type(err).__name__}: {text}"[:300]


def _run_parts(session: Session, parts: Sequence[Part], scale: float, reserve: float) -> None:
    stop = False
    for index, (part, record) in enumerate(zip(parts, session.records, strict=True)):
        if part.cuda_only and not session.cuda:
            record.status = "skipped on CPU"
            continue
        limit = _limit(session, parts, index, scale, reserve)
        if stop or limit < part.minimum_s:
            record.status, record.limit_s = "not reached", round(limit, 1)
            print(
                f"== {part.name}: not reached ({limit:.0f} s left of its minimum {part.minimum_s:.0f} s)",
                flush=True,
            )
            session.write()
            continue
        record.status, record.limit_s, record.started_s = (
            "running",
            round(limit, 1),
            round(session.elapsed(), 1),
        )
        session.write()
        print(
            f"\n== {part.name} (limit {limit:.0f} s, {session.elapsed():.0f} s into the session)", flush=True
        )
        start = time.perf_counter()
        alarm = Alarm()
        try:
            with hard_limit(limit) as alarm:
                part.run(session, max(0.0, limit - part.next_row_s))
            record.status = "cut" if alarm.fired else "ok"  # "cut": a PartTimeout was caught inside
        except PartTimeout:
            record.status = "cut"
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was measured, write the summary, stop
            record.status, stop = "cut (interrupted)", True
        except (Exception, SystemExit) as err:  # a part's failure is its status; the session goes on
            traceback.print_exc()
            record.status = "cut" if alarm.fired else _status(err)
            # PreemptionCallback's exit (SIGTERM during Trainer.fit, after its checkpoint): stop too
            stop = type(err).__name__ == "Preempted"
        record.seconds = round(time.perf_counter() - start, 2)
        with contextlib.suppress(Exception):
            _free_memory()
        print(f"== {part.name}: {record.status} in {record.seconds:.1f} s", flush=True)
        session.write()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("results/gpu_session"), help="results folder")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds from the start to the end of the summary (default {DEFAULT_BUDGET_S:.0f})")  # fmt: skip
    parser.add_argument("--inductor-cache", type=Path, default=None,
                        help="TORCHINDUCTOR_CACHE_DIR unless set (default OUT/inductor_cache)")  # fmt: skip
    parser.add_argument("--checkpoint", default=None, help="released SiT-XL/2 weights for the sampling part")
    parser.add_argument("--vae", default=None, help="local diffusers AutoencoderKL: uint8 differences")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (a rehearsal, seconds)")
    return parser


def main(
    argv: Sequence[str] | None = None, environ: MutableMapping[str, str] | None = None
) -> dict[str, Any]:
    """Run the session (``argv`` as on the command line); returns ``session.json``'s content."""
    began = time.perf_counter()
    args = _build_parser().parse_args(argv)
    out: Path = args.out
    inductor = configure_inductor_cache(args.inductor_cache or out / "inductor_cache", environ)

    import torch  # after the inductor variables: every compile of the session shares the cache

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit(
            "no CUDA device: the session measures GPU figures (use --smoke for the CPU rehearsal)"
        )
    if cuda and inductor["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1":  # torch imported before main: set them too
        with contextlib.suppress(Exception):
            import torch._functorch.config
            import torch._inductor.config

            torch._inductor.config.fx_graph_cache = True
            torch._functorch.config.enable_autograd_cache = inductor["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        for suffix in (".json", ".md"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)

    parts = plan_parts(args.smoke)
    scale = args.budget / DEFAULT_BUDGET_S
    reserve = min(SUMMARY_RESERVE_S, 0.02 * args.budget)
    session = Session(args, out, cuda, began, began + args.budget, inductor)
    session.records = [PartRecord(p.name, round(p.plan_s * scale, 1)) for p in parts]
    records = _benchmark("bench_records")
    session.environment = records.environment(records.resolve_device(torch.device("cuda" if cuda else "cpu")))
    print("environment: " + ", ".join(f"{k}={v}" for k, v in session.environment.items()), flush=True)
    print("inductor: " + ", ".join(f"{k}={v}" for k, v in inductor.items()), flush=True)
    session.write()

    previous_term = None
    if threading.current_thread() is threading.main_thread():  # `timeout` / a scheduler's SIGTERM: as Ctrl-C
        previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _run_parts(session, parts, scale, reserve)
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        for record in session.records:  # interrupted between parts (the exception goes on after the summary)
            if record.status in ("pending", "running"):
                record.status = "not reached" if record.status == "pending" else "cut (interrupted)"
        print("\n== summary", flush=True)
        table = parts_table(session.records)
        try:
            _benchmark(SUMMARY_NAME).main(["--results", str(out)])
        finally:
            summary = out / f"{SUMMARY_NAME}.md"
            goals = summary.read_text() if summary.is_file() else "(the summary failed)\n"
            summary.write_text(goals + "\nParts of the session:\n\n" + table)
            print(table + f"\n== done in {session.elapsed():.0f} s; results in {out}", flush=True)
            session.write(finished=True)
    return json.loads((out / f"{SESSION_NAME}.json").read_text())


if __name__ == "__main__":
    parts = main()["parts"]
    sys.exit(130 if any(part["status"] == "cut (interrupted)" for part in parts) else 0)  # as Ctrl-C would
