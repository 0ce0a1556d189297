"""Reproducible labeled / unlabeled / test splits for the converters (``--labeled``, ``--test``, ``--seed``).

A split assigns every *labelled* source case to exactly one of

* ``labeled``: ``imagesTr`` + ``labelsTr`` (what nnU-Net trains and cross-validates on);
* ``unlabeled``: ``imagesUnlabeled`` (the label is dropped; semi-supervised trainers use the image);
* ``test``: ``imagesTs`` + ``labelsTs`` (held out).

Source images without any label are not part of the split: they always go to ``imagesUnlabeled``.

The split is written to ``split.json`` in the dataset folder. Passing that file back (``--split-file``) reproduces
it exactly, or, with ``--labeled all``, keeps the same test cases and labels every other case: the pair
"semi-supervised dataset" / "fully supervised upper bound" of a benchmark.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ext.errors import InputError

SPLIT_FILE_NAME = "split.json"
SPLIT_FORMAT_VERSION = 1
ALL = "all"
RANDOM_ORDER, LIST_ORDER = "random", "list"
LABELED_ORDERS = (RANDOM_ORDER, LIST_ORDER)


class SplitError(InputError):
    """An impossible or inconsistent split request."""


@dataclass(frozen=True)
class CountRequest:
    """``N`` cases, a ``FRACTION`` of the candidates, or ``all`` of them (parsed from the command line).

    ``"20"`` is a count, ``"0.1"`` a fraction (``0 < f <= 1``; ``1.0`` means all), ``"all"`` everything.
    """

    count: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str | int | float | None, option: str) -> CountRequest | None:
        if text is None:
            return None
        if isinstance(text, CountRequest):
            return text
        raw = str(text).strip().lower()
        if raw == ALL:
            return cls(fraction=1.0)
        try:
            count = int(raw)
        except ValueError:
            count = None
        if count is not None:
            if count < 0:
                raise SplitError(f"{option}: a count must be >= 0, got {text!r}")
            return cls(count=count)
        try:
            fraction = float(raw)
        except ValueError:
            raise SplitError(f"{option}: expected a count (e.g. 20), a fraction in (0, 1] (e.g. 0.1) or 'all', "
                             f"got {text!r}") from None
        if not 0.0 < fraction <= 1.0 or math.isnan(fraction):
            raise SplitError(f"{option}: a fraction must be in (0, 1], got {text!r}")
        return cls(fraction=fraction)

    @property
    def is_all(self) -> bool:
        return self.fraction == 1.0

    def resolve(self, available: int, option: str) -> int:
        """Number of cases out of ``available``; fractions round to the nearest integer (at least 1)."""
        if self.count is not None:
            if self.count > available:
                raise SplitError(f"{option}: asked for {self.count} cases but only {available} are available")
            return self.count
        if available == 0:
            return 0
        return min(available, max(1, int(round(self.fraction * available))))

    def describe(self) -> str:
        if self.count is not None:
            return str(self.count)
        return ALL if self.is_all else repr(self.fraction)


@dataclass
class Split:
    """Case identifiers per part, sorted. ``unlabeled_only`` are source images that never had a label."""

    labeled: list[str]
    unlabeled: list[str]
    test: list[str]
    unlabeled_only: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def part_of(self, case: str) -> str:
        for name in ("labeled", "unlabeled", "test", "unlabeled_only"):
            if case in getattr(self, name):
                return name
        raise KeyError(case)

    def to_json(self) -> dict:
        return {"format_version": SPLIT_FORMAT_VERSION, **self.info, "labeled": self.labeled,
                "unlabeled": self.unlabeled, "test": self.test, "unlabeled_only": self.unlabeled_only}


def stratified_choice(cases: Sequence[str], n: int, rng: np.random.Generator,
                      strata: Mapping[str, str] | None = None) -> list[str]:
    """Choose ``n`` of ``cases`` at random; with ``strata`` (case -> class) keep class proportions.

    Per-class counts use largest-remainder rounding of ``n * class_size / total``, so the chosen set mirrors the
    class distribution as closely as integers allow. Deterministic for a given ``rng`` state and case set (cases
    are sorted first, so the input order does not matter).
    """
    ordered = sorted(cases)
    if n > len(ordered):
        raise SplitError(f"cannot choose {n} of {len(ordered)} cases")
    if strata is None:
        return sorted(ordered[i] for i in rng.permutation(len(ordered))[:n])
    groups: dict[str, list[str]] = {}
    for case in ordered:
        groups.setdefault(strata[case], []).append(case)
    names = sorted(groups)
    exact = [n * len(groups[g]) / len(ordered) for g in names]
    counts = [int(math.floor(e)) for e in exact]
    # Hand out the remaining picks to the largest remainders (ties: larger class first, then name).
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), -len(groups[names[i]]), names[i]))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    chosen: list[str] = []
    for name, count in zip(names, counts):
        members = groups[name]
        chosen.extend(members[i] for i in rng.permutation(len(members))[:count])
    return sorted(chosen)


def make_split(labelled_cases: Sequence[str], *, labeled: CountRequest | str | None = None,
               test: CountRequest | str | None = None, seed: int = 0, strata: Mapping[str, str] | None = None,
               fixed_test: Sequence[str] | None = None, fixed_train: Sequence[str] | None = None,
               unlabeled_only: Sequence[str] = (), previous: Mapping | None = None,
               labeled_order: str = RANDOM_ORDER, groups: Mapping[str, str] | None = None,
               group_name: str = "group") -> Split:
    """Split the labelled cases into labeled / unlabeled / test.

    Args:
        labelled_cases: every case that has a label in the source.
        labeled: how many of the training pool keep their label (default: all).
        test: how many labelled cases are held out (default: none). Chosen first, from all labelled cases.
        seed: seed of the random choices (``numpy.random.default_rng``).
        strata: optional case -> class name; the test and labeled choices are then stratified by class.
        fixed_test / fixed_train: a split given by the source (``test.list``/``train.list``): test cases are
            taken as given and the training pool is ``fixed_train`` (cases in neither are left out and recorded
            under ``"not_in_lists"``). ``test`` must then be None.
        unlabeled_only: images without labels (recorded, always unlabeled).
        previous: the content of an earlier ``split.json``: its test cases are reused and its labeled cases too
            unless ``labeled`` is ``all``. ``test`` must then be None and the case sets must match.
        labeled_order: ``random`` draws the labelled cases (seeded); ``list`` takes the first ones in the order of
            ``fixed_train`` (UA-MT, CAML and SSL4MIS label the first N entries of ``train.list``).
        groups: optional case -> group (e.g. ACDC patient, whose ED and ES frames are two cases): ``labeled`` and
            ``test`` then count groups, and a group's cases always stay together. The chosen groups are recorded
            as ``labeled_<group_name>s``, ``unlabeled_<group_name>s`` and ``test_<group_name>s``.

    Raises:
        SplitError: conflicting options, unknown cases or impossible counts (the message says which).
    """
    labeled_request = CountRequest.parse(labeled, "--labeled") if not isinstance(labeled, CountRequest) else labeled
    test_request = CountRequest.parse(test, "--test") if not isinstance(test, CountRequest) else test
    cases = sorted(set(labelled_cases))
    if len(cases) != len(labelled_cases):
        raise SplitError("duplicate case identifiers in the source")
    rng = np.random.default_rng(seed)
    info: dict = {"seed": seed, "labeled_request": labeled_request.describe() if labeled_request else ALL,
                  "test_request": test_request.describe() if test_request else "0"}

    if labeled_order not in LABELED_ORDERS:
        raise SplitError(f"--labeled-order must be one of {LABELED_ORDERS}, got {labeled_order!r}")
    if previous is not None:
        if labeled_order == LIST_ORDER:
            raise SplitError("--labeled-order list cannot be combined with --split-file (the split file fixes the "
                             "labelled cases)")
        if test_request is not None:
            raise SplitError("--test cannot be combined with --split-file (the split file fixes the test cases)")
        if fixed_test is not None:
            raise SplitError("a split file and the source's list files were both given; use one")
        prev_parts = {k: sorted(previous.get(k, [])) for k in ("labeled", "unlabeled", "test")}
        known = set().union(*prev_parts.values())
        missing = sorted(known - set(cases))
        extra = sorted(set(cases) - known)
        if missing or extra:
            raise SplitError(f"split file does not match the source: cases in the split file without a labelled "
                             f"source case: {missing[:10]}; labelled source cases not in the split file: "
                             f"{extra[:10]}")
        test_cases = prev_parts["test"]
        pool = prev_parts["labeled"] + prev_parts["unlabeled"]
        if labeled_request is None:
            labeled_cases = prev_parts["labeled"]
        elif labeled_request.is_all:
            labeled_cases = sorted(pool)
        else:
            raise SplitError("with --split-file, --labeled must be omitted (reuse the file's labeled cases) or 'all'")
        info.update({"derived_from_split": {"seed": previous.get("seed"),
                                            "labeled_request": previous.get("labeled_request")},
                     "seed": previous.get("seed", seed)})
        info["labeled_request"] = labeled_request.describe() if labeled_request else "as in split file"
        info["test_request"] = "as in split file"
        split = Split(labeled=sorted(labeled_cases), unlabeled=sorted(set(pool) - set(labeled_cases)),
                      test=test_cases, unlabeled_only=sorted(unlabeled_only), info=info)
        if groups is not None:
            _record_groups(split, groups, group_name)
        return split

    # With ``groups`` every choice is made over groups (patients), so no group is split between parts.
    unit_of = dict(groups) if groups is not None else {c: c for c in cases}
    missing_group = sorted(set(cases) - set(unit_of))
    if missing_group:
        raise SplitError(f"cases without a group: {missing_group[:10]}")

    def members(units: Sequence[str]) -> list[str]:
        chosen = set(units)
        return sorted(c for c in cases if unit_of[c] in chosen)

    def units_in_order(ordered_cases: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(unit_of[c] for c in ordered_cases))

    unit_strata = strata if groups is None else None
    if labeled_order == LIST_ORDER and fixed_train is None:
        raise SplitError("--labeled-order list takes the first cases of the source's train.list, but no train.list "
                         "is used here (none found, or --ignore-lists): use --labeled-order random")
    if fixed_test is not None or fixed_train is not None:
        if test_request is not None:
            raise SplitError("--test cannot be combined with the source's list files (train.list/test.list); pass "
                             "--ignore-lists for a random split")
        test_cases = sorted(set(fixed_test or ()))
        unknown = sorted((set(test_cases) | set(fixed_train or ())) - set(cases))
        if unknown:
            raise SplitError(f"list files name cases that have no labelled source case: {unknown[:10]}")
        # Keep the list's order: --labeled-order list takes its first entries.
        pool_in_order = [c for c in dict.fromkeys(fixed_train if fixed_train is not None else cases)
                         if c not in set(test_cases)]
        left_out = sorted(set(cases) - set(pool_in_order) - set(test_cases))
        if left_out:
            info["not_in_lists"] = left_out
        info["test_request"] = "from list files"
    else:
        units = sorted(set(unit_of.values()))
        n_test = test_request.resolve(len(units), "--test") if test_request else 0
        if n_test >= len(units):
            raise SplitError(f"--test {test_request.describe()} leaves no training case out of {len(units)}")
        test_cases = members(stratified_choice(units, n_test, rng, unit_strata))
        pool_in_order = sorted(set(cases) - set(test_cases))
    if not pool_in_order:
        raise SplitError("no training case left")
    test_units = {unit_of[c] for c in test_cases}
    shared = sorted(test_units & {unit_of[c] for c in pool_in_order})
    if groups is not None and shared:
        raise SplitError(f"{group_name}(s) {shared[:10]} have cases in both the test and the training lists")
    pool_units = units_in_order(pool_in_order)
    n_labeled = labeled_request.resolve(len(pool_units), "--labeled") if labeled_request else len(pool_units)
    if n_labeled < 1:
        raise SplitError("--labeled must keep at least one labelled training case")
    if n_labeled == len(pool_units):
        labeled_units = pool_units
    elif labeled_order == LIST_ORDER:
        labeled_units = pool_units[:n_labeled]
    else:
        labeled_units = stratified_choice(pool_units, n_labeled, rng, unit_strata)
    labeled_cases = sorted(c for c in pool_in_order if unit_of[c] in set(labeled_units))
    info["labeled_order"] = labeled_order
    split = Split(labeled=labeled_cases, unlabeled=sorted(set(pool_in_order) - set(labeled_cases)),
                  test=sorted(test_cases), unlabeled_only=sorted(unlabeled_only), info=info)
    if groups is not None:
        _record_groups(split, unit_of, group_name)
    return split


def _record_groups(split: Split, groups: Mapping[str, str], group_name: str) -> None:
    """Add ``grouped_by`` and ``<part>_<group_name>s`` (sorted group names per part) to ``split.info``.

    Raises:
        SplitError: a group has cases in two parts (e.g. a split file that separates a patient's frames).
    """
    parts = {part: sorted({groups[c] for c in getattr(split, part)}) for part in ("labeled", "unlabeled", "test")}
    for first, second in (("labeled", "unlabeled"), ("labeled", "test"), ("unlabeled", "test")):
        shared = sorted(set(parts[first]) & set(parts[second]))
        if shared:
            raise SplitError(f"{group_name}(s) {shared[:10]} have cases in both {first} and {second}; all cases "
                             f"of a {group_name} must stay together")
    split.info["grouped_by"] = group_name
    split.info.update({f"{part}_{group_name}s": names for part, names in parts.items()})


def load_split_file(path: str | Path) -> dict:
    """Read a ``split.json`` written by a converter (checks its structure)."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SplitError(f"split file {path} is not valid JSON: {e}") from None
    if not isinstance(content, dict) or not all(isinstance(content.get(k), list) for k in ("labeled", "test")):
        raise SplitError(f"split file {path}: expected a JSON object with lists 'labeled', 'unlabeled' and 'test' "
                         f"(as written by nnunet-ext convert)")
    content.setdefault("unlabeled", [])
    overlap = (set(content["labeled"]) & set(content["test"])) | (set(content["unlabeled"]) & set(content["test"]))
    if overlap:
        raise SplitError(f"split file {path}: cases in both training and test: {sorted(overlap)[:10]}")
    return content


def read_list_file(path: str | Path) -> list[str]:
    """Case names of a ``train.list``/``test.list`` (one per line; blank lines ignored)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
