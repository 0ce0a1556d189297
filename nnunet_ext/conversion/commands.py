"""``nnunet-ext convert LAYOUT ...``: dataset converters to nnU-Net's raw format (see docs/conversion.md)."""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

LAYOUTS_HELP = ("folders: images/ + labels/ (Hippocampus) | per-case: <case>/<MODALITY>.nii.gz (BraTS) | h5: "
                "<case>/<file>.h5 (UA-MT/CAML Left Atrium) | acdc-h5: SSL4MIS ACDC | ph2 | derm7pt")


def _add_common(p: argparse.ArgumentParser, default_name: str | None = None) -> None:
    p.add_argument("source", help="input folder (only read)")
    p.add_argument("-d", type=int, required=True, help="dataset ID of the output (1..999)")
    p.add_argument("-n", "--name", required=default_name is None, default=default_name,
                   help="dataset name: output folder Dataset<ID>_<NAME>" +
                        (f" (default: {default_name})" if default_name else ""))
    p.add_argument("-o", default=None, help="nnUNet_raw folder to write into (default: $nnUNet_raw)")
    p.add_argument("--labeled", default=None, metavar="N|FRACTION|all",
                   help="training cases that keep their label; the others go to imagesUnlabeled (default: all)")
    p.add_argument("--test", default=None, metavar="N|FRACTION",
                   help="labelled cases held out in imagesTs/labelsTs (default: 0, or the source's list files)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (default: 0)")
    p.add_argument("--split-file", default=None,
                   help="reuse the split.json of an earlier conversion (same test cases; with --labeled all: every "
                        "training case labelled)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")


def _add_labels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME=VALUE",
                   help="label names in dataset.json, e.g. background=0 tumour=1 (default: label_<value> from data)")
    p.add_argument("--label-map", nargs="+", default=None, metavar="SOURCE=TARGET",
                   help="change label values before writing, e.g. 255=1")


def _add_regions(p: argparse.ArgumentParser) -> None:
    p.add_argument("--regions", nargs="+", default=None, metavar="NAME=VALUES",
                   help="region-based training (instead of --labels), e.g. 'whole tumour=1,2,3,4' 'tumour core=1,3,4' "
                        "'enhancing tumour=4': the label files keep their values, dataset.json gets the regions and "
                        "a derived regions_class_order")


def _add_lists(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ignore-lists", action="store_true",
                   help="ignore the source's split files and split at random (--test, --seed)")


def _add_labeled_order(p: argparse.ArgumentParser, papers: str) -> None:
    p.add_argument("--labeled-order", choices=("random", "list"), default="random",
                   help=f"which training cases keep their label with --labeled N: drawn at random (--seed; default) "
                        f"or the first N of train.list (the cases labelled by {papers}: 'list' reproduces their "
                        f"splits)")


def _split_kwargs(args: argparse.Namespace) -> dict:
    return {"labeled": args.labeled, "test": args.test, "seed": args.seed, "split_file": args.split_file,
            "overwrite": args.overwrite}


def _label_kwargs(args: argparse.Namespace) -> dict:
    from nnunet_ext.conversion.common import parse_label_map, parse_label_names

    return {"labels": parse_label_names(args.labels), "label_map": parse_label_map(args.label_map)}


def _run(args: argparse.Namespace, convert: Callable[[], Path]) -> int:
    """Run ``convert``, printing its warnings as one line each; bad input reaches ``nnunet-ext`` as InputError."""
    from nnunet_ext.conversion.common import ConversionError, ConversionWarning

    prefix = f"nnunet-ext convert {args.layout}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        try:
            folder = convert()
        except FileExistsError as e:  # an existing output dataset (raised before anything is written)
            raise ConversionError(str(e)) from None
        finally:  # one readable line per warning instead of Python's file:line format
            for w in caught:
                kind = "" if issubclass(w.category, ConversionWarning) else f"{w.category.__name__}: "
                print(f"{prefix}: warning: {kind}{w.message}", file=sys.stderr)
    print(f"Dataset written to {folder}  (split in {folder / 'split.json'})")
    return 0


def _cmd_folders(args: argparse.Namespace) -> int:
    from nnunet_ext.conversion.folders import convert_folders
    from nnunet_ext.conversion.regions import parse_regions

    return _run(args, lambda: convert_folders(
        args.source, args.d, args.name, args.o, images_dir=args.images_dir, labels_dir=args.labels_dir,
        channel_name=args.channel_name, missing_label=args.missing_label, orphan_labels=args.orphan_labels,
        regions=parse_regions(args.regions), **_label_kwargs(args), **_split_kwargs(args)))


def _cmd_per_case(args: argparse.Namespace) -> int:
    from nnunet_ext.conversion.folders import convert_per_case
    from nnunet_ext.conversion.regions import parse_regions

    return _run(args, lambda: convert_per_case(
        args.source, args.d, args.name, args.modalities, args.label, args.o, channel_names=args.channel_names,
        missing_label=args.missing_label, regions=parse_regions(args.regions), **_label_kwargs(args),
        **_split_kwargs(args)))


def _cmd_h5(args: argparse.Namespace) -> int:
    from nnunet_ext.conversion.hdf5 import convert_h5

    return _run(args, lambda: convert_h5(
        args.source, args.d, args.name, args.spacing, args.o, h5_name=args.h5_name, axis_order=args.axis_order,
        image_key=args.image_key, label_key=args.label_key, channel_name=args.channel_name,
        train_list=args.train_list, test_list=args.test_list, ignore_lists=args.ignore_lists,
        labeled_order=args.labeled_order, **_label_kwargs(args), **_split_kwargs(args)))


def _cmd_acdc_h5(args: argparse.Namespace) -> int:
    from nnunet_ext.conversion.hdf5 import convert_acdc_h5

    return _run(args, lambda: convert_acdc_h5(
        args.source, args.d, args.name, args.spacing, args.o, ignore_lists=args.ignore_lists,
        labeled_order=args.labeled_order, **_split_kwargs(args)))


def _cmd_ph2(args: argparse.Namespace) -> int:
    from nnunet_ext.conversion.ph2 import convert_ph2

    return _run(args, lambda: convert_ph2(
        args.source, args.d, args.name, args.o, table=args.table, include_leaky=args.include_leaky,
        **_split_kwargs(args)))


def _cmd_derm7pt(args: argparse.Namespace) -> int:
    from nnunet_ext.conversion.derm7pt import convert_derm7pt

    return _run(args, lambda: convert_derm7pt(
        args.source, args.d, args.name, args.o, image_column=args.image, diagnosis=args.diagnosis,
        features=args.features, include_leaky=args.include_leaky, ignore_lists=args.ignore_lists,
        **_split_kwargs(args)))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` with one sub-command per source layout."""
    convert = subparsers.add_parser(
        "convert", help="convert a dataset layout into nnU-Net's raw format (DatasetXXX_Name)",
        description="Write DatasetXXX_Name under nnUNet_raw (or -o) from a known layout, with optional "
                    "semi-supervised split (--labeled/--test/--seed, recorded in split.json), checked with "
                    "nnU-Net's verify_dataset_integrity. Inputs are only read; an existing dataset is replaced only "
                    f"with --overwrite. Layouts: {LAYOUTS_HELP}. MSD task folders: use nnUNetv2_convert_MSD_dataset.")
    layouts = convert.add_subparsers(dest="layout", required=True, metavar="LAYOUT")

    p = layouts.add_parser("folders", help="images/<case>.nii.gz + labels/<case>.nii.gz (e.g. Hippocampus)",
                           description="Images without a label become unlabeled images (imagesUnlabeled).")
    _add_common(p)
    _add_labels(p)
    p.add_argument("--images-dir", default="images", help="image subfolder (default: images)")
    p.add_argument("--labels-dir", default="labels", help="label subfolder (default: labels)")
    p.add_argument("--channel-name", default="image", help="channel name in dataset.json ('CT' -> CT normalisation)")
    p.add_argument("--missing-label", choices=("unlabeled", "error"), default="unlabeled",
                   help="image without label: unlabeled image (default) or error")
    p.add_argument("--orphan-labels", choices=("skip", "error"), default="skip",
                   help="label without image: skip with a warning (default) or error")
    _add_regions(p)
    p.set_defaults(func=_cmd_folders)

    p = layouts.add_parser("per-case", help="<case>/<MODALITY>.nii.gz + <case>/<LABEL>.nii.gz (e.g. BraTS)",
                           description="One folder per case, one file per modality. --modalities gives the file "
                                       "names (without ending) in channel order.")
    _add_common(p)
    _add_labels(p)
    p.add_argument("--modalities", nargs="+", required=True, help="modality file names in channel order, e.g. "
                                                                   "FLAIR T1")
    p.add_argument("--label", required=True, help="label file name without ending, e.g. GT_W")
    p.add_argument("--channel-names", nargs="+", default=None, help="channel names (default: the modality names)")
    p.add_argument("--missing-label", choices=("unlabeled", "error"), default="unlabeled",
                   help="case without the label file: unlabeled image (default) or error")
    _add_regions(p)
    p.set_defaults(func=_cmd_per_case)

    p = layouts.add_parser("h5", help="<case>/<file>.h5 with image/label (UA-MT/CAML Left Atrium)",
                           description="HDF5 volumes with datasets image and label; train.list/test.list in the "
                                       "folder or its parent fix the test cases.")
    _add_common(p)
    _add_labels(p)
    _add_lists(p)
    _add_labeled_order(p, "UA-MT and CAML")
    p.add_argument("--spacing", nargs=3, type=float, required=True, metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm, x y z (HDF5 stores none; Left Atrium: 0.625 0.625 0.625)")
    p.add_argument("--axis-order", choices=("xyz", "zyx"), default="xyz",
                   help="array axis order in the files (UA-MT: xyz, the default)")
    p.add_argument("--h5-name", default=None, help="file name inside each case folder (default: its only .h5)")
    p.add_argument("--image-key", default="image")
    p.add_argument("--label-key", default="label")
    p.add_argument("--channel-name", default="MRI")
    p.add_argument("--train-list", default=None, help="default: train.list in the folder or its parent")
    p.add_argument("--test-list", default=None, help="default: test.list in the folder or its parent")
    p.set_defaults(func=_cmd_h5)

    p = layouts.add_parser("acdc-h5", help="SSL4MIS ACDC: data/*.h5 volumes or data/slices + train/val/test.list",
                           description="Uses the volumes (data/*.h5, z y x arrays); frames that only exist as 2D "
                                       "slices (data/slices/<frame>_slice_<k>.h5, the SSL4MIS training data) are "
                                       "stacked back into volumes. val.list joins training. --labeled and --test "
                                       "count patients (both frames together). Labels: background, RV, MYO, LV.")
    _add_common(p, default_name="ACDC")
    _add_lists(p)
    _add_labeled_order(p, "SSL4MIS")
    p.add_argument("--spacing", nargs=3, type=float, required=True, metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm, x y z (SSL4MIS dropped it)")
    p.set_defaults(func=_cmd_acdc_h5)

    p = layouts.add_parser("ph2", help="PH2 dermoscopy: RGB png + lesion mask + tabular.csv (diagnosis)",
                           description="Diagnosis from the Common Nevus/Atypical Nevus/Melanoma columns; splits "
                                       "stratified by class.")
    _add_common(p, default_name="PH2")
    p.add_argument("--table", default=None, help="the xlsx (default: PH2_dataset2.xlsx in the folder)")
    p.add_argument("--include-leaky", action="store_true",
                   help="also write 'Histological Diagnosis' (it names the diagnosis)")
    p.set_defaults(func=_cmd_ph2)

    p = layouts.add_parser("derm7pt", help="Derm7pt: RGB png (whole-image roi label) + tabular.csv (diagnosis)",
                           description="meta/meta.csv + images/; official split from meta/*_indexes.csv.")
    _add_common(p, default_name="Derm7pt")
    _add_lists(p)
    p.add_argument("--image", choices=("derm", "clinic"), default="derm",
                   help="dermoscopic (default) or clinical image")
    p.add_argument("--diagnosis", choices=("grouped", "raw"), default="grouped",
                   help="5 groups BCC/NEV/MEL/MISC/SK (default) or the raw diagnosis strings")
    p.add_argument("--features", choices=("clinical", "all", "cfcml"), default="clinical",
                   help="tabular features: clinical = sex, location, elevation (default; patient metadata only); "
                        "all = also the 7-point criteria, seven_point_score and level_of_diagnostic_difficulty "
                        "(the dermatologist's reading); cfcml = the 5 columns of CFCML's code (incl. management)")
    p.add_argument("--include-leaky", action="store_true", help="also write 'management' (decided from the "
                                                                "diagnosis)")
    p.set_defaults(func=_cmd_derm7pt)
