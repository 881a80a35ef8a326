#!/usr/bin/env bash
# iDLG gradient-leakage evaluation at CPU scale (fedseg attack idlg): one private 32x32 tumour slice of the built-in
# synthetic LiTS data (site-1 train, the largest tumour), one plain-SGD step, the attacker inverts what it observes.
# Usage: bash docs/experiments/idlg/run.sh   (from anywhere, after `pip install -e .`; about 9 minutes on 1 CPU core)
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=docs/experiments/idlg
COMMON=(--image-size 32 --iterations 300 --seed 0 --threads 1)

# 1. the comparison: FedAvg update vs what a CSAHE ring member decrypts with a leaked key (sigma = 100, the paper's
#    minimum and the attacker's best case; real Initiator ciphertexts), small_cnn (DLG's LeNet, fc head), lr 0.1
fedseg attack idlg --scenario fedavg csahe-member "${COMMON[@]}" --out "$OUT/small_cnn"
# 1b. the FedAvg attack with other seeds (global model init and dummy image)
for seed in 1 2 3; do
  fedseg attack idlg --scenario fedavg --image-size 32 --iterations 300 --seed "$seed" --threads 1 \
    --out "$OUT/small_cnn_seed$seed"
done
# 2. same FedAvg attack with the paper's learning rate 1e-4: the float32 update rounds the early layers away
fedseg attack idlg --scenario fedavg "${COMMON[@]}" --lr 1e-4 --out "$OUT/small_cnn_lr1e-4"
# 3. fully convolutional small_cnn (1x1 conv head: no per-pixel bias, so the mask is optimised jointly, DLG-style)
fedseg attack idlg --scenario fedavg "${COMMON[@]}" --model-args '{"head": "conv"}' --out "$OUT/small_cnn_conv_head"
# 4. fedseg's MONAI U-Net (BatchNorm in train mode, 0.5 M parameters): fewer iterations, it is ~20x slower per step
fedseg attack idlg --scenario fedavg --model unet --image-size 32 --iterations 100 --seed 0 --threads 1 \
  --out "$OUT/unet"
# 5. the ring member again with the scale-invariant cosine matching loss and Adam (Geiping et al.'s choice)
fedseg attack idlg --scenario csahe-member "${COMMON[@]}" --match cosine --optimizer adam --out "$OUT/small_cnn_cosine"
# 6. the DP-noised update (fedseg.algorithms.adaptive_dp: L1 clip at a fixed C, Laplace b = 2C / epsilon) over epsilon
fedseg attack idlg --scenario fedavg dp --dp-epsilon 1 10 100 1e4 1e6 1e7 1e8 1e10 "${COMMON[@]}" \
  --out "$OUT/small_cnn_dp"
# 6b. the same view against a scale-invariant attacker (cosine matching), and without clipping (C = 100)
fedseg attack idlg --scenario fedavg dp --dp-epsilon 1e8 1e10 "${COMMON[@]}" --match cosine \
  --out "$OUT/small_cnn_dp_cosine"
fedseg attack idlg --scenario dp --dp-epsilon 1e6 1e8 1e10 --dp-clip 100 "${COMMON[@]}" --out "$OUT/small_cnn_dp_clip100"
