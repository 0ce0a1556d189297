"""``nnunet-ext benchmark-cls``'s outputs: per-trainer summary over folds x seeds, paired statistics against the
best baseline, ``report.md``, the metrics plot and ``results.json`` (derived files, regenerated on every invocation
from the run records of :mod:`nnunet_ext.benchmark.classification`)."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from nnunet_ext.benchmark.report import format_mean_std, format_signed, markdown_table, mean_std
from nnunet_ext.benchmark.statistics_report import classification_statistics_lines

METRICS = ("auc", "balanced_accuracy", "accuracy", "f1_macro")
STATISTICS_METRICS = ("auc", "balanced_accuracy")  # paired comparisons with intervals and tests
METRIC_NAMES = {"auc": "macro AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy",
                "f1_macro": "macro F1"}


# ---------------------------------------------------------------------------------------------- aggregation
def summarise(results: Mapping) -> list[dict]:
    """One row per trainer: metrics as mean ± sample std over the finished (fold, seed) runs, out-of-fold metrics
    over seeds, test metrics over seeds, cost; and the difference to the best baseline of every metric (the
    baseline with the highest mean of that metric, the same reference for every row)."""
    runs, settings = results["runs"], results["settings"]
    rows = []
    for trainer in settings["trainers"]:
        members = [r for r in runs if r["trainer"] == trainer]
        ok = [r for r in members if r["status"] == "ok"]
        pooled = [p for p in results.get("out_of_fold", []) if p["trainer"] == trainer and p["metrics"]]
        tests = [t for t in results.get("test", []) if t["trainer"] == trainer and t["status"] == "ok"]
        rows.append({
            # planned runs (folds x seeds) when known, so unfinished runs show as missing, not as absent
            "trainer": trainer, "baseline": trainer in settings["baselines"],
            "runs": max(len(members), len(settings.get("folds", ())) * len(settings.get("seeds", ()))),
            "runs_ok": len(ok),
            "metrics": {k: mean_std([r["validation"][k] for r in ok]) for k in METRICS},
            "out_of_fold": {k: mean_std([p["metrics"][k] for p in pooled]) for k in METRICS},
            "test": {k: mean_std([t["metrics"][k] for t in tests]) for k in METRICS},
            "seconds_per_iteration": mean_std([r["training"]["seconds_per_iteration"] for r in ok]),
            "peak_rss_mb": mean_std([r["training"]["peak_rss_mb"] for r in ok]),
            "wall_seconds": mean_std([r["training"]["wall_seconds"] for r in ok]),
        })
    for row in rows:
        # every row against the same reference (the best baseline shows +0.0, the other baselines their gap to it)
        row["delta"], row["paired_auc"] = {}, None
        for metric in METRICS:
            best = best_baseline(rows, metric)
            value = row["metrics"][metric]["mean"]
            row["delta"][metric] = None if best is None or value is None else {
                "baseline": best["trainer"], "points": 100.0 * (value - best["metrics"][metric]["mean"])}
        best = best_baseline(rows, "auc")
        if best is not None and best["trainer"] != row["trainer"]:
            row["paired_auc"] = paired_differences(runs, row["trainer"], best["trainer"], "auc")
    return rows


def best_baseline(rows: Sequence[Mapping], metric: str, exclude: str | None = None) -> Mapping | None:
    """The baseline row with the highest mean of ``metric`` (other than ``exclude``), or None."""
    candidates = [r for r in rows if r["baseline"] and r["trainer"] != exclude and
                  r["metrics"][metric]["mean"] is not None]
    return max(candidates, key=lambda r: r["metrics"][metric]["mean"]) if candidates else None


def paired_differences(runs: Sequence[Mapping], trainer: str, reference: str, metric: str) -> dict | None:
    """``metric`` of ``trainer`` minus ``reference`` on the same (fold, seed), in points: mean ± std and wins."""
    values = {(r["fold"], r["seed"]): r["validation"][metric] for r in runs
              if r["trainer"] == reference and r["status"] == "ok"}
    diffs = [100.0 * (r["validation"][metric] - values[(r["fold"], r["seed"])]) for r in runs
             if r["trainer"] == trainer and r["status"] == "ok" and (r["fold"], r["seed"]) in values
             and math.isfinite(r["validation"][metric]) and math.isfinite(values[(r["fold"], r["seed"])])]
    if not diffs:
        return None
    return {"reference": reference, **mean_std(diffs), "wins": sum(d > 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs)}


def paired_statistics(results: Mapping, rows: Sequence[Mapping]) -> list[dict]:
    """Every non-baseline trainer against the best baseline of AUC and of balanced accuracy, paired over
    (fold, seed) (:func:`nnunet_ext.benchmark.statistics.classification_statistics`)."""
    from nnunet_ext.benchmark.statistics import classification_statistics

    references = {}
    for metric in STATISTICS_METRICS:
        best = best_baseline(rows, metric)
        references[metric] = None if best is None else best["trainer"]
    return classification_statistics(results["runs"], [r["trainer"] for r in rows if not r["baseline"]],
                                     references)


# ---------------------------------------------------------------------------------------------- report
def _points(delta: Mapping | None) -> str:
    return "—" if delta is None else format_signed(delta["points"])


def format_report(results: Mapping) -> str:
    """The Markdown report: settings, quality (cross-validation, out-of-fold, test), cost, failures, method."""
    s = results["settings"]
    rows = summarise(results)
    budget = s["budget"]
    lines = [f"# Classification benchmark: {s['dataset_name']}", "",
             f"- configuration `{s['configuration']}`, plans `{s['plans']}`, device {s['device']}, "
             f"`nnUNet_n_proc_DA={s['nnUNet_n_proc_DA']}`",
             f"- budget: {budget['epochs']} epochs x {budget['iterations']} iterations "
             f"(= {budget['epochs'] * budget['iterations']} iterations, batch size {s['batch_size']}) for every "
             f"trainer and fold ({s['budget_source']}); {budget['val_iterations']} segmentation validation "
             f"iteration(s) per epoch",
             f"- folds {s['folds']} of `splits_final.json`, seeds {s['seeds']}; classes {s['classes']}",
             f"- baselines: {', '.join(s['baselines'])}",
             f"- created {results['created']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in s["versions"].items()),
             f"- command: `{s['command']}`", ""]
    lines += ["## Cross-validation (validation cases of each fold)", "",
              "Mean ± sample std over the finished (fold, seed) runs; each run is evaluated on its fold's validation "
              "cases with the final checkpoint. Δ: difference of the means to the best baseline of that metric, in "
              "points (x100).", ""]
    body = []
    for row in rows:
        name = f"{row['trainer']} (baseline)" if row["baseline"] else row["trainer"]
        body.append([name, f"{row['runs_ok']}/{row['runs']}",
                     *[format_mean_std(row["metrics"][k]) for k in METRICS],
                     _points(row["delta"]["auc"]), _points(row["delta"]["balanced_accuracy"])])
    lines += markdown_table(["trainer", "runs", *[METRIC_NAMES[k] for k in METRICS], "Δ AUC", "Δ bal. acc."], body)
    lines.append("")
    paired = [(row["trainer"], row["paired_auc"]) for row in rows if row["paired_auc"] and not row["baseline"]]
    for trainer, p in paired:
        lines.append(f"- {trainer} vs {p['reference']} (best baseline by AUC), paired on the same folds and seeds: "
                     f"Δ AUC {format_mean_std(p, 1)} points, higher in {p['wins']}/{p['n']} runs")
    if paired:
        lines.append("")
    lines += classification_statistics_lines(paired_statistics(results, rows), METRIC_NAMES)
    if any(row["out_of_fold"]["auc"]["n"] for row in rows):
        lines += ["## Out-of-fold (all validation cases of a seed pooled)", "",
                  "Every benchmarked fold's validation predictions concatenated and evaluated once per seed; mean ± "
                  "std over seeds.", ""]
        lines += markdown_table(["trainer", *[METRIC_NAMES[k] for k in METRICS]],
                        [[row["trainer"], *[format_mean_std(row["out_of_fold"][k]) for k in METRICS]]
                         for row in rows])
        lines.append("")
    if s["test"]:
        lines += ["## Held-out test split", "",
                  f"`nnunet-ext predict-cls` on {results['n_test_cases']} test case(s), softmax averaged over the "
                  "finished folds; mean ± std over seeds.", ""]
        lines += markdown_table(["trainer", *[METRIC_NAMES[k] for k in METRICS]],
                        [[row["trainer"], *[format_mean_std(row["test"][k]) for k in METRICS]] for row in rows])
        lines.append("")
    lines += ["## Cost", "",
              "Seconds per training iteration from nnU-Net's epoch timestamps (mean epoch duration / iterations, "
              "first epoch left out; an epoch includes the per-epoch classification validation of all validation "
              "cases); peak resident memory of the training process tree. Runs on a shared machine are only "
              "comparable under the same load.", ""]
    lines += markdown_table(["trainer", "s/iteration", "peak memory (MB)", "training wall time (s)"],
                    [[row["trainer"], format_mean_std(row["seconds_per_iteration"]),
                      format_mean_std(row["peak_rss_mb"], 0), format_mean_std(row["wall_seconds"], 0)]
                     for row in rows])
    lines.append("")
    failed = [r for r in results["runs"] if r["status"] != "ok"] + \
        [t for t in results.get("test", []) if t["status"] != "ok"]
    if failed:
        lines += ["## Failed runs", ""]
        for r in failed:
            where = f"fold {r['fold']}" if "fold" in r else "test"
            lines += [f"### {r['trainer']} seed {r['seed']} {where}: {r['failed_step']}", "", f"{r['error']}", "",
                      f"log: `{r['log_file']}`", "", "```", str(r.get("log_tail") or "").strip(), "```", ""]
    if results.get("plots"):
        lines += ["## Plots", "", *[f"- {k}: `{v}`" for k, v in results["plots"].items()], ""]
    lines += ["## How the numbers are measured", "",
              "- AUC: binary ROC-AUC on P(class 1), macro one-vs-rest ROC-AUC for more classes "
              "(`nnunet_ext.cfcml.metrics.classification_metrics`); balanced accuracy: mean per-class recall; "
              "macro F1 over all classes.",
              "- Each fold's `validation_cls.csv` (written by the trainer with the final weights, one centred patch "
              "per case) is re-evaluated against the labels of `tabular.csv`; the checkpoint selected on validation "
              "AUC (`checkpoint_best_cls.pth`) is not used, so no number is selected on the cases it is reported on.",
              "- Equal budget: every generated trainer sets the same epochs, iterations per epoch and seed; the batch "
              "size (class-balanced) and learning-rate schedule come from the same plans.", ""]
    return "\n".join(lines)


def plot_metrics(rows: Sequence[Mapping], path: Path) -> Path:
    """Bars of mean macro AUC and balanced accuracy per trainer; error bars = std over folds x seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(rows) + 2), 3.6))
    width = 0.38
    for i, metric in enumerate(("auc", "balanced_accuracy")):
        means = [math.nan if r["metrics"][metric]["mean"] is None else r["metrics"][metric]["mean"] for r in rows]
        stds = [0.0 if r["metrics"][metric]["std"] is None else r["metrics"][metric]["std"] for r in rows]
        ax.bar([x + (i - 0.5) * width for x in range(len(rows))], means, width, yerr=stds, capsize=3,
               label=METRIC_NAMES[metric])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["trainer"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("cross-validation (mean ± std over folds x seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: dict, output: Path) -> None:
    """``results.json``, ``plots/classification_metrics.png`` and ``report.md`` (regenerated every time)."""
    rows = summarise(results)
    plots = {}
    if any(r["runs_ok"] for r in rows):
        plots["AUC and balanced accuracy"] = str(plot_metrics(rows, output / "plots" / "classification_metrics.png")
                                                 .relative_to(output))
    results["plots"] = plots
    results["summary"] = rows
    results["statistics"] = paired_statistics(results, rows)
    (output / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (output / "report.md").write_text(format_report(results))
