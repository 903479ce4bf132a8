#!/usr/bin/env bash
# Issue 12 on one GPU in one go (at most 8 minutes: the parts' limits add up to 475 s): every goal at once.
#
#   OUT=results/gpu_session bash benchmarks/gpu_session.sh          # on the lent machine, from the repo root
#   SIT_CKPT=SiT-XL-2-256x256.pt VAE=path/to/sd-vae-ft-ema bash benchmarks/gpu_session.sh   # optional inputs
#   SMOKE=1 OUT=/tmp/smoke PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh           # CPU rehearsal
#
# Parts (each under its own time limit, each writing JSON + markdown into $OUT as it goes, so a part
# cut off keeps what it measured; the summary runs whatever happened):
#   1. train_throughput.py: the bf16 matmul rate, then SiT-B/2 b256 and SiT-XL/2 b64 with the released
#      recipe, bf16+compile (keyed draws) and bf16+compile with unkeyed draws: img/s, MFU, peak memory.
#   2. lightning_overhead.py: the same models through Trainer.fit (sit-lightning fit's own step) and a
#      plain loop over the same module, compiled, alternating twice: the Lightning overhead, fit's img/s.
#   3. sample_throughput.py: guided SiT-XL/2 Heun 250 NFE cfg 1.5 on 64 samples: ours (fp32, bf16,
#      bf16+compile) against the released heun2 path, and the difference to our fp32 samples (uint8
#      levels with $VAE, else in latent space only).
#   4. issue12_summary.py: $OUT/issue12_summary.md, one row per goal with pass / FAIL / n/a.
# Inputs: PYTHON (default python3), OUT (default results/gpu_session), SIT_CKPT (released weights;
# default random weights), VAE (a local diffusers AutoencoderKL folder; default none).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-results/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
began=$(date +%s)

if [ "${SMOKE:-0}" = "1" ]; then
  TINY=(--device cpu --depth 1 --hidden-size 32 --num-heads 2)
  TRAIN=("${TINY[@]}" --models SiT-B/2:4,SiT-XL/2:2 --warmup 1 --steps 2)
  FIT=("${TINY[@]}" --models SiT-XL/2:2,SiT-B/2:4 --warmup 1 --steps 2)
  SAMPLE=(--smoke --device cpu)
  LIMIT_TRAIN=120 LIMIT_FIT=120 LIMIT_SAMPLE=120
else
  TRAIN=(--models SiT-B/2:256,SiT-XL/2:64 --recipes released,bf16_compile,bf16_compile_unkeyed
         --warmup 3 --steps 10 --time-budget 160)
  FIT=(--models SiT-XL/2:64,SiT-B/2:256 --compile --warmup 5 --steps 20 --rounds 2 --time-budget 75)
  SAMPLE=(--num-samples 64)
  LIMIT_TRAIN=200 LIMIT_FIT=125 LIMIT_SAMPLE=150
fi
[ -n "${SIT_CKPT:-}" ] && SAMPLE+=(--checkpoint "$SIT_CKPT")
[ -n "${VAE:-}" ] && SAMPLE+=(--vae "$VAE")

part() {  # part NAME LIMIT_SECONDS SCRIPT ARGS...: run one benchmark under a limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - began ))s into the session)"
  timeout --signal=INT --kill-after=15 "$limit" "$PYTHON" "$@" --out "$OUT" >"$OUT/$name.log" 2>&1
  local status=$?
  echo "   exit $status; $(grep -c '^|' "$OUT/$name.log") table lines; log $OUT/$name.log"
  tail -n 12 "$OUT/$name.log" | grep '^|' || true
}

{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,memory.total --format=csv
  "$PYTHON" -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__)"
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

part train_throughput "$LIMIT_TRAIN" benchmarks/train_throughput.py "${TRAIN[@]}"
part lightning_overhead "$LIMIT_FIT" benchmarks/lightning_overhead.py "${FIT[@]}"
part sample_throughput "$LIMIT_SAMPLE" benchmarks/sample_throughput.py "${SAMPLE[@]}"
"$PYTHON" benchmarks/issue12_summary.py --results "$OUT" | tee "$OUT/issue12_summary.log"
echo "== done in $(( $(date +%s) - began ))s; results in $OUT"
