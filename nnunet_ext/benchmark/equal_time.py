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
    from nnunet_ext.benchmark.runner import BenchmarkSettings, DatasetInfo, Progress, Run

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


def _seconds_per_iteration(record: Mapping | None) -> float | None:
    value = ((record or {}).get("training") or {}).get("seconds_per_iteration")
    return float(value) if value is not None and math.isfinite(value) and value > 0 else None


def plan_equal_time_runs(records: Sequence[Mapping], budget: Budget) -> list[dict]:
    """Per (method, seed) run: its cost ratio to stock of the same seed and the equal-time budget.

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
                   cross_validation: CrossValidation | None = None) -> tuple[list[dict], list[dict]]:
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

    Returns:
        ``(records of the equal-time runs, plans from :func:`plan_equal_time_runs`)``.
    """
    from nnunet_ext.benchmark.provenance import attach_segmentation_inputs
    from nnunet_ext.benchmark.runner import BenchmarkError, Run, _prepare_output, execute_run

    plans = plan_equal_time_runs(records, settings.budget)
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
