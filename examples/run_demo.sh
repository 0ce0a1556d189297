#!/usr/bin/env bash
# The main job on a fresh machine: environment, install, demo data, CPU plans, stock nnU-Net and every
# nnunet-ext trainer for a short CPU budget, prediction of the test cases, evaluation, comparison table.
# Usage: bash examples/run_demo.sh [WORK_DIR] [extra `nnunet-ext demo` options, e.g. --epochs 5]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-$repo/demo_output}"
shift || true
venv="$(bash "$repo/examples/setup_env.sh" | tail -n 1)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"$venv/bin/nnunet-ext" demo --work-dir "$work" "$@"
