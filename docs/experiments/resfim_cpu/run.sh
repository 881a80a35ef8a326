#!/usr/bin/env bash
# pFL-ResFIM vs FedPer vs FedAvg on the built-in PolypGen-format data (5 centres with different endoscope styles,
# fold 0), at the quick CPU scale of the jobs (128x128, UTNet base 8, 12 rounds x 1 local epoch, AdamW 1e-3).
# Every site is scored on its own validation part: FedAvg with the global model, FedPer / ResFIM with the site's
# personalized model (and, for reference, the global model of the same run). Then ResFIM variants (one setting
# changed each), the mask reliability check and the restyle figure.
# Usage: docs/experiments/resfim_cpu/run.sh [WORK_DIR]   (from the repository root; about 40 min on 2 idle cores)
set -euo pipefail
WORK=${1:-/tmp/resfim_cpu}
HERE=docs/experiments/resfim_cpu
mkdir -p "$WORK"
run() {  # run JOB_DIR NAME
  [ -f "$WORK/$2/server/simulate_job/results/metrics.json" ] && { echo "reusing $2"; return; }
  echo "running $2"; start=$(date +%s)
  nvflare simulator "$1" -w "$WORK/$2" -n 5 -t 5 > "$WORK/$2.log" 2>&1
  echo "$2: $(( $(date +%s) - start )) s"
}
run jobs/fedavg_polypgen fedavg
run jobs/fedper_polypgen fedper
run jobs/resfim_polypgen resfim
# variants: one personalization setting changed each (same data, model, rounds, seed)
variant() {  # variant JOB NAME KEY=JSON
  fedseg jobs export "$1" --out "$WORK/jobs_$2" --set "personalization_args.$3" > /dev/null
  run "$WORK/jobs_$2/$1" "$2"
}
variant resfim_polypgen resfim_sharedbn 'buffers="shared"'
variant fedper_polypgen fedper_sharedbn 'buffers="shared"'
variant resfim_polypgen resfim_rel 'residual="relative"'
variant resfim_polypgen resfim_warmup6 'warmup_rounds=6'
variant resfim_polypgen resfim_frac02 'fraction=0.02'
for metric in dice dice_s dice_l; do
  fedseg report sites --run FedAvg="$WORK/fedavg" --run FedPer="$WORK/fedper" --run ResFIM="$WORK/resfim" \
    --run "FedPer, shared BN statistics:personalized=$WORK/fedper_sharedbn" \
    --run "ResFIM, shared BN statistics:personalized=$WORK/resfim_sharedbn" \
    --run "ResFIM, relative residual:personalized=$WORK/resfim_rel" \
    --run "ResFIM, warm-up 6:personalized=$WORK/resfim_warmup6" \
    --run "ResFIM, 2% local:personalized=$WORK/resfim_frac02" --metric "$metric" --out "$HERE/$metric"
done
fedseg resfim restyle --job resfim_polypgen --site site-1 --out "$HERE/restyle"
# how reproducible the mask is (split-half overlap of the top-10% sets, abs vs relative residual)
python docs/experiments/resfim_cpu/mask_reliability.py "$WORK/fedavg/server/simulate_job/results/global_model.pt" \
  "FedAvg model after 12 rounds" > "$HERE/mask_reliability_trained.json"
python docs/experiments/resfim_cpu/mask_reliability.py init "untrained model (seed 0)" > "$HERE/mask_reliability_init.json"
# reference: the FedAvg model with each site's own BatchNorm statistics (post-hoc, no training; FedBN's effect alone)
python docs/experiments/resfim_cpu/bn_recalibration.py "$WORK/fedavg/server/simulate_job/results/global_model.pt" \
  "FedAvg global model" > "$HERE/bn_recalibration_fedavg.json"
