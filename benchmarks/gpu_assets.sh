#!/usr/bin/env bash
# On the device: assemble one assets folder for DSM_LITE_ASSETS from carried pieces.
# Usage: bash benchmarks/gpu_assets.sh DEST FOLDER...
# DEST gets every file that FOLDER/SHA256SUMS (the first FOLDER holding one) lists as an
# empty placeholder (loading a photo set checks only that its files exist), then the real
# files of each FOLDER, same layout, over them. Folders may be missing (skipped).
set -euo pipefail
dest=$1; shift
mkdir -p "$dest"
for src in "$@"; do
  if [ -f "$src/SHA256SUMS" ] && [ ! -f "$dest/SHA256SUMS" ]; then
    sums="$(cd "$src" && pwd)/SHA256SUMS"
    # names hold quotes and spaces (ImageNet class names): read by Python, not split by a shell
    (cd "$dest" && python3 -c "import os, sys
for line in open(sys.argv[1], encoding='utf-8'):
    name = line.rstrip('\\n').split('  ', 1)[1]
    os.makedirs(os.path.dirname(name), exist_ok=True)
    open(name, 'a').close()" "$sums")
  fi
done
for src in "$@"; do [ -d "$src" ] && cp -r "$src"/. "$dest"/; done
echo "assets in $dest: $(find "$dest" -type f -size +0 | wc -l) real files, $(find "$dest" -type f -size 0 | wc -l) placeholders"
