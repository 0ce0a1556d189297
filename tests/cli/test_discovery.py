"""Stock nnU-Net finds our trainers from the installed package, in a fresh process."""
from __future__ import annotations

import ast
import os
import subprocess
import textwrap
from pathlib import Path

import nnunetv2
import pytest
from helpers_cli import TEST_TRAINERS_DIR, console_script
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.cli import build_parser
from nnunet_ext.compat import builder_signature_is_supported
from nnunet_ext.discovery import env_lines, ext_trainer_path, shipped_trainer_names, trainers_dir
from nnunet_ext.training.base_trainer import ExtTrainerBase


def builtin_trainer_names() -> set[str]:
    root = Path(nnunetv2.__file__).parent / "training" / "nnUNetTrainer"
    return {node.name for path in root.rglob("*.py")
            for node in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(node, ast.ClassDef)}


def test_env_path_is_the_installed_trainers_folder():
    out = subprocess.run([console_script("nnunet-ext"), "env", "--path"], capture_output=True, text=True, check=True)
    folder = Path(out.stdout.strip())
    assert folder == trainers_dir() and folder.is_dir() and (folder / "__init__.py").exists()


def test_env_keeps_other_folders_and_puts_ours_first(tmp_path):
    value = ext_trainer_path(os.pathsep.join([str(tmp_path), str(trainers_dir())]))
    assert value.split(os.pathsep) == [str(trainers_dir()), str(tmp_path)]
    assert env_lines("sh", existing="")[0] == f"export nnUNet_extTrainer='{trainers_dir()}'"
    assert env_lines("cmd", existing="")[0].startswith('set "nnUNet_extTrainer=')


def test_fresh_shell_eval_env_then_nnunet_lookup(tmp_path):
    """eval "$(nnunet-ext env)" then nnU-Net's own lookup, for shipped trainers and a second (test) folder."""
    names = shipped_trainer_names() + ["ExtSmokeTrainer"]
    script = textwrap.dedent(f"""
        import os, sys
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        dirs = [os.path.abspath(p) for p in os.environ["nnUNet_extTrainer"].split(os.pathsep)]
        for name in {names!r}:
            cls = recursive_find_trainer_class_by_name(name)
            assert cls.__name__ == name, (cls, name)
            # modules imported by nnU-Net as top-level names; the installed package nnunet_ext_trainers (which test
            # fixtures and generated budget trainers import on purpose) is not a leak
            leaked = [m for m, mod in sys.modules.items() if not m.startswith("nnunet_ext_trainers")
                      and any(str(getattr(mod, "__file__", "") or "").startswith(d + os.sep) for d in dirs)]
            assert not leaked, leaked  # nnU-Net evicts what it imported from the folders
            assert recursive_find_trainer_class_by_name(name).__name__ == name  # a second lookup works
        print("FOUND", len({names!r}))
    """)
    (tmp_path / "lookup.py").write_text(script)
    python = Path(console_script("nnunet-ext")).parent / "python"
    shell = (f'eval "$({console_script("nnunet-ext")} env)" && '
             f'export nnUNet_extTrainer="$nnUNet_extTrainer:{TEST_TRAINERS_DIR}" && "{python}" "{tmp_path}/lookup.py"')
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"FOUND {len(names)}" in out.stdout


def test_shipped_trainer_names_never_clash_with_nnunet():
    builtins = builtin_trainer_names()
    assert "nnUNetTrainer" in builtins  # the scan itself works
    clashes = set(shipped_trainer_names()) & builtins
    assert not clashes, f"trainer names also defined by nnU-Net (nnU-Net's would win): {clashes}"


def test_builder_signature_era_guard():
    # nnU-Net dispatches on a parameter named plans_manager; a fourth signature era must fail this test
    assert builder_signature_is_supported(nnUNetTrainer.build_network_architecture)
    assert builder_signature_is_supported(ExtTrainerBase.build_network_architecture)
    assert not builder_signature_is_supported(lambda architecture_class_name, arch_init_kwargs: None)


def test_help_documents_every_command():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"env", "doctor", "plan", "preprocess-unlabeled", "configure", "demo-data", "demo"} <= set(commands)
    out = subprocess.run([console_script("nnunet-ext"), "--help"], capture_output=True, text=True, check=True)
    for name, sub in commands.items():
        assert name in out.stdout
        assert sub.description, f"nnunet-ext {name} has no description"


def test_doctor_reports_each_trainer(tmp_path):
    env = {**os.environ, **{var: str(tmp_path) for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    out = subprocess.run([console_script("nnunet-ext"), "doctor"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "nnunetv2 2.8" in out.stdout
    for name in shipped_trainer_names():
        assert f"ok   {name}" in out.stdout


@pytest.mark.parametrize("argv", [["plan"], ["preprocess-unlabeled"], ["configure", "bogus", "-d", "1"],
                                  ["configure", "ciml"], ["bogus"]])
def test_bad_command_lines_fail_early(argv):
    out = subprocess.run([console_script("nnunet-ext"), *argv], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_configure_errors_are_messages_not_tracebacks(tmp_path):
    env = {**os.environ, "nnUNet_preprocessed": str(tmp_path)}
    (tmp_path / "Dataset001_X").mkdir()
    out = subprocess.run([console_script("nnunet-ext"), "configure", "caml", "-d", "Dataset001_X"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "plan the dataset first" in out.stderr, out.stderr
