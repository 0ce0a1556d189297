"""Tiny synthetic 2D RGB image + table classification datasets for the CFCML tests (deterministic).

Each case is a 40x40 RGB PNG with a bright disc (the lesion); the class changes the disc's colour balance
(image signal) and the categorical column ``colour_flag`` / numeric column ``score`` (table signal, with missing
cells). ``noise`` is an uninformative numeric column. With ``masks=False`` the label map marks the whole image
as label 1 "roi" (the converters' mask-free contract).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("benign", "atypical", "malignant")


def write_classification_dataset(raw_root: str | Path, dataset_id: int, name: str = "CfcmlTiny",
                                 num_train: int = 15, num_test: int = 3, num_classes: int = 3, size: int = 40,
                                 masks: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    yy, xx = np.mgrid[:size, :size]
    for split, count in (("tr", num_train), ("ts", num_test)):
        for i in range(count):
            case = f"{split}_{i:03d}"
            label = i % num_classes
            centre = rng.uniform(size * 0.35, size * 0.65, 2)
            radius = rng.uniform(size * 0.15, size * 0.25)
            disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2
            image = rng.normal(60, 12, (size, size, 3))
            colour = np.array([120 + 60 * label, 140 - 30 * label, 100 + 20 * (label % 2)], float)
            image[disc] = colour + rng.normal(0, 12, (int(disc.sum()), 3))
            image = np.clip(image, 0, 255).astype(np.uint8)
            images_dir = "imagesTr" if split == "tr" else "imagesTs"
            Image.fromarray(image, "RGB").save(folder / images_dir / f"{case}_0000.png")
            if split == "tr":
                seg = disc.astype(np.uint8) if masks else np.ones((size, size), np.uint8)
                Image.fromarray(seg, "L").save(folder / "labelsTr" / f"{case}.png")
            flag = CLASSES[label] if rng.random() < 0.8 else CLASSES[int(rng.integers(num_classes))]
            rows.append({"case_id": case, "label": CLASSES[label] if split == "tr" else "",
                         "colour_flag": "" if rng.random() < 0.1 else flag,
                         "score": "" if rng.random() < 0.15 else f"{label * 2.0 + rng.normal(0, 1):.3f}",
                         "noise": f"{rng.normal():.3f}"})
    labels = {"background": 0, "lesion": 1} if masks else {"background": 0, "roi": 1}
    dataset_json = {"name": name, "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": labels,
                    "numTraining": num_train, "file_ending": ".png"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    with open(folder / "tabular.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder
