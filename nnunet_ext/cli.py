"""The ``nnunet-ext`` command: set-up, planning and data helpers around stock nnU-Net.

Training and prediction stay stock (``nnUNetv2_train``/``nnUNetv2_predict -tr <Trainer>``); this command does
what nnU-Net cannot do for external code: point it at our trainers, plan with our planners, preprocess
unlabeled images, write method settings into plans, and make demo data. Heavy imports happen inside the
sub-command functions so ``nnunet-ext env`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Modules that add their own sub-commands: each defines ``register(subparsers) -> None``, which adds one or more
# parsers and sets ``func`` (a callable taking the parsed namespace and returning an exit code). Heavy imports
# belong inside those functions, not at module level, so that ``nnunet-ext env`` stays instant.
COMMAND_MODULES: tuple[str, ...] = (
    "nnunet_ext.conversion.commands",
    "nnunet_ext.benchmark.commands",
    "nnunet_ext.benchmark.classification",
    "nnunet_ext.cfcml.commands",
    "nnunet_ext.ciml.commands",
)


def _cmd_env(args: argparse.Namespace) -> int:
    from nnunet_ext.discovery import env_lines, trainers_dir

    if args.path:
        print(trainers_dir())
    else:
        print("\n".join(env_lines(args.shell)))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    import nnunetv2
    import torch

    from nnunet_ext import __version__
    from nnunet_ext.discovery import ENV_VAR, ext_trainer_path, shipped_trainer_names, trainers_dir
    from nnunet_ext.inputs import NNUNET_FOLDER_VARIABLES

    try:
        from importlib.metadata import version

        nnunet_version = version("nnunetv2")
    except Exception:  # metadata missing in odd installs; the module path is still informative
        nnunet_version = "unknown"
    print(f"nnunet-ext {__version__} | nnunetv2 {nnunet_version} ({os.path.dirname(nnunetv2.__file__)}) | "
          f"torch {torch.__version__} | Python {platform.python_version()}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    for var in (*NNUNET_FOLDER_VARIABLES, ENV_VAR):
        value = os.environ.get(var)
        print(f"{var:20s} {value if value is not None else 'NOT SET'}")
    unset = [var for var in NNUNET_FOLDER_VARIABLES if not os.environ.get(var)]
    if unset:
        # nnUNetv2_train / nnUNetv2_predict cannot run without them, so this is a problem, not a note
        print(f"PROBLEM: {', '.join(unset)} not set; nnU-Net needs all of {', '.join(NNUNET_FOLDER_VARIABLES)} "
              f"(see nnU-Net's documentation/setting_up_paths.md)")
    ours = str(trainers_dir())
    if ours not in (os.environ.get(ENV_VAR) or "").split(os.pathsep):
        print(f"WARNING: {ENV_VAR} does not contain {ours}; run: eval \"$(nnunet-ext env)\" before "
              f"nnUNetv2_train AND nnUNetv2_predict")
    problems = len(unset)
    names = shipped_trainer_names()
    if not names:
        print(f"No trainer classes in {ours} yet.")
    os.environ[ENV_VAR] = ext_trainer_path(os.environ.get(ENV_VAR))
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for name in names:
        try:
            cls = recursive_find_trainer_class_by_name(name)
        except Exception as e:  # report every trainer, not just the first failure
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            problems += 1
            continue
        source = sys.modules.get(cls.__module__)
        where = getattr(source, "__file__", None) or cls.__module__
        if cls.__module__.startswith("nnunetv2."):
            print(f"WARNING {name} resolves to nnU-Net's built-in class in {cls.__module__}, not ours")
            problems += 1
        else:
            print(f"ok   {name} ({where})")
    return 1 if problems else 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from nnunet_ext.planning import plan_dataset

    identifier = plan_dataset(
        args.d, planner=args.pl, configurations=args.c, gpu_memory_target_in_gb=args.gpu_memory_target,
        overwrite_plans_name=args.overwrite_plans_name, num_processes=args.np, preprocess=not args.no_pp,
        verify_dataset_integrity=args.verify_dataset_integrity, verbose=args.verbose,
        overwrite_target_spacing=args.overwrite_target_spacing,
    )
    print(f"Plans identifier: {identifier}  (train with: nnUNetv2_train {args.d} CONFIG FOLD -p {identifier})")
    return 0


def _cmd_preprocess_unlabeled(args: argparse.Namespace) -> int:
    from nnunet_ext.inputs import require_dataset, require_plans
    from nnunet_ext.ssl.unlabeled_preprocessing import preprocess_unlabeled

    # the dataset, plans and configurations first, each with a one-line message (the image checks follow inside)
    require_dataset(args.d, "nnUNet_raw")
    require_plans(require_dataset(args.d, "nnUNet_preprocessed"), args.p, args.c)
    folders = preprocess_unlabeled(args.d, configurations=args.c, plans_identifier=args.p, num_processes=args.np,
                                   overwrite=args.overwrite, verbose=args.verbose)
    for folder in folders:
        print(f"Unlabeled cases written to {folder}")
    return 0


def _cmd_configure(args: argparse.Namespace) -> int:
    from nnunet_ext.errors import InputError
    from nnunet_ext.inputs import load_json_file, require_dataset, require_plans
    from nnunet_ext.plans import write_derived_plans

    settings = {} if args.config is None else load_json_file(args.config, "--config file")
    if not isinstance(settings, dict):
        raise InputError(f"--config file {args.config}: expected a JSON object with {args.method} settings, got "
                         f"{type(settings).__name__}")
    folder = require_dataset(args.d, "nnUNet_preprocessed")
    require_plans(folder, args.p)
    target = args.o or f"{args.p}_{args.method.upper()}"
    if target == args.p:
        raise InputError(f"-o {target}: the derived plans need their own identifier; the source plans -p are never "
                         f"modified")
    target_file = os.path.join(folder, target + ".json")
    if os.path.exists(target_file) and not args.overwrite:
        raise InputError(f"{target_file} exists; pass --overwrite to replace it")
    where = f"--config file {args.config}" if args.config else f"the default {args.method} settings"
    from nnunet_ext.cfcml.commands import tabular_warnings_as_lines

    try:
        with tabular_warnings_as_lines(f"nnunet-ext configure {args.method}"):
            path = write_derived_plans(folder, args.p, target, args.method, settings, overwrite=args.overwrite)
    except InputError:  # already names its file (e.g. CFCML's tabular.csv)
        raise
    except (KeyError, ValueError, FileNotFoundError) as error:
        # the method's deriver validates the settings (and finds sidecar files) before anything is written
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise InputError(f"{where}: {message}") from error
    print(f"Wrote {path}  (train with: nnUNetv2_train {args.d} CONFIG FOLD -tr <Trainer> -p {target})")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from nnunet_ext.conversion.synthetic import write_demo_dataset
    from nnunet_ext.errors import InputError

    try:
        path = write_demo_dataset(args.o, dataset_id=args.d, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as error:  # raised before anything is written; the message names the folder
        raise InputError(str(error).replace("overwrite=True (--overwrite)", "--overwrite")) from None
    print(f"Demo dataset written to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from nnunet_ext.benchmark.demo import run_demo

    run_demo(args.work_dir, epochs=args.epochs, iterations=args.iterations, trainers=args.trainers,
             seed=args.seed, device=args.device, full=args.full, heartbeat_seconds=args.heartbeat)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-ext",
        description="nnU-Net v2 extension trainers (CIML, CAML, ACTION, CFCML). Train and predict with stock "
                    "nnUNetv2_train / nnUNetv2_predict -tr <Trainer> after: eval \"$(nnunet-ext env)\"",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("env", help="print the shell lines that let nnU-Net find our trainers",
                       description="Print `export nnUNet_extTrainer=...` (keeps folders already set). "
                                   "Use: eval \"$(nnunet-ext env)\"")
    p.add_argument("--shell", choices=("sh", "fish", "cmd", "powershell"), default="sh")
    p.add_argument("--path", action="store_true", help="print only the installed trainers folder")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("doctor", help="check versions, nnU-Net paths and that every trainer is found",
                       description="Resolve every shipped trainer through nnU-Net's own lookup and report problems.")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("plan", help="plan (and preprocess) a dataset with one of our planners",
                       description="nnU-Net's -pl sees only planners inside nnunetv2; this runs fingerprinting, "
                                   "planning and preprocessing with a planner from nnunet-ext (or nnU-Net).")
    p.add_argument("-d", type=int, required=True, help="dataset ID")
    p.add_argument("-pl", default="CPUPlanner", help="planner class name (default: CPUPlanner)")
    p.add_argument("-c", nargs="+", default=None, help="configurations to preprocess (default: all planned)")
    p.add_argument("-gpu_memory_target", type=float, default=None, help="VRAM target in GB (planner default)")
    p.add_argument("-overwrite_plans_name", default=None, help="custom plans identifier")
    p.add_argument("-overwrite_target_spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="target spacing in mm (axis order of nnU-Net arrays) instead of nnU-Net's choice, as "
                        "nnUNetv2_plan_experiment; also sets 2d's in-plane spacing; combine with -overwrite_plans_name")
    p.add_argument("-np", type=int, default=2, help="processes for fingerprinting and preprocessing")
    p.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    p.add_argument("--verify_dataset_integrity", action="store_true", help="run nnU-Net's dataset check first")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("preprocess-unlabeled", help="preprocess imagesUnlabeled/ with the dataset's plans",
                       description="Preprocess nnUNet_raw/<Dataset>/imagesUnlabeled into "
                                   "nnUNet_preprocessed/<Dataset>/<data_identifier>__unlabeled (images only).")
    p.add_argument("-d", required=True, help="dataset ID or name")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default: 3d_fullres)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-np", type=int, default=1, help="worker processes")
    p.add_argument("--overwrite", action="store_true", help="re-preprocess cases that already exist")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_cmd_preprocess_unlabeled)

    p = sub.add_parser("configure", help="write method settings into a derived plans file",
                       description="Copy plans -p to a new identifier carrying the method's settings under the "
                                   "'nnunet_ext' key. Configurations and preprocessed data are reused.")
    p.add_argument("method", choices=("ciml", "caml", "action", "cfcml"))
    p.add_argument("-d", required=True, help="dataset ID or name")
    p.add_argument("-p", default="nnUNetPlans", help="source plans identifier")
    p.add_argument("-o", default=None, help="derived plans identifier (default: <source>_<METHOD>)")
    p.add_argument("--config", default=None, help="JSON file with the method settings (default: the method's "
                                                     "defaults, resolved for the dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing derived plans file")
    p.set_defaults(func=_cmd_configure)

    p = sub.add_parser("demo-data", help="write the synthetic multimodal demo dataset (nnU-Net raw format)",
                       description="Two complementary modalities, labeled/unlabeled/test cases and tabular.csv.")
    p.add_argument("-o", required=True, help="nnUNet_raw folder to write into")
    p.add_argument("-d", type=int, default=990, help="dataset ID (default: 990)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo dataset")
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("demo", help="end-to-end demo: stock nnU-Net vs our trainers on demo data, on the CPU",
                       description="Make demo data, plan with CPU plans, train stock nnU-Net and every shipped "
                                   "segmentation trainer for a short budget, predict the test cases, evaluate, print "
                                   "a table. Default: a quick 2D demo (3 epochs x 10 iterations on small volumes); "
                                   "--full: 3D, 10 epochs x 50 iterations (most of an hour on 2 CPU cores).")
    p.add_argument("--work-dir", default="demo_output", help="folder for raw/preprocessed/results (default: "
                                                             "./demo_output)")
    p.add_argument("--full", action="store_true", help="the 3d_fullres demo with 10 epochs x 50 iterations "
                                                       "instead of the quick 2d one (use its own --work-dir)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per training (default: 3, --full: 10)")
    p.add_argument("--iterations", type=int, default=None,
                   help="training iterations per epoch (default: 10, --full: 50)")
    p.add_argument("--trainers", nargs="*", default=None, help="our trainers to run (default: all shipped "
                                                                "segmentation trainers)")
    p.add_argument("--seed", type=int, default=0, help="demo data seed")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--heartbeat", type=float, default=30.0,
                   help="longest silence in seconds while a step runs (default: 30)")
    p.set_defaults(func=_cmd_demo)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from nnunet_ext.errors import InputError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as error:  # expected bad input: one line, no traceback (a bug keeps its traceback)
        print(f"nnunet-ext {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
