#!/usr/bin/env bash
# Issue 12 on one GPU in one go, in at most 5 minutes (--budget 290 s): every figure, in priority order.
#
#   OUT=results/gpu_session bash benchmarks/gpu_session.sh          # on the lent machine, from the repo root
#   SIT_CKPT=SiT-XL-2-256x256.pt VAE=path/to/sd-vae-ft-ema bash benchmarks/gpu_session.sh   # optional inputs
#   SMOKE=1 OUT=/tmp/smoke PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh           # CPU rehearsal
#
# A thin wrapper of benchmarks/issue12_session.py: one Python process runs the parts against one
# deadline, each under a hard limit (its planned share plus the time the parts before it left), all
# compiles sharing one inductor cache ($OUT/inductor_cache: a rerun is warm), each part's JSON +
# markdown rewritten in $OUT after every row and $OUT/session.json after every part (a run cut off
# keeps what it measured); the summary ($OUT/issue12_summary.md: one row per goal, pass / FAIL / n/a,
# then the parts with their status and seconds) is written whatever happened. Parts, most important
# first (planned seconds):
#   1. data (8): keyed_draws.py on the CPU, one thread: the data workers' posterior draw against the
#      per-sample generators, and a whole LatentSource.load, for 256x4x32x32.
#   2. train_xl (90): train_throughput.py, the bf16 matmul rate, then SiT-XL/2 b64 with the released
#      recipe, bf16+compile (keyed draws) and bf16+compile with unkeyed draws: img/s, MFU, peak memory.
#   3. fit_xl (32): lightning_overhead.py, SiT-XL/2 b64 compiled through Trainer.fit (sit-lightning
#      fit's own step) and a plain loop over the same module, alternating twice.
#   4. train_b2 (42), 5. fit_b2 (20): the same for SiT-B/2 b256.
#   6. sample (84): sample_throughput.py, guided SiT-XL/2 Heun 250 NFE cfg 1.5 on 64 samples: ours (fp32,
#      bf16+compile) against the released heun2 path, and the difference to our fp32 samples (uint8
#      levels with $VAE, else in latent space only).
#   7. draws_cuda (4): keyed_draws.py on the GPU.
# Inputs: PYTHON (default python3), OUT (default results/gpu_session), SIT_CKPT (released weights;
# default random weights), VAE (a local diffusers AutoencoderKL folder; default none), SMOKE=1 (tiny
# models on the CPU, seconds).
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-results/gpu_session}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
ARGS=(--out "$OUT")
[ "${SMOKE:-0}" = "1" ] && ARGS+=(--smoke)
[ -n "${SIT_CKPT:-}" ] && ARGS+=(--checkpoint "$SIT_CKPT")
[ -n "${VAE:-}" ] && ARGS+=(--vae "$VAE")
exec "$PYTHON" benchmarks/issue12_session.py "${ARGS[@]}"
