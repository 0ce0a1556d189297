#!/usr/bin/env bash
# The test suite, as CI runs it: a fresh (or reused) virtual environment with nnunet-ext installed
# non-editably, then pytest against the installed package. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/examples/setup_env.sh" "[dev]" | tail -n 1)"
cd "$repo"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MPLBACKEND=Agg
# the installed `pytest` script (not `python -m pytest`, which would import nnunet_ext from the checkout)
"$venv/bin/pytest" -ra --durations=15 "$@"
