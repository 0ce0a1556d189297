"""``nnunet-ext predict-cls`` and ``nnunet-ext evaluate-cls`` (registered through ``COMMAND_MODULES``)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def tabular_warnings_as_lines(prefix: str) -> Iterator[None]:
    """Print each :class:`TabularDataWarning` at once as ``<prefix>: warning: <message>`` on stderr (every one,
    not only the first per call site); other warnings keep Python's format."""
    from nnunet_ext.cfcml.prediction_table import TabularDataWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", TabularDataWarning)
        show_default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, TabularDataWarning):
                print(f"{prefix}: warning: {message}", file=sys.stderr)
            else:
                show_default(message, category, filename, lineno, file, line)

        warnings.showwarning = show  # restored by catch_warnings
        yield


def _cmd_predict_cls(args: argparse.Namespace) -> int:
    from nnunet_ext.cfcml.predict import predict_classification
    from nnunet_ext.inputs import require_input_file, require_input_folder, require_model_folder, require_new_file

    require_input_folder(args.i, "-i")
    if args.t is not None:
        require_input_file(args.t, "-t")
    require_new_file(args.o, "-o")
    require_model_folder(args.d, args.tr, args.p, args.c, args.f, args.chk)
    with tabular_warnings_as_lines("nnunet-ext predict-cls"):
        path = predict_classification(args.i, args.t, args.o, args.d, args.c, args.f, trainer=args.tr, plans=args.p,
                                      checkpoint_name=args.chk, device=args.device,
                                      allow_missing_tabular=args.allow_missing_tabular,
                                      allow_missing_columns=args.allow_missing_columns)
    print(f"Class probabilities written to {path}")
    return 0


def _cmd_evaluate_cls(args: argparse.Namespace) -> int:
    from nnunet_ext.cfcml.metrics import evaluate_predictions_csv
    from nnunet_ext.inputs import require_input_file

    require_input_file(args.predictions, "predictions CSV")
    require_input_file(args.labels, "labels CSV")
    metrics = evaluate_predictions_csv(args.predictions, args.labels)
    text = json.dumps(metrics, indent=2, default=float)
    if args.o:
        with open(args.o, "w") as f:
            f.write(text)
    print(text)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict-cls", help="case-level class probabilities from trained CFCML folds (CSV)",
        description="Preprocess each case like training, take the centred patch, average the softmax over folds "
                    "and write one row per case: case_id, prediction, prob_<class>...")
    p.add_argument("-i", required=True, help="folder with images named like imagesTr (<case>_<XXXX><ending>)")
    p.add_argument("-t", default=None, help="tabular CSV with a row per case (default: the copy configure cfcml "
                                            "made for the plans -p, if the raw tabular.csv is unchanged since)")
    p.add_argument("-o", required=True, help="output CSV (must not exist)")
    p.add_argument("-d", required=True, help="dataset ID or name")
    p.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-f", nargs="+", default=["0"], help="folds to ensemble (default: 0)")
    p.add_argument("-tr", default="CFCMLTrainer", help="trainer class name (default: CFCMLTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (e.g. the one from configure cfcml)")
    p.add_argument("-chk", default="checkpoint_final.pth",
                   help="checkpoint file name (e.g. checkpoint_best_cls.pth)")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--allow-missing-tabular", action="store_true",
                   help="cases without a tabular row get all fields missing instead of an error")
    p.add_argument("--allow-missing-columns", action="store_true",
                   help="feature columns of the trained model that the table lacks are missing for every case "
                        "(one warning per column) instead of an error")
    p.set_defaults(func=_cmd_predict_cls)

    p = subparsers.add_parser("evaluate-cls", help="classification metrics of a predict-cls CSV against labels",
                              description="AUC, balanced accuracy, accuracy, F1, per-class sensitivity/specificity.")
    p.add_argument("predictions", help="CSV from predict-cls or validation_cls.csv")
    p.add_argument("labels", help="CSV with case_id and label columns (e.g. tabular.csv)")
    p.add_argument("-o", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=_cmd_evaluate_cls)
