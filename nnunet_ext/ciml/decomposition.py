"""CIML task decomposition: which subtask predicts which outputs from which primary and auxiliary modalities.

A *subtask* owns a set of nnU-Net output channels (regions, or foreground labels), reads one *primary* modality
through its own encoder/decoder branch and receives messages from its *auxiliary* modalities. Users declare
subtasks with names (``channel_names`` values, ``labels`` keys); :func:`resolve_settings` turns them into indices
once, at ``nnunet-ext configure ciml`` time, because nnU-Net's predictor builds the network from the plans alone
and never sees ``dataset.json``.

The resolved block stored in the plans (``plans["nnunet_ext"]["ciml"]``)::

    {"subtasks": [...user declaration...], "beta": 1e-3, ..., "modality_names": ["FLAIR", "T1c"],
     "resolved": {"output_mode": "labels", "num_modalities": 2, "num_outputs": 3,
                  "subtasks": [{"name": "oedema", "primary": 0, "auxiliary": [1], "out_channels": [1]}, ...]}}

Output modes: ``"regions"`` (region-based dataset, sigmoid per channel), ``"labels"`` (softmax; channel 0 is a
constant zero background logit, subtasks own foreground labels) and ``"direct"`` (the automatic default: one subtask
emits every output channel itself, background included, exactly like nnU-Net's own head).

Automatic default (no block in the plans, or ``configure ciml`` without ``--config``; Design decision): one
subtask ``"all"`` owning every output channel, primary modality = input channel 0, auxiliaries = all other channels.
It depends only on the numbers of input and output channels, so training and prediction resolve it identically.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OUTPUT_MODES = ("regions", "labels", "direct")
MESSAGE_MODES = ("pair", "shared")
ATTENTION_TYPES = ("cbam", "concat")
STAGE_PRESETS = ("all_but_first", "all", "bottleneck")

#: User-facing settings and their defaults (CIML spec section 5). ``subtasks: None`` = automatic default.
DEFAULT_SETTINGS: dict[str, Any] = {
    "subtasks": None,
    "beta": 1e-3,
    "beta_warmup_fraction": 0.1,
    "message_stages": "all_but_first",
    "message_mode": "pair",
    "attention": {"type": "cbam", "kernel": 7},
    "latent_channels": "same",
    "logvar_clamp": 10.0,
    "variational": True,
    "messages": True,
    # Per sample and sender, the probability that all messages of that sender are switched off during training,
    # so that inference with a missing auxiliary modality (messages off) degrades gracefully. Design decision.
    "message_dropout": 0.1,
}

#: Documented decompositions (Design decisions, CIML spec section 8.5); ``{"preset": NAME}`` in a config file.
PRESETS: dict[str, list[dict[str, Any]]] = {
    # nnU-Net Dataset137 BraTS convention: channels T1, T1ce, T2, Flair; regions whole tumor, tumor core,
    # enhancing tumor. T1 is a sender only.
    "brats": [
        {"name": "WT", "targets": ["whole tumor"], "primary": "Flair", "auxiliary": "all"},
        {"name": "TC", "targets": ["tumor core"], "primary": "T2", "auxiliary": "all"},
        {"name": "ET", "targets": ["enhancing tumor"], "primary": "T1ce", "auxiliary": "all"},
    ],
    # shared project data BraTS2018_FLAIR_T1 (FLAIR, T1; one label): one subtask, FLAIR primary
    "brats2018_flair_t1": [
        {"name": "tumour", "targets": "all", "primary": "FLAIR", "auxiliary": ["T1"]},
    ],
    # shared project data BraTS2015_FLAIR_T1c converted with --regions (docs/ciml.md): FLAIR shows the whole lesion,
    # T1c the enhancing rim and necrosis. One T1c subtask for both nested core regions: one decoder instead of two,
    # and the T1c -> WT message (the one CIML is about here) is the same either way.
    "brats2015_flair_t1c": [
        {"name": "WT", "targets": ["whole tumour"], "primary": "FLAIR", "auxiliary": ["T1c"]},
        {"name": "core", "targets": ["tumour core", "enhancing tumour"], "primary": "T1c", "auxiliary": ["FLAIR"]},
    ],
    # nnunet-ext demo data (FLAIR, T1c; oedema=1, core=2): oedema from FLAIR, core from T1c
    "demo": [
        {"name": "oedema", "targets": ["oedema"], "primary": "FLAIR", "auxiliary": ["T1c"]},
        {"name": "core", "targets": ["core"], "primary": "T1c", "auxiliary": ["FLAIR"]},
    ],
}


@dataclass(frozen=True)
class SubtaskSpec:
    """One resolved subtask: primary and auxiliary input channels, and the output channels it produces."""

    name: str
    primary: int
    auxiliary: tuple[int, ...]
    out_channels: tuple[int, ...]


@dataclass(frozen=True)
class MessageConfig:
    """Validated message hyper-parameters (see :data:`DEFAULT_SETTINGS`)."""

    enabled: bool = True
    variational: bool = True
    mode: str = "pair"
    stages: str | tuple[int, ...] = "all_but_first"
    attention_type: str = "cbam"
    attention_kernel: int = 7
    latent_channels: str | int = "same"
    logvar_clamp: float = 10.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in MESSAGE_MODES:
            raise ValueError(f"message_mode must be one of {MESSAGE_MODES}, got {self.mode!r}")
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention.type must be one of {ATTENTION_TYPES}, got {self.attention_type!r}")
        if not isinstance(self.attention_kernel, int) or self.attention_kernel < 1 or self.attention_kernel % 2 == 0:
            raise ValueError(f"attention.kernel must be an odd positive integer, got {self.attention_kernel!r}")
        if isinstance(self.stages, str):
            if self.stages not in STAGE_PRESETS:
                raise ValueError(f"message_stages must be one of {STAGE_PRESETS} or a list of stage indices, "
                                 f"got {self.stages!r}")
        elif not self.stages or not all(isinstance(s, int) and s >= 0 for s in self.stages):
            raise ValueError(f"message_stages as a list must hold non-negative stage indices, got {self.stages!r}")
        if not (self.latent_channels == "same" or (isinstance(self.latent_channels, int)
                                                   and not isinstance(self.latent_channels, bool)
                                                   and self.latent_channels > 0)):
            raise ValueError(f"latent_channels must be 'same' or a positive integer, got {self.latent_channels!r}")
        if self.logvar_clamp <= 0:
            raise ValueError(f"logvar_clamp must be positive, got {self.logvar_clamp}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"message_dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> MessageConfig:
        attention = settings.get("attention", DEFAULT_SETTINGS["attention"])
        if not isinstance(attention, Mapping) or set(attention) - {"type", "kernel"}:
            raise ValueError(f"attention must be an object with keys 'type' and 'kernel', got {attention!r}")
        stages = settings.get("message_stages", "all_but_first")
        return cls(
            enabled=bool(settings.get("messages", True)),
            variational=bool(settings.get("variational", True)),
            mode=settings.get("message_mode", "pair"),
            stages=stages if isinstance(stages, str) else tuple(stages),
            attention_type=attention.get("type", "cbam"),
            attention_kernel=attention.get("kernel", 7),
            latent_channels=settings.get("latent_channels", "same"),
            logvar_clamp=float(settings.get("logvar_clamp", 10.0)),
            dropout=float(settings.get("message_dropout", 0.1)),
        )

    def stage_indices(self, num_stages: int) -> tuple[int, ...]:
        """Encoder stages that carry messages for a network with ``num_stages`` stages."""
        if self.stages == "all_but_first":
            return tuple(range(1, num_stages))
        if self.stages == "all":
            return tuple(range(num_stages))
        if self.stages == "bottleneck":
            return (num_stages - 1,)
        bad = [s for s in self.stages if s >= num_stages]
        if bad:
            raise ValueError(f"message_stages {list(self.stages)} name stage(s) {bad}, but the plan's network has "
                             f"only stages 0..{num_stages - 1}")
        return tuple(sorted(set(self.stages)))


def merge_hyper_parameters(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``DEFAULT_SETTINGS`` updated with ``settings``; unknown keys are a ValueError naming them and ``where``."""
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS) - {"preset", "resolved", "modality_names"})
    if unknown:
        raise ValueError(f"unknown CIML setting(s) {unknown} in {where}; known settings: "
                         f"{sorted(DEFAULT_SETTINGS)} and 'preset'")
    merged = copy.deepcopy(DEFAULT_SETTINGS)
    merged.update(copy.deepcopy({k: v for k, v in settings.items() if k in DEFAULT_SETTINGS}))
    beta = merged["beta"]
    if not isinstance(beta, (int, float)) or beta < 0:
        raise ValueError(f"beta must be a number >= 0 in {where}, got {beta!r}")
    fraction = merged["beta_warmup_fraction"]
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"beta_warmup_fraction must be in [0, 1] in {where}, got {fraction!r}")
    MessageConfig.from_settings(merged)  # validates the message options
    return merged


def automatic_resolution(num_modalities: int, num_outputs: int) -> dict[str, Any]:
    """The automatic default: one subtask ``"all"`` owning every output, primary channel 0, all others auxiliary."""
    if num_modalities < 1 or num_outputs < 1:
        raise ValueError(f"need at least one input and one output channel, got {num_modalities} and {num_outputs}")
    return {
        "output_mode": "direct",
        "num_modalities": num_modalities,
        "num_outputs": num_outputs,
        "subtasks": [{"name": "all", "primary": 0, "auxiliary": list(range(1, num_modalities)),
                      "out_channels": list(range(num_outputs))}],
    }


def _label_targets(dataset_json: Mapping[str, Any]) -> tuple[str, dict[str, int], int]:
    """``(output_mode, {label name: output channel}, num_outputs)`` as nnU-Net's LabelManager orders them."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    labels = dataset_json["labels"]
    manager = LabelManager(labels, dataset_json.get("regions_class_order"))
    channels: dict[str, int] = {}
    if manager.has_regions:
        position = 0
        for name, value in labels.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if name == "ignore" or all(int(v) == 0 for v in values):
                continue
            channels[name] = position
            position += 1
        return "regions", channels, manager.num_segmentation_heads
    for name, value in labels.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if name == "ignore" or int(values[0]) == 0:
            continue
        channels[name] = manager.all_labels.index(int(values[0]))
    return "labels", channels, manager.num_segmentation_heads


def _modality_index(ref: Any, names: Sequence[str], subtask: str, role: str) -> int:
    if isinstance(ref, bool):
        raise ValueError(f"subtask {subtask!r}: {role} modality {ref!r} is not a channel name or index")
    if isinstance(ref, int):
        if not 0 <= ref < len(names):
            raise ValueError(f"subtask {subtask!r}: {role} modality index {ref} does not exist; the dataset has "
                             f"channels 0..{len(names) - 1} ({list(names)})")
        return ref
    if isinstance(ref, str):
        matches = [i for i, n in enumerate(names) if n == ref]
        if not matches:
            matches = [i for i, n in enumerate(names) if n.lower() == ref.lower()]
        if not matches:
            raise ValueError(f"subtask {subtask!r}: {role} modality {ref!r} is not in the dataset's channel_names "
                             f"{list(names)}")
        if len(matches) > 1:
            raise ValueError(f"subtask {subtask!r}: channel name {ref!r} is ambiguous (channels {matches}); "
                             f"refer to the channel by its index")
        return matches[0]
    raise ValueError(f"subtask {subtask!r}: {role} modality must be a channel name or index, got {ref!r}")


def _target_channels(ref: Any, label_channels: Mapping[str, int], mode: str, dataset_labels: Mapping[str, Any],
                     subtask: str) -> list[int]:
    if ref == "all":
        return sorted(set(label_channels.values()))
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    if not refs:
        raise ValueError(f"subtask {subtask!r} has no targets")
    out = []
    for r in refs:
        if isinstance(r, str):
            if r not in label_channels:
                raise ValueError(f"subtask {subtask!r}: target {r!r} is not a foreground "
                                 f"{'region' if mode == 'regions' else 'label'} of the dataset; known: "
                                 f"{sorted(label_channels)}")
            out.append(label_channels[r])
        elif isinstance(r, int) and not isinstance(r, bool):
            # label value in label mode, region position (0-based, labels order) in region mode
            by_value = {int(v if not isinstance(v, (list, tuple)) else v[0]): label_channels[k]
                        for k, v in dataset_labels.items() if k in label_channels}
            lookup = by_value if mode == "labels" else {c: c for c in label_channels.values()}
            if r not in lookup:
                raise ValueError(f"subtask {subtask!r}: target {r} is not a foreground "
                                 f"{'label value' if mode == 'labels' else 'region index'} of the dataset")
            out.append(lookup[r])
        else:
            raise ValueError(f"subtask {subtask!r}: targets must be names, integers or 'all', got {r!r}")
    return out


def resolve_subtasks(subtasks: Sequence[Mapping[str, Any]], dataset_json: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve a user declaration against ``dataset_json`` into the index form stored under ``resolved``.

    Raises:
        ValueError: naming the subtask and the bad key, modality or label (unknown name, primary among its own
            auxiliaries, an output channel covered twice or never, an unused modality, duplicate subtask names).
    """
    names = [dataset_json["channel_names"][k] for k in sorted(dataset_json["channel_names"], key=int)]
    mode, label_channels, num_outputs = _label_targets(dataset_json)
    if not isinstance(subtasks, (list, tuple)) or not subtasks:
        raise ValueError("'subtasks' must be a non-empty list of {name, targets, primary, auxiliary} objects")
    resolved, owner, seen_names = [], {}, set()
    for i, subtask in enumerate(subtasks):
        if not isinstance(subtask, Mapping):
            raise ValueError(f"subtask #{i} must be an object, got {subtask!r}")
        name = str(subtask.get("name", f"subtask{i}"))
        unknown = sorted(set(subtask) - {"name", "targets", "primary", "auxiliary"})
        if unknown:
            raise ValueError(f"subtask {name!r}: unknown key(s) {unknown}; allowed: name, targets, primary, auxiliary")
        if name in seen_names:
            raise ValueError(f"subtask name {name!r} is used twice")
        seen_names.add(name)
        for key in ("targets", "primary"):
            if key not in subtask:
                raise ValueError(f"subtask {name!r} lacks {key!r}")
        primary = _modality_index(subtask["primary"], names, name, "primary")
        aux_ref = subtask.get("auxiliary", [])
        if aux_ref == "all":
            auxiliary = [m for m in range(len(names)) if m != primary]
        else:
            aux_list = aux_ref if isinstance(aux_ref, (list, tuple)) else [aux_ref]
            auxiliary = sorted({_modality_index(a, names, name, "auxiliary") for a in aux_list})
        if primary in auxiliary:
            raise ValueError(f"subtask {name!r}: primary modality {names[primary]!r} is also listed as auxiliary")
        channels = _target_channels(subtask["targets"], label_channels, mode, dataset_json["labels"], name)
        for c in channels:
            if c in owner:
                raise ValueError(f"output channel {c} ({_channel_name(c, label_channels)}) is covered by subtasks "
                                 f"{owner[c]!r} and {name!r}; every output must belong to exactly one subtask")
            owner[c] = name
        resolved.append({"name": name, "primary": primary, "auxiliary": auxiliary, "out_channels": sorted(channels)})
    uncovered = sorted(set(label_channels.values()) - set(owner))
    if uncovered:
        raise ValueError(f"output(s) {[_channel_name(c, label_channels) for c in uncovered]} are not covered by any "
                         f"subtask")
    used = {s["primary"] for s in resolved} | {a for s in resolved for a in s["auxiliary"]}
    unused = [names[m] for m in range(len(names)) if m not in used]
    if unused:
        raise ValueError(f"modality(ies) {unused} are neither primary nor auxiliary in any subtask (their encoder "
                         f"would be unused); add them as auxiliary or drop the channel from the dataset")
    return {"output_mode": mode, "num_modalities": len(names), "num_outputs": num_outputs, "subtasks": resolved}


def _channel_name(channel: int, label_channels: Mapping[str, int]) -> str:
    return next((k for k, v in label_channels.items() if v == channel), str(channel))


def resolve_settings(settings: Mapping[str, Any], dataset_json: Mapping[str, Any],
                     where: str = "the CIML settings") -> dict[str, Any]:
    """The complete plans block for ``settings`` (user declaration, hyper-parameters and ``resolved`` indices).

    ``{"preset": NAME}`` selects one of :data:`PRESETS` (its subtasks can still be overridden by ``subtasks``);
    no subtasks at all selects the automatic default.
    """
    settings = dict(settings)
    preset = settings.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown CIML preset {preset!r}; presets: {sorted(PRESETS)}")
        settings.setdefault("subtasks", copy.deepcopy(PRESETS[preset]))
    settings.pop("resolved", None)
    settings.pop("modality_names", None)
    block = merge_hyper_parameters(settings, where)
    names = [dataset_json["channel_names"][k] for k in sorted(dataset_json["channel_names"], key=int)]
    if block["subtasks"] is None:
        _, _, num_outputs = _label_targets(dataset_json)
        block["resolved"] = automatic_resolution(len(names), num_outputs)
    else:
        block["resolved"] = resolve_subtasks(block["subtasks"], dataset_json)
    block["modality_names"] = names
    return block


def check_block_against_dataset(block: Mapping[str, Any], dataset_json: Mapping[str, Any]) -> None:
    """Re-resolve a stored block against ``dataset_json``; a dataset that changed since ``configure`` is an error."""
    fresh = resolve_settings({k: v for k, v in block.items()}, dataset_json, where="the plans' CIML block")
    if fresh["resolved"] != block.get("resolved"):
        raise ValueError(f"the CIML block in the plans no longer matches dataset.json (stored "
                         f"{block.get('resolved')}, now {fresh['resolved']}); run nnunet-ext configure ciml again")


def validate_resolved(resolved: Mapping[str, Any], num_inputs: int, num_outputs: int) -> list[SubtaskSpec]:
    """Structural checks of a ``resolved`` block against the network's channel counts; returns the subtasks."""
    try:
        mode = resolved["output_mode"]
        subtasks = [SubtaskSpec(str(s["name"]), int(s["primary"]), tuple(int(a) for a in s["auxiliary"]),
                                tuple(int(c) for c in s["out_channels"])) for s in resolved["subtasks"]]
    except (KeyError, TypeError) as error:
        raise ValueError(f"malformed 'resolved' CIML block ({error!r}); run nnunet-ext configure ciml again") from error
    if mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {mode!r}")
    if resolved.get("num_modalities") != num_inputs:
        raise ValueError(f"the CIML block was resolved for {resolved.get('num_modalities')} input channels but the "
                         f"network gets {num_inputs}")
    if resolved.get("num_outputs") != num_outputs:
        raise ValueError(f"the CIML block was resolved for {resolved.get('num_outputs')} outputs but the network "
                         f"must produce {num_outputs} (num_segmentation_heads)")
    owned = sorted(c for s in subtasks for c in s.out_channels)
    expected = list(range(1, num_outputs)) if mode == "labels" else list(range(num_outputs))
    if owned != expected:
        raise ValueError(f"subtask outputs {owned} must cover channels {expected} exactly once ({mode} mode)")
    for s in subtasks:
        if not 0 <= s.primary < num_inputs or any(not 0 <= a < num_inputs for a in s.auxiliary):
            raise ValueError(f"subtask {s.name!r} refers to a modality outside 0..{num_inputs - 1}")
        if s.primary in s.auxiliary:
            raise ValueError(f"subtask {s.name!r}: primary modality {s.primary} is also auxiliary")
    return subtasks


def effective_settings(block: Mapping[str, Any] | None, overrides: Mapping[str, Any], num_inputs: int,
                       num_outputs: int, where: str = "the plans") -> dict[str, Any]:
    """Settings a network is built with: the plans' block (or the automatic default) plus a variant's overrides.

    Uses only the plans and the channel counts, so nnU-Net's predictor (which has no ``dataset.json`` in the
    builder) rebuilds exactly the trained network.

    Raises:
        ValueError: a block without ``resolved`` indices, bad overrides, or channel counts that do not match.
    """
    block = dict(block or {})
    if block and "resolved" not in block:
        raise ValueError(f"the CIML block in {where} has no 'resolved' entry; write it with "
                         f"nnunet-ext configure ciml -d ID -p PLANS [--config cfg.json] (presets: {sorted(PRESETS)})")
    resolved = block.pop("resolved", None) or automatic_resolution(num_inputs, num_outputs)
    modality_names = block.pop("modality_names", None) or [str(m) for m in range(num_inputs)]
    merged = merge_hyper_parameters(block, where)
    merge_hyper_parameters(overrides, "the trainer's ciml_overrides")  # unknown keys are an error
    merged.update(copy.deepcopy(dict(overrides)))
    merged = merge_hyper_parameters(merged, f"{where} with the trainer's ciml_overrides")
    validate_resolved(resolved, num_inputs, num_outputs)
    merged["resolved"] = copy.deepcopy(dict(resolved))
    merged["modality_names"] = list(modality_names)
    return merged
