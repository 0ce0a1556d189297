"""Progress lines of ``nnunet-ext demo``: one line per training epoch, with estimates of the time left.

``nnUNetv2_train`` logs each epoch as ``Epoch N``, ``train_loss X`` ... ``Epoch time: S s`` (each line after a
timestamp). :class:`EpochLogParser` turns those lines into :class:`EpochReport` s, and :class:`DemoProgress`
prints them as, e.g.::

    [run 2/5 CAMLTrainer] epoch 3/5  loss -0.412  elapsed 0:41  run left ~1:05  demo left ~4:30

The estimates are simple on purpose: the run's mean epoch time times the epochs left (less the time the current
epoch has been running), plus the mean time that
finished runs needed after training (prediction, evaluation); each run not yet started is assumed to take as
long as the finished runs did on average (the current run's projection while none has finished).
"""
from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

_EPOCH_START = re.compile(r"(?:^|: )Epoch (\d+)\s*$")
_TRAIN_LOSS = re.compile(r"(?:^|: )train_loss (\S+)\s*$")
_EPOCH_TIME = re.compile(r"(?:^|: )Epoch time: ([0-9.]+) s\s*$")


def format_duration(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from one hour on); negative values count as zero."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class EpochReport:
    """One finished nnU-Net epoch: ``epoch`` counts from 0 as in nnU-Net's log; ``loss`` may be missing."""

    epoch: int
    loss: float | None
    seconds: float


class EpochLogParser:
    """Reads ``nnUNetv2_train`` output line by line; :meth:`feed` returns a report when an epoch ends."""

    def __init__(self) -> None:
        self._epoch: int | None = None
        self._loss: float | None = None

    def feed(self, line: str) -> EpochReport | None:
        line = line.rstrip()
        if match := _EPOCH_START.search(line):
            self._epoch, self._loss = int(match.group(1)), None
        elif match := _TRAIN_LOSS.search(line):
            try:
                self._loss = float(match.group(1))
            except ValueError:
                self._loss = None
        elif (match := _EPOCH_TIME.search(line)) and self._epoch is not None:
            report = EpochReport(self._epoch, self._loss, float(match.group(1)))
            self._epoch, self._loss = None, None
            return report
        return None


class DemoProgress:
    """Prints the demo's progress: steps, one line per epoch of each run, heartbeats while a step runs.

    Args:
        n_runs: trainings in the demo (stock plus our trainers).
        epochs: epochs of each training.
        clock: seconds (monotonic); replaceable in tests.
        out: where lines go (``print`` with flush by default).
    """

    def __init__(self, n_runs: int, epochs: int, clock: Callable[[], float] = time.monotonic,
                 out: Callable[[str], None] | None = None) -> None:
        self.n_runs, self.epochs = n_runs, epochs
        self.clock = clock
        self.out = out or (lambda line: print(line, flush=True))
        self.start = clock()
        self.run_index = 0
        self.run_name = ""
        self.run_start = self.start
        self.train_end: float | None = None
        self.epoch_seconds: list[float] = []
        self.epochs_done = 0
        self.last_epoch_end = self.start
        self.finished_totals: list[float] = []
        self.finished_after_training: list[float] = []
        self.parser = EpochLogParser()

    # ------------------------------------------------------------------ estimates
    def _after_training_estimate(self) -> float:
        return statistics.mean(self.finished_after_training) if self.finished_after_training else 0.0

    def run_left(self) -> float | None:
        """Seconds left in the current run, or None before its first epoch ended."""
        if self.train_end is not None:
            return max(0.0, self._after_training_estimate() - (self.clock() - self.train_end))
        if not self.epoch_seconds:
            return None
        epoch = statistics.mean(self.epoch_seconds)
        # the epoch under way has been running since the last one ended (never counted below zero)
        training_left = max(0.0, epoch * max(0, self.epochs - self.epochs_done) - (self.clock() - self.last_epoch_end))
        return training_left + self._after_training_estimate()

    def demo_left(self) -> float | None:
        """Seconds left in the whole demo, or None while nothing can be estimated yet."""
        run_left = self.run_left()
        if run_left is None:
            return None
        runs_after = max(0, self.n_runs - self.run_index)
        if self.finished_totals:
            per_run = statistics.mean(self.finished_totals)
        else:
            per_run = (self.clock() - self.run_start) + run_left
        return run_left + runs_after * per_run

    # ------------------------------------------------------------------ lines
    def _prefix(self) -> str:
        if self.run_index:
            return f"[run {self.run_index}/{self.n_runs} {self.run_name}]"
        return f"[demo {format_duration(self.clock() - self.start)}]"

    def _times(self) -> str:
        parts = []
        if self.run_index:
            parts.append(f"elapsed {format_duration(self.clock() - self.run_start)}")
            if (left := self.run_left()) is not None:
                parts.append(f"run left ~{format_duration(left)}")
        if (left := self.demo_left()) is not None:
            parts.append(f"demo left ~{format_duration(left)}")
        return "  ".join(parts)

    def step(self, message: str) -> None:
        """A step of the demo (data, planning, a run's prediction ...)."""
        self.out(f"{self._prefix()} {message}")

    def heartbeat(self, what: str, last_log_line: str = "") -> None:
        """Still working on ``what``: prints the times and the child's last log line."""
        line = f"{self._prefix()} {what} ...  {self._times()}".rstrip()
        self.out(line + (f"  | {last_log_line[:100]}" if last_log_line else ""))

    def start_run(self, index: int, name: str) -> None:
        self.run_index, self.run_name = index, name
        self.run_start = self.clock()
        self.train_end = None
        self.epoch_seconds, self.epochs_done = [], 0
        self.last_epoch_end = self.run_start
        self.parser = EpochLogParser()

    def on_training_line(self, line: str) -> bool:
        """Feed one line of ``nnUNetv2_train`` output; prints (and returns True) when an epoch ended."""
        report = self.parser.feed(line)
        if report is None:
            return False
        self.epoch_seconds.append(report.seconds)
        self.epochs_done = report.epoch + 1
        self.last_epoch_end = self.clock()
        loss = "n/a" if report.loss is None else f"{report.loss:.3f}"
        self.out(f"{self._prefix()} epoch {self.epochs_done}/{self.epochs}  loss {loss}  {self._times()}")
        return True

    def training_done(self) -> None:
        self.train_end = self.clock()
        self.epochs_done = self.epochs

    def finish_run(self) -> None:
        """The run (training, prediction, evaluation) is complete: its times feed the estimates of later runs."""
        now = self.clock()
        self.finished_totals.append(now - self.run_start)
        if self.train_end is not None:
            self.finished_after_training.append(now - self.train_end)
