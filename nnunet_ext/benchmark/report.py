"""Aggregation over seeds and the Markdown report of ``nnunet-ext benchmark``.

Every number in the report comes from ``results.json`` (one record per run, see :mod:`nnunet_ext.benchmark.runner`);
nothing here trains or predicts.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from nnunet_ext.benchmark.statistics import MIN_MEANINGFUL_GAP_POINTS

ROLE_ORDER = {"baseline": 0, "method": 1, "equal_time": 2, "upper_bound": 3}
UPPER_BOUND_LABEL = "stock, all labeled"


def seconds_per_iteration(logging: Mapping[str, Sequence[float]], iterations: int,
                          skip_warmup: bool = True) -> dict[str, float | int | bool | None]:
    """Seconds per training iteration from nnU-Net's logged epoch start/end timestamps.

    An epoch's duration (``epoch_end_timestamps - epoch_start_timestamps``) covers its training iterations, its
    validation iterations and the end-of-epoch bookkeeping (logging, checkpoint, progress plot), identically for
    every trainer of a benchmark. The first epoch also pays one-off costs (data loader start, memory allocation,
    cuDNN autotuning), so it is left out when there is more than one epoch.

    Args:
        logging: ``checkpoint["logging"]`` of nnU-Net.
        iterations: training iterations per epoch.
        skip_warmup: leave out the first epoch if at least two were logged.

    Returns:
        ``{"value": mean epoch duration / iterations (None without complete epochs), "epochs_timed": n,
        "warmup_excluded": bool}``.

    Raises:
        ValueError: ``iterations < 1``.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    starts, ends = logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", [])
    durations = [float(e) - float(s) for s, e in zip(starts, ends)]
    excluded = skip_warmup and len(durations) > 1
    if excluded:
        durations = durations[1:]
    value = statistics.fmean(durations) / iterations if durations else None
    return {"value": value, "epochs_timed": len(durations), "warmup_excluded": excluded}


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (n - 1) over seeds; None values (failed runs) are left out.

    An infinite value makes the mean infinite and the std undefined (None); a single value has no std.
    """
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        return {"mean": None, "std": None, "n": 0}
    if any(math.isinf(v) for v in kept):
        return {"mean": math.inf, "std": None, "n": len(kept)}
    return {"mean": statistics.fmean(kept), "std": statistics.stdev(kept) if len(kept) > 1 else None,
            "n": len(kept)}


def format_number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def format_mean_std(stats: Mapping[str, float | int | None], digits: int = 3) -> str:
    """``0.812 ± 0.010``; a single seed shows the value alone, no successful run shows ``—``."""
    if stats["mean"] is None:
        return "—"
    text = format_number(stats["mean"], digits)
    if stats["std"] is not None:
        text += f" ± {format_number(stats['std'], digits)}"
    return text


def format_ratio(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None or not math.isfinite(value) or not math.isfinite(baseline) or baseline <= 0:
        return "—"
    return f"{value / baseline:.2f}"


def format_signed(value: float, digits: int = 1) -> str:
    """``+1.2`` / ``-0.4``; a value that rounds to zero shows ``0.0`` (never ``-0.0`` or ``+0.0``)."""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


def format_delta(value: float | None, baseline: float | None, digits: int = 3) -> str:
    if value is None or baseline is None or not math.isfinite(value) or not math.isfinite(baseline):
        return "—"
    return format_signed(value - baseline, digits)


def _group_key(run: Mapping) -> tuple:
    return ROLE_ORDER[run["role"]], run["label"], run["dataset"]


def summarise(runs: Sequence[Mapping], label_keys: Sequence[str]) -> list[dict]:
    """One row per (role, trainer, dataset): mean ± std over the seeds whose run finished.

    Per run, a class's Dice is the NaN-ignoring mean over test cases (nnU-Net's summary) and its HD95 the mean
    over test cases with a finite value; the report counts the infinite cases.
    """
    groups: dict[tuple, list[Mapping]] = {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2])):
        members = groups[key]
        ok = [r for r in members if r["status"] == "ok"]
        evaluations = [r["evaluation"] for r in ok]
        row = {
            "role": members[0]["role"], "label": members[0]["label"], "trainer": members[0]["trainer"],
            "dataset": members[0]["dataset"], "seeds": [r["seed"] for r in members],
            "seeds_ok": [r["seed"] for r in ok],
            "dice": {k: mean_std([e["mean"][k]["Dice"] for e in evaluations]) for k in label_keys},
            "mean_dice": mean_std([e["foreground_mean"]["Dice"] for e in evaluations]),
            "hd95": {k: mean_std([e["mean"][k]["HD95"]["mean"] for e in evaluations]) for k in label_keys},
            "hd95_infinite_cases": sum(e["mean"][k]["HD95"]["n_inf"] for e in evaluations for k in label_keys),
            "mean_hd95": mean_std([e["foreground_mean"]["HD95"] for e in evaluations]),
            "seconds_per_iteration": mean_std([r["training"]["seconds_per_iteration"] for r in ok]),
            "peak_rss_mb": mean_std([r["training"]["peak_rss_mb"] for r in ok]),
            "cuda_peak_mb": mean_std([r["training"].get("cuda_max_memory_allocated_mb") for r in ok]),
            "inference_seconds_per_case": mean_std([r["inference"]["seconds_per_case"] for r in ok]),
            "network_seconds_per_case": mean_std([r["inference"].get("network_seconds_per_case") for r in ok]),
            "missing_mode": next((r["missing"]["mode"] for r in ok if r.get("missing")), None),
            "missing_mean_dice": mean_std([r["missing"]["evaluation"]["foreground_mean"]["Dice"]
                                           for r in ok if r.get("missing") and r["missing"].get("evaluation")]),
            "missing_dice": {k: mean_std([r["missing"]["evaluation"]["mean"][k]["Dice"]
                                          for r in ok if r.get("missing") and r["missing"].get("evaluation")])
                             for k in label_keys},
        }
        rows.append(row)
    return rows


def gap_bound(rows: Sequence[Mapping]) -> dict | None:
    """All-labeled minus labeled-only stock mean Dice, in Dice points (x100); None without an upper-bound run."""
    base = next((r for r in rows if r["role"] == "baseline"), None)
    upper = next((r for r in rows if r["role"] == "upper_bound"), None)
    if base is None or upper is None:
        return None
    b, u = base["mean_dice"]["mean"], upper["mean_dice"]["mean"]
    if b is None or u is None or not math.isfinite(b) or not math.isfinite(u):
        return {"points": None, "meaningful": None, "labeled_only": b, "all_labeled": u}
    points = 100.0 * (u - b)
    # rounded so that a gap of exactly 3 points is not lost to floating point (0.63 - 0.60 = 0.0299999...)
    return {"points": points, "meaningful": round(points, 6) >= MIN_MEANINGFUL_GAP_POINTS, "labeled_only": b,
            "all_labeled": u}


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table as lines: header, separator, one row per body entry."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(cells) + " |" for cells in body]]


def _run_name(row: Mapping, several_datasets: bool) -> str:
    name = f"{row['label']} (stock)" if row["role"] == "baseline" else row["label"]
    return f"{name} [{row['dataset']}]" if several_datasets and row["role"] == "upper_bound" else name


def format_report(results: Mapping) -> str:
    """The Markdown report: settings, quality table, cost table, gap bound, paired statistics, failed runs, how
    things are measured."""
    from nnunet_ext.benchmark.cross_validation import cross_validation_lines
    from nnunet_ext.benchmark.statistics import segmentation_statistics
    from nnunet_ext.benchmark.statistics_report import equal_time_lines, segmentation_statistics_lines

    settings, labels = results["settings"], results["labels"]
    label_keys = list(labels)
    rows = summarise(results["runs"], label_keys)
    several = len({r["dataset"] for r in rows}) > 1
    base = next((r for r in rows if r["role"] == "baseline"), None)
    budget = settings["budget"]
    n_cases = results.get("n_test_cases")
    cv = results.get("cross_validation")
    evaluated_on = (
        f"{cv['folds']}-fold cross-validation over {n_cases} training cases (each predicted once per seed by the "
        f"fold that held it out; folds pooled per case, see 'Cross-validation')" if cv else
        f"{n_cases} held-out test cases (`{settings['test_labels']}`)")
    lines = [
        f"# Benchmark: {settings['dataset_name']}",
        "",
        f"- configuration `{settings['configuration']}`, plans `{settings['plans']}`, "
        + (f"folds 0-{cv['folds'] - 1}" if cv else f"fold `{settings['fold']}`") + f", device `{settings['device']}`",
        f"- budget: {budget['epochs']} epochs x {budget['iterations']} training iterations "
        f"({budget['val_iterations']} validation iterations per epoch); seeds {settings['seeds']}",
        f"- evaluation: {evaluated_on}, `checkpoint_final.pth`, "
        f"test-time augmentation {'on' if settings['tta'] else 'off'}; Dice from nnU-Net's evaluation, "
        "HD95 in mm from MedPy",
        f"- versions: {settings.get('versions', {})}",
        "",
        "## Segmentation " + ("in cross-validation, folds pooled" if cv else "on the test split")
        + " (mean ± std over seeds)",
        "",
    ]
    header = ["run", "seeds ok", *[f"Dice {labels[k]}" for k in label_keys], "mean Dice", "Δ mean Dice vs stock",
              *[f"HD95 {labels[k]} (mm)" for k in label_keys], "cases with HD95 = inf"]
    body = []
    for row in rows:
        delta = "—" if row["role"] == "baseline" or base is None else \
            format_delta(row["mean_dice"]["mean"], base["mean_dice"]["mean"])
        body.append([_run_name(row, several), f"{len(row['seeds_ok'])}/{len(row['seeds'])}",
                     *[format_mean_std(row["dice"][k]) for k in label_keys], format_mean_std(row["mean_dice"]),
                     delta, *[format_mean_std(row["hd95"][k], 2) for k in label_keys],
                     str(row["hd95_infinite_cases"])])
    lines += markdown_table(header, body)
    lines += ["", "## Cost (mean ± std over seeds; × = ratio to stock)", ""]
    cuda = any(r["cuda_peak_mb"]["mean"] is not None for r in rows)
    header = ["run", "s / training iteration", "× stock", "peak memory (MB)", "× stock",
              *(["CUDA peak allocated (MB)"] if cuda else []), "inference s / case", "× stock",
              "network s / case", "× stock"]
    body = []
    for row in rows:
        b = base if base is not None else row
        body.append([_run_name(row, several), format_mean_std(row["seconds_per_iteration"]),
                     format_ratio(row["seconds_per_iteration"]["mean"], b["seconds_per_iteration"]["mean"]),
                     format_mean_std(row["peak_rss_mb"], 0),
                     format_ratio(row["peak_rss_mb"]["mean"], b["peak_rss_mb"]["mean"]),
                     *([format_mean_std(row["cuda_peak_mb"], 0)] if cuda else []),
                     format_mean_std(row["inference_seconds_per_case"], 2),
                     format_ratio(row["inference_seconds_per_case"]["mean"],
                                  b["inference_seconds_per_case"]["mean"]),
                     format_mean_std(row["network_seconds_per_case"], 3),
                     format_ratio(row["network_seconds_per_case"]["mean"], b["network_seconds_per_case"]["mean"])])
    lines += markdown_table(header, body)

    missing = settings.get("missing_channels") or []
    if missing:
        lines += ["", f"## Without {', '.join(missing)} at inference (mean ± std over seeds)", "",
                  f"The test cases predicted again without {', '.join(missing)}: models that handle a missing "
                  "modality by design switch its messages off (`messages-off`, CIML); every other model gets the "
                  "channel as an all-zero image (`zero-fill`, what a stock nnU-Net user can do). Drop = mean Dice "
                  "with all channels minus mean Dice without, in Dice points (x100).", ""]
        header = ["run", "mode", *[f"Dice {labels[k]} without" for k in label_keys], "mean Dice, all channels",
                  "mean Dice without", "drop (points)"]
        body = []
        for row in rows:
            if row["missing_mode"] is None:
                continue
            full, without = row["mean_dice"]["mean"], row["missing_mean_dice"]["mean"]
            drop = "—" if full is None or without is None else format_signed(100.0 * (full - without))
            body.append([_run_name(row, several), f"`{row['missing_mode']}`",
                         *[format_mean_std(row["missing_dice"][k]) for k in label_keys],
                         format_mean_std(row["mean_dice"]), format_mean_std(row["missing_mean_dice"]), drop])
        lines += markdown_table(header, body)

    gap = gap_bound(rows)
    if settings.get("upper_bound_dataset") is not None:
        lines += ["", "## Gap bound for semi-supervised comparisons", ""]
        if gap is None or gap["points"] is None:
            lines.append("The gap bound is undefined: the labeled-only or the all-labeled stock run did not finish.")
        else:
            verdict = ("at least" if gap["meaningful"] else "below")
            lines.append(
                f"Stock nnU-Net with all training cases labeled (`{settings['upper_bound_dataset_name']}`) reaches "
                f"mean Dice {gap['all_labeled']:.3f}; with the labeled cases only {gap['labeled_only']:.3f}. "
                f"Gap bound: **{gap['points']:.1f} Dice points**, {verdict} {MIN_MEANINGFUL_GAP_POINTS:.0f}.")
        differences = results.get("upper_bound_plans_differences")
        if differences:
            lines.append(f"Note: the two datasets were planned separately and their `{settings['configuration']}` "
                         f"plans differ in {', '.join(sorted(differences))} (see results.json), so the gap also "
                         f"reflects those differences.")
        lines.append(f"A semi-supervised comparison is meaningful only when this gap is >= "
                     f"{MIN_MEANINGFUL_GAP_POINTS:.0f} Dice points; "
                     + ("here it is." if gap and gap["meaningful"] else
                        "here it is NOT, so differences between semi-supervised trainers and stock nnU-Net on this "
                        "dataset and budget say nothing about the methods."))
    lines += cross_validation_lines(results)
    lines += segmentation_statistics_lines(segmentation_statistics(results["runs"]))
    lines += equal_time_lines(results.get("equal_time") or [])

    failed = [r for r in results["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for run in failed:
            lines += [f"### {run['label']} [{run['dataset']}], seed {run['seed']}: {run['failed_step']} failed", "",
                      f"{run.get('error') or ''}  Log: `{run.get('log_file')}`", ""]
            if run.get("log_tail"):
                lines += ["```", run["log_tail"].rstrip(), "```", ""]
    if results.get("excluded_trainers"):
        lines += ["", "## Not benchmarked here", ""]
        lines += [f"- `{e['trainer']}`: {e['reason']}" for e in results["excluded_trainers"]]
    if results.get("plots"):
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({path})" for name, path in results["plots"].items()]
    lines += [
        "", "## How the numbers are measured", "",
        "- Dice: nnU-Net's per-case Dice, averaged over test cases per class ignoring cases where both reference "
        "and prediction are empty (NaN), then over classes for the mean Dice; per run, then mean ± std over seeds "
        "(sample std, n - 1)."
        + (" In cross-validation a run is one (trainer, seed) over all folds: its test cases are all training "
           "cases, each from the fold that held it out; cost values are means over the folds." if cv else ""),
        "- HD95: MedPy `hd95` with the image spacing (mm). Both masks empty: NaN (left out); exactly one empty: inf, "
        "counted in the column 'cases with HD95 = inf' and left out of the mean.",
        "- s / training iteration: nnU-Net's logged epoch durations (training iterations, validation iterations "
        "and end-of-epoch bookkeeping) divided by the training iterations per epoch, first epoch left out as "
        "warm-up when there are two or more.",
        "- peak memory: peak resident memory of the training process and its data-augmentation workers "
        "(`nnunet_ext.benchmark.measure`); on CUDA also `torch.cuda.max_memory_allocated`.",
        "- inference s / case: time in nnU-Net's `predict_from_files` for all test images divided by their "
        "number (preprocessing, sliding window, export and worker start-up; no interpreter start or model "
        "loading). network s / case: the sliding-window network prediction alone "
        "(`predict_logits_from_preprocessed_data`), the part a trainer can change.",
        "- A short budget shows relative cost and whether a pipeline works; quality numbers need nnU-Net's full "
        "budget (1000 epochs x 250 iterations).",
    ]
    return "\n".join(lines) + "\n"
