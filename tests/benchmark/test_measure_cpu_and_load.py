"""measure.py records CPU time and the machine's load, and tells when wall-clock timings are unreliable."""
from __future__ import annotations

import json
import sys

import pytest

from nnunet_ext.benchmark.measure import busy_machine_reason, run_measured


@pytest.mark.parametrize("stats, busy", [
    ({"load_average_1min_mean": 1.9, "cpu_count": 2}, False),   # the run's own two threads
    ({"load_average_1min_mean": 2.5, "cpu_count": 2}, False),   # within the margin
    ({"load_average_1min_mean": 2.6, "cpu_count": 2}, True),
    ({"load_average_1min_mean": 11.7, "cpu_count": 2}, True),   # eight engineers on two cores
    ({"load_average_1min_mean": 11.7, "cpu_count": 16}, False),
    ({"load_average_1min_mean": None, "cpu_count": 2}, False),  # no samples: nothing to say
    ({}, False),                                                # stats of an older version
])
def test_busy_machine_reason(stats, busy):
    reason = busy_machine_reason(stats)
    assert (reason is not None) == busy
    if busy:
        assert f"{stats['load_average_1min_mean']:.1f}" in reason and f"{stats['cpu_count']} core" in reason


def test_stats_have_cpu_time_and_load(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_measured sets sys.argv for nnU-Net's parser
    stats_file = tmp_path / "stats.json"
    assert run_measured("train", ["--help"], stats_file, interval=0.05) == 0  # argparse exits 0 after the help
    stats = json.loads(stats_file.read_text())
    assert stats["cpu_seconds"] == pytest.approx(stats["cpu_user_seconds"] + stats["cpu_system_seconds"])
    assert stats["cpu_seconds"] > 0 and stats["cpu_count"] >= 1
    assert 0 <= stats["load_average_1min_mean"] <= stats["load_average_1min_max"]
