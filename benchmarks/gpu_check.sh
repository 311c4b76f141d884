#!/usr/bin/env bash
# The export issue's GPU check: one script, nothing installed from the network, one table.
# On the lent GPU machine (CUDA torch, triton and CPU onnxruntime are there) the project's other
# pure-Python dependencies travel as wheels in .whl/ (see docs/ARCHITECTURE.md, "GPU checks").
# Budget: under 10 minutes on an H100/H200 (ViT-H export ~1-2 min, its ORT-CPU parity ~2-3 min).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -m benchmarks.gpu_check --out "${OUT:-/tmp}/cp-gpu-check" "$@"
