"""Where the installed trainers live, and how nnU-Net finds them.

nnU-Net 2.8 looks up trainers it does not ship in the folders named by ``nnUNet_extTrainer`` (``os.pathsep``
separated), importing each module there as a top-level module and evicting it afterwards.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

TRAINERS_PACKAGE = "nnunet_ext_trainers"
PLANNERS_PACKAGE = "nnunet_ext_planners"
ENV_VAR = "nnUNet_extTrainer"


def package_dir(package: str) -> Path:
    """Folder of an installed package (works for wheels and editable installs)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package} is not installed; reinstall nnunet-ext (pip install nnunet-ext)")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def trainers_dir() -> Path:
    """The installed ``trainers/`` folder, the one ``nnUNet_extTrainer`` must point at."""
    return package_dir(TRAINERS_PACKAGE)


def shipped_trainers() -> dict[str, str]:
    """``{trainer class name: module name}`` for the installed trainer files, read without importing them."""
    modules = {}
    for path in sorted(trainers_dir().glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        modules.update({node.name: path.stem for node in tree.body if isinstance(node, ast.ClassDef)})
    return modules


def shipped_trainer_names() -> list[str]:
    """Names of the trainer classes in the installed trainer files."""
    return list(shipped_trainers())


def ext_trainer_path(existing: str | None = None) -> str:
    """Value for ``nnUNet_extTrainer``: our trainers folder first, then any other folders already set."""
    ours = str(trainers_dir())
    others = [p for p in (existing or "").split(os.pathsep) if p and os.path.abspath(p) != ours]
    return os.pathsep.join([ours, *others])


def env_lines(shell: str = "sh", existing: str | None = None) -> list[str]:
    """Shell lines that make stock ``nnUNetv2_train``/``nnUNetv2_predict`` find our trainers."""
    value = ext_trainer_path(os.environ.get(ENV_VAR) if existing is None else existing)
    if shell == "cmd":
        return [f'set "{ENV_VAR}={value}"']
    if shell == "powershell":
        return [f'$env:{ENV_VAR} = "{value}"']
    if shell == "fish":
        return [f"set -gx {ENV_VAR} '{value}'"]
    quoted = value.replace("'", "'\"'\"'")
    return [f"export {ENV_VAR}='{quoted}'"]
