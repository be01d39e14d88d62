#!/usr/bin/env bash
# Pack what a device call needs beside the repository (it takes the work tree and carried
# folders only, 64 MiB in all; its image has torch, timm and triton but not the book's tools):
#   .gpuassets  the weights, SHA256SUMS, and of each photo set the photos that the book's
#               chapters and benchmarks/fused_exactness.py decode (benchmarks/gpu_photos.txt),
#               every other photo as an empty placeholder (loading checks that files exist;
#               only decoding reads them)
#   .gpuwhl     Python 3.12 wheels of nbval, ipykernel, myst-nb, torchprofile and what they need
# Then: run(carry=[".gpuassets", ".gpuwhl"], command=<the lines in benchmarks/gpu_issue24.sh>).
# --log first re-derives gpu_photos.txt by running the book under nbval on this CPU with every
# decoded path logged (about 5 minutes on 2 cores).
# Needs DSM_LITE_ASSETS (the full offline assets) and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DSM_LITE_ASSETS:?set DSM_LITE_ASSETS to the offline assets folder}"
LIST=benchmarks/gpu_photos.txt
if [ "${1:-}" = --log ]; then
  hook=$(mktemp -d); log=$(mktemp)
  cat > "$hook/sitecustomize.py" <<'PY'
import os
import PIL.Image as _image
_open = _image.open
def _logged(fp, *args, **kwargs):
    with open(os.environ["DSM_LITE_DECODE_LOG"], "a") as f:
        f.write(f"{fp}\n")
    return _open(fp, *args, **kwargs)
_image.open = _logged
PY
  DSM_LITE_DECODE_LOG="$log" PYTHONPATH="$hook" DSM_LITE_CACHE="$(mktemp -d)" PYTHONHASHSEED=0 \
    python -m pytest -q -p no:cacheprovider --nbval --nbval-current-env \
    --nbval-sanitize-with book/nbval_sanitize.cfg book || true
  python - "$log" "$LIST" <<'PY'
import os, sys
import dsm_lite
root = os.path.realpath(os.environ["DSM_LITE_ASSETS"])
seen = {os.path.relpath(os.path.realpath(p.strip()), root) for p in open(sys.argv[1]) if p.strip()}
seen |= set(dsm_lite.load_images("imagenet-sample", n=256, seed=0).paths)  # fused_exactness.py
with open(sys.argv[2], "w") as f:
    f.write("".join(f"{p}\n" for p in sorted(p for p in seen if not p.startswith(".."))))
print(len(seen), "photos decoded ->", sys.argv[2])
PY
fi
grep -qx '/.gpuassets/' .git/info/exclude 2>/dev/null || printf '/.gpuassets/\n/.gpuwhl/\n' >> .git/info/exclude
rm -rf .gpuassets .gpuwhl && mkdir -p .gpuassets .gpuwhl
cp -r "$DSM_LITE_ASSETS/weights" "$DSM_LITE_ASSETS/SHA256SUMS" .gpuassets/
(cd "$DSM_LITE_ASSETS" && find . -mindepth 2 -type f ! -path './weights/*') | while read -r f; do
  mkdir -p ".gpuassets/$(dirname "$f")" && : > ".gpuassets/$f"; done
while read -r f; do cp "$DSM_LITE_ASSETS/$f" ".gpuassets/$f"; done < "$LIST"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pip download -q "${PLAT[@]}" -d .gpuwhl nbval ipykernel myst-nb
pip download -q --no-deps "${PLAT[@]}" -d .gpuwhl torchprofile==0.1.0
du -sh .gpuassets .gpuwhl
