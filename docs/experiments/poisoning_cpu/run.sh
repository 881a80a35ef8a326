#!/usr/bin/env bash
# Attack x defence sweep of paper 002 at CPU scale: FedGS on the built-in synthetic LiTS (4 sites, quick UTNet),
# clean / model replacement (x4) / noise / mask flip at site-4, against no defence (FedGS mean), coordinate median,
# trimmed mean (beta 0.25), Krum (f 0) and norm screening (factor 3). 6 rounds, at most 12 local steps per round.
# About 35-40 minutes on the shared 2-core dev machine (20 simulator runs, one at a time).
# Usage: bash docs/experiments/poisoning_cpu/run.sh   (after `pip install -e .`)
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=docs/experiments/poisoning_cpu
RUNS="${FEDSEG_SWEEP_DIR:-/tmp/poisoning_cpu}"   # simulator workspaces (large): kept outside the repository
fedseg security sweep --job fedgs_lits_robust \
  --attacks none scale noise mask_flip \
  --defences none median trimmed_mean krum norm_screening \
  --attack-sites site-4 \
  --set num_rounds=6 --set max_steps_per_round=12 \
  --parallel 1 --out "$RUNS"
cp "$RUNS"/table.md "$RUNS"/sweep.json "$RUNS"/attack_defence.png "$OUT"/
