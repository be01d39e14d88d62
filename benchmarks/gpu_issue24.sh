#!/usr/bin/env bash
# Issue 24's GPU runs, in priority order, inside one time budget (device time is scarce):
#   nbval       1. the book under nbval on the GPU (the stored outputs must hold there too);
#                  run it in a call of its own: it needs most of one call's 10 minutes
#   exactness   2. benchmarks/fused_exactness.py: the Triton kernels against the eager engine
#   profile     3. benchmarks/gpu_profile.py, eager and Triton: kernels per merging block
#   paper-fp32  4. the paper's protocol: batch 32, 50 rounds, float32 with TF32 off, ViT-B and
#                  DeiT-S, r = 8, 16, 20, eager and Triton side by side, CUDA graphs
#   paper-fp16  5. the same under fp16 autocast
#   ours        6. fp16, CUDA graphs, batch 1, 8, 32 and 256, r = 8 and 16
#   compiled    7. torch.compile(fullgraph=True, mode="reduce-overhead"): ViT-B, DSM r = 16,
#                  batch 32, fp16, eager and Triton (inductor traces into the triton_op)
# Each step writes OUT/<step>.txt as it goes, runs under its own `timeout`, and is skipped
# when less than its budget is left. STEPS picks steps (default: every step but nbval).
#
# On the device: three calls to one warm machine, back to back (it is given back 30 s after a
# call), after benchmarks/gpu_pack.sh here; /tmp and ignored folders stay between calls.
#  1. carry [".gpustage"] (weights, wheels, 64 photos), about 2 minutes:
#     mkdir -p /tmp/stage && cp -r .gpustage/. /tmp/stage/ && python3 -m pip install -q --no-index
#     --no-deps --no-compile --target /tmp/site /tmp/stage/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#     && bash benchmarks/gpu_assets.sh /tmp/assets /tmp/stage/assets && DSM_LITE_ASSETS=/tmp/assets
#     STEPS=exactness BUDGET=200 OUT=$OUT bash benchmarks/gpu_issue24.sh
#  2. carry [".gpubook"] (the chapters' photos), the book under nbval:
#     export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_assets.sh /tmp/assets .gpubook &&
#     DSM_LITE_ASSETS=/tmp/assets STEPS=nbval BUDGET=500 OUT=$OUT bash benchmarks/gpu_issue24.sh
#  3. no carry, the timings with what is left:
#     export PYTHONPATH=/tmp/site:$PWD DSM_LITE_ASSETS=/tmp/assets && BUDGET=500 OUT=$OUT
#     STEPS="profile paper-fp32 paper-fp16 ours compiled" bash benchmarks/gpu_issue24.sh
# Rehearsal on the CPU (interpreter, tiny settings): DEVICE=cpu QUICK=1 bash benchmarks/gpu_issue24.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-issue24}
BUDGET=${BUDGET:-540}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
STEPS=${STEPS:-exactness profile paper-fp32 paper-fp16 ours compiled}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KINETO_LOG_LEVEL=5 PYTHONHASHSEED=0
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; fi
start=$(date +%s)
PY=$(command -v python || command -v python3)   # the device image has python3
TAIL=4
source benchmarks/gpu_steps.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU ($DEVICE)"
  "$PY" -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %cd' 2>/dev/null; } | tee "$OUT/device.txt"

MODELS=(vit_base_patch16_224 deit_small_patch16_224)
BENCH=("$PY" benchmarks/throughput.py --device "$DEVICE" --no-profile --backend eager triton
       --methods tome spatial dsm)
if [ "$DEVICE" = cuda ]; then BENCH+=(--cuda-graph); fi
PAPER=(--batch-sizes 32 --runs 50 --warmup 5 --r 8 16 20)
OURS=(--batch-sizes 1 8 32 256 --runs 20 --warmup 5 --r 8 16)
PROFILE=(--batch-sizes 1 32 --runs 10)
EXACT=(--images 64 --photos 256)
COMPILED=(--batch-sizes 32 --runs 20 --warmup 3 --r 16)
NBVAL=(book -n 4 --dist loadscope)   # pytest-xdist is on the device image
if [ "$QUICK" = 1 ]; then
  MODELS=(vit_tiny_patch16_224)
  PAPER=(--batch-sizes 2 --runs 2 --warmup 1 --r 8); OURS=(--batch-sizes 1 --runs 2 --warmup 1 --r 8)
  PROFILE=(--batch-sizes 2 --runs 1 --no-graph); EXACT=(--quick); NBVAL=(book/00_model_and_photos.ipynb)
  COMPILED=(--batch-sizes 2 --runs 1 --warmup 1 --r 8 --compile-mode default)
fi

step nbval 300 "$PY" -m pytest "${NBVAL[@]}" -q -p no:cacheprovider --nbval --nbval-current-env \
  --nbval-sanitize-with book/nbval_sanitize.cfg
step exactness 60 "$PY" benchmarks/fused_exactness.py --device "$DEVICE" "${EXACT[@]}"
step profile 60 "$PY" benchmarks/gpu_profile.py --device "$DEVICE" --models "${MODELS[0]}" \
  --backend eager triton "${PROFILE[@]}"
step paper-fp32 90 "${BENCH[@]}" --models "${MODELS[@]}" "${PAPER[@]}"
step paper-fp16 90 "${BENCH[@]}" --amp fp16 --models "${MODELS[@]}" "${PAPER[@]}"
step ours 90 "${BENCH[@]}" --amp fp16 --models "${MODELS[@]}" "${OURS[@]}"
step compiled 120 "$PY" benchmarks/throughput.py --device "$DEVICE" --no-profile --no-oracle --compile \
  --compile-mode reduce-overhead --amp fp16 --backend eager triton --methods dsm --models "${MODELS[0]}" \
  "${COMPILED[@]}"
echo "== all done in $(( $(date +%s) - start )) s; results in $OUT"
