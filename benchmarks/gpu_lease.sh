#!/usr/bin/env bash
# Everything this project does in one lease of the GPU machine, within 10 minutes:
#  1. the speed benchmark (benchmarks/gpu_bench.sh: ViT-H pipeline vs SamPredictor, bf16 parity),
#     unless BENCH_S=0;
#  2. EfficientNet-Lite0 detector trainings on the packed training split, side by side, validated
#     on their boxes (no SAM weights travel), each a tar to bring back. RUNS lists them, one
#     "name: cp-train flags" per line; the default is the 2026-11-27 lease's three runs.
# Prepare here first:  python -m benchmarks.gpu_data --data D --split D/splits/train.txt \
#   --out .gpudata/kvasir-train --max-side 384 --quality 80, and the wheels in .whl/
#   (benchmarks/gpu_env.sh); repo, wheels and data must fit the 64 MiB a call carries. For more
#   data, add --weightless-base .gpudata/base to gpu_data, move the bundle's *.safetensors out of
#   the working tree for the call (git checkout puts them back) and set TRAIN_ARGS="--base .gpudata/base".
# A CPU smoke run: BENCH_ARGS="--arch tiny --device cpu --images 4 --no-compile" DEVICE=cpu
#   TRAIN_ARGS="--max-images 16" RUNS="a: --epochs 1
#   b: --epochs 1 --giou 2 --ema 0.99" benchmarks/gpu_lease.sh
# Each part has its own time limit, so one that fails or overruns leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
OUT=${OUT:-/tmp/cp-gpu-lease}
mkdir -p "$OUT" /tmp/cp-logs
BENCH_S=${BENCH_S:-360} TRAIN_S=${TRAIN_S:-200}
if [ "$BENCH_S" != 0 ]; then
  timeout "$BENCH_S" python3 -m benchmarks.gpu_bench --out /tmp/cp-gpu-bench ${BENCH_ARGS:-} 2>&1 | tee /tmp/cp-logs/bench.log
  (cd /tmp/cp-gpu-bench 2>/dev/null && tar -cf "$OUT/bench.tar" ./*.json)
fi

DATA=.gpudata/kvasir-train
train() {
  local name=$1; shift
  timeout "$TRAIN_S" python3 -m cp_train.cli detector --data $DATA --split $DATA/train.txt \
    --out /tmp/det-$name --work-dir /tmp/det-$name-work --detector-size 320 --val-metric boxes \
    --device ${DEVICE:-cuda} --workers ${WORKERS:-5} --threads ${THREADS:-4} --no-progress ${TRAIN_ARGS:-} "$@" \
    > /tmp/cp-logs/train-$name.log 2>&1
  echo "train $name exit $?" >> /tmp/cp-logs/train-$name.log
  # the finished bundle's detector, or (cut off by the time limit) the best checkpoint so far
  local skip='*.pt'; [ -f /tmp/det-$name/detector.safetensors ] || skip=last.pt
  tar -C /tmp -cf "$OUT/det-$name.tar" --ignore-failed-read det-$name/detector.safetensors \
    det-$name/bundle.json --exclude="$skip" det-$name-work/detector 2>/dev/null
}
RUNS=${RUNS:-"a: --epochs 40
b: --epochs 40 --detector-freeze 0
c: --epochs 50 --detector-freeze 0 --batch-size 32 --lr 1e-3"}
names=()
while IFS=: read -r name flags; do
  [ -n "$name" ] || continue
  names+=("$name")
  # shellcheck disable=SC2086  # the flags are words
  train "$name" $flags &
done <<< "$RUNS"
wait
tar -C /tmp -cf "$OUT/logs.tar" cp-logs
for n in "${names[@]}"; do echo "== train $n"; grep -E "epoch|val \{|wrote|exit|Error" /tmp/cp-logs/train-$n.log | tail -6; done
[ "$BENCH_S" = 0 ] || { echo "== bench"; sed -n '/^| config/,$p' /tmp/cp-logs/bench.log; }
