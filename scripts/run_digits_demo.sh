#!/usr/bin/env bash
# The CPU demo: train a small SiT on scikit-learn's 8x8 digits, then print where the logs and the
# sample grid are and how good the samples are (conditional accuracy of 2,000 EMA samples, FID
# against the test split, the real train-vs-test FID floor). Extra arguments go to `sit-lightning fit`,
# e.g. `scripts/run_digits_demo.sh --trainer.max_steps 400` for a quick look.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
# Two threads fit a 2-core laptop; more threads do not help a model this small.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
start=$(date +%s)
sit-lightning fit --config configs/digits.yaml "$@"
echo "demo wall time: $(( $(date +%s) - start )) s (training, sampling and scoring)"
