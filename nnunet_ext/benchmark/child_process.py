"""Run a child process with its output in a log file, reporting progress while it runs.

One machinery for ``nnunet-ext benchmark``, ``benchmark-cls`` and ``demo``: the full output of the child stays in
its log file; the caller sees the new log lines as they arrive (``on_line``, e.g. to turn nnU-Net's epoch lines
into one progress line) and a heartbeat whenever nothing was reported for ``heartbeat_seconds``.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def last_line(path: Path) -> str:
    """The last non-empty line of a (growing) log file, or '' if it has none or cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else ""
    except OSError:
        return ""


class _LineReader:
    """Complete lines appended to a file since the last call (a partial last line waits for its end)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.pending = ""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        # tqdm redraws with carriage returns: each redraw counts as a line
        text = (self.pending + chunk.decode(errors="replace")).replace("\r", "\n")
        lines = text.split("\n")
        self.pending = lines.pop()
        return lines


def run_logged(cmd: list[str], env: dict[str, str], log_file: Path, heartbeat_seconds: float,
               on_heartbeat: Callable[[str], None], on_line: Callable[[str], bool] | None = None,
               poll_seconds: float = 1.0) -> int:
    """Run ``cmd`` with stdout and stderr appended to ``log_file``; returns its exit code.

    Args:
        heartbeat_seconds: call ``on_heartbeat(last log line)`` after this long without a report.
        on_line: called with every new log line while the child runs (and after it ended); returns True when it
            reported something, which restarts the heartbeat clock. Without it the log is not read.
        poll_seconds: how often new lines are read (only with ``on_line``).

    Ctrl-C (or any exception) stops the child before it propagates.
    """
    if heartbeat_seconds <= 0:
        raise ValueError(f"heartbeat_seconds must be positive, got {heartbeat_seconds}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        log.write(f"+ {shlex.join(cmd)}\n")
        log.flush()
        reader = _LineReader(log_file) if on_line is not None else None
        wait = heartbeat_seconds if reader is None else min(poll_seconds, heartbeat_seconds)
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        last_report = time.monotonic()
        try:
            while True:
                try:
                    code = process.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    code = None
                if reader is not None:
                    for line in reader.new_lines():
                        if on_line(line):
                            last_report = time.monotonic()
                if code is not None:
                    return code
                if time.monotonic() - last_report >= heartbeat_seconds:
                    on_heartbeat(last_line(log_file))
                    last_report = time.monotonic()
        except BaseException:  # Ctrl-C: stop our child, then re-raise
            process.terminate()
            process.wait()
            raise
