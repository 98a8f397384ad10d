#!/usr/bin/env bash
# Tensor x pipeline parallel training of the tiny spec on 4 CPU processes (gloo), then the same
# run on one process: the per-step losses agree to ~1e-6. On GPUs the same command uses nccl.
set -euo pipefail
cd "$(dirname "$0")/.."
mtp train specs/tiny.yaml train.steps=20 parallel.tensor=2 parallel.pipeline=2 \
  --nproc 4 --run-dir runs/example_tp2_pp2 --overwrite
mtp train specs/tiny.yaml train.steps=20 --nproc 1 --run-dir runs/example_single --overwrite
mtp inspect-ckpt runs/example_tp2_pp2 --strict
mtp report runs/example_tp2_pp2 runs/example_single --out runs/example_report
