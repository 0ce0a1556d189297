"""The tabular sidecar as configured, one copy per plans identifier, and the check that its source is unchanged.

``configure cfcml`` resolves the schema from the raw ``tabular.csv``/``tabular.json`` and copies both to
``nnUNet_preprocessed/<Dataset>/tabular/<plans identifier>/`` (training never needs ``nnUNet_raw``; a second
plans identifier gets its own copy instead of replacing the first one's). The CFCML block records the copy and the
sources' sha256 under ``"table"``. When the trainer starts (and when ``predict-cls`` reads its default table) a
source that differs from the recorded hash stops with the command that configures again (issue 17.3): otherwise
edits of the raw table would be ignored without a word.

Plans configured before this record existed used one shared copy ``nnUNet_preprocessed/<Dataset>/tabular.csv``;
they keep working and are checked against that copy's hash.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

from nnunet_ext.cfcml.tabular import TABULAR_CSV, TABULAR_JSON, TabularDataError
from nnunet_ext.io_checks import file_sha256

TABLE_RECORD_KEY = "table"
CONFIGURED_TABLES_DIR = "tabular"


def sha256_of(path: str | os.PathLike | None) -> str | None:
    """Hex sha256 of a file's bytes (None for no file)."""
    if path is None or not os.path.isfile(path):
        return None
    return file_sha256(path)


def configured_folder(preprocessed_folder: str, plans_name: str) -> str:
    """``nnUNet_preprocessed/<Dataset>/tabular/<plans_name>``."""
    return os.path.join(preprocessed_folder, CONFIGURED_TABLES_DIR, plans_name)


def _copy_replacing(source: str, target: str) -> None:
    # through a temporary name (per process: DDP ranks may resolve at once): a reader never sees half a table
    temporary = f"{target}.{os.getpid()}.partial"
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def write_configured_copy(preprocessed_folder: str, plans_name: str, csv_path: str, json_path: str | None,
                          source_plans: str | None) -> dict[str, Any]:
    """Copy the sidecars into :func:`configured_folder` and return the block's ``"table"`` record.

    Args:
        source_plans: the plans identifier ``configure`` derived from (for the re-run command); None when the
            trainer resolved its own plans.
    """
    folder = configured_folder(preprocessed_folder, plans_name)
    os.makedirs(folder, exist_ok=True)
    _copy_replacing(csv_path, os.path.join(folder, TABULAR_CSV))
    json_copy = os.path.join(folder, TABULAR_JSON)
    if json_path:
        _copy_replacing(json_path, json_copy)
    elif os.path.isfile(json_copy):
        os.remove(json_copy)  # our own copy from an earlier configure: the source has no tabular.json any more
    relative = os.path.relpath(folder, preprocessed_folder)
    return {"csv": os.path.join(relative, TABULAR_CSV), "json": os.path.join(relative, TABULAR_JSON) if json_path
            else None, "csv_sha256": sha256_of(csv_path), "json_sha256": sha256_of(json_path),
            "source_plans": source_plans}


def configured_csv(block: Mapping[str, Any], preprocessed_folder: str) -> str:
    """The table these plans were configured with (the shared legacy copy for plans without a record)."""
    record = block.get(TABLE_RECORD_KEY)
    return os.path.join(preprocessed_folder, record["csv"] if record else TABULAR_CSV)


def configure_command(dataset_name: str, plans_name: str, source_plans: str | None) -> str:
    source = source_plans or "SOURCE_PLANS"
    return f"nnunet-ext configure cfcml -d {dataset_name} -p {source} -o {plans_name} --overwrite"


def changed_source(block: Mapping[str, Any], preprocessed_folder: str,
                   raw_folder: str | None) -> tuple[str, str] | None:
    """``(source file, recorded copy)`` of the first sidecar (csv, then json) whose source differs from what the
    plans were configured with; None when unchanged or when no source is at hand (training from the copy)."""
    from nnunet_ext.cfcml.configure import locate_sidecars

    record = block.get(TABLE_RECORD_KEY)
    if record is None:  # configured before the record: compare with the shared copy, if there is one
        legacy = os.path.join(preprocessed_folder, TABULAR_CSV)
        if not os.path.isfile(legacy):
            return None
        legacy_json = os.path.join(preprocessed_folder, TABULAR_JSON)
        record = {"csv": TABULAR_CSV, "json": TABULAR_JSON, "csv_sha256": sha256_of(legacy),
                  "json_sha256": sha256_of(legacy_json)}
    try:
        csv_path, json_path = locate_sidecars(preprocessed_folder, raw_folder)
    except FileNotFoundError:
        return None
    if sha256_of(csv_path) != record["csv_sha256"]:
        return csv_path, os.path.join(preprocessed_folder, record["csv"])
    if sha256_of(json_path) != record.get("json_sha256"):
        source = json_path or os.path.join(os.path.dirname(csv_path), TABULAR_JSON)
        return source, os.path.join(preprocessed_folder, os.path.dirname(record["csv"]), TABULAR_JSON)
    return None


def require_unchanged_source(block: Mapping[str, Any], preprocessed_folder: str, raw_folder: str | None,
                             dataset_name: str, plans_name: str) -> None:
    """Stop training when the raw sidecar changed since ``configure`` (the schema and copy would be stale).

    Raises:
        TabularDataError: naming the changed file and the exact ``configure`` command to run again.
    """
    changed = changed_source(block, preprocessed_folder, raw_folder)
    if changed is None:
        return
    source, copy = changed
    record = block.get(TABLE_RECORD_KEY) or {}
    state = "was added or removed" if not (os.path.isfile(source) and os.path.isfile(copy)) else "changed"
    raise TabularDataError(
        f"{source} {state} since plans {plans_name!r} were configured (they use the copy {copy}); configure again "
        f"so that the schema, splits check and copy follow the edit: "
        f"{configure_command(dataset_name, plans_name, record.get('source_plans'))}")
