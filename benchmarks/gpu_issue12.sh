#!/usr/bin/env bash
# Issue 12's GPU runs, in priority order, inside one time budget (device time is scarce):
#   1. benchmarks/prop_attn.py: what proportional attention costs, and cheaper ways;
#   2. benchmarks/precision.py: fp16 and bf16 autocast against float32 on real photos;
#   3. benchmarks/gpu_profile.py: ViT-B at batch 1 and 256 (kernels, host, graphs);
#   4. benchmarks/throughput.py, CUDA graphs: fp16 (ViT-B, ViT-Ti; batch 256, 32, 1) and bf16
#      (ViT-B, batch 256);
#   5. benchmarks/throughput.py --compile (reduce-overhead): ViT-B batch 1, dense vs merged
#      vs the truncation oracle, compiled (last: it takes whatever time is left).
# Each step writes OUT/<step>.txt and is skipped when less than its budget is left.
# Usage: OUT=dir BUDGET=seconds benchmarks/gpu_issue12.sh   (DSM_LITE_ASSETS set for step 2)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-issue12}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KINETO_LOG_LEVEL=5 PYTHONHASHSEED=0
start=$(date +%s)
source benchmarks/gpu_steps.sh
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
step prop-attn 60 python benchmarks/prop_attn.py --batch-sizes 1 32 256
step precision-fp16 60 python benchmarks/precision.py --device cuda --amp fp16
step precision-bf16 60 python benchmarks/precision.py --device cuda --amp bf16
step profile 90 python benchmarks/gpu_profile.py --models vit_base_patch16_224 --batch-sizes 1 256 --runs 10
step throughput-fp16-cudagraph 75 python benchmarks/throughput.py --device cuda --amp fp16 \
  --cuda-graph --no-profile --models vit_base_patch16_224 vit_tiny_patch16_224 --batch-sizes 256 32 1 --runs 20
step throughput-bf16-cudagraph 45 python benchmarks/throughput.py --device cuda --amp bf16 \
  --cuda-graph --no-profile --models vit_base_patch16_224 --batch-sizes 256 --runs 20
step compiled 150 python benchmarks/throughput.py --device cuda --amp fp16 --compile \
  --compile-mode reduce-overhead --no-profile --models vit_base_patch16_224 --methods tome dsm \
  --r 16 --batch-sizes 1 --runs 20 --warmup 3
echo "== all done in $(( $(date +%s) - start )) s"
