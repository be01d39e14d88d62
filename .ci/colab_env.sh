#!/usr/bin/env bash
# The package alone, as a Colab reader gets it: a fresh virtual environment holding Colab's usual
# preinstalled set, plus `pip install dsm_lite[book]` (here from this checkout, not editable,
# exactly what the notebooks' setup cell installs from git), then every notebook's setup and
# import cells executed there. Fails if a notebook imports anything that install does not bring.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${COLAB_VENV:-$(mktemp -d)/venv}"
python -m venv "$VENV"
PY="$VENV/bin/python"
# Colab's preinstalled set; torch/torchvision pinned to the pair already on this machine (no re-download)
TV="$(python -c 'import torch, torchvision as tv; v = lambda m: m.__version__.split("+")[0]; print(f"torch=={v(torch)} torchvision=={v(tv)}")')"
"$PY" -m pip install -q $TV numpy pandas matplotlib seaborn pillow tqdm ipykernel
"$PY" -m pip install -q ".[book]"
"$PY" .ci/run_setup_cells.py book/*.ipynb
