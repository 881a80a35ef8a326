#!/usr/bin/env bash
# Privacy-utility sweep of paper 003 at CPU scale: FedGS on the built-in synthetic LiTS (4 sites, quick UTNet),
# non-private vs fixed-clipping DP vs adaptive (noisy-quantile) DP, Laplace mechanism with L1 clipping, over the
# per-round epsilon. About 35 minutes on the 2-core dev machine (11 simulator runs, one at a time).
# Usage: bash docs/experiments/privacy_utility_cpu/run.sh   (after `pip install -e .`)
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=docs/experiments/privacy_utility_cpu
RUNS="${FEDSEG_SWEEP_DIR:-/tmp/fedseg/privacy_sweep}"   # simulator workspaces (large): kept outside the repository
fedseg privacy sweep --job fedgs_lits --methods none fixed adaptive --epsilons 1e4 1e5 1e6 1e7 1e8 \
  --set num_rounds=8 --set dp_clip_init=1000 --set dp_quantile_epsilon=1.0 --set dp_clip_lr=0.5 \
  --parallel 1 --out "$RUNS"
cp "$RUNS"/table.md "$RUNS"/sweep.json "$RUNS"/privacy_utility.png "$OUT"/
