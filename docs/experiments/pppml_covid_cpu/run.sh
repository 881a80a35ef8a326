#!/usr/bin/env bash
# PPPML-HMI's per-hospital comparison (paper Fig. 3C) at CPU scale on the built-in synthetic COVID data:
# centralized / local-only / FedAvg / PPPML-HMI (Per-FedAvg + CSAHE + 3 adaptation steps), every model scored on
# each hospital's own test cases (volumetric Dice of the fused 2.5D prediction). Run from the repository root.
set -euo pipefail
WS=${WS:-/tmp/fedseg_pppml_covid}
OUT=docs/experiments/pppml_covid_cpu
mkdir -p "$WS"
# the two FL jobs in the simulator (5 hospitals = 5 sites)
nvflare simulator jobs/fedavg_covid -w "$WS/fedavg" -n 5 -t 5 > "$WS/fedavg.log" 2>&1
nvflare simulator jobs/pppml_covid -w "$WS/pppml" -n 5 -t 5 > "$WS/pppml.log" 2>&1
# the baselines with the same data, model, optimiser (AdamW 1e-3) and total epochs as fedavg_covid (12 x 1)
fedseg baseline local --job fedavg_covid --out "$WS/local" --no-progress > "$WS/local.log" 2>&1
fedseg baseline central --job fedavg_covid --out "$WS/central" --no-progress > "$WS/central.log" 2>&1
fedseg report sites --run "Centralized=$WS/central" --run "Local=$WS/local" --run "FedAvg=$WS/fedavg" \
  --run "PPPML-HMI=$WS/pppml" --out "$OUT"
# keep the per-run summaries next to the table
for run in fedavg pppml; do
  cp "$WS/$run/server/simulate_job/results/metrics.json" "$OUT/${run}_metrics.json"
  cp "$WS/$run/server/simulate_job/results/results.md" "$OUT/${run}_results.md"
done
cp "$WS/pppml/server/simulate_job/results/personalized_bars.png" "$OUT/pppml_personalized_bars.png"
cp "$WS/pppml/server/simulate_job/csahe_rounds.jsonl" "$OUT/pppml_csahe_rounds.jsonl" 2>/dev/null || true
for b in local central; do cp "$WS/$b/metrics.json" "$OUT/${b}_metrics.json"; done
cp "$WS/local/cross_site_heatmap.png" "$OUT/local_cross_site_heatmap.png"
