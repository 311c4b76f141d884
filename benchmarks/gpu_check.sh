#!/usr/bin/env bash
# The export issue's GPU check: one script, nothing installed from the network, one table.
# Budget: under 10 minutes on an H100/H200 (ViT-H export ~1-2 min, its ORT-CPU parity ~2-3 min).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
python3 -m benchmarks.gpu_check --out "${OUT:-/tmp}/cp-gpu-check" "$@"
