"""Sub-commands ``nnunet-ext predict`` (with ``--missing`` for CIML models) and ``nnunet-ext explain`` (CIML)."""
from __future__ import annotations

import argparse


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", required=True, help="input folder with <case>_<XXXX><file_ending> files")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-tr", default="CIMLTrainer", help="trainer name (default: CIMLTrainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-f", nargs="+", default=None, help="folds (default: all available)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"))
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")


def _folds(values: list[str] | None) -> list[int | str] | None:
    return None if values is None else [v if v == "all" else int(v) for v in values]


def _model_folder(args: argparse.Namespace) -> str:
    """The trained model folder of ``-d -c -tr -p`` with ``-chk`` in every fold ``-f``, checked before any work."""
    from nnunet_ext.inputs import require_input_folder, require_model_folder

    require_input_folder(args.i, "-i")
    return require_model_folder(args.d, args.tr, args.p, args.c, _folds(args.f), args.chk)


def _cmd_predict(args: argparse.Namespace) -> int:
    from nnunet_ext.ciml.predict import predict_folder

    cases = predict_folder(args.i, args.o, _model_folder(args), _folds(args.f),
                           missing=args.missing or (), checkpoint_name=args.chk, device=args.device,
                           use_mirroring=not args.disable_tta, tile_step_size=args.step_size,
                           num_processes_preprocessing=args.npp, num_processes_export=args.nps,
                           missing_mode=args.missing_mode)
    note = f" without {', '.join(args.missing)} ({args.missing_mode})" if args.missing else ""
    print(f"Predicted {len(cases)} case(s) into {args.o}{note}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from nnunet_ext.ciml.explain import explain_folder

    path = explain_folder(args.i, args.o, _model_folder(args), _folds(args.f),
                          checkpoint_name=args.chk, device=args.device, tile_step_size=args.step_size)
    print(f"Message maps and overlays in {args.o}; contributions table {path}")
    return 0


def register(subparsers) -> None:
    """Add ``predict`` and ``explain`` to the ``nnunet-ext`` command."""
    from nnunet_ext.ciml.predict import MISSING_MODES

    p = subparsers.add_parser(
        "predict", help="nnUNetv2_predict through nnU-Net's predictor, with --missing modalities",
        description="Predict a folder like nnUNetv2_predict. With --missing MOD the channel file may be absent (it "
                    "is replaced by an all-zero image). --missing-mode messages-off (default; CIML models only) "
                    "switches that auxiliary modality's messages off, so the zero image never reaches the network; "
                    "a missing primary modality is an error. --missing-mode zero-fill (any model, e.g. stock "
                    "nnU-Net) feeds the all-zero image to the network.")
    _model_arguments(p)
    p.add_argument("--missing", nargs="+", default=None, metavar="MOD",
                   help="modalities (channel names or indices) that are not available")
    p.add_argument("--missing-mode", choices=MISSING_MODES, default="messages-off",
                   help="messages-off: CIML switches the messages of the missing senders off (default); "
                        "zero-fill: the network sees all-zero images (any model)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("-npp", type=int, default=1, help="preprocessing processes")
    p.add_argument("-nps", type=int, default=1, help="export processes")
    p.set_defaults(func=_cmd_predict)

    p = subparsers.add_parser(
        "explain", help="CIML: per-message attention/magnitude maps, overlays and a contribution table",
        description="For every case: NIfTI maps of each message's attention and magnitude (sender -> subtask) "
                    "aligned with the input image, PNG overlays of a representative slice, and "
                    "contributions.csv (how much each modality contributed to each subtask).")
    _model_arguments(p)
    p.set_defaults(func=_cmd_explain)
