"""Paired statistics of a benchmark: a method against a reference on the same seeds (and folds, test cases).

Pure functions on numbers and on the run records of ``results.json``; nothing here trains or predicts.

- Per seed (``benchmark``) or per (fold, seed) (``benchmark-cls``) the paired difference method - reference, in
  points (x100). Its mean with a 95 % Student-t interval over those pairs (``scipy.stats.t``), and how many pairs
  the method wins. One pair has no interval: "an observation, not a result".
- A Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided, zero differences dropped) on the pairs of
  per-case mean Dice over test cases x seeds (``benchmark``) or on the (fold, seed) differences
  (``benchmark-cls``).
- The share of the gap bound closed: per seed (method - stock) / (stock, all labeled - stock), with the t-interval
  of those per-seed shares. A per-seed ratio rather than a ratio of means (Fieller) because it is paired like the
  differences; it is unstable when a seed's gap is small, which is why it is only meaningful where the gap bound
  is at least :data:`MIN_MEANINGFUL_GAP_POINTS` Dice points (seeds with a gap <= 0 have no share).
- A verdict: better (interval above 0), worse (below 0) or not distinguishable (interval contains 0).
"""
from __future__ import annotations

import math
import statistics as pystats
from collections.abc import Hashable, Mapping, Sequence

#: A semi-supervised comparison needs room between the labeled-only and the all-labeled stock model.
MIN_MEANINGFUL_GAP_POINTS = 3.0
CONFIDENCE = 0.95

BETTER, WORSE, INDISTINGUISHABLE, ONE_PAIR, NO_PAIR = "better", "worse", "not distinguishable", "one pair", "none"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float | int | None]:
    """Mean and two-sided Student-t confidence interval (``mean ± t(n-1) * sd / sqrt(n)``).

    Args:
        values: finite numbers (one per pair).
        confidence: coverage of the interval.

    Returns:
        ``{"n", "mean", "std" (sample, n - 1), "low", "high"}``; no value: all None but ``n``; one value: no std
        and no interval.

    Raises:
        ValueError: a NaN or infinite value.
    """
    from scipy import stats

    values = [float(v) for v in values]
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"values must be finite, got {values}")
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "low": None, "high": None}
    mean = pystats.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "low": None, "high": None}
    std = pystats.stdev(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def signed_rank_test(differences: Sequence[float]) -> dict[str, float | int | None]:
    """Two-sided Wilcoxon signed-rank test of paired differences (``scipy.stats.wilcoxon``, zeros dropped).

    Returns:
        ``{"n": pairs, "n_nonzero", "statistic", "p_value"}``; without any pair both None; when every difference is
        zero the data show no difference at all: statistic 0, p-value 1.
    """
    from scipy import stats

    differences = [float(d) for d in differences]
    nonzero = sum(d != 0 for d in differences)
    result: dict[str, float | int | None] = {"n": len(differences), "n_nonzero": nonzero, "statistic": None,
                                             "p_value": None}
    if not differences:
        return result
    if nonzero == 0:
        return {**result, "statistic": 0.0, "p_value": 1.0}
    test = stats.wilcoxon(differences)
    return {**result, "statistic": float(test.statistic), "p_value": float(test.pvalue)}


def verdict(interval: Mapping[str, float | int | None]) -> str:
    """:data:`BETTER` (interval above 0), :data:`WORSE` (below 0), :data:`INDISTINGUISHABLE`, :data:`ONE_PAIR`
    (no interval) or :data:`NO_PAIR`."""
    if not interval["n"]:
        return NO_PAIR
    if interval["low"] is None:
        return ONE_PAIR
    if interval["low"] > 0:
        return BETTER
    if interval["high"] < 0:
        return WORSE
    return INDISTINGUISHABLE


def paired_differences(candidate: Mapping[Hashable, float], reference: Mapping[Hashable, float],
                       scale: float = 100.0) -> dict[Hashable, float]:
    """``scale * (candidate - reference)`` for every key both have with a finite value, in key order."""
    return {k: scale * (float(candidate[k]) - float(reference[k])) for k in sorted(candidate)
            if k in reference and math.isfinite(float(candidate[k])) and math.isfinite(float(reference[k]))}


def case_mean_dice(evaluation: Mapping) -> dict[str, float]:
    """Per test case, the mean Dice over classes ignoring classes where it is undefined (NaN: reference and
    prediction empty), as nnU-Net's averages do; NaN when no class of the case has a Dice."""
    means = {}
    for case in evaluation["per_case"]:
        dice = [float(m["Dice"]) for m in case["metrics"].values() if not math.isnan(float(m["Dice"]))]
        means[case["case"]] = pystats.fmean(dice) if dice else math.nan
    return means


def case_pairs(candidate: Mapping[int, Mapping], reference: Mapping[int, Mapping]) -> dict[str, object]:
    """Per-case mean Dice differences (points) over test cases x seeds, for the seeds in both.

    Args:
        candidate, reference: ``{seed: evaluation}`` (``per_case`` as written by ``evaluate_folder``).

    Returns:
        ``{"differences": [...], "undefined": pairs left out because a side has no Dice}``.

    Raises:
        ValueError: a seed whose two evaluations cover different test cases (named).
    """
    differences, undefined = [], 0
    for seed in sorted(set(candidate) & set(reference)):
        a, b = case_mean_dice(candidate[seed]), case_mean_dice(reference[seed])
        if set(a) != set(b):
            raise ValueError(f"seed {seed}: the runs were evaluated on different test cases (only in one: "
                             f"{sorted(set(a) - set(b))[:10]}, only in the other: {sorted(set(b) - set(a))[:10]})")
        for case in sorted(a):
            if math.isnan(a[case]) or math.isnan(b[case]):
                undefined += 1
            else:
                differences.append(100.0 * (a[case] - b[case]))
    return {"differences": differences, "undefined": undefined}


def gap_shares(candidate: Mapping[int, float], stock: Mapping[int, float],
               upper: Mapping[int, float]) -> dict[str, object]:
    """Per seed, the gap bound (upper - stock, points) and the share of it the candidate closes.

    Returns:
        ``{"gap": mean_interval of the per-seed gaps, "meaningful": mean gap >= 3 points (None without a gap),
        "per_seed": {seed: {"gap", "share"}}, "share": mean_interval of the shares of seeds with a positive gap}``.
    """
    gaps = paired_differences(upper, stock)
    closed = paired_differences(candidate, stock)
    per_seed = {seed: {"gap": gap, "share": closed[seed] / gap if seed in closed and gap > 0 else None}
                for seed, gap in gaps.items()}
    gap = mean_interval(list(gaps.values()))
    # rounded so that a gap of exactly 3 points is not lost to floating point (0.63 - 0.60 = 0.0299999...)
    meaningful = None if gap["mean"] is None else round(gap["mean"], 6) >= MIN_MEANINGFUL_GAP_POINTS
    return {"gap": gap, "meaningful": meaningful, "per_seed": per_seed,
            "share": mean_interval([s["share"] for s in per_seed.values() if s["share"] is not None])}


def _ok_by_seed(runs: Sequence[Mapping], role: str, label: str | None = None) -> dict[int, Mapping]:
    return {r["seed"]: r for r in runs if r["role"] == role and (label is None or r["label"] == label)
            and r["status"] == "ok" and r.get("evaluation")}


def compare_segmentation(candidate: Mapping[int, Mapping], reference: Mapping[int, Mapping],
                         upper: Mapping[int, Mapping] | None = None, stock: Mapping[int, Mapping] | None = None
                         ) -> dict:
    """Statistics of ``candidate`` against ``reference`` (``{seed: finished run record}``).

    Mean Dice per seed (``evaluation.foreground_mean.Dice``) gives the paired differences, their interval, wins
    and the verdict; per-case mean Dice over test cases x seeds gives the Wilcoxon test. With ``upper`` and
    ``stock`` (all-labeled and labeled-only stock runs), also the share of the gap bound closed.

    Raises:
        ValueError: a seed whose runs were evaluated on different test cases.
    """
    def mean_dice(runs: Mapping[int, Mapping]) -> dict[int, float]:
        return {seed: r["evaluation"]["foreground_mean"]["Dice"] for seed, r in runs.items()}

    differences = paired_differences(mean_dice(candidate), mean_dice(reference))
    interval = mean_interval(list(differences.values()))
    seeds = list(differences)
    if all("per_case" in candidate[s]["evaluation"] and "per_case" in reference[s]["evaluation"] for s in seeds):
        pairs = case_pairs({s: candidate[s]["evaluation"] for s in seeds},
                           {s: reference[s]["evaluation"] for s in seeds})
        test = {**signed_rank_test(pairs["differences"]), "undefined_pairs": pairs["undefined"]}
    else:  # results written before per-case values were kept
        test = None
    result = {"seeds": seeds, "differences": [differences[s] for s in seeds], **interval,
              "wins": sum(d > 0 for d in differences.values()), "wilcoxon": test, "verdict": verdict(interval),
              "gap": None}
    if upper and stock:
        result["gap"] = gap_shares(mean_dice(candidate), mean_dice(stock), mean_dice(upper))
    return result


def segmentation_statistics(runs: Sequence[Mapping]) -> list[dict]:
    """Every method against stock, and every method against its equal-time stock run (role ``equal_time``).

    Returns:
        One entry per comparison: ``{"candidate", "reference", "kind": "stock" | "equal_time", ...}`` with the
        fields of :func:`compare_segmentation`, or ``"error"`` when the runs cannot be paired.
    """
    stock = _ok_by_seed(runs, "baseline")
    upper = _ok_by_seed(runs, "upper_bound")
    methods = list(dict.fromkeys(r["label"] for r in runs if r["role"] == "method"))
    comparisons = []
    for method in methods:
        candidate = _ok_by_seed(runs, "method", method)
        references = [("stock", "stock", stock)]
        same_time = [r for r in runs if r["role"] == "equal_time" and r.get("equal_time", {}).get("method") == method]
        if same_time:
            references.append(("equal_time", same_time[0]["label"], _ok_by_seed(same_time, "equal_time")))
        for kind, name, reference in references:
            entry = {"candidate": method, "reference": name, "kind": kind}
            try:
                entry.update(compare_segmentation(candidate, reference, upper if kind == "stock" else None, stock))
            except ValueError as e:
                entry["error"] = str(e)
            comparisons.append(entry)
    return comparisons


def classification_comparison(runs: Sequence[Mapping], candidate: str, reference: str, metric: str) -> dict:
    """``metric`` of ``candidate`` minus ``reference`` on the same (fold, seed), in points: differences, their
    mean and t-interval over the (fold, seed) pairs, wins, Wilcoxon test and verdict."""
    def values(trainer: str) -> dict[tuple[int, int], float]:
        return {(r["fold"], r["seed"]): r["validation"][metric] for r in runs
                if r["trainer"] == trainer and r["status"] == "ok" and r.get("validation")}

    differences = paired_differences(values(candidate), values(reference))
    interval = mean_interval(list(differences.values()))
    return {"candidate": candidate, "reference": reference, "metric": metric,
            "pairs": [list(k) for k in differences], "differences": list(differences.values()), **interval,
            "wins": sum(d > 0 for d in differences.values()),
            "wilcoxon": signed_rank_test(list(differences.values())), "verdict": verdict(interval)}


def classification_statistics(runs: Sequence[Mapping], candidates: Sequence[str],
                              references: Mapping[str, str | None]) -> list[dict]:
    """Every candidate against the reference of each metric (``{metric: trainer}``, e.g. the best baseline), paired
    over (fold, seed); a metric without a reference is left out. See :func:`classification_comparison`."""
    return [classification_comparison(runs, candidate, reference, metric) for candidate in candidates
            for metric, reference in references.items() if reference is not None and reference != candidate]
