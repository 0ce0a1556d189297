"""The ``nnunet-ext benchmark`` sub-command (registered through ``nnunet_ext.cli.COMMAND_MODULES``)."""
from __future__ import annotations

import argparse


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from nnunet_ext.benchmark.budget import Budget
    from nnunet_ext.benchmark.runner import BenchmarkSettings, run_benchmark

    settings = BenchmarkSettings(
        dataset=args.d, output=args.output, trainers=tuple(args.trainers), configuration=args.c, plans=args.p,
        budget=Budget(args.epochs, args.iterations, args.val_iterations), seeds=tuple(args.seeds),
        fold=args.f, device=args.device, upper_bound_dataset=args.upper_bound_dataset,
        extra_trainer_dirs=tuple(args.trainer_dirs), planner=args.planner,
        final_validation=args.final_validation, tta=args.tta, da_workers=args.da_workers,
        predict_processes=args.predict_processes, overwrite=args.overwrite,
        heartbeat_seconds=args.heartbeat, missing_channels=tuple(args.missing_channels),
        equal_time=args.equal_time, equal_time_costs=args.equal_time_costs, cv_folds=args.cv_folds,
    )
    results = run_benchmark(settings)  # bad input raises BenchmarkError before any run starts
    print()
    print((settings.output / "report.md").read_text())
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark", help="train stock nnU-Net and other trainers with one budget and seeds, evaluate the test split",
        description="Train stock nnUNetTrainer (always, the baseline) and the given trainers with the same budget, "
                    "plans and seeds (nnUNetv2_train in child processes), predict the dataset's imagesTs with "
                    "nnUNetv2_predict, evaluate against labelsTs (Dice per class, HD95 in mm), measure seconds per "
                    "iteration, peak memory and inference time, and write results.json, report.md and plots into "
                    "--output. Re-running completes a benchmark; finished runs are skipped. Exit code 1 if a run "
                    "failed (it is in the report with its log tail), 2 for bad inputs.")
    p.add_argument("-d", required=True, help="dataset ID or name (in nnUNet_raw, with imagesTs/labelsTs unless "
                                             "--cv-folds)")
    p.add_argument("-c", default="3d_fullres", help="configuration (default: 3d_fullres)")
    p.add_argument("-p", default="nnUNetCPUPlans", help="plans identifier (default: nnUNetCPUPlans)")
    p.add_argument("-f", default="all", help="fold: 'all' (default; all labeled cases train, the test split "
                                             "evaluates) or a number (needs splits_final.json or >= 5 cases); "
                                             "for every fold with pooled results use --cv-folds")
    p.add_argument("--trainers", nargs="*", default=[], help="trainers besides stock nnUNetTrainer (classification "
                                                             "trainers are skipped with a note)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default: 10)")
    p.add_argument("--iterations", type=int, default=50, help="training iterations per epoch (default: 50)")
    p.add_argument("--val-iterations", type=int, default=5, help="validation iterations per epoch (default: 5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; one run per trainer and seed "
                                                                     "(default: 0)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--output", default="benchmark_output", help="output folder (default: ./benchmark_output)")
    p.add_argument("--upper-bound-dataset", default=None,
                   help="dataset with the same test cases and all training cases labeled: stock nnUNetTrainer is "
                        "also trained there ('stock, all labeled') and the report states the gap bound")
    p.add_argument("--trainer-dirs", nargs="*", default=[], help="further folders with trainer files (added to "
                                                                 "nnUNet_extTrainer)")
    p.add_argument("--planner", default=None, help="plan datasets whose plans are missing with this planner (e.g. "
                                                   "CPUPlanner); default: stop with the command to run")
    p.add_argument("--final-validation", action="store_true",
                   help="keep nnU-Net's final validation after training (skipped by default: the benchmark evaluates "
                        "the test split, and with fold 'all' it would predict every training case)")
    p.add_argument("--tta", action="store_true", help="test-time mirroring when predicting (off by default: about 8x "
                                                      "slower in 3D on a CPU)")
    p.add_argument("--da-workers", type=int, default=None,
                   help="nnUNet_n_proc_DA for training (default: 0 on cpu, which makes seeded runs reproducible; "
                        "nnU-Net's default on cuda)")
    p.add_argument("--predict-processes", type=int, default=1, help="-npp/-nps of nnUNetv2_predict (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="delete and redo the requested runs (never without it)")
    p.add_argument("--heartbeat", type=float, default=60.0, help="seconds between progress lines while a step runs")
    p.add_argument("--missing-channels", nargs="+", default=[], metavar="CHANNEL",
                   help="also predict and evaluate the test split without these channels (dataset.json "
                        "channel names): CIML models switch their messages off, every other model gets all-zero "
                        "images (nnunet-ext predict --missing-mode); the report adds a table with the drop")
    p.add_argument("--equal-time", action="store_true",
                   help="also train stock nnUNetTrainer, per method and seed, for as long as the method took: same "
                        "epochs, training iterations per epoch x the method's measured cost ratio (its seconds per "
                        "iteration / stock's); reported as 'stock, same time (<method>)' with paired statistics; "
                        "with --cv-folds every fold of it is trained, and the ratio is the mean over folds")
    p.add_argument("--cv-folds", type=int, default=None, metavar="K",
                   help="K-fold cross-validation instead of the held-out test split, for datasets with few labelled "
                        "cases: the folds of nnU-Net's splits_final.json in the preprocessed dataset folder (written "
                        "with nnU-Net's generate_crossval_split, seed 12345, when absent; a file with another number "
                        "of folds is refused, never overwritten). Every trainer and seed trains each fold "
                        "(nnUNetv2_train D C k), predicts the fold's validation cases from imagesTr and evaluates "
                        "them; per trainer and seed the folds are pooled per case (each case predicted once), and the "
                        "statistics pair those pooled runs by seed. imagesTs is neither needed nor used. Not with -f "
                        "(every fold is trained) nor --upper-bound-dataset (the gap bound needs a separate "
                        "all-labelled dataset with the same held-out test cases)")
    p.add_argument("--equal-time-costs", default=None, metavar="RESULTS_JSON",
                   help="with --equal-time: take the cost ratios from this results.json of another benchmark run on "
                        "an otherwise idle machine (stock and the methods in one invocation; same dataset, "
                        "configuration, plans, device, epochs and iterations) instead of from these runs, whose "
                        "timings are only fair when nothing else ran beside them")
    p.set_defaults(func=_cmd_benchmark)
