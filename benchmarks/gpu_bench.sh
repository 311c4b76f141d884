#!/usr/bin/env bash
# The speed issue's GPU benchmark: ViT-H-sized curriculum pipeline against the SamPredictor
# reference, bf16 parity against fp32, one table. Installs nothing from the network (carried
# wheels in .whl/ are installed with --no-index, as in gpu_check.sh). About 5 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -m benchmarks.gpu_bench --out "${OUT:-/tmp}/cp-gpu-bench" "$@"
