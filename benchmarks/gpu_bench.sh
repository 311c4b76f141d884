#!/usr/bin/env bash
# The speed issue's GPU benchmark: ViT-H-sized curriculum pipeline against the SamPredictor
# reference, bf16 parity against fp32, one table. Nothing installed from the network.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
python3 -m benchmarks.gpu_bench --out "${OUT:-/tmp}/cp-gpu-bench" "$@"
