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


def test_test_module_names_are_unique():
    # pytest's default (prepend) import mode imports test modules by basename: two test_losses.py in different
    # folders make the second one fail to collect
    names = [p.name for p in (REPO / "tests").rglob("*.py") if p.name != "conftest.py"]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, duplicates
