#!/usr/bin/env bash
# pFL-ResFIM vs FedPer vs FedAvg on the built-in PolypGen-format data (5 centres with different endoscope styles,
# fold 0), at the quick CPU scale of the jobs (128x128, UTNet base 8, 12 rounds x 1 local epoch, AdamW 1e-3).
# Every site is scored on its own validation part: FedAvg with the global model, FedPer / ResFIM with the site's
# personalized model (and, for reference, the global model of the same run).
# Usage: docs/experiments/resfim_cpu/run.sh [WORK_DIR]   (from the repository root; about 25 min on 2 cores)
set -euo pipefail
WORK=${1:-/tmp/resfim_cpu}
HERE=docs/experiments/resfim_cpu
mkdir -p "$WORK/jobs_rel"
run() {  # run JOB_DIR NAME
  [ -f "$WORK/$2/server/simulate_job/results/metrics.json" ] && { echo "reusing $2"; return; }
  echo "running $2"; start=$(date +%s)
  nvflare simulator "$1" -w "$WORK/$2" -n 5 -t 5 > "$WORK/$2.log" 2>&1
  echo "$2: $(( $(date +%s) - start )) s"
}
run jobs/fedavg_polypgen fedavg
run jobs/fedper_polypgen fedper
run jobs/resfim_polypgen resfim
# the same ResFIM job with the relative residual |F_real - F_styled| / (F_real + F_styled + 1e-12) instead of abs
fedseg jobs export resfim_polypgen --out "$WORK/jobs_rel" --set 'personalization_args.residual="relative"' > /dev/null
run "$WORK/jobs_rel/resfim_polypgen" resfim_rel
for metric in dice dice_s dice_l; do
  fedseg report sites --run FedAvg="$WORK/fedavg" --run FedPer="$WORK/fedper" --run ResFIM="$WORK/resfim" \
    --run "ResFIM-relative=$WORK/resfim_rel" --metric "$metric" --out "$HERE/$metric"
done
fedseg resfim restyle --job resfim_polypgen --site site-1 --out "$HERE/restyle"
# how reproducible the mask is (split-half overlap of the top-10% sets, abs vs relative residual)
python docs/experiments/resfim_cpu/mask_reliability.py "$WORK/fedavg/server/simulate_job/results/global_model.pt" \
  "FedAvg model after 12 rounds" > "$HERE/mask_reliability_trained.json"
python docs/experiments/resfim_cpu/mask_reliability.py init "untrained model (seed 0)" > "$HERE/mask_reliability_init.json"
