"""Region-based labels for the converters (``--regions``), as nnU-Net's BraTS datasets (Dataset137) use them.

The label files keep their values (e.g. BraTS 2015: 1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing tumour);
``dataset.json`` declares each region as the list of label values it contains, e.g.
``{"background": 0, "whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": 4}``, and nnU-Net
trains one sigmoid output per region.

At export nnU-Net turns the region outputs back into one label map (``LabelManager.
convert_probabilities_to_segmentation``): region ``i`` (in ``labels`` order) paints the value
``regions_class_order[i]`` where its probability exceeds 0.5, and later regions overwrite earlier ones. The map is
only right if every voxel ends up with a value that lies in exactly the regions its true label lies in.
:func:`plan_regions` derives such an order and refuses definitions for which none exists.

Derivation: a label value's *membership* is the set of regions containing it. For a voxel of value ``v`` every
region of its membership paints and the last of them wins, so each membership needs its own "last" region, and
that region paints a value with that membership. Working backwards, a region can go last when at most one not yet
placed membership contains it; placing it never blocks another region, so the greedy pass finds an order whenever
one exists. Among the eligible regions the pass takes the latest in the user's order, so a valid user order is kept
as it is (the output channels keep the user's order), and an invalid one is reordered with a warning, following the
user's order wherever the constraints leave a choice. No ``--regions-order`` option: every valid order gives the
same map for consistent predictions, and the painted value of a region is any value of its membership (the
smallest), which region-wise evaluation cannot tell apart. The result is checked with nnU-Net's own painting code
before anything is written.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nnunet_ext.conversion.common import ConversionError, LabelConverter, warn

RESERVED_NAMES = ("background", "ignore")


@dataclass(frozen=True)
class Region:
    """One output of region-based training: a name and the label values it contains (sorted, unique)."""

    name: str
    values: tuple[int, ...]

    def json_value(self) -> int | list[int]:
        """``dataset.json`` form: one value as an int (as nnU-Net's own converters write it), several as a list."""
        return self.values[0] if len(self.values) == 1 else list(self.values)


@dataclass(frozen=True)
class RegionPlan:
    """Regions in painting order (= ``labels`` order in ``dataset.json``) and the value each one paints."""

    regions: tuple[Region, ...]
    class_order: tuple[int, ...]

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every foreground label value some region contains (1..N)."""
        return tuple(sorted({v for region in self.regions for v in region.values}))

    def dataset_labels(self) -> dict[str, int | list[int]]:
        return {"background": 0, **{region.name: region.json_value() for region in self.regions}}

    def describe(self) -> str:
        return ", ".join(f"{region.name}={','.join(map(str, region.values))}" for region in self.regions)


def parse_regions(items: Sequence[str] | None) -> dict[str, list[int]] | None:
    """``["whole tumour=1,2,3,4", "enhancing tumour=4"]`` -> ``{"whole tumour": [1, 2, 3, 4], ...}`` (``--regions``).

    Names may contain spaces; the values follow the last ``=``.
    """
    if not items:
        return None
    regions: dict[str, list[int]] = {}
    for item in items:
        name, sep, values = str(item).rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise ConversionError(f"--regions: expected NAME=VALUE[,VALUE...] (e.g. 'tumour core=1,3,4'), got "
                                  f"{item!r}")
        if name in regions:
            raise ConversionError(f"--regions: region {name!r} is given twice")
        parts = [p.strip() for p in values.split(",")]
        if parts == [""]:
            raise ConversionError(f"--regions: region {name!r} has no label values (expected e.g. '{name}=1,2')")
        try:
            regions[name] = [int(p) for p in parts]
        except ValueError:
            raise ConversionError(f"--regions: region {name!r}: label values must be integers separated by commas, "
                                  f"got {values.strip()!r}") from None
    return regions


def _checked_regions(regions: Mapping[str, int | Iterable[int]]) -> list[Region]:
    """Regions with their values checked one by one (the structure as a whole is checked by plan_regions)."""
    if not regions:
        raise ConversionError("--regions: give at least one region NAME=VALUE[,VALUE...]")
    checked = []
    for name, values in regions.items():
        name = str(name)
        if name in RESERVED_NAMES:
            raise ConversionError(f"--regions: {name!r} cannot be a region name (nnU-Net reserves it)")
        values = [values] if isinstance(values, (int, np.integer)) else list(values)
        if not values:
            raise ConversionError(f"--regions: region {name!r} has no label values")
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
            raise ConversionError(f"--regions: region {name!r}: label values must be integers, got {values}")
        if len(set(values)) != len(values):
            raise ConversionError(f"--regions: region {name!r} lists a label value twice: {values}")
        bad = [int(v) for v in values if v <= 0]
        if bad:
            raise ConversionError(f"--regions: region {name!r} contains {bad}; region values must be foreground "
                                  f"labels (>= 1; 0 is background)")
        checked.append(Region(name, tuple(sorted(int(v) for v in values))))
    return checked


def _check_structure(regions: Sequence[Region]) -> None:
    if all(len(region.values) == 1 for region in regions):
        raise ConversionError("--regions: every region has a single label value, so nnU-Net would train plain "
                              "labels (softmax) and ignore regions_class_order; use --labels NAME=VALUE instead")
    seen: dict[tuple[int, ...], str] = {}
    for region in regions:
        if region.values in seen:
            raise ConversionError(f"--regions: regions {seen[region.values]!r} and {region.name!r} contain the same "
                                  f"label values {list(region.values)}")
        seen[region.values] = region.name
    covered = sorted({v for region in regions for v in region.values})
    gaps = sorted(set(range(1, covered[-1] + 1)) - set(covered))
    if gaps:
        raise ConversionError(f"--regions: label value(s) {gaps} are in no region, but nnU-Net needs the regions "
                              f"to cover 1..{covered[-1]} without gaps (they cover {covered}); add them to a region, "
                              f"or renumber the label values with --label-map SOURCE=TARGET")


def _membership(value: int, regions: Sequence[Region]) -> frozenset[str]:
    return frozenset(region.name for region in regions if value in region.values)


def _painting_order(regions: Sequence[Region]) -> tuple[list[Region], list[int]]:
    """The greedy backward pass of the module docstring: (regions in painting order, value each one paints)."""
    values = sorted({v for region in regions for v in region.values})
    # membership -> the label values that have it (each membership needs a region that paints last for it)
    unplaced: dict[frozenset[str], list[int]] = {}
    for value in values:
        unplaced.setdefault(_membership(value, regions), []).append(value)
    remaining = list(regions)
    backwards: list[tuple[Region, int]] = []
    while remaining:
        eligible = [r for r in remaining if sum(r.name in m for m in unplaced) <= 1]
        if not eligible:
            clashes = ", ".join(
                f"{r.name!r} for " + " and ".join(",".join(map(str, sorted(unplaced[m]))) for m in unplaced
                                                  if r.name in m)
                for r in remaining)
            raise ConversionError(
                f"--regions: no painting order exists. nnU-Net paints the regions in order and later ones overwrite "
                f"earlier ones, so label values that lie in different sets of regions each need their own region "
                f"painted last; here each remaining region would have to be last for several: {clashes}. Add a "
                f"region that separates them or change the definitions")
        region = eligible[-1]  # the latest in the user's order: a valid user order is kept as given
        mine = [m for m in unplaced if region.name in m]
        if mine:
            painted = min(unplaced.pop(mine[0]))
        else:  # every value of this region is painted over by a later region: any value of it will do
            painted = min(region.values, key=lambda v: (len(_membership(v, regions)), v))
        backwards.append((region, painted))
        remaining.remove(region)
    backwards.reverse()
    return [r for r, _ in backwards], [v for _, v in backwards]


def painting_mismatches(labels: Mapping[str, int | Sequence[int]],
                        regions_class_order: Sequence[int]) -> list[str]:
    """Label values whose regions change after nnU-Net paints a perfect prediction (empty: the order is valid).

    Runs nnU-Net's own export code: one voxel per label value 0..N, every region's mask as its probability map,
    ``LabelManager.convert_probabilities_to_segmentation``, then nnU-Net's evaluation masks
    (``region_or_label_to_mask``) on the painted map compared with those of the true values.
    """
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(dict(labels), list(regions_class_order))
    if not manager.has_regions:
        return ["no entry of labels has several values, so nnU-Net trains plain labels and paints no regions"]
    truth = np.arange(max(manager.all_labels) + 1)
    masks = [region_or_label_to_mask(truth, region) for region in manager.foreground_regions]
    painted = np.asarray(manager.convert_probabilities_to_segmentation(np.stack(masks).astype(np.float32)))
    painted_masks = [region_or_label_to_mask(painted, region) for region in manager.foreground_regions]
    problems = []
    for value in truth:
        changed = [name for name, want, got in zip(_region_names(labels), masks, painted_masks)
                   if want[value] != got[value]]
        if changed:
            problems.append(f"value {value} is painted {painted[value]}, which changes region(s) {changed}")
    return problems


def _region_names(labels: Mapping[str, int | Sequence[int]]) -> list[str]:
    """Foreground region names in nnU-Net's order (LabelManager skips 'ignore' and all-background entries)."""
    def background_only(value: int | Sequence[int]) -> bool:
        return all(int(v) == 0 for v in (value if isinstance(value, (list, tuple)) else [value]))

    return [name for name, value in labels.items() if name != "ignore" and not background_only(value)]


def plan_regions(regions: Mapping[str, int | Iterable[int]]) -> RegionPlan:
    """Check region definitions (name -> label values, in the user's order) and derive the painting order.

    Raises:
        ConversionError: naming the region and what was expected: no regions, a reserved name, an empty region,
            values that are not positive integers or repeat, two regions with the same values, only single-value
            regions (nnU-Net would not train regions), label values 1..N not all covered, or no valid painting order.
    """
    checked = _checked_regions(regions)
    _check_structure(checked)
    ordered, class_order = _painting_order(checked)
    if [r.name for r in ordered] != [r.name for r in checked]:
        warn(f"--regions: painting order changed to {[r.name for r in ordered]} (nnU-Net paints regions in "
             f"dataset.json order and later ones overwrite earlier ones; in the given order a region would be "
             f"painted over); the network's output channels follow this order")
    plan = RegionPlan(tuple(ordered), tuple(class_order))
    problems = painting_mismatches(plan.dataset_labels(), plan.class_order)
    if problems:  # cannot happen if _painting_order is right; nnU-Net's own code has the last word
        raise ConversionError(f"--regions: derived regions_class_order {list(plan.class_order)} fails nnU-Net's "
                              f"painting: {'; '.join(problems)}")
    return plan


class RegionLabelConverter(LabelConverter):
    """A :class:`LabelConverter` whose label files keep their values and whose ``dataset.json`` declares regions.

    A value in a label file that no region contains is an error naming the file (nnU-Net would reject it). After
    the last file, a value of some region that no converted file contains is a warning, and a region without any
    voxel in them is an error (its output would be trained on empty targets only).
    """

    def __init__(self, plan: RegionPlan, value_map: Mapping[int, int] | None = None) -> None:
        super().__init__(None, value_map)
        self.plan = plan

    def allowed_values(self) -> set[int] | None:
        return {0, *self.plan.label_values}

    def undeclared_values_message(self, where: str, unexpected: list[int]) -> str:
        return (f"{where}: label values {unexpected} are in no region ({self.plan.describe()}); add them to a region "
                f"(--regions) or map them first (--label-map {unexpected[0]}=0 makes them background)")

    def dataset_json_entries(self) -> dict:
        empty = [r.name for r in self.plan.regions if not set(r.values) & self.seen]
        if empty:
            raise ConversionError(f"--regions: region(s) {empty} have no voxel in any converted label file (values "
                                  f"found: {sorted(self.seen)}); check the values (after --label-map)")
        absent = [v for v in self.plan.label_values if v not in self.seen]
        if absent:
            warn(f"--regions: label value(s) {absent} occur in no converted label file")
        return {"labels": self.plan.dataset_labels(), "regions_class_order": list(self.plan.class_order)}
