"""``nnunet-ext benchmark --equal-time``: the budget from the measured cost ratio, and the whole benchmark with its
child processes faked (training writes a checkpoint whose logged epoch times follow a per-trainer cost)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers_nnunet import benchmark_settings_from_command_line, make_tiny_dataset, set_nnunet_paths

from nnunet_ext.benchmark import metrics, runner
from nnunet_ext.benchmark.budget import Budget
from nnunet_ext.benchmark.equal_time import equal_time_budget, plan_equal_time_runs

METHOD = "nnUNetTrainerNoMirroring"  # any segmentation trainer; nothing trains here


@pytest.mark.parametrize("budget, ratio, iterations", [
    (Budget(10, 50), 2.04, 102), (Budget(10, 50), 1.0, 50), (Budget(10, 50), 0.5, 25), (Budget(3, 2), 1.3, 3),
    (Budget(10, 50), 0.001, 1),  # at least one iteration per epoch
])
def test_equal_time_budget_scales_iterations_and_keeps_epochs(budget, ratio, iterations):
    scaled = equal_time_budget(budget, ratio)
    assert (scaled.epochs, scaled.iterations, scaled.val_iterations) == (budget.epochs, iterations,
                                                                        budget.val_iterations)


@pytest.mark.parametrize("ratio", [0.0, -1.0, float("nan"), float("inf"), None])
def test_equal_time_budget_refuses_a_bad_ratio(ratio):
    with pytest.raises(ValueError, match="cost ratio"):
        equal_time_budget(Budget(2, 2), ratio)


def _record(role, label, seed, spi, status="ok"):
    return {"role": role, "label": label, "seed": seed, "status": status,
            "training": None if spi is None else {"seconds_per_iteration": spi}}


def test_plan_pairs_each_method_with_stock_of_its_seed_and_says_why_not():
    records = [_record("baseline", "nnUNetTrainer", 0, 1.0), _record("baseline", "nnUNetTrainer", 1, 2.0),
               _record("baseline", "nnUNetTrainer", 2, 1.0, status="failed"),
               _record("method", "M", 0, 3.0), _record("method", "M", 1, 3.0), _record("method", "M", 2, 3.0),
               _record("method", "N", 0, None, status="failed"), _record("upper_bound", "stock, all labeled", 0, 9.0)]
    plans = {(p["method"], p["seed"]): p for p in plan_equal_time_runs(records, Budget(4, 10))}
    assert set(plans) == {("M", 0), ("M", 1), ("M", 2), ("N", 0)}
    assert plans[("M", 0)]["cost_ratio"] == 3.0 and plans[("M", 0)]["budget_trainer"] == "nnUNetTrainer_e4i30s0"
    assert plans[("M", 1)]["cost_ratio"] == 1.5 and plans[("M", 1)]["budget"]["iterations"] == 15
    assert plans[("M", 2)]["skipped"] == "the stock run of seed 2 did not finish"
    assert plans[("N", 0)]["skipped"] == "the N run of seed 0 did not finish" and plans[("N", 0)]["budget"] is None


# ------------------------------------------------------------------------- the benchmark with faked children
COST = {"nnUNetTrainer": 0.1, METHOD: 0.25}  # seconds per training iteration of the fake training


def _argument(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def fake_child(calls: list[list[str]]):
    """Stands in for ``runner._run_logged``: "training" writes a checkpoint with epoch timestamps that follow the
    trainer's cost and budget (from its generated class name), "prediction" writes the predicted files."""

    def run(cmd, env, log_file, progress, settings):
        calls.append(list(cmd))
        stats = Path(_argument(cmd, "--stats"))
        trainer = _argument(cmd, "-tr")
        if "train" in cmd:
            base, epochs, iterations, _ = re.fullmatch(r"(.+)_e(\d+)i(\d+)s(\d+)", trainer).groups()
            epoch_seconds = int(iterations) * COST[base]
            fold = settings.output / "nnUNet_results" / cmd[cmd.index("--") + 1] / \
                f"{trainer}__{settings.plans}__{settings.configuration}" / f"fold_{settings.fold}"
            fold.mkdir(parents=True)
            n = int(epochs)
            logging = {"epoch_start_timestamps": [i * epoch_seconds for i in range(n)],
                       "epoch_end_timestamps": [(i + 1) * epoch_seconds for i in range(n)],
                       "train_losses": [1.0] * n, "val_losses": [1.0] * n, "mean_fg_dice": [0.5] * n,
                       "ema_fg_dice": [0.5] * n}
            torch.save({"logging": logging}, fold / "checkpoint_final.pth")
        else:
            output = Path(_argument(cmd, "-o"))
            output.mkdir(parents=True, exist_ok=True)
            for label in Path(_argument(cmd, "-i")).parent.joinpath("labelsTs").iterdir():
                (output / label.name).write_bytes(b"")
        stats.write_text(json.dumps({"returncode": 0, "predict_from_files_seconds": 1.0, "network_seconds": 0.5,
                                     "network_seconds_calls": 1, "peak_rss_mb": 100.0, "wall_seconds": 5.0}))
        return 0

    return run


def fake_evaluation(reference_folder, prediction_folder, dataset_json, plans_file, output_file=None):
    """Dice 0.6 for stock, 0.7 for the method, 0.65 for the equal-time stock run, per case and class."""
    trainer = Path(prediction_folder).parents[1].name.split("__")[0]
    dice = 0.7 if trainer.startswith(METHOD) else 0.6 if trainer.endswith("e2i4s0") else 0.65
    cases = sorted(p.name[:-len(".nii.gz")] for p in Path(reference_folder).iterdir())
    per_case = [{"case": c, "metrics": {"1": {"Dice": dice}}} for c in cases]
    result = {"labels": {"1": "structure"}, "per_case": per_case, "n_cases": len(cases),
              "mean": {"1": {"Dice": dice, "HD95": {"mean": 1.0, "n_finite": len(cases), "n_nan": 0, "n_inf": 0}}},
              "foreground_mean": {"Dice": dice, "HD95": 1.0}}
    Path(output_file).write_text(json.dumps(result))
    return result


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    raw = set_nnunet_paths(monkeypatch, tmp_path)["nnUNet_raw"]
    folder = make_tiny_dataset(raw, 979, name="EqualTime", n_labelled=2, n_unlabeled=0, shape=(10, 12, 12))
    for sub in ("imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    for source, target in (("imagesTr", "imagesTs"), ("labelsTr", "labelsTs")):
        for path in (folder / source).iterdir():
            shutil.copy(path, folder / target / path.name.replace("tr_", "ts_"))
    preprocessed = tmp_path / "nnUNet_preprocessed" / folder.name
    (preprocessed / "data").mkdir(parents=True)
    (preprocessed / "data" / "case.b2nd").write_bytes(b"x")
    (preprocessed / "nnUNetCPUPlans.json").write_text(json.dumps(
        {"configurations": {"3d_fullres": {"data_identifier": "data"}}}))
    return folder


def test_equal_time_run_gets_the_method_budget_and_statistics(dataset, tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "_run_logged", fake_child(calls))
    monkeypatch.setattr(metrics, "evaluate_folder", fake_evaluation)
    settings = runner.BenchmarkSettings(dataset="979", output=tmp_path / "out", trainers=(METHOD,),
                                        budget=Budget(2, 4, 1), equal_time=True, heartbeat_seconds=600)
    results = runner.run_benchmark(settings)

    # the method costs 0.25 / 0.1 = 2.5 times stock per iteration: stock for 2 epochs x round(4 x 2.5) = 10
    trained = [_argument(c, "-tr") for c in calls if "train" in c]
    assert trained == ["nnUNetTrainer_e2i4s0", f"{METHOD}_e2i4s0", "nnUNetTrainer_e2i10s0"]
    (plan,) = results["equal_time"]
    assert plan["cost_ratio"] == pytest.approx(2.5) and plan["budget"] == {"epochs": 2, "iterations": 10,
                                                                           "val_iterations": 1}
    generated = (settings.output / "budget_trainers" / "nnunet_ext_budget_trainers.py").read_text()
    block = generated[generated.index("class nnUNetTrainer_e2i10s0(nnUNetTrainer):"):]
    assert "seed_everything(0)" in block and "self.num_iterations_per_epoch = 10" in block
    assert f"class {METHOD}_e2i4s0({METHOD}):" in generated  # the benchmark's classes stay

    runs = {r["label"]: r for r in results["runs"]}
    same_time = runs[f"stock, same time ({METHOD})"]
    assert same_time["role"] == "equal_time" and same_time["equal_time"]["method"] == METHOD
    # timed with its own iterations per epoch: the same 0.1 s per iteration as stock
    assert same_time["training"]["seconds_per_iteration"] == pytest.approx(0.1)
    stock_comparison, same_time_comparison = results["statistics"]
    assert stock_comparison["differences"] == pytest.approx([10.0])
    assert same_time_comparison["reference"] == f"stock, same time ({METHOD})"
    assert same_time_comparison["differences"] == pytest.approx([5.0])
    report = (settings.output / "report.md").read_text()
    assert f"| {METHOD} | 0 | 2.50 | 2 x 10 | `nnUNetTrainer_e2i10s0` |  |" in report

    # a second invocation reuses the equal-time run (same ratio from the reused checkpoints, same name)
    calls.clear()
    again = runner.run_benchmark(settings)
    assert not [c for c in calls if "train" in c]
    assert again["equal_time"][0]["budget_trainer"] == "nnUNetTrainer_e2i10s0"


def test_equal_time_same_budget_as_stock_reuses_stocks_run(dataset, tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "_run_logged", fake_child(calls))
    monkeypatch.setattr(metrics, "evaluate_folder", fake_evaluation)
    monkeypatch.setitem(COST, METHOD, 0.11)  # ratio 1.1: round(4 x 1.1) = 4, the benchmark's own budget
    settings = runner.BenchmarkSettings(dataset="979", output=tmp_path / "out", trainers=(METHOD,),
                                        budget=Budget(2, 4, 1), equal_time=True, heartbeat_seconds=600)
    results = runner.run_benchmark(settings)
    assert [_argument(c, "-tr") for c in calls if "train" in c] == ["nnUNetTrainer_e2i4s0", f"{METHOD}_e2i4s0"]
    same_time = next(r for r in results["runs"] if r["role"] == "equal_time")
    assert same_time["budget_trainer"] == "nnUNetTrainer_e2i4s0" and same_time["status"] == "ok"
    # one curve figure per trained model, stock and the method (the equal-time run is stock's own): no second
    # title pointing at stock's figure
    curves = sorted(k for k in results["plots"] if k.startswith("training curves"))
    assert curves == sorted([f"training curves: {METHOD} [Dataset979_EqualTime] seed 0",
                             "training curves: nnUNetTrainer [Dataset979_EqualTime] seed 0"])


@pytest.mark.parametrize("flag, expected", [([], False), (["--equal-time"], True)])
def test_command_line_option(monkeypatch, tmp_path, flag, expected):
    settings = benchmark_settings_from_command_line(monkeypatch, ["-d", "1", "--output", str(tmp_path / "out"), *flag])
    assert settings.equal_time is expected


def test_generated_module_holds_the_further_budgets_once(tmp_path):
    import importlib.util

    from nnunet_ext.benchmark.budget import write_benchmark_trainers

    names = write_benchmark_trainers(tmp_path, ["nnUNetTrainer", METHOD], Budget(2, 3, 1), [0],
                                     further_budgets=[("nnUNetTrainer", Budget(2, 7, 1), 0),
                                                      ("nnUNetTrainer", Budget(2, 3, 1), 0)])  # = the stock class
    assert names == {("nnUNetTrainer", 0): "nnUNetTrainer_e2i3s0", (METHOD, 0): f"{METHOD}_e2i3s0"}
    source = (tmp_path / "nnunet_ext_budget_trainers.py").read_text()
    assert source.count("class nnUNetTrainer_e2i3s0(") == 1
    spec = importlib.util.spec_from_file_location("generated_equal_time_budgets", tmp_path /
                                                  "nnunet_ext_budget_trainers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.nnUNetTrainer_e2i7s0.__mro__[1].__name__ == "nnUNetTrainer"
    block = source[source.index("class nnUNetTrainer_e2i7s0("):]
    assert "self.num_epochs = 2" in block and "self.num_iterations_per_epoch = 7" in block


@pytest.mark.parametrize("trainers", [(), ("nnUNetTrainer",)])
def test_equal_time_without_a_method_is_refused_before_any_run(dataset, tmp_path, monkeypatch, trainers):
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "_run_logged", fake_child(calls))
    settings = runner.BenchmarkSettings(dataset="979", output=tmp_path / "out", trainers=trainers,
                                        budget=Budget(2, 4, 1), equal_time=True)
    with pytest.raises(runner.BenchmarkError, match="--equal-time .* at least one segmentation trainer"):
        runner.run_benchmark(settings)
    assert calls == []


# ------------------------------------------------------------------------- --equal-time-costs
def _cost_results(tmp_path, **changes) -> Path:
    """A cost run's results.json: stock 0.1 s and the method 0.3 / 0.5 s per iteration over two seeds."""
    settings = {"dataset_name": "Dataset979_EqualTime", "configuration": "3d_fullres", "plans": "nnUNetCPUPlans",
                "device": "cpu", "budget": {"epochs": 2, "iterations": 4, "val_iterations": 1}}
    settings.update(changes)
    runs = [_record("baseline", "nnUNetTrainer", 0, 0.1), _record("method", METHOD, 0, 0.3),
            _record("method", METHOD, 1, 0.5), _record("method", "Broken", 0, 9.0, status="failed")]
    path = tmp_path / "cost" / "results.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "runs": runs}))
    return path


def test_cost_ratios_from_another_benchmark_are_means_over_its_seeds(tmp_path):
    from nnunet_ext.benchmark.equal_time import cost_ratios_from_results

    ratios = cost_ratios_from_results(_cost_results(tmp_path), "Dataset979_EqualTime", "3d_fullres",
                                      "nnUNetCPUPlans", "cpu", Budget(2, 4, 1), [METHOD])
    assert ratios[METHOD]["cost_ratio"] == pytest.approx(4.0)  # mean(0.3, 0.5) / 0.1
    assert ratios[METHOD]["seeds"] == [0, 1]


@pytest.mark.parametrize("changes, methods, message", [
    ({"plans": "nnUNetPlans"}, [METHOD], r"other settings: plans 'nnUNetPlans' \(this benchmark: 'nnUNetCPUPlans'\)"),
    ({"budget": {"epochs": 30, "iterations": 4}}, [METHOD], r"budget .*'epochs': 30"),
    ({}, ["Broken"], "no finished, timed run of Broken"),
    ({}, ["Absent"], "no finished, timed run of Absent"),
])
def test_cost_ratios_from_a_mismatching_benchmark_are_refused(tmp_path, changes, methods, message):
    from nnunet_ext.benchmark.equal_time import cost_ratios_from_results

    with pytest.raises(runner.BenchmarkError, match=message):
        cost_ratios_from_results(_cost_results(tmp_path, **changes), "Dataset979_EqualTime", "3d_fullres",
                                 "nnUNetCPUPlans", "cpu", Budget(2, 4, 1), methods)


def test_equal_time_with_measured_costs_uses_them_for_every_seed(dataset, tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "_run_logged", fake_child(calls))
    monkeypatch.setattr(metrics, "evaluate_folder", fake_evaluation)
    costs = _cost_results(tmp_path)
    settings = runner.BenchmarkSettings(dataset="979", output=tmp_path / "out", trainers=(METHOD,),
                                        budget=Budget(2, 4, 1), seeds=(0, 1), equal_time=True,
                                        equal_time_costs=costs, heartbeat_seconds=600)
    results = runner.run_benchmark(settings)
    # the runs' own timings give 2.5; the cost measurement says 4.0: stock for 2 x 16 iterations on both seeds
    assert [(p["seed"], p["cost_ratio"], p["budget"]["iterations"]) for p in results["equal_time"]] == [
        (0, pytest.approx(4.0), 16), (1, pytest.approx(4.0), 16)]
    assert {p["cost_source"] for p in results["equal_time"]} == {str(costs)}
    assert results["settings"]["equal_time_costs"] == str(costs)
    assert str(costs) in (settings.output / "report.md").read_text()


def test_equal_time_costs_need_equal_time_and_a_matching_file_before_any_run(dataset, tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "_run_logged", fake_child(calls))
    with pytest.raises(runner.BenchmarkError, match="add --equal-time"):
        runner.BenchmarkSettings(dataset="979", output=tmp_path / "out", trainers=(METHOD,),
                                 equal_time_costs=_cost_results(tmp_path))
    settings = runner.BenchmarkSettings(dataset="979", output=tmp_path / "out", trainers=(METHOD,),
                                        budget=Budget(3, 4, 1), equal_time=True,
                                        equal_time_costs=_cost_results(tmp_path))
    with pytest.raises(runner.BenchmarkError, match="other settings: budget"):
        runner.run_benchmark(settings)
    settings.equal_time_costs = tmp_path / "missing.json"
    with pytest.raises(runner.BenchmarkError, match="missing.json not found"):
        runner.run_benchmark(settings)
    assert calls == []
