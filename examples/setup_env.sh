#!/usr/bin/env bash
# Create (or reuse) a virtual environment with nnunet-ext installed from this checkout (non-editable).
# Usage: source-free; prints nothing but pip's progress. VENV defaults to ./.venv next to the repository.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: nnU-Net 2.8.1 excludes torch 2.9; these wheels are the ones the project is tested with.
"$venv/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install --quiet "$repo$extras"
echo "$venv"
