#!/usr/bin/env bash
# Pack, here, what issue 24's device calls need beside the repository. A call takes the work
# tree (about 8 MiB) and carried folders, 64 MiB in all, and the device image has torch, timm
# and triton but not the book's tools; the book's photos (52 MiB) and the weights (22 MiB)
# do not fit in one call, so they travel in two calls to one warm machine, whose ignored
# folders and /tmp stay between calls:
#   .gpustage   the weights, SHA256SUMS, the 64 photos of benchmarks/fused_exactness.py, and
#               Python 3.12 wheels of nbval, ipykernel, myst-nb (glue only) and torchprofile
#               that the device image lacks (about 44 MiB)
#   .gpubook    the photos the chapters decode (benchmarks/gpu_photos/<chapter>.txt, about
#               52 MiB)
# benchmarks/gpu_assets.sh assembles them on the device into one assets folder (every other
# photo an empty placeholder: loading a set checks that its files exist, only decoding reads
# them). The calls, in order, are in benchmarks/gpu_issue24.sh's header.
# --log first re-derives benchmarks/gpu_photos/ by running each chapter under nbval on this
# CPU with every decoded path logged (about 5 minutes on 2 cores).
# Needs DSM_LITE_ASSETS (the full offline assets) and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DSM_LITE_ASSETS:?set DSM_LITE_ASSETS to the offline assets folder}"
LISTS=benchmarks/gpu_photos
if [ "${1:-}" = --log ]; then
  hook=$(mktemp -d)
  cat > "$hook/sitecustomize.py" <<'PY'
import os
import PIL.Image as _image
_open = _image.open
def _logged(fp, *args, **kwargs):
    with open(os.environ["DSM_LITE_DECODE_LOG"], "a") as f:
        f.write(f"{os.path.relpath(os.path.realpath(fp), os.path.realpath(os.environ['DSM_LITE_ASSETS']))}\n")
    return _open(fp, *args, **kwargs)
_image.open = _logged
PY
  for nb in book/*.ipynb; do
    log="$LISTS/$(basename "$nb" .ipynb).txt"; : > "$log"
    DSM_LITE_DECODE_LOG="$PWD/$log" PYTHONPATH="$hook" DSM_LITE_CACHE="$(mktemp -d)" PYTHONHASHSEED=0 \
      python -m pytest -q -p no:cacheprovider --nbval --nbval-current-env \
      --nbval-sanitize-with book/nbval_sanitize.cfg "$nb" || true
    sort -u -o "$log" "$log"; [ -s "$log" ] || rm "$log"
  done
  python -c "import dsm_lite; print(*sorted(dsm_lite.load_images('imagenet-sample', n=64, seed=0).paths), sep='\n')" \
    > "$LISTS/fused_exactness.txt"
fi
grep -qx '/.gpustage/' .git/info/exclude 2>/dev/null || printf '/.gpustage/\n/.gpubook/\n' >> .git/info/exclude
rm -rf .gpustage .gpubook && mkdir -p .gpustage/assets .gpustage/whl .gpubook
copy() {  # copy DEST LIST...: the files the lists name, from the assets folder into DEST
  local dest=$1; shift
  sort -u "$@" | while read -r f; do mkdir -p "$dest/$(dirname "$f")"; cp "$DSM_LITE_ASSETS/$f" "$dest/$f"; done
}
cp -r "$DSM_LITE_ASSETS/weights" "$DSM_LITE_ASSETS/SHA256SUMS" .gpustage/assets/
copy .gpustage/assets "$LISTS/fused_exactness.txt"
copy .gpubook $(ls "$LISTS"/*.txt | grep -v fused_exactness)
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpustage/whl)
pip download -q "${PLAT[@]}" nbval ipykernel
pip download -q "${PLAT[@]}" --no-deps myst-nb torchprofile==0.1.0
# the device image has these (device README's package list): one version each, or pip refuses
for have in attrs coverage iniconfig packaging platformdirs pluggy psutil pytest python_dateutil \
            typing_extensions pygments; do rm -f .gpustage/whl/"$have"-[0-9]*.whl; done
du -sh .gpustage .gpubook
