"""Aggregation over seeds, number formatting, the gap bound, the Markdown report and the plots."""
from __future__ import annotations

import math

import pytest

from nnunet_ext.benchmark.report import (
    format_delta,
    format_mean_std,
    format_ratio,
    format_report,
    format_signed,
    gap_bound,
    mean_std,
    seconds_per_iteration,
    summarise,
)
from nnunet_ext.benchmark.runner import write_outputs


@pytest.mark.parametrize("starts, ends, iterations, skip, value, timed, excluded", [
    ([0, 10, 14], [10, 14, 18], 2, True, 2.0, 2, True),      # first epoch (10 s) is warm-up
    ([0, 10, 14], [10, 14, 18], 2, False, 3.0, 3, False),
    ([0], [10], 4, True, 2.5, 1, False),                       # a single epoch is kept
    ([0, 10], [10], 1, True, 10.0, 1, False),                  # unfinished last epoch ignored
    ([], [], 1, True, None, 0, False),
])
def test_seconds_per_iteration(starts, ends, iterations, skip, value, timed, excluded):
    result = seconds_per_iteration({"epoch_start_timestamps": starts, "epoch_end_timestamps": ends}, iterations,
                                   skip_warmup=skip)
    assert result == {"value": value, "epochs_timed": timed, "warmup_excluded": excluded}


@pytest.mark.parametrize("value, digits, text", [
    (1.25, 1, "+1.2"), (-0.44, 1, "-0.4"), (-0.04, 1, "0.0"), (0.04, 1, "0.0"), (0.0, 1, "0.0"), (-0.0, 3, "0.000"),
    (-0.0004, 3, "0.000"), (0.0123, 3, "+0.012"),
])
def test_format_signed_never_shows_a_signed_zero(value, digits, text):
    assert format_signed(value, digits) == text


def test_seconds_per_iteration_bad_iterations():
    with pytest.raises(ValueError, match="iterations"):
        seconds_per_iteration({}, 0)


@pytest.mark.parametrize("values, mean, std, n", [
    ([1.0, 2.0, 3.0], 2.0, 1.0, 3),
    ([0.5], 0.5, None, 1),
    ([None, 1.0, math.nan], 1.0, None, 1),     # failed run and undefined value left out
    ([math.inf, 1.0], math.inf, None, 2),
    ([], None, None, 0),
])
def test_mean_std(values, mean, std, n):
    assert mean_std(values) == {"mean": mean, "std": std, "n": n}


@pytest.mark.parametrize("stats, digits, text", [
    ({"mean": 0.81234, "std": 0.01011, "n": 2}, 3, "0.812 ± 0.010"),
    ({"mean": 0.81234, "std": None, "n": 1}, 3, "0.812"),
    ({"mean": None, "std": None, "n": 0}, 3, "—"),
    ({"mean": math.inf, "std": None, "n": 2}, 2, "inf"),
    ({"mean": 1234.4, "std": 10.6, "n": 3}, 0, "1234 ± 11"),
])
def test_format_mean_std(stats, digits, text):
    assert format_mean_std(stats, digits) == text


@pytest.mark.parametrize("value, base, ratio, delta", [
    (2.0, 1.0, "2.00", "+1.000"),
    (0.5, 1.0, "0.50", "-0.500"),
    (None, 1.0, "—", "—"),
    (1.0, 0.0, "—", "+1.000"),
    (math.inf, 1.0, "—", "—"),
])
def test_ratio_and_delta(value, base, ratio, delta):
    assert format_ratio(value, base) == ratio
    assert format_delta(value, base) == delta


def make_run(role, label, seed, dice=(0.5, 0.7), hd95=(3.0, 4.0), s_it=1.0, mem=1000.0, inf=2.0, net=0.5,
             dataset="Dataset992_Bench", status="ok", n_inf=0):
    trainer = "nnUNetTrainer" if role != "method" else label
    run = {"role": role, "label": label, "trainer": trainer, "dataset": dataset, "seed": seed, "status": status,
           "budget_trainer": f"{trainer}_e2i2s{seed}", "failed_step": None, "error": None, "log_file": None,
           "log_tail": None, "training": None, "inference": None, "evaluation": None}
    if status != "ok":
        run.update(failed_step="training", error="nnUNetv2_train exited with code 1: RuntimeError: boom",
                   log_file="/x/train.log", log_tail="Traceback (most recent call last):\nRuntimeError: boom")
        return run
    run["training"] = {"seconds_per_iteration": s_it, "peak_rss_mb": mem, "cuda_max_memory_allocated_mb": None,
                       "curves": {"train_losses": [1.0, 0.5], "val_losses": [1.1, 0.7], "mean_fg_dice": [0.1, 0.4],
                                  "ema_fg_dice": [0.1, 0.13]}}
    run["inference"] = {"seconds_per_case": inf, "network_seconds_per_case": net}
    mean = {k: {"Dice": d, "HD95": {"mean": h, "n_finite": 3, "n_nan": 0, "n_inf": n_inf}}
            for k, d, h in zip(("1", "2"), dice, hd95)}
    run["evaluation"] = {"labels": {"1": "anterior", "2": "posterior"}, "mean": mean,
                         "foreground_mean": {"Dice": sum(dice) / 2, "HD95": sum(hd95) / 2}}
    return run


def make_results(runs, upper=True):
    return {
        "settings": {"dataset": "992", "dataset_name": "Dataset992_Bench", "configuration": "3d_fullres",
                     "plans": "nnUNetCPUPlans", "fold": "all", "device": "cpu", "seeds": [0, 1], "tta": False,
                     "budget": {"epochs": 2, "iterations": 2, "val_iterations": 1},
                     "test_labels": "/raw/labelsTs", "upper_bound_dataset": "993" if upper else None,
                     "upper_bound_dataset_name": "Dataset993_BenchAll" if upper else None, "versions": {}},
        "labels": {"1": "anterior", "2": "posterior"}, "n_test_cases": 3,
        "excluded_trainers": [{"trainer": "BenchClassifierTrainer", "reason": "task_kind = 'classification'"}],
        "runs": runs,
    }


@pytest.fixture
def runs():
    return [
        make_run("baseline", "nnUNetTrainer", 0, dice=(0.5, 0.7), s_it=1.0, mem=1000.0, inf=2.0),
        make_run("baseline", "nnUNetTrainer", 1, dice=(0.6, 0.8), s_it=1.2, mem=1100.0, inf=2.2),
        make_run("method", "ExtSmokeTrainer", 0, dice=(0.7, 0.9), s_it=2.2, mem=2100.0, inf=2.2, n_inf=2),
        make_run("method", "ExtSmokeTrainer", 1, status="failed"),
        make_run("upper_bound", "stock, all labeled", 0, dice=(0.6, 0.8), dataset="Dataset993_BenchAll"),
        make_run("upper_bound", "stock, all labeled", 1, dice=(0.7, 0.9), dataset="Dataset993_BenchAll"),
    ]


def test_summarise_over_seeds(runs):
    rows = summarise(runs, ["1", "2"])
    assert [(r["role"], r["label"]) for r in rows] == [("baseline", "nnUNetTrainer"), ("method", "ExtSmokeTrainer"),
                                                        ("upper_bound", "stock, all labeled")]
    base, method, upper = rows
    assert base["dice"]["1"]["mean"] == pytest.approx(0.55) and base["dice"]["1"]["n"] == 2
    assert base["mean_dice"]["mean"] == pytest.approx(0.65)
    assert base["seconds_per_iteration"]["mean"] == pytest.approx(1.1)
    assert method["seeds"] == [0, 1] and method["seeds_ok"] == [0] and method["mean_dice"]["std"] is None
    assert method["hd95_infinite_cases"] == 4  # 2 per class
    assert upper["mean_dice"]["mean"] == pytest.approx(0.75)


@pytest.mark.parametrize("upper_dice, points, meaningful", [((0.6, 0.8), 10.0, True), ((0.52, 0.72), 2.0, False),
                                                            ((0.53, 0.73), 3.0, True)])
def test_gap_bound(upper_dice, points, meaningful):
    runs = [make_run("baseline", "nnUNetTrainer", 0, dice=(0.5, 0.7)),
            make_run("upper_bound", "stock, all labeled", 0, dice=upper_dice, dataset="Dataset993_BenchAll")]
    gap = gap_bound(summarise(runs, ["1", "2"]))
    assert gap["points"] == pytest.approx(points) and gap["meaningful"] is meaningful


def test_gap_bound_without_upper_bound_run():
    assert gap_bound(summarise([make_run("baseline", "nnUNetTrainer", 0)], ["1", "2"])) is None


def test_report_tables_gap_failures_and_exclusions(runs):
    report = format_report(make_results(runs))
    assert "| nnUNetTrainer (stock) | 2/2 | 0.550 ± 0.071 | 0.750 ± 0.071 | 0.650 ± 0.071 | — | 3.00 ± 0.00 | " \
           "4.00 ± 0.00 | 0 |" in report
    assert "| ExtSmokeTrainer | 1/2 | 0.700 | 0.900 | 0.800 | +0.150 | 3.00 | 4.00 | 4 |" in report
    assert "| stock, all labeled [Dataset993_BenchAll] | 2/2 | 0.650 ± 0.071 | 0.850 ± 0.071 | 0.750 ± 0.071 | " \
           "+0.100 |" in report
    assert "| nnUNetTrainer (stock) | 1.100 ± 0.141 | 1.00 | 1050 ± 71 | 1.00 | 2.10 ± 0.14 | 1.00 | 0.500 ± " \
           "0.000 | 1.00 |" in report
    assert "| ExtSmokeTrainer | 2.200 | 2.00 | 2100 | 2.00 | 2.20 | 1.05 | 0.500 | 1.00 |" in report
    assert "Gap bound: **10.0 Dice points**, at least 3." in report
    assert "meaningful only when this gap is >= 3 Dice points; here it is." in report
    assert "### ExtSmokeTrainer [Dataset992_Bench], seed 1: training failed" in report
    assert "RuntimeError: boom" in report and "```\nTraceback (most recent call last):" in report
    assert "- `BenchClassifierTrainer`: task_kind = 'classification'" in report


def test_report_says_when_the_gap_is_too_small():
    runs = [make_run("baseline", "nnUNetTrainer", 0, dice=(0.5, 0.7)),
            make_run("upper_bound", "stock, all labeled", 0, dice=(0.51, 0.71), dataset="Dataset993_BenchAll")]
    report = format_report(make_results(runs))
    assert "Gap bound: **1.0 Dice points**, below 3." in report
    assert "here it is NOT" in report


def test_report_without_upper_bound_has_no_gap_section():
    report = format_report(make_results([make_run("baseline", "nnUNetTrainer", 0)], upper=False))
    assert "Gap bound" not in report and "## Failed runs" not in report


def test_write_outputs_writes_json_report_and_pngs(runs, tmp_path):
    results = make_results(runs)
    write_outputs(results, tmp_path)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "report.md").is_file()
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    # one bar chart and one curve figure per finished run (the failed run has no curves)
    assert "dice_per_class.png" in pngs and len(pngs) == 1 + 5
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Dice per class](plots/dice_per_class.png)" in (tmp_path / "report.md").read_text()


def _with_missing(run, mode, dice):
    run["missing"] = {"channels": ["T1"], "mode": mode, "command": "nnunet-ext predict ...", "evaluation": {
        "mean": {k: {"Dice": d} for k, d in zip(("1", "2"), dice)},
        "foreground_mean": {"Dice": sum(dice) / 2}}}
    return run


def test_report_table_without_a_channel():
    runs = [_with_missing(make_run("baseline", "nnUNetTrainer", 0, dice=(0.6, 0.8)), "zero-fill", (0.2, 0.4)),
            _with_missing(make_run("method", "CIMLTrainer", 0, dice=(0.7, 0.9)), "messages-off", (0.68, 0.88)),
            make_run("upper_bound", "stock, all labeled", 0, dice=(0.7, 0.9), dataset="Dataset993_BenchAll")]
    results = make_results(runs)
    results["settings"]["missing_channels"] = ["T1"]
    report = format_report(results)
    assert "## Without T1 at inference (mean ± std over seeds)" in report
    assert "| nnUNetTrainer (stock) | `zero-fill` | 0.200 | 0.400 | 0.700 | 0.300 | +40.0 |" in report
    assert "| CIMLTrainer | `messages-off` | 0.680 | 0.880 | 0.800 | 0.780 | +2.0 |" in report
    assert "stock, all labeled [Dataset993_BenchAll] | `" not in report  # the bound is not predicted again


def test_report_has_no_missing_section_without_the_option(runs):
    assert "at inference" not in format_report(make_results(runs))


def _with_cases(run, case_dice):
    """Add per-case Dice (one value per case for both classes) so the Wilcoxon test has pairs."""
    run["evaluation"]["per_case"] = [{"case": f"ts_{i}", "metrics": {"1": {"Dice": d}, "2": {"Dice": d}}}
                                     for i, d in enumerate(case_dice)]
    return run


@pytest.mark.parametrize("method_dice, verdict", [
    ((0.62, 0.63, 0.64), "better than stock (95 % interval above 0)"),
    ((0.58, 0.57, 0.56), "worse than stock (95 % interval below 0)"),
    ((0.65, 0.55, 0.61), "not distinguishable from stock (95 % interval contains 0)"),
])
def test_report_paired_statistics_and_verdicts(method_dice, verdict):
    from scipy import stats

    runs = []
    for seed, dice in enumerate(method_dice):
        runs.append(_with_cases(make_run("baseline", "nnUNetTrainer", seed, dice=(0.5, 0.7)), (0.55, 0.6, 0.65)))
        runs.append(_with_cases(make_run("method", "M", seed, dice=(dice - 0.1, dice + 0.1)),
                                (dice - 0.05, dice, dice + 0.05)))
    report = format_report(make_results(runs, upper=False))
    assert "## Paired comparisons" in report and f"- **M** vs stock: {verdict}." in report
    differences = [100 * (d - 0.6) for d in method_dice]
    p_value = stats.wilcoxon([100 * (d + o - s) for d in method_dice
                              for o, s in zip((-0.05, 0, 0.05), (0.55, 0.6, 0.65))]).pvalue
    row = next(line for line in report.splitlines() if line.startswith("| M | stock |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "3" and cells[3] == ", ".join(format_signed(d) for d in differences)
    assert cells[5] == f"{sum(d > 0 for d in differences)}/3" and cells[6] == f"{p_value:.3g} (n = 9)"
    assert cells[7] == "—"  # no upper bound, no share of the gap


def test_report_statistics_with_one_seed_and_the_gap_share(runs):
    report = format_report(make_results(runs))
    # seed 0 only (seed 1 of the method failed): +20 points; the gap of seed 0 is 10 points -> 200 %
    assert "| ExtSmokeTrainer | stock | 1 | +20.0 | +20.0 | 1/1 | — | 200 % |" in report
    assert "- **ExtSmokeTrainer** vs stock: one seed: an observation, not a result." in report


def test_report_statistics_say_when_the_gap_is_too_small():
    runs = [make_run(role, label, seed, dice=dice, dataset=dataset) for seed in (0, 1) for role, label, dice, dataset
            in [("baseline", "nnUNetTrainer", (0.5, 0.7), "Dataset992_Bench"), ("method", "M", (0.51, 0.71),
                                                                                  "Dataset992_Bench"),
                ("upper_bound", "stock, all labeled", (0.52, 0.72), "Dataset993_BenchAll")]]
    report = format_report(make_results(runs))
    assert "gap bound 2.0 < 3 Dice points, so this semi-supervised comparison is not meaningful." in report
    assert "| M | stock | 2 | +1.0, +1.0 | +1.0 [+1.0, +1.0] | 2/2 | — | 50 % [50, 50 %] |" in report


def test_report_equal_time_rows_and_comparison():
    runs = [make_run("baseline", "nnUNetTrainer", 0, dice=(0.5, 0.7), s_it=1.0),
            make_run("method", "M", 0, dice=(0.6, 0.8), s_it=2.0),
            make_run("equal_time", "stock, same time (M)", 0, dice=(0.55, 0.75), s_it=1.0)]
    runs[-1]["equal_time"] = {"method": "M"}
    results = make_results(runs, upper=False)
    results["equal_time"] = [{"method": "M", "seed": 0, "cost_ratio": 2.0, "budget": {"epochs": 2, "iterations": 4},
                              "budget_trainer": "nnUNetTrainer_e2i4s0", "skipped": None}]
    report = format_report(results)
    assert "| stock, same time (M) | 1/1 | 0.550 | 0.750 | 0.650 | +0.050 |" in report
    assert "| M | stock, same time (M) | 1 | +5.0 | +5.0 | 1/1 | — | — |" in report
    assert "- **M** vs stock, same time (M): one seed: an observation, not a result." in report
    assert "| M | 0 | 2.00 | 2 x 4 | `nnUNetTrainer_e2i4s0` |  |" in report


def test_write_outputs_keeps_the_statistics_in_results_json(runs, tmp_path):
    import json

    write_outputs(make_results(runs), tmp_path)
    (entry,) = json.loads((tmp_path / "results.json").read_text())["statistics"]
    assert entry["candidate"] == "ExtSmokeTrainer" and entry["reference"] == "stock"
    assert entry["differences"] == pytest.approx([20.0]) and entry["verdict"] == "one pair"
