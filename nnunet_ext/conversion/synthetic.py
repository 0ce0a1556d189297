"""The synthetic demo dataset: two complementary modalities, unlabeled and test cases, and a tabular sidecar.

Each case is a noisy "body" ellipsoid with a lesion made of an outer zone (label 1, ``oedema``) around a core
(label 2, ``core``):

* modality ``FLAIR`` (channel 0) is bright over the whole lesion but cannot tell core from oedema;
* modality ``T1c`` (channel 1) is bright in the core only and shows nothing of the oedema.

So neither channel alone can segment both labels: oedema = bright in FLAIR and not in T1c. Intensities carry a
smooth multiplicative bias field and Gaussian noise.

``tabular.csv`` has one row per case (labelled, unlabeled and test) with ``case_id``, ``label`` and features.
The class depends on the image and the table together: ``large core`` (core radius above the middle of its
range) plus ``age >= 60`` gives ``low`` (neither), ``medium`` (one) or ``high`` (both). ``site`` and ``marker``
are distractors; ``age`` is missing in about 5 % of rows, which then follow the image-only rule. Test cases have
labels (``labelsTs``, the ``label`` column) so that demos and tests can evaluate; hide them from a model in
real use.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CHANNELS = {"0": "FLAIR", "1": "T1c"}
LABELS = {"background": 0, "oedema": 1, "core": 2}
CLASSES = ("low", "medium", "high")
CORE_RADIUS_RANGE = (2.5, 5.5)
AGE_THRESHOLD = 60.0


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """A low-frequency multiplicative field around 1 (a scanner-like bias)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    field = sum(rng.uniform(-1, 1) * g for g in grids) + rng.uniform(-1, 1) * grids[0] * grids[1]
    return 1.0 + strength * field / 2.0


def make_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """One case. Returns images ``[2, *shape]`` float32, labels ``[*shape]`` uint8 and the core radius."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre_body = (np.array(shape) - 1) / 2
    semi_axes = np.array(shape) * rng.uniform(0.38, 0.46, 3)
    body = (((grid - centre_body[:, None, None, None]) / semi_axes[:, None, None, None]) ** 2).sum(0) <= 1
    core_radius = float(rng.uniform(*CORE_RADIUS_RANGE))
    outer_radius = core_radius + float(rng.uniform(2.5, 4.5))
    margin = outer_radius + 1
    lesion_centre = np.array([rng.uniform(c - a + margin, c + a - margin) if a > margin + 1 else c
                              for c, a in zip(centre_body, semi_axes)])
    core_centre = lesion_centre + rng.uniform(-1.5, 1.5, 3)
    dist_outer = np.sqrt(((grid - lesion_centre[:, None, None, None]) ** 2).sum(0))
    dist_core = np.sqrt(((grid - core_centre[:, None, None, None]) ** 2).sum(0))
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(dist_outer <= outer_radius) & body] = LABELS["oedema"]
    seg[(dist_core <= core_radius) & body] = LABELS["core"]

    tissue = np.where(body, 100.0, 0.0)
    flair = tissue + 80.0 * (seg > 0)
    t1c = tissue + 90.0 * (seg == LABELS["core"])
    images = []
    for image in (flair, t1c):
        image = image * _smooth_field(rng, shape, 0.3) + rng.normal(0.0, 12.0, shape) * body
        images.append(np.clip(image, 0, None).astype(np.float32))
    return np.stack(images), seg, core_radius


def case_class(core_radius: float, age: float | None) -> str:
    """The tabular ``label``: image evidence (core size) and table evidence (age) add up."""
    large_core = core_radius > sum(CORE_RADIUS_RANGE) / 2
    old = age is not None and age >= AGE_THRESHOLD
    return CLASSES[int(large_core) + int(old)]


def _write(array: np.ndarray, path: Path, spacing: tuple[float, float, float]) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[::-1])  # numpy (z, y, x) -> ITK (x, y, z)
    sitk.WriteImage(image, str(path), useCompression=True)


def write_demo_dataset(raw_root: str | Path, dataset_id: int = 990, name: str = "NNExtDemo", num_labeled: int = 12,
                       num_unlabeled: int = 12, num_test: int = 6, shape: tuple[int, int, int] = (32, 40, 40),
                       spacing: tuple[float, float, float] = (1.5, 1.0, 1.0), seed: int = 0,
                       overwrite: bool = False) -> Path:
    """Write ``Dataset<ID>_<name>`` (``imagesTr``, ``labelsTr``, ``imagesUnlabeled``, ``imagesTs``, ``labelsTs``,
    ``dataset.json``, ``tabular.csv``) into ``raw_root`` and check it with nnU-Net's integrity check.

    Args:
        raw_root: the ``nnUNet_raw`` folder.
        shape: image shape in (z, y, x) order; ``spacing`` likewise, in mm.
        seed: everything is deterministic given the seed.
        overwrite: replace an existing dataset folder (it is never touched otherwise).

    Raises:
        FileExistsError: the dataset folder exists and ``overwrite`` is False.
        ValueError: a count below its minimum (nnU-Net's 5-fold split needs 5 labelled cases).
    """
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    if num_labeled < 5 or num_unlabeled < 0 or num_test < 1:
        raise ValueError(f"need >= 5 labelled cases, >= 0 unlabeled and >= 1 test case; got {num_labeled}, "
                         f"{num_unlabeled}, {num_test}")
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(folder)
    rng = np.random.default_rng(seed)
    groups = (("imagesTr", "labelsTr", "demo", num_labeled), ("imagesUnlabeled", None, "unl", num_unlabeled),
              ("imagesTs", "labelsTs", "test", num_test))
    rows = []
    for image_dir, label_dir, prefix, count in groups:
        (folder / image_dir).mkdir(parents=True, exist_ok=True)
        if label_dir:
            (folder / label_dir).mkdir(exist_ok=True)
        for i in range(count):
            case = f"{prefix}_{i:03d}"
            images, seg, core_radius = make_case(rng, shape)
            for channel, image in enumerate(images):
                _write(image, folder / image_dir / f"{case}_{channel:04d}.nii.gz", spacing)
            if label_dir:
                _write(seg, folder / label_dir / f"{case}.nii.gz", spacing)
            age = None if rng.random() < 0.05 else float(np.round(rng.uniform(30, 90), 1))
            rows.append({"case_id": case, "label": case_class(core_radius, age),
                         "age": "" if age is None else age, "site": str(rng.choice(["A", "B", "C"])),
                         "marker": float(np.round(rng.normal(1.0, 0.3), 3))})
    dataset_json = {"name": name, "channel_names": CHANNELS, "labels": LABELS, "numTraining": num_labeled,
                    "file_ending": ".nii.gz",
                    "description": "nnunet-ext synthetic demo: FLAIR shows the whole lesion, T1c only the core"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    with open(folder / "tabular.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    verify_dataset_integrity(str(folder), num_processes=1)
    return folder
