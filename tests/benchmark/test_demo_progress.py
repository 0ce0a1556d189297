"""Progress lines of the demo: nnU-Net's epoch lines parsed, estimates of the time left, heartbeats."""
from __future__ import annotations

import sys

import pytest

from nnunet_ext.benchmark.child_process import run_logged
from nnunet_ext.benchmark.demo_progress import DemoProgress, EpochLogParser, EpochReport, format_duration

# what nnUNetv2_train 2.8.1 prints for one epoch (timestamps as nnU-Net writes them)
EPOCH_LOG = """2026-12-07 14:02:33.608852: Epoch 1
2026-12-07 14:02:33.608966: Current learning rate: 0.00694
2026-12-07 14:02:39.125786: train_loss 0.2307
2026-12-07 14:02:39.125989: val_loss -0.0003
2026-12-07 14:02:39.126052: Pseudo dice [np.float32(0.6854), np.float32(0.548)]
2026-12-07 14:02:39.126122: Epoch time: 5.52 s
2026-12-07 14:02:39.126168: Yayy! New best EMA pseudo Dice: 0.32580000162124634"""


@pytest.mark.parametrize("lines, expected", [
    (EPOCH_LOG.splitlines(), [EpochReport(1, 0.2307, 5.52)]),
    (["Epoch 0", "train_loss -0.41", "Epoch time: 12.0 s"], [EpochReport(0, -0.41, 12.0)]),
    (["2026-01-01 00:00:00.0: Epoch 3", "2026-01-01 00:00:09.0: Epoch time: 9 s"], [EpochReport(3, None, 9.0)]),
    (["Epoch time: 3.0 s"], []),                                          # no epoch started: nothing to report
    (["2026-12-07 14:02:18.371159: Creating new 5-fold cross-validation split..."], []),
    (["Epoch 2", "train_loss nan", "Epoch time: 1.5 s"], [EpochReport(2, float("nan"), 1.5)]),
    (["Epoch 2", "train_loss ???", "Epoch time: 1.5 s"], [EpochReport(2, None, 1.5)]),  # unreadable loss
])
def test_epoch_log_parser(lines, expected):
    parser = EpochLogParser()
    reports = [r for r in map(parser.feed, lines) if r is not None]
    assert len(reports) == len(expected)
    for got, want in zip(reports, expected):
        assert (got.epoch, got.seconds) == (want.epoch, want.seconds)
        assert got.loss == want.loss or (got.loss != got.loss and want.loss != want.loss)  # nan == nan


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (41.4, "0:41"), (65, "1:05"), (3725, "1:02:05"),
                                           (-3, "0:00")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _epoch(progress: DemoProgress, clock: FakeClock, epoch: int, loss: float, seconds: float) -> None:
    clock.now += seconds
    for line in (f"Epoch {epoch}", f"train_loss {loss}", f"Epoch time: {seconds} s"):
        progress.on_training_line(line)


def test_progress_lines_and_estimates():
    clock, lines = FakeClock(), []
    progress = DemoProgress(n_runs=3, epochs=4, clock=clock, out=lines.append)
    clock.now = 30.0  # data, planning, preprocessing
    progress.start_run(1, "nnUNetTrainer")
    clock.now += 10  # process start before the first epoch
    _epoch(progress, clock, 0, 0.5, 10.0)
    # run 1: 3 epochs of 10 s left, nothing known about prediction yet; runs 2 and 3 like this one (50 s)
    assert lines[-1] == "[run 1/3 nnUNetTrainer] epoch 1/4  loss 0.500  elapsed 0:20  run left ~0:30  " \
                        "demo left ~2:10"
    for epoch in (1, 2, 3):
        _epoch(progress, clock, epoch, -0.25, 10.0)
    assert lines[-1].startswith("[run 1/3 nnUNetTrainer] epoch 4/4  loss -0.250  elapsed 0:50  run left ~0:00")
    progress.training_done()
    clock.now += 10  # prediction and evaluation
    progress.finish_run()  # 60 s in all, 10 s after training

    progress.start_run(2, "CAMLTrainer")
    clock.now += 5
    assert progress.run_left() is None and progress.demo_left() is None  # nothing measured in this run yet
    progress.heartbeat("training", "Using device: cpu")
    assert lines[-1] == "[run 2/3 CAMLTrainer] training ...  elapsed 0:05  | Using device: cpu"
    _epoch(progress, clock, 0, 0.1, 20.0)
    # 3 epochs x 20 s + 10 s prediction = 70 s; run 3 takes the finished runs' mean, 60 s
    assert progress.run_left() == pytest.approx(70.0)
    assert progress.demo_left() == pytest.approx(130.0)
    assert lines[-1].endswith("run left ~1:10  demo left ~2:10")
    clock.now += 15  # the next epoch is under way: the estimates count down
    assert progress.run_left() == pytest.approx(55.0) and progress.demo_left() == pytest.approx(115.0)


def test_steps_before_the_first_run_show_the_demo_clock():
    clock, lines = FakeClock(), []
    progress = DemoProgress(n_runs=2, epochs=1, clock=clock, out=lines.append)
    clock.now = 75.0
    progress.step("+ nnunet-ext plan -d 990")
    progress.heartbeat("planning and preprocessing", "")
    assert lines == ["[demo 1:15] + nnunet-ext plan -d 990", "[demo 1:15] planning and preprocessing ..."]


def _child(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", code]


def test_run_logged_streams_lines_and_keeps_the_full_log(tmp_path):
    log, seen, beats = tmp_path / "logs" / "child.log", [], []
    script = "import sys\nprint('Epoch 0')\nprint('train_loss 0.5')\nprint('Epoch time: 0.1 s')\nsys.exit(3)"
    code = run_logged(_child(script), {}, log, heartbeat_seconds=30, on_heartbeat=beats.append,
                      on_line=lambda line: seen.append(line) or False, poll_seconds=0.05)
    assert code == 3 and beats == []
    assert seen == ["Epoch 0", "train_loss 0.5", "Epoch time: 0.1 s"]
    assert log.read_text().splitlines()[-3:] == seen  # after the command line: everything the child printed


@pytest.mark.parametrize("reports, expected_beats", [(False, True), (True, False)])
def test_run_logged_heartbeat_only_after_silence(tmp_path, reports, expected_beats):
    """A heartbeat comes after ``heartbeat_seconds`` without a report; lines that were reported restart the clock."""
    beats = []
    script = "import time\nfor i in range(8):\n    print('line', i)\n    time.sleep(0.1)"
    code = run_logged(_child(script), {}, tmp_path / "c.log", heartbeat_seconds=0.35, on_heartbeat=beats.append,
                      on_line=lambda line: reports, poll_seconds=0.05)
    assert code == 0
    assert bool(beats) == expected_beats
    assert all(beat.startswith("line") for beat in beats)  # the last log line goes with the heartbeat


def test_run_logged_rejects_a_non_positive_heartbeat(tmp_path):
    with pytest.raises(ValueError, match="heartbeat_seconds"):
        run_logged(_child("pass"), {}, tmp_path / "c.log", heartbeat_seconds=0, on_heartbeat=print)
