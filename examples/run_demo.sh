#!/usr/bin/env bash
# The main job on a fresh machine: environment, install, demo data, CPU plans, stock nnU-Net and every
# nnunet-ext segmentation trainer for a short CPU budget, prediction of the test cases, evaluation, comparison
# table and Dice picture. The default is the quick 2D demo (sized for 10 minutes or less on an idle 2-core machine,
# install included); --full runs the 3D demo with 10 epochs x 50 iterations (most of an hour).
# Usage: bash examples/run_demo.sh [WORK_DIR] [`nnunet-ext demo` options, e.g. --full or --epochs 5]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$repo/demo_output"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument that is not an option is the work folder
  work="$1"
  shift
fi
echo "[setup] creating or reusing the environment (torch and nnU-Net install: a few minutes the first time)"
venv="$(bash "$repo/examples/setup_env.sh" | tail -n 1)"
echo "[setup] environment ready after ${SECONDS} s: $venv"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"$venv/bin/nnunet-ext" demo --work-dir "$work" "$@"
echo "run_demo.sh finished in $((SECONDS / 60)) min $((SECONDS % 60)) s"
