"""The one error type for bad user input.

Every command checks its inputs before it does any work; a problem found there is raised as an
:class:`InputError` (or a subclass) whose message names the file, case or option and what was expected.
``nnunet-ext`` prints it as one line, ``nnunet-ext <command>: error: <message>``, and exits with code 2, without a
traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input for a command: the message names the file, case or option and what was expected."""
