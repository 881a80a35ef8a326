#!/usr/bin/env bash
# The FedGS paper's Table 1 at CPU scale on fedseg's built-in synthetic data (both datasets, FedAvg vs FedGS, UTNet).
# PolypGen: 5-fold cross-validation (`fedseg cv`), best checkpoint of each fold by validation Dice, test centre 6.
# LiTS: the single paper split of the built-in data, best checkpoint by validation Dice, test centre 5.
# Usage: bash docs/experiments/table1_cpu/run.sh [WORKSPACE]   (from the repository root, after `pip install -e .`)
set -euo pipefail
cd "$(dirname "$0")/../../.."
WS=${1:-/tmp/fedseg_table1_cpu}
OUT=docs/experiments/table1_cpu
mkdir -p "$WS"
for method in fedavg fedgs; do
  if [ ! -f "$WS/lits_${method}_utnet/server/simulate_job/results/metrics.json" ]; then
    rm -rf "$WS/lits_${method}_utnet"
    nvflare simulator "jobs/${method}_lits" -w "$WS/lits_${method}_utnet" -n 4 -t 4 > "$WS/lits_${method}_utnet.log" 2>&1
  fi
  if [ ! -f "$WS/polypgen_${method}_utnet/cv_summary.json" ]; then
    fedseg cv "${method}_polypgen" --workspace "$WS/polypgen_${method}_utnet"
  fi
done
fedseg report table1 "$WS"/lits_fedavg_utnet "$WS"/lits_fedgs_utnet \
  "$WS"/polypgen_fedavg_utnet "$WS"/polypgen_fedgs_utnet --out "$OUT"
# keep the per-run summaries next to the table
for method in fedavg fedgs; do
  cp "$WS/polypgen_${method}_utnet/cv_summary.md" "$OUT/polypgen_${method}_utnet_cv.md"
  cp "$WS/polypgen_${method}_utnet/cv_summary.json" "$OUT/polypgen_${method}_utnet_cv.json"
  cp "$WS/lits_${method}_utnet/server/simulate_job/results/results.md" "$OUT/lits_${method}_utnet_results.md"
  cp "$WS/lits_${method}_utnet/server/simulate_job/results/training_curves.png" "$OUT/lits_${method}_utnet_curves.png"
done
