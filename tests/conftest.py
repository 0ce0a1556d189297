"""Shared fixtures. ``tests/`` is on ``sys.path`` (pytest inserts a conftest's folder), so test modules can
``import helpers_nnunet``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
SHARED_DATA = REPO_DIR.parent / "shared" / "data"
TEST_TRAINERS_DIR = TESTS_DIR / "trainer_fixtures"


def console_script(name: str) -> str:
    """Path of a console script installed next to the running interpreter (nnUNetv2_train, nnunet-ext, ...)."""
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}; install nnunet-ext into this environment")
    return str(candidate)


def run_cli(cmd: list[str], env: dict, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command line in a fresh process; with ``check``, fail the test with the output tails on a non-zero exit."""
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/README.md)")
    return SHARED_DATA


def subprocess_env(root: Path, extra_trainer_dirs: tuple[Path, ...] = ()) -> dict[str, str]:
    """Environment for nnU-Net CLI calls in a fresh process: folders below ``root``, CPU settings and our trainers."""
    from nnunet_ext.discovery import trainers_dir

    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / var)
    env.update({
        "nnUNet_compile": "f",
        "nnUNet_def_n_proc": "1",
        "OMP_NUM_THREADS": "2",
        "nnUNet_extTrainer": os.pathsep.join([str(trainers_dir()), *map(str, extra_trainer_dirs)]),
        "MPLBACKEND": "Agg",
    })
    env.pop("nnUNet_n_proc_DA", None)
    return env
