"""``nnunet-ext benchmark --equal-time``: stock nnU-Net trained for as long as each method trained.

It answers: with the hours a method needs, would stock nnU-Net trained longer be as good? After the runs of the
benchmark have been measured, for every method and seed whose runs finished:

- cost ratio = the method's seconds per training iteration / stock's, both from the runs of that seed (each from
  its checkpoint's logged epoch times, see :func:`nnunet_ext.benchmark.report.seconds_per_iteration`; a reused run
  keeps the timing of the invocation that trained it);
- stock ``nnUNetTrainer`` with the same seed is trained for the same epochs and ``round(I x ratio)`` (at least 1)
  training iterations per epoch, i.e. ``epochs x iterations x ratio`` iterations in all, rounded per epoch.
  Keeping the epochs keeps nnU-Net's poly learning-rate schedule (it decays once per epoch over ``num_epochs``)
  and the number of validation and checkpoint steps as in the other runs; only the steps within an epoch grow;
- the run goes through the same generated budget trainers, named ``nnUNetTrainer_e{E}i{I'}s{S}``: the budget is in
  the name (hence in the run folders), so a changed ratio makes a new run and a matching earlier run is reused like
  any other. When ``I'`` equals the benchmark's iterations, stock's own run of that seed is the equal-time run.

The runs appear as ``stock, same time (<Method>)`` (role ``equal_time``) and are compared with their method by
:func:`nnunet_ext.benchmark.statistics.segmentation_statistics`.

With ``--equal-time-costs RESULTS_JSON`` the cost ratios come instead from another benchmark's ``results.json``: a
cost measurement made on an otherwise idle machine (stock and the methods in one invocation, same dataset,
configuration, plans, device and budget), one ratio per method (mean seconds per iteration over its seeds / stock's)
for every seed. That keeps long quality runs usable when the machine was shared while they trained, which makes
their own timings useless for the ratio; the report names the file.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nnunet_ext.benchmark.budget import STOCK_TRAINER, Budget, budget_trainer_name, write_benchmark_trainers

if TYPE_CHECKING:  # the runner imports this module while it runs
    from nnunet_ext.benchmark.cross_validation import CrossValidation
    from nnunet_ext.benchmark.datasets import DatasetInfo
    from nnunet_ext.benchmark.runner import BenchmarkSettings, Progress, Run

EQUAL_TIME_ROLE = "equal_time"


def equal_time_label(method: str) -> str:
    """Row name of the equal-time stock run of ``method``."""
    return f"stock, same time ({method})"


def equal_time_budget(budget: Budget, cost_ratio: float) -> Budget:
    """``budget`` with the training iterations per epoch scaled by ``cost_ratio`` (rounded, at least 1).

    Raises:
        ValueError: a ratio that is not a positive finite number.
    """
    if not (isinstance(cost_ratio, (int, float)) and math.isfinite(cost_ratio) and cost_ratio > 0):
        raise ValueError(f"cost ratio must be a positive number, got {cost_ratio!r}")
    return Budget(budget.epochs, max(1, round(budget.iterations * cost_ratio)), budget.val_iterations)


def cost_ratios_from_results(path: Path, dataset_name: str, configuration: str, plans: str, device: str,
                             budget: Budget, methods: Sequence[str]) -> dict[str, dict]:
    """Per method, the cost ratio to stock measured by another benchmark invocation (``--equal-time-costs``).

    Args:
        path: that invocation's ``results.json``.
        dataset_name, configuration, plans, device, budget: must equal the cost run's (a multi-stage trainer's cost
            per iteration depends on how the epochs split into stages, so the budget must match too).
        methods: the method labels that need a ratio.

    Returns:
        ``{method: {"cost_ratio", "method_seconds_per_iteration", "stock_seconds_per_iteration", "seeds"}}``, the
        seconds per iteration being means over the cost run's finished seeds.

    Raises:
        BenchmarkError: unreadable file, other settings, or a method (or stock) without a finished timed run.
    """
    from nnunet_ext.benchmark.datasets import BenchmarkError
    from nnunet_ext.errors import InputError
    from nnunet_ext.inputs import load_json_file

    try:
        results = load_json_file(path, "cost results (--equal-time-costs)")
    except InputError as error:
        raise BenchmarkError(str(error)) from None
    wanted = {"dataset_name": dataset_name, "configuration": configuration, "plans": plans, "device": device,
              "budget": {"epochs": budget.epochs, "iterations": budget.iterations}}
    found = dict((results.get("settings") or {}))
    found["budget"] = {k: (found.get("budget") or {}).get(k) for k in ("epochs", "iterations")}
    different = [f"{key} {found.get(key)!r} (this benchmark: {value!r})" for key, value in wanted.items()
                 if found.get(key) != value]
    if different:
        raise BenchmarkError(f"--equal-time-costs {path} was measured with other settings: {'; '.join(different)}. "
                             f"Measure the cost with the same dataset, configuration, plans, device, epochs and "
                             f"iterations")

    def mean_timing(role: str, label: str | None = None) -> tuple[float | None, list[int]]:
        timed = [(r["seed"], _seconds_per_iteration(r)) for r in results.get("runs", [])
                 if r.get("role") == role and (label is None or r.get("label") == label) and r.get("status") == "ok"]
        timed = [(seed, value) for seed, value in timed if value is not None]
        return (sum(v for _, v in timed) / len(timed) if timed else None), sorted(seed for seed, _ in timed)

    stock_spi, _ = mean_timing("baseline")
    if stock_spi is None:
        raise BenchmarkError(f"--equal-time-costs {path} has no finished, timed stock nnUNetTrainer run")
    ratios = {}
    for method in methods:
        method_spi, seeds = mean_timing("method", method)
        if method_spi is None:
            raise BenchmarkError(f"--equal-time-costs {path} has no finished, timed run of {method}; add it to that "
                                 f"cost benchmark (same invocation as its stock run)")
        ratios[method] = {"cost_ratio": method_spi / stock_spi, "method_seconds_per_iteration": method_spi,
                          "stock_seconds_per_iteration": stock_spi, "seeds": seeds}
    return ratios


def _seconds_per_iteration(record: Mapping | None) -> float | None:
    value = ((record or {}).get("training") or {}).get("seconds_per_iteration")
    return float(value) if value is not None and math.isfinite(value) and value > 0 else None


def plan_equal_time_runs(records: Sequence[Mapping], budget: Budget,
                         measured_ratios: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Per (method, seed) run: its cost ratio to stock of the same seed and the equal-time budget.

    ``measured_ratios`` (from :func:`cost_ratios_from_results`) replaces the ratio of the runs' own timings.

    Returns:
        ``[{"method", "seed", "method_seconds_per_iteration", "stock_seconds_per_iteration", "cost_ratio",
        "budget": {"epochs", "iterations", "val_iterations"}, "budget_trainer", "skipped": reason or None}]``; a
        method or stock run that did not finish (or has no timing) gives an entry with ``skipped`` and no budget.
    """
    stock = {r["seed"]: r for r in records if r["role"] == "baseline"}
    plans = []
    for record in records:
        if record["role"] != "method":
            continue
        seed = record["seed"]
        method_spi, stock_spi = _seconds_per_iteration(record), _seconds_per_iteration(stock.get(seed))
        if measured_ratios is not None:
            measured = measured_ratios[record["label"]]
            method_spi, stock_spi = measured["method_seconds_per_iteration"], measured["stock_seconds_per_iteration"]
        plan = {"method": record["label"], "seed": seed, "method_seconds_per_iteration": method_spi,
                "stock_seconds_per_iteration": stock_spi, "cost_ratio": None, "budget": None,
                "budget_trainer": None, "skipped": None}
        if record["status"] != "ok":
            plan["skipped"] = f"the {record['label']} run of seed {seed} did not finish"
        elif stock.get(seed, {}).get("status") != "ok":
            plan["skipped"] = f"the stock run of seed {seed} did not finish"
        elif method_spi is None or stock_spi is None:
            plan["skipped"] = "no seconds per iteration measured (a single epoch with no duration?)"
        else:
            plan["cost_ratio"] = method_spi / stock_spi
            scaled = equal_time_budget(budget, plan["cost_ratio"])
            plan["budget"] = {"epochs": scaled.epochs, "iterations": scaled.iterations,
                              "val_iterations": scaled.val_iterations}
            plan["budget_trainer"] = budget_trainer_name(STOCK_TRAINER, scaled.epochs, scaled.iterations, seed)
        plans.append(plan)
    return plans


def _failed_record(run: Run, settings: BenchmarkSettings, error: str) -> dict:
    return {"key": run.key(settings), "role": run.role, "label": run.label, "trainer": run.trainer,
            "budget_trainer": run.budget_trainer, "dataset": run.dataset.name, "seed": run.seed, "status": "failed",
            "failed_step": "reuse check", "error": error, "log_file": None, "log_tail": None, "reused_steps": [],
            "training": None, "inference": None, "evaluation": None}


def run_equal_time(settings: BenchmarkSettings, trainers: Sequence[str], records: Sequence[Mapping],
                   dataset: DatasetInfo, plans_file: Path, env: dict, train_env: dict, progress: Progress,
                   cross_validation: CrossValidation | None = None,
                   measured_ratios: Mapping[str, Mapping] | None = None) -> tuple[list[dict], list[dict]]:
    """Train, predict and evaluate the equal-time stock runs of a finished benchmark.

    Args:
        settings: the :class:`~nnunet_ext.benchmark.runner.BenchmarkSettings`.
        trainers: the benchmarked trainers (the generated budget module is rewritten with them plus the
            equal-time classes).
        records: the run records of this invocation (methods and stock of every seed).
        dataset, plans_file, env, train_env, progress: as for
            :func:`~nnunet_ext.benchmark.runner.execute_run`.
        cross_validation: with ``--cv-folds``: each equal-time run trains every fold and its records are pooled
            like the other runs' (the cost ratio then comes from the pooled records: mean over folds).
        measured_ratios: with ``--equal-time-costs``: :func:`cost_ratios_from_results` of that file (read and
            checked once, before any run started).

    Returns:
        ``(records of the equal-time runs, plans from :func:`plan_equal_time_runs`)``.
    """
    from nnunet_ext.benchmark.provenance import attach_segmentation_inputs
    from nnunet_ext.benchmark.runner import BenchmarkError, Run, _prepare_output, execute_run

    plans = plan_equal_time_runs(records, settings.budget, measured_ratios)
    for plan in plans:
        plan["cost_source"] = str(settings.equal_time_costs) if measured_ratios is not None else "these runs"
    for plan in plans:
        if plan["skipped"]:
            progress(f"equal time: {plan['method']} seed {plan['seed']}: not run, {plan['skipped']}")
    planned = [p for p in plans if p["skipped"] is None]
    if not planned:
        return [], plans
    further = [(STOCK_TRAINER, Budget(**p["budget"]), p["seed"]) for p in planned]
    write_benchmark_trainers(settings.output / "budget_trainers", trainers, settings.budget, settings.seeds,
                             skip_final_validation=not settings.final_validation,
                             extra_trainer_dirs=settings.extra_trainer_dirs, further_budgets=further)
    done = {r["budget_trainer"]: r for r in records if r["role"] == "baseline"}
    results = []
    for plan in planned:
        label, info = equal_time_label(plan["method"]), {k: plan[k] for k in ("method", "cost_ratio", "budget")}
        progress(f"equal time: {plan['method']} seed {plan['seed']}: cost ratio {plan['cost_ratio']:.2f} -> stock "
                 f"for {plan['budget']['epochs']} x {plan['budget']['iterations']} iterations "
                 f"({plan['budget_trainer']})")
        if plan["budget_trainer"] in done:  # the ratio rounds to the benchmark's budget: stock's own run
            record = copy.deepcopy(done[plan["budget_trainer"]])
            record.update(role=EQUAL_TIME_ROLE, label=label, equal_time_is_stock_run=True)  # plotted once
        else:
            run = Run(EQUAL_TIME_ROLE, label, STOCK_TRAINER, plan["budget_trainer"], dataset, plan["seed"],
                      iterations=plan["budget"]["iterations"])
            runs = [run] if cross_validation is None else cross_validation.fold_runs(run)
            _prepare_output(settings, runs, progress)  # --overwrite: redo it too
            # recorded and checked like every other run: a reused equal-time model must come from the same inputs
            attach_segmentation_inputs(runs, settings, {dataset.name: plans_file})
            try:
                fold_records = [execute_run(r, settings, plans_file, env, train_env, progress) for r in runs]
                if cross_validation is None:
                    record = fold_records[0]
                else:
                    from nnunet_ext.benchmark.cross_validation import pool_fold_records

                    record = pool_fold_records(fold_records)[0]
            except BenchmarkError as e:  # a folder made with other settings: reported, the benchmark goes on
                record = _failed_record(run, settings, str(e))
            done[plan["budget_trainer"]] = record
        record["equal_time"] = info
        results.append(record)
    return results, plans
