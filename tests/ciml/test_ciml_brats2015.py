"""The shipped BraTS 2015 FLAIR + T1c decomposition (example file and preset) against the converted 2-mm dataset:
``nnunet-ext configure ciml`` validates it, and a CIML network built from it takes a few training steps on real
tumour patches with nnU-Net's region targets and region loss, then exports through ``regions_class_order``."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from ciml_testing import configuration
from ciml_testing import single_torch_thread  # noqa: F401
from helpers_cli import REPO_DIR
from helpers_nnunet import set_nnunet_paths

from nnunet_ext.ciml.decomposition import resolve_settings
from nnunet_ext.ciml.network import build_ciml_network

pytestmark = pytest.mark.shared_data

EXAMPLE = REPO_DIR / "examples" / "ciml_brats2015_flair_t1c.json"
# WT from FLAIR (channel 0) with T1c messages; tumour core and enhancing tumour (outputs 1, 2) from T1c with FLAIR's
EXPECTED = {"output_mode": "regions", "num_modalities": 2, "num_outputs": 3, "subtasks": [
    {"name": "WT", "primary": 0, "auxiliary": [1], "out_channels": [0]},
    {"name": "core", "primary": 1, "auxiliary": [0], "out_channels": [1, 2]}]}


@pytest.fixture
def preprocessed(brats2015_ds2_raw, tmp_path, monkeypatch):
    """nnUNet_preprocessed/Dataset052_... holding the converted dataset.json and a plans file with one 5-stage
    configuration (configure reads dataset.json and the configurations' stage counts, nothing else)."""
    folders = set_nnunet_paths(monkeypatch, tmp_path)
    folder = folders["nnUNet_preprocessed"] / brats2015_ds2_raw.name
    folder.mkdir()
    shutil.copy(brats2015_ds2_raw / "dataset.json", folder)
    architecture = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {"n_stages": 5}, "_kw_requires_import": []}
    (folder / "nnUNetPlans.json").write_text(json.dumps({
        "dataset_name": brats2015_ds2_raw.name, "plans_name": "nnUNetPlans",
        "configurations": {"3d_fullres": {"architecture": architecture}}}))
    return folder


@pytest.mark.parametrize("config", [json.loads(EXAMPLE.read_text()), {"preset": "brats2015_flair_t1c"}],
                         ids=["example", "preset"])
def test_configure_ciml_validates_the_shipped_decomposition(preprocessed, tmp_path, config):
    from nnunet_ext.cli import main

    config_file = tmp_path / "ciml.json"
    config_file.write_text(json.dumps(config))
    assert main(["configure", "ciml", "-d", "52", "-p", "nnUNetPlans", "--config", str(config_file)]) == 0
    derived = json.loads((preprocessed / "nnUNetPlans_CIML.json").read_text())
    assert derived["nnunet_ext"]["ciml"]["resolved"] == EXPECTED
    assert derived["nnunet_ext"]["ciml"]["modality_names"] == ["FLAIR", "T1c"]


def test_configure_ciml_names_a_target_the_dataset_lacks(preprocessed, tmp_path, capsys):
    """Dataset137's spelling ('tumor core') is not this dataset's region name."""
    from nnunet_ext.cli import main

    config = json.loads(EXAMPLE.read_text())
    config["subtasks"][1]["targets"] = ["tumor core", "enhancing tumour"]
    config_file = tmp_path / "ciml.json"
    config_file.write_text(json.dumps(config))
    assert main(["configure", "ciml", "-d", "52", "-p", "nnUNetPlans", "--config", str(config_file)]) == 2
    assert ("subtask 'core': target 'tumor core' is not a foreground region of the dataset; known: "
            "['enhancing tumour', 'tumour core', 'whole tumour']") in capsys.readouterr().err
    assert not (preprocessed / "nnUNetPlans_CIML.json").exists()


def _tumour_patch(raw, case: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``([2, size^3] FLAIR and T1c, [size^3] labels)`` centred on the tumour (z, y, x arrays)."""
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz")))
    centre = np.round(np.argwhere(label > 0).mean(0)).astype(int)
    start = [int(np.clip(c - size // 2, 0, s - size)) for c, s in zip(centre, label.shape)]
    window = tuple(slice(s, s + size) for s in start)
    images = [sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"{case}_{c:04d}.nii.gz")))[window]
              for c in (0, 1)]
    return np.stack(images).astype(np.float32), label[window]


def test_a_few_ciml_training_steps_on_real_tumour_patches(brats2015_ds2_raw):
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    dataset_json = json.loads((brats2015_ds2_raw / "dataset.json").read_text())
    block = resolve_settings(json.loads(EXAMPLE.read_text()), dataset_json)
    manager = LabelManager(dataset_json["labels"], dataset_json["regions_class_order"])
    assert manager.has_regions and manager.num_segmentation_heads == 3
    cases = json.loads((brats2015_ds2_raw / "split.json").read_text())["labeled"][:2]
    patches = [_tumour_patch(brats2015_ds2_raw, case, 32) for case in cases]
    data = torch.from_numpy(np.stack([images for images, _ in patches]))
    to_regions = ConvertSegmentationToRegionsTransform(manager.foreground_regions)  # what nnU-Net's loader does
    target = torch.stack([to_regions(segmentation=torch.from_numpy(label[None].astype(np.int16)))["segmentation"]
                          for _, label in patches]).float()
    labels = torch.from_numpy(np.stack([label for _, label in patches]))
    assert torch.equal(target[:, 0].bool(), labels > 0) and torch.equal(target[:, 2].bool(), labels == 4)
    assert all(float(target[:, c].sum()) > 0 for c in range(3))  # every region is in the patches

    torch.manual_seed(0)
    net = build_ciml_network(configuration(3, patch=32, features=(4, 8, 8)), 2, 3, block, {},
                             enable_deep_supervision=False)
    loss_fn = DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                              use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    net.train()
    for _ in range(3):
        optimizer.zero_grad()
        logits, kl = net(data, return_aux=True)
        assert net.pair_names == ["T1c->WT", "FLAIR->core"] and kl.shape == (2,)
        loss = loss_fn(logits, target) + 1e-3 * kl.sum()
        assert math.isfinite(loss.item())
        loss.backward()
        for module in (*net.decoders, *net.messages.values()):  # both subtasks and both messages learn
            assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.parameters())
        optimizer.step()
    net.eval()
    with torch.no_grad():
        painted = manager.convert_logits_to_segmentation(net(data)[0])
    assert painted.shape == labels.shape[1:]
    assert set(torch.unique(painted).tolist()) <= {0, 2, 1, 4}  # background and regions_class_order's values
