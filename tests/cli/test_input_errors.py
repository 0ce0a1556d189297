"""Bad input reaches the user as one line and exit code 2; a bug keeps its traceback."""
from __future__ import annotations

import pytest

import nnunet_ext.cli as cli
from nnunet_ext.benchmark.runner import BenchmarkError
from nnunet_ext.cfcml.tabular import TabularDataError
from nnunet_ext.conversion.common import ConversionError
from nnunet_ext.conversion.splits import SplitError
from nnunet_ext.errors import InputError
from nnunet_ext.ssl.unlabeled_preprocessing import UnlabeledDataError


@pytest.mark.parametrize("error_type", [InputError, ConversionError, SplitError, TabularDataError, UnlabeledDataError,
                                        BenchmarkError])
def test_input_error_is_one_line_and_exit_2(monkeypatch, capsys, error_type):
    def failing_command(args):
        raise error_type("case_007.nii.gz: expected 2 channels, found 1")

    monkeypatch.setattr(cli, "_cmd_env", failing_command)
    assert cli.main(["env"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "nnunet-ext env: error: case_007.nii.gz: expected 2 channels, found 1\n"
    assert captured.out == ""


def test_other_errors_keep_their_traceback(monkeypatch):
    def buggy_command(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_cmd_env", buggy_command)
    with pytest.raises(ZeroDivisionError):
        cli.main(["env"])


def test_existing_input_error_types_stay_value_errors():
    # callers that caught ValueError (or RuntimeError for the benchmark) keep working
    assert issubclass(ConversionError, ValueError) and issubclass(BenchmarkError, RuntimeError)
