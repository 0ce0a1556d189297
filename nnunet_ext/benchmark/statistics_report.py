"""Markdown of the paired statistics (:mod:`nnunet_ext.benchmark.statistics`) for both benchmark reports."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from nnunet_ext.benchmark.report import format_signed, markdown_table
from nnunet_ext.benchmark.statistics import (
    BETTER,
    INDISTINGUISHABLE,
    MIN_MEANINGFUL_GAP_POINTS,
    NO_PAIR,
    ONE_PAIR,
    WORSE,
)


def format_interval(entry: Mapping, digits: int = 1, scale: float = 1.0) -> str:
    """``+8.3 [+1.2, +15.5]``; without an interval the mean alone; without pairs ``—``."""
    if entry.get("mean") is None:
        return "—"
    text = format_signed(scale * entry["mean"], digits)
    if entry.get("low") is not None:
        text += f" [{format_signed(scale * entry['low'], digits)}, {format_signed(scale * entry['high'], digits)}]"
    return text


def format_p_value(test: Mapping | None) -> str:
    """``0.031 (n = 60)``: the p-value with the number of pairs; ``—`` without a test."""
    if not test or test.get("p_value") is None:
        return "—"
    return f"{test['p_value']:.3g} (n = {test['n']})"


def verdict_text(verdict: str, reference: str, unit: str = "seed") -> str:
    """The verdict as a sentence part, e.g. ``better than stock (95 % interval above 0)``."""
    return {
        BETTER: f"better than {reference} (95 % interval above 0)",
        WORSE: f"worse than {reference} (95 % interval below 0)",
        INDISTINGUISHABLE: f"not distinguishable from {reference} (95 % interval contains 0)",
        ONE_PAIR: f"one {unit}: an observation, not a result",
        NO_PAIR: f"no {unit} where both runs finished: no comparison",
    }[verdict]


def _share(entry: Mapping) -> str:
    """``50 % [20, 80 %]``: the share of the gap bound closed with its interval; ``—`` without an upper bound."""
    share = entry["gap"]["share"] if entry.get("gap") else None
    if not share or share["mean"] is None:
        return "—"
    if share["low"] is None:
        return f"{100 * share['mean']:.0f} %"
    return f"{100 * share['mean']:.0f} % [{100 * share['low']:.0f}, {100 * share['high']:.0f} %]"


def segmentation_statistics_lines(comparisons: Sequence[Mapping]) -> list[str]:
    """The report section "Paired comparisons" of ``nnunet-ext benchmark`` (empty without a method)."""
    if not comparisons:
        return []
    lines = ["", "## Paired comparisons", "",
             "Paired by seed (same seed, same test cases). Δ: mean Dice of the method minus the reference per seed, "
             "in Dice points (x100); mean Δ with its 95 % Student-t interval over seeds; wins: seeds where the "
             "method is higher. Wilcoxon: two-sided signed-rank test on per-case mean Dice over test cases x seeds "
             "(cases without any defined Dice left out). Share of the gap closed: per seed (method - stock) / "
             "(stock, all labeled - stock), mean with its t-interval over seeds.", ""]
    body = []
    for c in comparisons:
        if c.get("error"):
            body.append([c["candidate"], c["reference"], "—", "—", "—", "—", "—", "—"])
            continue
        body.append([c["candidate"], c["reference"], str(c["n"]),
                     ", ".join(format_signed(d) for d in c["differences"]) or "—", format_interval(c),
                     f"{c['wins']}/{c['n']}", format_p_value(c["wilcoxon"]), _share(c)])
    lines += markdown_table(["method", "against", "seeds", "Δ per seed", "mean Δ [95 % CI]", "wins",
                             "Wilcoxon p (pairs)", "share of gap closed [95 % CI]"], body)
    lines += ["", "Verdicts:", ""]
    for c in comparisons:
        if c.get("error"):
            lines.append(f"- **{c['candidate']}** vs {c['reference']}: not compared: {c['error']}")
            continue
        line = f"- **{c['candidate']}** vs {c['reference']}: {verdict_text(c['verdict'], c['reference'])}"
        gap = c.get("gap")
        if gap and gap["meaningful"] is False:
            line += (f"; gap bound {gap['gap']['mean']:.1f} < {MIN_MEANINGFUL_GAP_POINTS:.0f} Dice points, so this "
                     "semi-supervised comparison is not meaningful")
        lines.append(line + ".")
    return lines


def equal_time_lines(plans: Sequence[Mapping]) -> list[str]:
    """The report section on ``--equal-time``: the cost ratio and budget of every "stock, same time" run."""
    if not plans:
        return []
    sources = {p.get("cost_source", "these runs") for p in plans}
    ratio_from = ("both runs of that seed" if sources == {"these runs"} else
                  "means over the seeds of the cost measurement " + ", ".join(f"`{s}`" for s in sorted(sources)) +
                  " (`--equal-time-costs`), not the timings of these runs")
    lines = ["", "## Stock with the same training time (`--equal-time`)", "",
             "Per method and seed, stock nnU-Net with the same seed and epochs, its training iterations per epoch "
             "scaled by the method's cost ratio (method's / stock's seconds per training iteration, "
             f"{ratio_from}), rounded. The poly learning-rate schedule still spans the same epochs.", ""]
    body = []
    for p in plans:
        ratio = "—" if p.get("cost_ratio") is None else f"{p['cost_ratio']:.2f}"
        budget = "—" if p.get("budget") is None else f"{p['budget']['epochs']} x {p['budget']['iterations']}"
        body.append([p["method"], str(p["seed"]), ratio, budget, f"`{p['budget_trainer']}`" if p.get(
            "budget_trainer") else "—", p.get("skipped") or ""])
    lines += markdown_table(["method", "seed", "cost ratio", "epochs x iterations", "trainer", "not run because"],
                            body)
    return lines


def classification_statistics_lines(comparisons: Sequence[Mapping], metric_names: Mapping[str, str]) -> list[str]:
    """The report section "Paired comparisons" of ``nnunet-ext benchmark-cls`` (empty without a comparison)."""
    if not comparisons:
        return []
    lines = ["## Paired comparisons", "",
             "Paired by (fold, seed): the method minus the best baseline of that metric, in points (x100); mean Δ "
             "with its 95 % Student-t interval over the (fold, seed) pairs; wins: pairs where the method is higher; "
             "Wilcoxon: two-sided signed-rank test on the same pairs. Folds share training cases, so the pairs are "
             "not independent and the interval is on the optimistic side.", ""]
    body = [[c["candidate"], metric_names[c["metric"]], c["reference"], str(c["n"]), format_interval(c),
             f"{c['wins']}/{c['n']}", format_p_value(c["wilcoxon"])] for c in comparisons]
    lines += markdown_table(["method", "metric", "against", "pairs", "mean Δ [95 % CI]", "wins",
                             "Wilcoxon p (pairs)"], body)
    lines += ["", "Verdicts:", ""]
    lines += [f"- **{c['candidate']}**, {metric_names[c['metric']]}: "
              f"{verdict_text(c['verdict'], c['reference'], 'run (fold, seed)')}." for c in comparisons]
    lines.append("")
    return lines
