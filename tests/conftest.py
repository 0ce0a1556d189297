"""Shared fixtures. ``tests/`` is on ``sys.path`` (pytest inserts a conftest's folder), so test modules can
``import helpers_nnunet`` and ``from helpers_cli import ...`` (helpers live there, never import from ``conftest``)."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers_cli import BRATS2015_CONVERT_ARGS, BRATS2015_DS2, SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def brats2015_ds2_raw(tmp_path_factory) -> Path:
    """The 2-mm copy of the shared BraTS 2015 FLAIR + T1c cases converted once per session with the documented
    command (regions, 2 test cases); the dataset folder in a temporary nnUNet_raw (treat it as read-only)."""
    if not BRATS2015_DS2.is_dir():
        pytest.skip(f"real data folder {BRATS2015_DS2} is absent (see ../shared/data/README.md)")
    from nnunet_ext.cli import main

    root = tmp_path_factory.mktemp("brats2015")
    with pytest.MonkeyPatch.context() as mp:  # the converter looks for the dataset ID in all three folders
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(var, str(root / var))
        code = main(["convert", "per-case", str(BRATS2015_DS2), *BRATS2015_CONVERT_ARGS])
    assert code == 0
    return root / "nnUNet_raw" / "Dataset052_BraTS2015FlairT1c"
