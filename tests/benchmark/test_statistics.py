"""Paired statistics of the benchmarks against scipy and hand-computed values, with their edge cases."""
from __future__ import annotations

import math

import pytest
from scipy import stats

from nnunet_ext.benchmark.statistics import (
    BETTER,
    INDISTINGUISHABLE,
    NO_PAIR,
    ONE_PAIR,
    WORSE,
    case_mean_dice,
    case_pairs,
    classification_comparison,
    compare_segmentation,
    gap_shares,
    mean_interval,
    paired_differences,
    segmentation_statistics,
    signed_rank_test,
    verdict,
)


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [0.3, -0.1], [5.0, 5.5, 4.0, 6.5, 5.2]])
def test_mean_interval_is_scipys_t_interval(values):
    result = mean_interval(values)
    n = len(values)
    mean = sum(values) / n
    std = stats.tstd(values)
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=std / math.sqrt(n))
    assert result["n"] == n and result["mean"] == pytest.approx(mean) and result["std"] == pytest.approx(std)
    assert result["low"] == pytest.approx(low) and result["high"] == pytest.approx(high)


def test_mean_interval_known_value():
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.302653 -> half width 4.302653 / sqrt(3) = 2.484138
    result = mean_interval([1.0, 2.0, 3.0])
    assert result["low"] == pytest.approx(2 - 2.484138, abs=1e-6) and result["high"] == pytest.approx(4.484138,
                                                                                                      abs=1e-6)


@pytest.mark.parametrize("values, expected", [
    ([], {"n": 0, "mean": None, "std": None, "low": None, "high": None}),
    ([1.5], {"n": 1, "mean": 1.5, "std": None, "low": None, "high": None}),       # one seed: no interval
    ([0.0, 0.0, 0.0], {"n": 3, "mean": 0.0, "std": 0.0, "low": 0.0, "high": 0.0}),  # all differences zero
])
def test_mean_interval_edge_cases(values, expected):
    assert mean_interval(values) == expected


def test_mean_interval_refuses_nan():
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, math.nan])


@pytest.mark.parametrize("differences", [[1.0, 2.0, -0.5, 3.0, 4.0], [0.2, -0.1, 0.4, 0.3, -0.2, 0.6, 0.05],
                                         [0.0, 1.0, 2.0, -3.0, 4.0, 5.0]])
def test_signed_rank_test_is_scipys_wilcoxon(differences):
    expected = stats.wilcoxon(differences)
    result = signed_rank_test(differences)
    assert result["p_value"] == pytest.approx(expected.pvalue) and result["statistic"] == expected.statistic
    assert result["n"] == len(differences) and result["n_nonzero"] == sum(d != 0 for d in differences)


@pytest.mark.parametrize("differences, p_value", [([], None), ([0.0, 0.0], 1.0)])
def test_signed_rank_test_edge_cases(differences, p_value):
    assert signed_rank_test(differences)["p_value"] == p_value


@pytest.mark.parametrize("interval, expected", [
    ({"n": 3, "low": 0.1, "high": 2.0}, BETTER), ({"n": 3, "low": -2.0, "high": -0.1}, WORSE),
    ({"n": 3, "low": -1.0, "high": 1.0}, INDISTINGUISHABLE), ({"n": 3, "low": 0.0, "high": 0.0}, INDISTINGUISHABLE),
    ({"n": 1, "low": None, "high": None}, ONE_PAIR), ({"n": 0, "low": None, "high": None}, NO_PAIR),
])
def test_verdict(interval, expected):
    assert verdict(interval) == expected


def test_paired_differences_keep_common_finite_keys_in_order():
    assert paired_differences({2: 0.7, 0: 0.5, 1: math.nan, 3: 0.9}, {0: 0.4, 1: 0.5, 2: 0.8}) == \
        pytest.approx({0: 10.0, 2: -10.0})


def _evaluation(per_case: dict[str, tuple[float, ...]]) -> dict:
    cases = [{"case": case, "metrics": {str(i + 1): {"Dice": d} for i, d in enumerate(dice)}}
             for case, dice in per_case.items()]
    means = [sum(d for d in dice if not math.isnan(d)) / max(1, sum(not math.isnan(d) for d in dice))
             for dice in per_case.values()]
    return {"per_case": cases, "foreground_mean": {"Dice": sum(means) / len(means)}}


def test_case_mean_dice_ignores_undefined_classes():
    means = case_mean_dice(_evaluation({"a": (0.5, 0.7), "b": (math.nan, 0.8), "c": (math.nan, math.nan)}))
    assert means["a"] == pytest.approx(0.6) and means["b"] == pytest.approx(0.8) and math.isnan(means["c"])


def test_case_pairs_over_cases_and_seeds_leave_out_undefined_cases():
    method = {0: _evaluation({"a": (0.6,), "b": (0.5,), "c": (math.nan,)}), 1: _evaluation({"a": (0.7,),
                                                                                            "b": (0.4,),
                                                                                            "c": (0.2,)})}
    stock = {0: _evaluation({"a": (0.5,), "b": (0.5,), "c": (0.0,)}), 1: _evaluation({"a": (0.6,), "b": (0.6,),
                                                                                      "c": (0.1,)})}
    pairs = case_pairs(method, stock)
    assert pairs["differences"] == pytest.approx([10.0, 0.0, 10.0, -20.0, 10.0]) and pairs["undefined"] == 1


def test_case_pairs_refuse_different_test_cases():
    with pytest.raises(ValueError, match=r"seed 0: .*different test cases.*\['c'\]"):
        case_pairs({0: _evaluation({"a": (0.5,), "c": (0.5,)})}, {0: _evaluation({"a": (0.5,), "b": (0.5,)})})


def test_gap_shares_per_seed():
    result = gap_shares({0: 0.55, 1: 0.62}, {0: 0.50, 1: 0.60}, {0: 0.60, 1: 0.64})
    assert result["per_seed"][0] == pytest.approx({"gap": 10.0, "share": 0.5})
    assert result["per_seed"][1] == pytest.approx({"gap": 4.0, "share": 0.5})
    assert result["gap"]["mean"] == pytest.approx(7.0) and result["meaningful"] is True
    assert result["share"]["mean"] == pytest.approx(0.5) and result["share"]["low"] == pytest.approx(0.5)


@pytest.mark.parametrize("upper, meaningful, shares", [
    ({0: 0.53}, True, 1),      # exactly 3 points counts as meaningful
    ({0: 0.52}, False, 1),
    ({0: 0.49}, False, 0),     # negative gap: no share
])
def test_gap_shares_meaningful_only_from_three_points(upper, meaningful, shares):
    result = gap_shares({0: 0.51}, {0: 0.50}, upper)
    assert result["meaningful"] is meaningful and result["share"]["n"] == shares


def _run(role, label, seed, per_case, status="ok", method=None):
    run = {"role": role, "label": label, "seed": seed, "status": status,
           "evaluation": _evaluation(per_case) if status == "ok" else None}
    if method:
        run["equal_time"] = {"method": method}
    return run


def test_compare_segmentation_against_hand_computed_values():
    method = {s: _run("method", "M", s, {"a": (d1,), "b": (d2,)}) for s, d1, d2 in [(0, 0.7, 0.5), (1, 0.8, 0.6),
                                                                                      (2, 0.6, 0.6)]}
    stock = {s: _run("baseline", "nnUNetTrainer", s, {"a": (d1,), "b": (d2,)})
             for s, d1, d2 in [(0, 0.6, 0.4), (1, 0.6, 0.6), (2, 0.6, 0.5)]}
    result = compare_segmentation(method, stock)
    assert result["seeds"] == [0, 1, 2] and result["differences"] == pytest.approx([10.0, 10.0, 5.0])
    assert result["wins"] == 3 and result["mean"] == pytest.approx(25 / 3)
    expected = mean_interval([10.0, 10.0, 5.0])
    assert result["low"] == pytest.approx(expected["low"]) and result["verdict"] == BETTER
    per_case = [10.0, 10.0, 20.0, 0.0, 0.0, 10.0]
    assert result["wilcoxon"]["p_value"] == pytest.approx(stats.wilcoxon(per_case).pvalue)
    assert result["gap"] is None


def test_segmentation_statistics_one_seed_failed_runs_and_equal_time():
    runs = [_run("baseline", "nnUNetTrainer", 0, {"a": (0.5,)}), _run("baseline", "nnUNetTrainer", 1, {"a": (0.6,)}),
            _run("method", "M", 0, {"a": (0.6,)}), _run("method", "M", 1, {}, status="failed"),
            _run("upper_bound", "stock, all labeled", 0, {"a": (0.7,)}),
            _run("equal_time", "stock, same time (M)", 0, {"a": (0.65,)}, method="M")]
    against_stock, against_same_time = segmentation_statistics(runs)
    assert against_stock["kind"] == "stock" and against_stock["verdict"] == ONE_PAIR
    assert against_stock["seeds"] == [0] and against_stock["differences"] == pytest.approx([10.0])
    assert against_stock["gap"]["per_seed"][0] == pytest.approx({"gap": 20.0, "share": 0.5})
    assert against_same_time["reference"] == "stock, same time (M)" and against_same_time["kind"] == "equal_time"
    assert against_same_time["differences"] == pytest.approx([-5.0]) and against_same_time["gap"] is None


def test_segmentation_statistics_report_unpairable_runs():
    runs = [_run("baseline", "nnUNetTrainer", 0, {"a": (0.5,)}), _run("method", "M", 0, {"b": (0.6,)})]
    (entry,) = segmentation_statistics(runs)
    assert "different test cases" in entry["error"]


def test_classification_comparison_over_folds_and_seeds():
    def record(trainer, fold, seed, auc, status="ok"):
        return {"trainer": trainer, "fold": fold, "seed": seed, "status": status,
                "validation": {"auc": auc} if status == "ok" else None}

    runs = [record("A", f, s, v) for (f, s), v in {(0, 0): 0.9, (1, 0): 0.8, (0, 1): 0.85, (1, 1): 0.7}.items()]
    runs += [record("B", f, s, v) for (f, s), v in {(0, 0): 0.8, (1, 0): 0.8, (0, 1): 0.8}.items()]
    runs.append(record("B", 1, 1, None, status="failed"))
    result = classification_comparison(runs, "A", "B", "auc")
    assert result["pairs"] == [[0, 0], [0, 1], [1, 0]] and result["differences"] == pytest.approx([10.0, 5.0, 0.0])
    assert result["wins"] == 2 and result["verdict"] == INDISTINGUISHABLE
    assert result["wilcoxon"]["p_value"] == pytest.approx(stats.wilcoxon([10.0, 5.0, 0.0]).pvalue)
