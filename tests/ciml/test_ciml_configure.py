"""``configure ciml`` checks ``message_stages`` against every configuration's network, as the network build does."""
from __future__ import annotations

import pytest

from nnunet_ext.ciml.configure import check_message_stages


def _plans(stages_per_configuration: dict[str, int]) -> dict:
    return {"configurations": {name: {"architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": n}, "_kw_requires_import": []}} for name, n in stages_per_configuration.items()}}


@pytest.mark.parametrize(("settings", "error"), [
    ({"message_stages": "all_but_first"}, None),
    ({"message_stages": "bottleneck"}, None),
    ({"message_stages": [1, 3]}, "configuration '2d': message_stages [1, 3] name stage(s) [3]"),
    ({"message_stages": [0, 9]}, "configuration '3d_fullres': message_stages [0, 9] name stage(s) [9]"),
    ({"message_stages": [0, 9], "messages": False}, None),  # no messages: the stages are never used
])
def test_message_stages_must_exist_in_every_configuration(settings, error):
    plans = _plans({"3d_fullres": 5, "2d": 3})  # stages 0..4 and 0..2
    if error is None:
        check_message_stages(settings, plans)
    else:
        with pytest.raises(ValueError, match="only stages 0..") as raised:
            check_message_stages(settings, plans)
        assert error in str(raised.value)
