"""``nnunet-ext benchmark --cv-folds 2`` end to end through the real nnU-Net CLI on a tiny region dataset without a
test split: stock and a second trainer, seeds 0 and 1, budget 1 epoch x 2 iterations.

Checks that nnU-Net trained the folds of the split the benchmark wrote, that every case was predicted exactly once
per seed (by the fold that held it out), that regions are evaluated per region, and that the pooled report has the
paired statistics and the per-fold table. A second invocation (seed 0, ``--missing-channels MRI``) must reuse
every fold's model and prediction and add the per-fold predictions without MRI.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers_cli import console_script
from helpers_nnunet import extract_fingerprint, make_tiny_dataset, set_nnunet_paths

pytestmark = pytest.mark.slow

DATASET = 996
NAME = f"Dataset{DATASET}_BenchCV"
METHOD = "nnUNetTrainerNoMirroring"  # a stock variant: any second supervised trainer will do
CASES = ["tr_000", "tr_001", "tr_002", "tr_003"]
REGIONS = {"(1, 2)": "a or b", "2": "b"}


def benchmark(root: Path, *args: str, timeout: float = 3 * 3600) -> subprocess.CompletedProcess:
    """One invocation (a few minutes on an idle 2-core machine; the generous timeout is for a loaded one). On a
    timeout the whole process group is killed, so that no training child outlives the test."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg",
           "nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
           "nnUNet_compile": "f", "nnUNet_def_n_proc": "1"}
    cmd = [console_script("nnunet-ext"), "benchmark", "-d", str(DATASET), "--cv-folds", "2", "--epochs", "1",
           "--iterations", "2", "--val-iterations", "1", "--output", str(root / "out"), "--heartbeat", "60", *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"nnunet-ext benchmark timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    from nnunet_ext.planning import plan_dataset

    root = tmp_path_factory.mktemp("benchmark_cv")
    with pytest.MonkeyPatch.context() as mp:
        folders = set_nnunet_paths(mp, root)
        raw = make_tiny_dataset(folders["nnUNet_raw"], DATASET, name="BenchCV", n_labelled=len(CASES),
                                n_unlabeled=0)
        dataset_json = json.loads((raw / "dataset.json").read_text())  # BraTS-style: nested regions
        dataset_json.update(labels={"background": 0, "a or b": [1, 2], "b": 2}, regions_class_order=[1, 2])
        (raw / "dataset.json").write_text(json.dumps(dataset_json))
        mp.setenv("nnUNet_n_proc_DA", "1")  # planning needs a positive value in nnU-Net 2.8.1
        extract_fingerprint(DATASET)
        plan_dataset(DATASET, "CPUPlanner", ["3d_fullres"], num_processes=1, verify_dataset_integrity=False)
    out = benchmark(root, "--trainers", METHOD, "--seeds", "0", "1")
    results_file = root / "out" / "results.json"
    return {"root": root, "out": out, "results": json.loads(results_file.read_text()) if results_file.exists()
            else None}


def test_every_case_is_predicted_once_per_seed_by_the_fold_that_held_it_out(first):
    out, results, root = first["out"], first["results"], first["root"]
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    splits = json.loads((root / "nnUNet_preprocessed" / NAME / "splits_final.json").read_text())
    assert len(splits) == 2 and sorted(c for s in splits for c in s["val"]) == CASES
    assert results["cross_validation"]["validation_cases"] == [s["val"] for s in splits]
    runs = {(r["label"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {("nnUNetTrainer", 0), ("nnUNetTrainer", 1), (METHOD, 0), (METHOD, 1)}
    for run in runs.values():
        assert run["status"] == "ok", run.get("log_tail")
        assert [c["case"] for c in run["evaluation"]["per_case"]] == CASES
        for fold, split in zip(run["folds"], splits):
            predicted = sorted(p.name for p in Path(fold["paths"]["predictions"]).glob("*.nii.gz"))
            assert predicted == sorted(f"{c}.nii.gz" for c in split["val"])  # exactly this fold's cases
            assert fold["commands"]["train"].startswith(f"nnUNetv2_train {NAME} 3d_fullres {fold['fold']} -tr ")
            train_log = (Path(fold["paths"]["run"]) / "train.log").read_text()
            assert "Using splits from existing split file" in train_log  # nnU-Net trained on the written split
        for case in run["evaluation"]["per_case"]:  # scored per region
            assert set(case["metrics"]) == set(REGIONS)
            assert all(0.0 <= m["Dice"] <= 1.0 or math.isnan(m["Dice"]) for m in case["metrics"].values())
        assert run["training"]["seconds_per_iteration"] > 0 and run["training"]["folds"] == 2
    assert results["labels"] == REGIONS


def test_report_pools_the_folds_with_statistics(first):
    report = (first["root"] / "out" / "report.md").read_text()
    assert "2-fold cross-validation over 4 training cases" in report
    assert "| nnUNetTrainer (stock) | 2/2 |" in report and f"| {METHOD} | 2/2 |" in report
    assert "Dice a or b" in report and "Dice b" in report
    assert "## Cross-validation: 2 folds" in report and "| run | seed | fold 0 | fold 1 | pooled |" in report
    assert "## Paired comparisons" in report and f"- **{METHOD}** vs stock: " in report
    (comparison,) = first["results"]["statistics"]
    assert comparison["seeds"] == [0, 1] and comparison["wilcoxon"]["n"] + comparison["wilcoxon"][
        "undefined_pairs"] == 8  # 4 cases x 2 seeds


def test_rerun_reuses_every_fold_and_adds_a_missing_channel(first):
    root = first["root"]
    out = benchmark(root, "--trainers", METHOD, "--seeds", "0", "--missing-channels", "MRI")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert ": training: nnUNetv2_train" not in out.stdout  # nothing was trained again
    results = json.loads((root / "out" / "results.json").read_text())
    assert len(results["runs"]) == 2
    for run in results["runs"]:
        assert run["reused_steps"] == ["training", "prediction", "evaluation"]
        assert run["missing"]["mode"] == "zero-fill"
        assert [c["case"] for c in run["missing"]["evaluation"]["per_case"]] == CASES  # each fold its own cases
        for fold in run["folds"]:
            assert f"-f {fold['fold']} " in fold["missing_command"] and "--missing MRI" in fold["missing_command"]
    assert "## Without MRI at inference" in (root / "out" / "report.md").read_text()
