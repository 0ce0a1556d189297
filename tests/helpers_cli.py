"""Paths and command-line helpers shared by the test modules: ``from helpers_cli import run_cli, ...``.

Not a conftest: test modules import these names explicitly, and importing from ``conftest`` is ambiguous as soon as
a sub-folder has its own ``conftest.py`` (pytest registers every one of them as the module ``conftest``).
"""
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


def predict_validation_cases_and_evaluate(root: Path, dataset_id: int, dataset_name: str, trainer: str, plans: str,
                                          env: dict, labels: tuple[str, ...] = ("1", "2"),
                                          configuration: str = "3d_fullres") -> dict:
    """``nnUNetv2_predict`` (fresh process, fold 0, no TTA) on fold 0's validation cases of a raw dataset under
    ``root``, then ``nnUNetv2_evaluate_simple`` against their labels; returns nnU-Net's ``summary.json``.

    Checks that exactly the validation cases were predicted and that every mean Dice is in [0, 1] (or NaN).
    Inputs, references and predictions go to ``root/{in,gt,out}_<trainer>``.
    """
    import json
    import math

    folder = f"Dataset{dataset_id:03d}_{dataset_name}"
    raw = root / "nnUNet_raw" / folder
    splits = json.loads((root / "nnUNet_preprocessed" / folder / "splits_final.json").read_text())
    cases = splits[0]["val"]
    inputs, gt, out = root / f"in_{trainer}", root / f"gt_{trainer}", root / f"out_{trainer}"
    inputs.mkdir()
    gt.mkdir()
    for case in cases:
        for image in raw.glob(f"imagesTr/{case}_*.nii.gz"):
            (inputs / image.name).symlink_to(image)
        (gt / f"{case}.nii.gz").symlink_to(raw / "labelsTr" / f"{case}.nii.gz")
    run_cli([console_script("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(dataset_id),
             "-c", configuration, "-tr", trainer, "-p", plans, "-f", "0", "-device", "cpu", "--disable_tta",
             "-npp", "1", "-nps", "1"], env)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in cases)
    run_cli([console_script("nnUNetv2_evaluate_simple"), str(gt), str(out), "-l", *labels, "-np", "1"], env)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean"]) == set(labels)
    assert all(0.0 <= summary["mean"][k]["Dice"] <= 1.0 or math.isnan(summary["mean"][k]["Dice"])
               for k in summary["mean"])
    return summary


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


BRATS2015_DS2 = SHARED_DATA / "BraTS2015_FLAIR_T1c" / "ds2"
#: ``nnunet-ext convert per-case <ds2> ...`` as docs/ciml.md gives it ("BraTS 2015 FLAIR + T1c"), without the source
BRATS2015_CONVERT_ARGS = ["-d", "52", "-n", "BraTS2015FlairT1c", "--modalities", "FLAIR", "T1c", "--label", "label",
                          "--regions", "whole tumour=1,2,3,4", "tumour core=1,3,4", "enhancing tumour=4",
                          "--test", "2"]
