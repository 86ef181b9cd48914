#!/usr/bin/env bash
# The GPU checks of the recipes, in one go on one GPU machine, each part cut short at a shared deadline:
#   1. airbench94 from PyPI (bench/airbench94.py) and configs/fast.yaml (bench/time_to_accuracy.py),
#      trained and scored on the same 45,000 / 5,000 split;
#   2. the suite's step overhead at best.yaml's batch (bench/step_overhead.py);
#   3. configs/best.yaml: seed 0 alone (a clean wall time), then seeds 1 and 2 side by side on the same GPU.
# Usage (needs the CIFAR-10 training set in ~/.cache/cifar10 and `pip install airbench==0.1.8`):
#   bash bench/gpu_recipes.sh LOG_DIR SECONDS
# Each part logs to LOG_DIR (8 files); a best.yaml run cut short still leaves its per-epoch rows in
# LOG_DIR/metrics.txt.
set -uo pipefail
log=${1:?usage: bash bench/gpu_recipes.sh LOG_DIR SECONDS}
end=$((SECONDS + ${2:?usage: bash bench/gpu_recipes.sh LOG_DIR SECONDS}))
left() { echo $((end - SECONDS > 1 ? end - SECONDS : 1)); }
py=${PYTHON:-python3}
runs=$(mktemp -d)
mkdir -p "$log"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, timm, accelerate; print('torch', torch.__version__, '| timm', timm.__version__,
'| accelerate', accelerate.__version__)"; } 2>&1 | tee "$log/gpu.txt"

timeout "$(left)" $py bench/airbench94.py 2>&1 | tee "$log/airbench94.log"
timeout "$(left)" $py bench/time_to_accuracy.py --recipe configs/fast.yaml --run-dir "$runs/fast" 2>&1 \
  | tee "$log/fast.log"
timeout "$(left)" $py bench/step_overhead.py --mixed-precision bf16 --batch-size 256 --steps 50 2>&1 \
  | tee "$log/step_overhead.log"

timeout "$(left)" $py bench/time_to_accuracy.py --recipe configs/best.yaml --run-dir "$runs/best0" -- --seed 0 \
  >"$log/best0.log" 2>&1
tail -n 12 "$log/best0.log"
for seed in 1 2; do
  timeout "$(left)" $py bench/time_to_accuracy.py --recipe configs/best.yaml --run-dir "$runs/best$seed" \
    -- --seed $seed >"$log/best$seed.log" 2>&1 &
done
wait
tail -n 12 "$log/best1.log" "$log/best2.log"
tail -n +1 "$runs"/*/run/metrics.csv >"$log/metrics.txt"
