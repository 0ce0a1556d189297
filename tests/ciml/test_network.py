"""CIMLNet: shapes (2D/3D, all output modes), determinism, KL statistics, attention range, gradients, assembly,
additivity, missing modalities, state-dict stability and mirroring TTA."""
from __future__ import annotations

import itertools

import pytest
import torch
from ciml_testing import LABELS_DATASET, BRATS_DATASET, configuration
from ciml_testing import single_torch_thread  # noqa: F401
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_ext.ciml.decomposition import resolve_settings
from nnunet_ext.ciml.network import CIMLNet, build_ciml_network

CASES = {  # name: (dataset, settings)
    "labels": (LABELS_DATASET, {"preset": "demo"}),
    "regions": (BRATS_DATASET, {"preset": "brats"}),
    "direct": (LABELS_DATASET, {}),
}


def make_net(case: str = "labels", dim: int = 3, overrides: dict | None = None, ds: bool = True,
             seed: int = 0, **config_kwargs) -> CIMLNet:
    dataset, settings = CASES[case]
    block = resolve_settings(settings, dataset)
    torch.manual_seed(seed)
    return build_ciml_network(configuration(dim, **config_kwargs), block["resolved"]["num_modalities"],
                              block["resolved"]["num_outputs"], block, overrides or {}, enable_deep_supervision=ds)


def inputs(net: CIMLNet, dim: int, batch: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, net.num_modalities, *([size] * dim), generator=g)


@pytest.mark.parametrize("case, dim", list(itertools.product(CASES, (2, 3))))
def test_shapes_train_with_deep_supervision_and_eval_single_tensor(case, dim):
    net = make_net(case, dim)
    x = inputs(net, dim)
    out = net(x)
    assert isinstance(out, list) and len(out) == 2  # 3 stages -> 2 decoder outputs, full resolution first
    assert [tuple(o.shape) for o in out] == [(2, net.num_outputs, *([16] * dim)), (2, net.num_outputs, *([8] * dim))]
    net.eval()
    net.deep_supervision = False
    single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, net.num_outputs, *x.shape[2:])


def test_residual_encoder_plans_are_supported():
    net = make_net("labels", 3, architecture="ResidualEncoderUNet")
    assert type(net.encoders["0"]).__name__ == "ResidualEncoder"
    assert net(inputs(net, 3))[0].shape == (2, 3, 16, 16, 16)


def test_eval_is_deterministic_train_samples():
    net = make_net("regions", 3, overrides={"message_dropout": 0.0})
    x = inputs(net, 3)
    net.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(x), net(x)))
        net.train()
        assert not torch.equal(net(x)[0], net(x)[0])
    novib = make_net("regions", 3, overrides={"variational": False, "message_dropout": 0.0})
    with torch.no_grad():
        assert torch.equal(novib(x)[0], novib(x)[0])  # no sampling in training either


def test_kl_stats_order_shape_and_batch_permutation_invariance():
    net = make_net("regions", 3).eval()
    assert net.pair_names == ["T1->WT", "T1ce->WT", "T2->WT", "T1->TC", "T1ce->TC", "Flair->TC",
                              "T1->ET", "T2->ET", "Flair->ET"]
    x = inputs(net, 3, batch=3)
    with torch.no_grad():
        _, kl = net(x, return_aux=True)
        _, kl_perm = net(x[[2, 0, 1]], return_aux=True)
    assert kl.shape == (9,) and kl.dtype == torch.float32 and bool((kl > 0).all())
    torch.testing.assert_close(kl, kl_perm)


def test_no_messages_variant_returns_empty_kl_and_builds_no_sender_only_encoder():
    net = make_net("regions", 3, overrides={"messages": False})
    _, kl = net(inputs(net, 3), return_aux=True)
    assert kl.shape == (0,)
    assert sorted(net.encoders) == ["1", "2", "3"]  # T1 (channel 0) only sends messages in the brats preset
    assert len(net.messages) == 0 and len(net.shared_encoders) == 0


def test_no_vib_variant_has_no_log_variance_parameters():
    net = make_net("labels", 3, overrides={"variational": False})
    for module in net.messages.values():
        assert module.encoder.conv.out_channels == module.encoder.latent_channels
    default = make_net("labels", 3)
    for module in default.messages.values():
        assert module.encoder.conv.out_channels == 2 * module.encoder.latent_channels


def test_attention_maps_are_in_unit_interval_and_cover_every_pair_and_stage():
    net = make_net("labels", 3).eval()
    maps = net.message_tensors(inputs(net, 3))
    assert sorted(maps) == sorted(net.pair_names)
    for name, tensors in maps.items():
        assert sorted(tensors) == sorted(f"{kind}@{s}" for kind in ("attention", "magnitude", "kl") for s in (1, 2))
        for key, value in tensors.items():
            assert value.shape[:2] == (2, 1)
            if key.startswith("attention"):
                assert float(value.min()) >= 0.0 and float(value.max()) <= 1.0
            else:
                assert float(value.min()) >= 0.0
    with pytest.raises(RuntimeError, match="eval"):
        net.train().message_tensors(inputs(net, 3))


@pytest.mark.parametrize("overrides", [
    {}, {"variational": False}, {"messages": False}, {"message_mode": "shared"},
    {"attention": {"type": "concat", "kernel": 3}}, {"latent_channels": 3}, {"message_stages": "all"},
])
@pytest.mark.parametrize("case", ["labels", "regions"])
def test_every_parameter_gets_a_gradient(case, overrides):
    net = make_net(case, 3, overrides={**overrides, "message_dropout": 0.0})
    x = inputs(net, 3).requires_grad_(True)
    out, kl = net(x, return_aux=True)
    (sum(o.square().mean() for o in out) + kl.sum()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # every modality an encoder is built for receives a gradient through the network
    for m in net.used_modalities:
        assert x.grad[:, m].abs().sum() > 0


def test_shared_mode_has_one_message_encoder_per_sender_and_stage():
    net = make_net("regions", 3, overrides={"message_mode": "shared"})
    assert sorted(net.shared_encoders) == [f"{a}@{s}" for a in "0123" for s in (1, 2)]
    assert all(module.encoder is None for module in net.messages.values())
    assert len(net.messages) == 9 * 2


def test_region_assembly_routes_each_decoder_to_its_channels_only():
    net = make_net("regions", 3, ds=False).eval()
    x = inputs(net, 3)
    with torch.no_grad():
        before = net(x)
        for p in net.decoders[1].seg_layers.parameters():  # subtask TC -> output channel 1
            p.add_(0.5)
        after = net(x)
    changed = [c for c in range(3) if not torch.equal(before[:, c], after[:, c])]
    assert changed == [1]


def test_label_mode_background_is_a_constant_zero_logit():
    net = make_net("labels", 2)
    for output in net(inputs(net, 2)):
        assert torch.equal(output[:, 0], torch.zeros_like(output[:, 0]))
    one = {"channel_names": {"0": "A", "1": "B"}, "labels": {"background": 0, "lesion": 1}}
    block = resolve_settings({"subtasks": [{"name": "l", "targets": "all", "primary": "A", "auxiliary": ["B"]}]}, one)
    net = build_ciml_network(configuration(2), 2, 2, block, {}, enable_deep_supervision=False).eval()
    logits = net(torch.randn(1, 2, 16, 16))
    torch.testing.assert_close(torch.softmax(logits, 1)[:, 1], torch.sigmoid(logits[:, 1]))


def _zero_message_means(net: CIMLNet) -> None:
    with torch.no_grad():
        for module in list(net.messages.values()) + list(net.shared_encoders.values()):
            for p in module.parameters():
                p.zero_()


def test_messages_are_additive_primary_features_are_kept():
    net = make_net("labels", 3, ds=False).eval()
    _zero_message_means(net)  # zero mu (and attention) -> z = 0 -> m = 0 in eval
    x = inputs(net, 3).requires_grad_(True)
    out = net(x)
    out[:, 1].sum().backward()  # subtask "oedema": primary FLAIR (0), auxiliary T1c (1)
    assert x.grad[:, 0].abs().sum() > 0
    assert torch.equal(x.grad[:, 1], torch.zeros_like(x.grad[:, 1]))
    fresh = make_net("labels", 3, ds=False).eval()
    x.grad = None
    fresh(x)[:, 1].sum().backward()
    assert x.grad[:, 1].abs().sum() > 0


def test_missing_modality_switches_its_messages_off():
    net = make_net("labels", 3, ds=False).eval()
    overrides_free = make_net("direct", 3, ds=False).eval()
    for model in (net, overrides_free):
        with pytest.raises(ValueError, match="primary modality"):
            model.set_missing_modalities([0])
    overrides_free.set_missing_modalities([1])
    x = inputs(overrides_free, 3)
    y = x.clone()
    y[:, 1] = 0.0
    with torch.no_grad():
        a, kl = overrides_free(x, return_aux=True)
        b = overrides_free(y)
    assert torch.equal(a, b) and torch.equal(kl, torch.zeros(1))  # output independent of the missing channel
    with pytest.raises(ValueError, match="out of range"):
        overrides_free.set_missing_modalities([4])


def test_message_dropout_only_in_training():
    net = make_net("direct", 3, overrides={"message_dropout": 0.5})
    x = inputs(net, 3, batch=8)
    keep = net._sender_keep(x)
    assert set(keep) == {1} and keep[1].shape == (8, 1, 1, 1, 1)
    assert set(torch.unique(keep[1]).tolist()) <= {0.0, 1.0}
    assert net.eval()._sender_keep(x) == {}


def test_state_dict_does_not_depend_on_deep_supervision_and_loads_strictly():
    a, b = make_net("regions", 3, ds=True), make_net("regions", 3, ds=False, seed=5)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict(), strict=True)


def test_bad_inputs_and_stages():
    net = make_net("labels", 3)
    with pytest.raises(ValueError, match="expects 2 input channels"):
        net(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="only stages 0..2"):
        make_net("labels", 3, overrides={"message_stages": [5]})
    with pytest.raises(ValueError, match="PlainConvUNet or ResidualEncoderUNet"):
        cfg = configuration(3)
        cfg.configuration["architecture"]["network_class_name"] = "my.Net"
        build_ciml_network(cfg, 2, 3, None)


def test_attention_kernel_shrinks_on_small_stages():
    net = make_net("labels", 3, patch=16)  # stage sizes 16, 8, 4
    kernels = {key: module.attention.gate.kernel_size[0] for key, module in net.messages.items()}
    assert kernels == {"1->0@1": 7, "1->0@2": 3, "0->1@1": 7, "0->1@2": 3}


def test_memory_proxy_accounts_for_extra_encoders_and_messages():
    cfg = configuration(3, features=(4, 8, 8))
    net = make_net("labels", 3)
    plain = PlainConvUNet(2, 3, [4, 8, 8], torch.nn.Conv3d, 3, [1, 2, 2], [1, 1, 1], 3, [1, 1], True,
                          torch.nn.InstanceNorm3d, {"affine": True}, None, None, torch.nn.LeakyReLU, None)
    assert cfg.patch_size == [16, 16, 16]
    assert net.compute_conv_feature_map_size([16] * 3) > 1.5 * plain.compute_conv_feature_map_size([16] * 3)


def test_mirroring_tta_is_reproducible_because_eval_is_deterministic():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    net = make_net("regions", 3, ds=False)
    predictor = nnUNetPredictor(use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False)
    predictor.network, predictor.allowed_mirroring_axes = net.eval(), (0, 1, 2)
    x = inputs(net, 3, batch=1)
    first = predictor._internal_maybe_mirror_and_predict(x)
    assert torch.equal(first, predictor._internal_maybe_mirror_and_predict(x))
    manual = sum(torch.flip(net(torch.flip(x, axes)), axes) if axes else net(x)
                 for axes in [()] + [c for i in range(3) for c in itertools.combinations((2, 3, 4), i + 1)]) / 8
    torch.testing.assert_close(first, manual)
    net.train()  # sampled messages: the same call no longer reproduces itself
    assert not torch.equal(predictor._internal_maybe_mirror_and_predict(x), first)
