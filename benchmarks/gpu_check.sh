#!/usr/bin/env bash
# The book and the benchmark on an accelerator, in one go:
#   1. every chapter under `pytest --nbval` (the stored outputs must hold on this device too);
#   2. the sweeps of chapters 0 and 2-5 recomputed on every photo (`python -m dsm_lite.store rebuild`
#      into OUT/book.npz) and compared, photo by photo, with the shipped dsm_lite/results/book.npz;
#   3. benchmarks/throughput.py for ViT-Ti, DeiT-S and ViT-B (random weights: timing does not
#      depend on them), eager, at batch 1, 32 and 256, under fp16 autocast on a GPU, then the
#      same replayed as CUDA graphs (--cuda-graph);
#   4. a short report (device, versions, nbval and store verdicts, where the tables are).
#
# Usage:
#   benchmarks/gpu_check.sh                       # on a machine with a GPU
#   benchmarks/gpu_check.sh --device cpu --quick  # the CPU path: one chapter, a tiny benchmark
# Options: --device cuda|cpu (default cuda), --out DIR (default benchmarks/results/gpu-check),
#          --quick (chapter 0 only; ViT-Ti at batch 1, r = 8, few runs), --skip-book, --skip-store,
#          --skip-bench,
#          --jobs N (chapters in N parallel kernels, needs pytest-xdist; cells of a chapter stay in order),
#          --notebooks GLOB (which chapters; default book/*.ipynb).
# Needs DSM_LITE_ASSETS (offline) or internet for the photos and the pretrained ViT-Ti.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda OUT=benchmarks/results/gpu-check QUICK=0 BOOK=1 STORE=1 BENCH=1 JOBS=() SELECT="book/*.ipynb"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --skip-book) BOOK=0; shift ;;
    --skip-store) STORE=0; shift ;;
    --skip-bench) BENCH=0; shift ;;
    --jobs) JOBS=(-n "$2" --dist loadscope); shift 2 ;;
    --notebooks) SELECT=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "--device must be cuda or cpu" >&2; exit 2 ;; esac
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
  python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "--device cuda, but torch sees no GPU (torch.cuda.is_available() is False); use --device cpu" >&2; exit 2; }
  AMP=(--amp fp16); BATCHES=(1 32 256); MODELS=(vit_tiny_patch16_224 deit_small_patch16_224 vit_base_patch16_224)
  RUNS=(--runs 30 --warmup 5)
else
  export CUDA_VISIBLE_DEVICES=""   # the notebooks pick their device themselves: make it the CPU
  STORE=0   # recomputing every photo takes hours on a CPU; tests/test_store.py checks a subset
  AMP=(); BATCHES=(1 8 32); MODELS=(vit_tiny_patch16_224 deit_small_patch16_224)
  RUNS=(--runs 20 --warmup 3)
fi
NOTEBOOKS=($SELECT)
if [ "$QUICK" = 1 ]; then
  STORE=0  # the store's rebuild runs chapters 0 and 2-5 on every photo: minutes on a GPU
  NOTEBOOKS=(book/00_model_and_photos.ipynb); BATCHES=(1); MODELS=(vit_tiny_patch16_224); RUNS=(--runs 2 --warmup 1 --r 8)
fi

DEVICE_NAME="$(python -c "
import torch, platform
print(torch.cuda.get_device_name() if '$DEVICE' == 'cuda' else (platform.processor() or platform.machine()) + ' CPU')")"
export DSM_LITE_CACHE="${DSM_LITE_CACHE:-$(mktemp -d)}"   # cold result cache: nothing is reused
export PYTHONHASHSEED=0 KINETO_LOG_LEVEL=5

book_rc=skipped store_rc=skipped bench_rc=skipped
if [ "$BOOK" = 1 ]; then
  python -m pytest "${NOTEBOOKS[@]}" "${JOBS[@]}" -q -p no:cacheprovider --nbval --nbval-current-env \
    --nbval-sanitize-with book/nbval_sanitize.cfg 2>&1 | tee "$OUT/nbval.txt"
  book_rc=${PIPESTATUS[0]}
fi
if [ "$STORE" = 1 ]; then
  { python -m dsm_lite.store rebuild --out "$OUT/book.npz" &&
    python -m dsm_lite.store diff dsm_lite/results/book.npz "$OUT/book.npz"; } 2>&1 | tee "$OUT/store.txt"
  store_rc=${PIPESTATUS[0]}
fi
if [ "$BENCH" = 1 ]; then
  python benchmarks/throughput.py --device "$DEVICE" "${AMP[@]}" --models "${MODELS[@]}" \
    --batch-sizes "${BATCHES[@]}" "${RUNS[@]}" 2>&1 | tee "$OUT/throughput.txt"
  bench_rc=${PIPESTATUS[0]}
  if [ "$DEVICE" = cuda ] && [ "$bench_rc" = 0 ]; then
    # eager GPU runs are host-bound at small batch: the same configurations replayed as CUDA graphs
    python benchmarks/throughput.py --device cuda "${AMP[@]}" --cuda-graph --no-profile --models "${MODELS[@]}" \
      --batch-sizes "${BATCHES[@]}" "${RUNS[@]}" 2>&1 | tee "$OUT/throughput-cudagraph.txt"
    bench_rc=${PIPESTATUS[0]}
  fi
fi

{
  echo "dsm_lite device check on: $DEVICE_NAME ($DEVICE)"
  python -c "import torch, timm, dsm_lite; print(f'torch {torch.__version__}, timm {timm.__version__}, dsm_lite {dsm_lite.__version__}')"
  verdict() { case "$1" in 0) echo "$2" ;; skipped) echo skipped ;; *) echo "FAILED (exit $1)" ;; esac; }
  echo "book under nbval (${#NOTEBOOKS[@]} notebooks): $(verdict "$book_rc" PASS) -> $OUT/nbval.txt"
  if [ "$BOOK" = 1 ]; then tail -n 1 "$OUT/nbval.txt"; fi
  echo "sweeps recomputed vs the shipped store: $(verdict "$store_rc" MATCH) -> $OUT/store.txt"
  if [ "$STORE" = 1 ]; then grep "entries in both" "$OUT/store.txt"; fi
  echo "throughput (${MODELS[*]}; batch ${BATCHES[*]}): $(verdict "$bench_rc" done) -> $OUT/throughput.txt"
} | tee "$OUT/report.txt"
[ "$book_rc" = 0 -o "$book_rc" = skipped ] && [ "$store_rc" = 0 -o "$store_rc" = skipped ] &&
  [ "$bench_rc" = 0 -o "$bench_rc" = skipped ]
