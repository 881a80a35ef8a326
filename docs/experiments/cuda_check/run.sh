#!/usr/bin/env bash
# CUDA check on a GPU host (run from the repository root). Wheels for the packages the host lacks are in .whl/
# (see README.md in this folder); results go to $OUT (default ./cuda_out).
set -euo pipefail
OUT=${OUT:-$PWD/cuda_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HOME=/tmp/fedseg_home FEDSEG_DATA_HOME=/tmp/fedseg_data
WHL=${WHL:-.whl}
if [ -d "$WHL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
  export PYTHONPATH=/tmp/site:$PWD/custom
fi
if ! command -v nvflare >/dev/null; then  # wheels unpacked with --target have no console scripts
  mkdir -p /tmp/fedseg_bin
  printf '#!/bin/sh\nexec python3 -c "import sys; from nvflare.cli import main; sys.argv[0]=\\"nvflare\\"; sys.exit(main())" "$@"\n' > /tmp/fedseg_bin/nvflare
  printf '#!/bin/sh\nexec python3 -m fedseg.cli "$@"\n' > /tmp/fedseg_bin/fedseg
  chmod +x /tmp/fedseg_bin/*; export PATH=/tmp/fedseg_bin:$PATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, nvflare, tenseal; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'nvflare', nvflare.__version__)"
# 1. trainer step time, CPU vs CUDA fp32 vs CUDA AMP, paper-width UTNet at 512x512
python3 docs/experiments/cuda_check/step_bench.py --json "$OUT/step_bench.json" | tee "$OUT/step_bench.txt"
# 2. the quick job in the simulator, device auto -> CUDA, 4 sites sharing one GPU
t0=$(date +%s%N)
nvflare simulator jobs/fedgs_lits -w /tmp/ws_quick -n 4 -t 4 > "$OUT/quick_sim.log" 2>&1 || { tail -50 "$OUT/quick_sim.log"; exit 1; }
echo "quick job wall seconds: $(( ($(date +%s%N) - t0) / 1000000000 ))" | tee "$OUT/quick_wall.txt"
grep -A2 "fedseg results" "$OUT/quick_sim.log" | tee "$OUT/quick_result.txt"
cp /tmp/ws_quick/server/simulate_job/results/metrics.json "$OUT/quick_metrics.json" 2>/dev/null || find /tmp/ws_quick -name metrics.json | head -1 | xargs -I{} cp {} "$OUT/quick_metrics.json"
# 3. the paper-setting LiTS job (UTNet base 32, 512x512, 5 local epochs), 2 rounds on the built-in data
fedseg jobs export fedgs_lits_paper --set num_rounds=2 --out /tmp/jobs_paper
t0=$(date +%s%N)
nvflare simulator /tmp/jobs_paper/fedgs_lits_paper -w /tmp/ws_paper -n 4 -t 4 > "$OUT/paper_sim.log" 2>&1 || { tail -50 "$OUT/paper_sim.log"; exit 1; }
echo "paper job (2 rounds) wall seconds: $(( ($(date +%s%N) - t0) / 1000000000 ))" | tee "$OUT/paper_wall.txt"
grep -A2 "fedseg results" "$OUT/paper_sim.log" | tee "$OUT/paper_result.txt"
grep -h "local steps" "$OUT/paper_sim.log" | head -8 | tee "$OUT/paper_steps.txt"
grep -h "training on" "$OUT/paper_sim.log" | head -4
