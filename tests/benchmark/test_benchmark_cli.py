"""``nnunet-ext benchmark`` end to end on a tiny dataset: every step through the real nnU-Net CLI.

One module-scoped benchmark (stock + a semi-supervised test trainer + a crashing trainer + a classification
trainer that must be excluded + the all-labeled upper bound, budget 2 epochs x 2 iterations, seed 0), then a
re-run that must skip every finished step, then ``--overwrite`` with seeds 0 and 1 for stock alone: the redone
seed-0 run must repeat its losses exactly (seeded, augmentation in the main process) and seed 1 must differ.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers_cli import TEST_TRAINERS_DIR, console_script
from helpers_nnunet import extract_fingerprint, make_tiny_dataset, set_nnunet_paths

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "fixture_trainers"
DATASET, UPPER = 994, 995
NAME, UPPER_NAME = f"Dataset{DATASET}_Bench", f"Dataset{UPPER}_BenchAll"
CRASH_MESSAGE = "BenchCrashTrainer fails on purpose in its first training step"


def _add_test_split(dataset: Path, source: Path) -> None:
    (dataset / "imagesTs").mkdir()
    (dataset / "labelsTs").mkdir()
    for sub, target in (("imagesTr", "imagesTs"), ("labelsTr", "labelsTs")):
        for path in (source / sub).iterdir():
            shutil.copy(path, dataset / target / path.name.replace("tr_", "ts_"))


def benchmark(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg",
           "nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
           "nnUNet_compile": "f", "nnUNet_def_n_proc": "1"}
    return subprocess.run([console_script("nnunet-ext"), "benchmark", "--epochs", "2", "--iterations", "2",
                           "--val-iterations", "1", "--output", str(root / "out"), "--heartbeat", "30", *args],
                          capture_output=True, text=True, env=env, timeout=1500)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    from nnunet_ext.planning import plan_dataset

    root = tmp_path_factory.mktemp("benchmark")
    with pytest.MonkeyPatch.context() as mp:
        folders = set_nnunet_paths(mp, root)
        raw = folders["nnUNet_raw"]
        labeled = make_tiny_dataset(raw, DATASET, name="Bench", n_labelled=5, n_unlabeled=2)
        upper = make_tiny_dataset(raw, UPPER, name="BenchAll", n_labelled=7, n_unlabeled=0, seed=3)
        test = make_tiny_dataset(root / "test_source", 999, name="Test", n_labelled=2, n_unlabeled=0, seed=7)
        for dataset in (labeled, upper):
            _add_test_split(dataset, test)
        mp.setenv("nnUNet_n_proc_DA", "1")  # planning needs a positive value in nnU-Net 2.8.1
        for dataset_id in (DATASET, UPPER):
            extract_fingerprint(dataset_id)  # plan_dataset reuses it
            plan_dataset(dataset_id, "CPUPlanner", ["3d_fullres"], num_processes=1, verify_dataset_integrity=False)
    out = benchmark(root, "-d", str(DATASET), "--trainers", "ExtSmokeTrainer", "BenchCrashTrainer",
                    "BenchClassifierTrainer", "--trainer-dirs", str(TEST_TRAINERS_DIR), str(FIXTURES),
                    "--upper-bound-dataset", str(UPPER), "--seeds", "0", "--missing-channels", "MRI")
    results = json.loads((root / "out" / "results.json").read_text()) if (root / "out" / "results.json").exists() \
        else None
    return {"root": root, "out": out, "results": results}


def _runs(results: dict) -> dict:
    return {(r["label"], r["seed"]): r for r in results["runs"]}


def test_complete_report_with_a_crashed_and_an_excluded_trainer(first):
    out, results, root = first["out"], first["results"], first["root"]
    assert out.returncode == 1, out.stdout[-4000:] + out.stderr[-4000:]  # 1: a run failed, the rest is complete
    assert results is not None
    runs = _runs(results)
    assert set(runs) == {("nnUNetTrainer", 0), ("ExtSmokeTrainer", 0), ("BenchCrashTrainer", 0),
                         ("stock, all labeled", 0)}
    assert results["excluded_trainers"][0]["trainer"] == "BenchClassifierTrainer"
    for label in ("nnUNetTrainer", "ExtSmokeTrainer", "stock, all labeled"):
        run = runs[(label, 0)]
        assert run["status"] == "ok", run.get("log_tail")
        assert run["training"]["seconds_per_iteration"] > 0 and run["training"]["warmup_excluded"]
        assert run["training"]["peak_rss_mb"] > 100 and len(run["training"]["curves"]["train_losses"]) == 2
        assert run["inference"]["seconds_per_case"] > 0 and run["inference"]["network_seconds_per_case"] > 0
        evaluation = run["evaluation"]
        assert [c["case"] for c in evaluation["per_case"]] == ["ts_000", "ts_001"]
        for case in evaluation["per_case"]:
            assert set(case["metrics"]) == {"1", "2"}
            for metrics in case["metrics"].values():
                assert 0.0 <= metrics["Dice"] <= 1.0 and (metrics["HD95"] >= 0 or math.isnan(metrics["HD95"]))
        assert run["commands"]["train"].startswith(f"nnUNetv2_train {run['dataset']} 3d_fullres all -tr ")
        assert "--disable_tta" in run["commands"]["predict"] and "-chk checkpoint_final.pth" in \
            run["commands"]["predict"]
        predictions = Path(run["paths"]["predictions"])
        assert sorted(p.name for p in predictions.glob("*.nii.gz")) == ["ts_000.nii.gz", "ts_001.nii.gz"]
        # the benchmark skipped nnU-Net's final validation (it evaluates the test split instead)
        assert not (Path(run["paths"]["model"]) / "validation").exists()
    assert runs[("stock, all labeled", 0)]["dataset"] == UPPER_NAME
    # --missing-channels MRI: both models predicted again with MRI as an all-zero image, the bound is not
    for label in ("nnUNetTrainer", "ExtSmokeTrainer"):
        missing = runs[(label, 0)]["missing"]
        assert missing["mode"] == "zero-fill" and missing["channels"] == ["MRI"]
        assert [c["case"] for c in missing["evaluation"]["per_case"]] == ["ts_000", "ts_001"]
        assert "--missing MRI --missing-mode zero-fill" in missing["command"]
    assert "missing" not in runs[("stock, all labeled", 0)]
    crash = runs[("BenchCrashTrainer", 0)]
    assert crash["status"] == "failed" and crash["failed_step"] == "training"
    assert CRASH_MESSAGE in crash["log_tail"] and CRASH_MESSAGE in crash["error"]
    # the semi-supervised trainer needed the unlabeled images: preprocessed automatically
    assert list((root / "nnUNet_preprocessed" / NAME).glob("*__unlabeled/manifest.json"))


def test_report_tables_gap_and_failure(first):
    report = (first["root"] / "out" / "report.md").read_text()
    assert "| nnUNetTrainer (stock) | 1/1 |" in report and "| ExtSmokeTrainer | 1/1 |" in report
    assert "| BenchCrashTrainer | 0/1 | — |" in report and f"| stock, all labeled [{UPPER_NAME}] | 1/1 |" in report
    assert "## Gap bound for semi-supervised comparisons" in report
    assert "## Without MRI at inference" in report and "| nnUNetTrainer (stock) | `zero-fill` |" in report
    assert "A semi-supervised comparison is meaningful only when this gap is >= 3 Dice points" in report
    assert "### BenchCrashTrainer [Dataset994_Bench], seed 0: training failed" in report and CRASH_MESSAGE in report
    assert "- `BenchClassifierTrainer`: task_kind = 'classification'" in report
    plots = first["root"] / "out" / "plots"
    assert (plots / "dice_per_class.png").stat().st_size > 0 and len(list(plots.glob("curves_*.png"))) == 3
    assert "Dice per class" in first["results"]["plots"]


def test_progress_is_printed_with_elapsed_time(first):
    lines = first["out"].stdout.splitlines()
    assert any(line.startswith("[") and "run 1/4: nnUNetTrainer" in line for line in lines)
    assert any("preprocessing unlabeled images" in line for line in lines)
    assert any("FAILED BenchCrashTrainer" in line for line in lines)


def test_rerun_skips_finished_runs_and_retries_the_crashed_one(first):
    root = first["root"]
    checkpoints = {k: Path(r["paths"]["model"]) / "checkpoint_final.pth"
                   for k, r in _runs(first["results"]).items() if r["status"] == "ok"}
    mtimes = {k: p.stat().st_mtime_ns for k, p in checkpoints.items()}
    out = benchmark(root, "-d", str(DATASET), "--trainers", "ExtSmokeTrainer", "BenchCrashTrainer",
                    "--trainer-dirs", str(TEST_TRAINERS_DIR), str(FIXTURES), "--upper-bound-dataset", str(UPPER),
                    "--seeds", "0")
    assert out.returncode == 1, out.stdout[-4000:] + out.stderr[-4000:]
    again = _runs(json.loads((root / "out" / "results.json").read_text()))
    for key, path in checkpoints.items():
        assert path.stat().st_mtime_ns == mtimes[key], key
        assert again[key]["reused_steps"] == ["training", "prediction", "evaluation"]
        assert again[key]["evaluation"]["per_case"] == _runs(first["results"])[key]["evaluation"]["per_case"]
    assert again[("BenchCrashTrainer", 0)]["reused_steps"] == [] and CRASH_MESSAGE in out.stdout


def test_overwrite_redoes_runs_and_seeds_are_reproducible(first):
    root = first["root"]
    before = _runs(first["results"])[("nnUNetTrainer", 0)]
    out = benchmark(root, "-d", str(DATASET), "--seeds", "0", "1", "--overwrite")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "--overwrite: deleting" in out.stdout
    runs = _runs(json.loads((root / "out" / "results.json").read_text()))
    assert set(runs) == {("nnUNetTrainer", 0), ("nnUNetTrainer", 1)}
    redone, other = runs[("nnUNetTrainer", 0)], runs[("nnUNetTrainer", 1)]
    assert redone["reused_steps"] == []
    assert redone["training"]["curves"]["train_losses"] == before["training"]["curves"]["train_losses"]
    assert other["training"]["curves"]["train_losses"] != before["training"]["curves"]["train_losses"]
    report = (root / "out" / "report.md").read_text()
    assert "| nnUNetTrainer (stock) | 2/2 |" in report and " ± " in report.split("| nnUNetTrainer (stock) | 2/2 |")[1]
    # the crashed trainer's and the smoke trainer's folders were not requested, so they were left alone
    assert (root / "out" / "runs" / NAME / "ExtSmokeTrainer_e2i2s0__nnUNetCPUPlans__3d_fullres").is_dir()
