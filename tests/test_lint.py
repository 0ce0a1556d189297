"""The code base stays ruff-clean (E/F/W at 120 columns, see ruff.toml), as nnU-Net's pre-commit checks."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = Path(sys.executable).parent / "ruff"
    ruff = str(ruff) if ruff.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install nnunet-ext[dev])")
    out = subprocess.run([ruff, "check", "nnunet_ext", "trainers", "planners", "tests", "setup.py"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
