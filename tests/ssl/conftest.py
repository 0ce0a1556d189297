"""Fixtures shared by the unlabeled-data tests: one planned tiny dataset per session, a private copy per test."""
from __future__ import annotations

from pathlib import Path

import helpers_nnunet as h  # tests/ is on sys.path through tests/conftest.py
import pytest

DATASET_ID = 990


@pytest.fixture(scope="session")
def pristine_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # tr_000 (which has a zero border, so cropping matters) is also an unlabeled image under another name
    return h.planned_tiny_root(tmp_path_factory.getbasetemp(), DATASET_ID,
                               copy_labelled_to_unlabeled={"tr_000": "unl_copy"})


@pytest.fixture
def root(pristine_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, writable copy of the planned dataset with the nnU-Net variables pointing at it."""
    h.clone_root(pristine_root, tmp_path / "root")
    h.set_nnunet_paths(monkeypatch, tmp_path / "root", n_proc_da=0)
    return tmp_path / "root"
