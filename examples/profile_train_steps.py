"""Seconds per training step of one trainer at chosen epochs (ACTION's stages), optionally with a cProfile table.

Unlike ``nnunet-ext benchmark`` (mean epoch time of a whole run, validation and checkpoints included), this times
``train_step`` alone, in one process, after warm-up steps, at the epochs you name: e.g. epochs 0, 100 and 200 of
``ACTIONTrainer`` are its stages i, ii and iii with the default (100, 100, 800) schedule. The network is freshly
initialised (no training before), which is what the cost of a step depends on. Used for issue 15's profiles
(``docs/benchmarks.md``). Needs ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` and ``nnUNet_extTrainer``
(``eval "$(nnunet-ext env)"``) like ``nnUNetv2_train``; semi-supervised trainers need ``preprocess-unlabeled`` first.

    python examples/profile_train_steps.py -d 43 -c 2d -p nnUNetCPUPlans -tr ACTIONTrainer --epochs 0 100 200
    python examples/profile_train_steps.py -d 43 -c 2d -p nnUNetCPUPlans -tr ACTIONTrainer --epochs 200 --profile
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch


def time_steps(trainer, steps: int) -> float:
    """Mean wall seconds of ``steps`` calls of ``trainer.train_step`` on batches of its own loader."""
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(trainer.dataloader_train))
    return (time.perf_counter() - start) / steps


def profile_steps(trainer, steps: int, lines: int) -> str:
    """cProfile of ``steps`` training steps: the ``lines`` most expensive functions by own and by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        trainer.train_step(next(trainer.dataloader_train))
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)
    return text.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset name or ID")
    parser.add_argument("-c", required=True, help="configuration, e.g. 2d")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-tr", required=True, help="trainer class name")
    parser.add_argument("-f", default="all", help="fold (default: all)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[0], help="epochs at which to time steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at each epoch (default: 10)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps at each epoch (default: 40)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile table of 15 more steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-device", default="cpu", choices=("cpu", "cuda", "mps"))
    args = parser.parse_args(argv)

    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(args.seed)
    trainer = get_trainer_from_args(args.d, args.c, args.f if args.f == "all" else int(args.f), args.tr, args.p,
                                    device=torch.device(args.device))
    trainer.on_train_start()
    try:
        for epoch in args.epochs:
            trainer.current_epoch = epoch
            trainer.on_train_epoch_start()  # ACTION switches stage here
            time_steps(trainer, args.warmup)
            seconds = time_steps(trainer, args.steps)
            print(f"{args.tr} epoch {epoch}: {seconds:.4f} s per training step "
                  f"(mean of {args.steps} after {args.warmup} warm-up steps)", flush=True)
            if args.profile:
                print(profile_steps(trainer, 15, 30), flush=True)
    finally:
        trainer.on_train_end()


if __name__ == "__main__":
    main()
