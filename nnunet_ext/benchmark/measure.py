"""Run ``nnUNetv2_train`` or ``nnUNetv2_predict`` in this process and record its time and peak memory.

Usage (what ``nnunet-ext benchmark`` runs in a child process)::

    python -m nnunet_ext.benchmark.measure --stats stats.json train   -- 4 3d_fullres all -tr T -p P -device cpu
    python -m nnunet_ext.benchmark.measure --stats stats.json predict -- -i IN -o OUT -d 4 ...

The arguments after ``--`` are exactly those of the stock command, whose entry point
(``nnunetv2.run.run_training:run_training_entry`` / ``nnunetv2.inference.predict_from_raw_data:predict_entry_point``)
runs unchanged. The stats file is written even when the command fails:

* ``peak_rss_mb``: peak resident memory of the process tree (this process plus its children, e.g. nnU-Net's
  data-augmentation workers and the predictor's preprocessing/export workers), sampled every ``--interval``
  seconds from ``/proc`` (Linux), and never below the kernel's exact peak RSS of this process
  (``getrusage``). Pages shared between forked workers are counted once per process, so with workers the value
  is an upper bound; with ``nnUNet_n_proc_DA=0`` (the benchmark's CPU default) it is exact up to sampling.
* ``maxrss_self_mb`` / ``maxrss_children_mb``: ``getrusage`` peaks of this process and of its largest finished
  child.
* ``cpu_user_seconds`` / ``cpu_system_seconds`` / ``cpu_seconds``: CPU time of this process plus its finished
  (waited-for) children, from ``getrusage``; it grows far less than wall time when other work shares the CPU.
* ``load_average_1min_mean`` / ``load_average_1min_max``: the system's 1-minute load average (``os.getloadavg``),
  sampled with the memory; ``cpu_count``: the cores this process may use. :func:`busy_machine_reason` tells
  from these whether wall-clock timings of the run measured other work as well.
* ``cuda_max_memory_allocated_mb``: ``torch.cuda.max_memory_allocated`` (CUDA runs only).
* ``predict_from_files_seconds``: time inside nnU-Net's ``nnUNetPredictor.predict_from_files`` (preprocessing,
  sliding window, export of all cases, worker start-up; without interpreter start and model loading);
  ``network_seconds``: time inside ``predict_logits_from_preprocessed_data`` (the sliding-window network
  prediction of each case, the part a trainer can change), summed over cases (``network_seconds_calls``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path

_KIB = 1024.0


def _maxrss_mb(who: int) -> float:
    value = resource.getrusage(who).ru_maxrss
    return value / (_KIB * _KIB) if sys.platform == "darwin" else value / _KIB  # bytes on macOS, KiB on Linux


def _rss_kib(pid: int) -> int:
    """Current resident set size of ``pid`` in KiB (0 if it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and all its live descendants, from ``/proc/*/stat`` (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: the fields after the last ')' are fixed
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def usable_cpu_count() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


#: A run alone on the machine puts at most about one runnable thread per core into the load average
#: (OMP_NUM_THREADS <= cores); more than this margin above the core count means other work shared the CPU.
BUSY_LOAD_MARGIN = 0.5


def busy_machine_reason(stats: dict) -> str | None:
    """Why the wall-clock timings in a stats file are unreliable (other work shared the CPU), or None.

    The run counts as shared when the mean 1-minute load average during it exceeded the core count by more than
    :data:`BUSY_LOAD_MARGIN`. Stats without load samples (older files, platforms without ``getloadavg``) give None.
    """
    load, cores = stats.get("load_average_1min_mean"), stats.get("cpu_count")
    if load is None or not cores:
        return None
    if load > cores + BUSY_LOAD_MARGIN:
        return f"mean 1-min load average {load:.1f} on {cores} core(s)"
    return None


class TreeMemorySampler:
    """Samples the summed RSS of a process tree in a background thread; ``peak_mb`` is the largest sample.
    The system's 1-minute load average is sampled alongside (``load_samples``)."""

    def __init__(self, root_pid: int | None = None, interval: float = 0.5):
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.root_pid = os.getpid() if root_pid is None else root_pid
        self.interval = interval
        self.available = os.path.isdir("/proc")
        self.peak_mb = 0.0
        self.load_samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nnunet-ext-memory-sampler", daemon=True)

    def sample(self) -> float:
        total = sum(_rss_kib(pid) for pid in process_tree(self.root_pid)) / _KIB
        self.peak_mb = max(self.peak_mb, total)
        load = _load_average()
        if load is not None:
            self.load_samples.append(load)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemorySampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()
            self.sample()


def _time_method(cls: type, method: str, stats: dict, key: str) -> None:
    """Accumulate the wall time of ``cls.method`` into ``stats[key]`` (and count the calls in ``key + '_calls'``)."""
    original = getattr(cls, method)

    # nnU-Net reads predict_from_files' own parameters through inspect.signature: functools.wraps keeps them
    @functools.wraps(original)
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            stats[key] = stats.get(key, 0.0) + time.perf_counter() - start
            stats[key + "_calls"] = stats.get(key + "_calls", 0) + 1

    setattr(cls, method, timed)


def _time_prediction(stats: dict) -> None:
    """Time nnU-Net's whole prediction of the input folder and, per case, the network part (sliding window)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    _time_method(nnUNetPredictor, "predict_from_files", stats, "predict_from_files_seconds")
    _time_method(nnUNetPredictor, "predict_logits_from_preprocessed_data", stats, "network_seconds")


def run_measured(tool: str, args: list[str], stats_file: str | os.PathLike, interval: float = 0.5) -> int:
    """Run the stock entry point of ``tool`` (``train`` or ``predict``) with ``args``; write the stats file.

    Returns:
        The exit code (0 on success, 1 after an exception, whose traceback goes to stderr).
    """
    if tool not in ("train", "predict"):
        raise ValueError(f"tool must be 'train' or 'predict', got {tool!r}")
    stats: dict = {"tool": tool, "args": list(args), "pid": os.getpid()}
    start = time.perf_counter()
    code = 1
    sampler = TreeMemorySampler(interval=interval)
    try:
        with sampler:
            if tool == "train":
                from nnunetv2.run.run_training import run_training_entry as entry

                sys.argv = ["nnUNetv2_train", *args]
            else:
                from nnunetv2.inference.predict_from_raw_data import predict_entry_point as entry

                _time_prediction(stats)
                sys.argv = ["nnUNetv2_predict", *args]
            try:
                entry()
                code = 0
            except SystemExit as e:  # argparse errors and explicit exits of nnU-Net
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                sys.stdout.flush()  # the traceback after everything printed before it (shared log file)
                traceback.print_exc()
                code = 1
    finally:
        stats["returncode"] = code
        stats["wall_seconds"] = time.perf_counter() - start
        stats["maxrss_self_mb"] = _maxrss_mb(resource.RUSAGE_SELF)
        stats["maxrss_children_mb"] = _maxrss_mb(resource.RUSAGE_CHILDREN)
        usage_self, usage_children = resource.getrusage(resource.RUSAGE_SELF), \
            resource.getrusage(resource.RUSAGE_CHILDREN)
        stats["cpu_user_seconds"] = usage_self.ru_utime + usage_children.ru_utime
        stats["cpu_system_seconds"] = usage_self.ru_stime + usage_children.ru_stime
        stats["cpu_seconds"] = stats["cpu_user_seconds"] + stats["cpu_system_seconds"]
        stats["cpu_count"] = usable_cpu_count()
        loads = sampler.load_samples or ([x] if (x := _load_average()) is not None else [])
        stats["load_average_1min_mean"] = sum(loads) / len(loads) if loads else None
        stats["load_average_1min_max"] = max(loads) if loads else None
        stats["tree_sampled"] = sampler.available
        stats["peak_rss_mb"] = max(sampler.peak_mb, stats["maxrss_self_mb"])
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            stats["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / (_KIB * _KIB)
        Path(stats_file).write_text(json.dumps(stats, indent=2))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_ext.benchmark.measure",
                                     description="Run nnUNetv2_train/nnUNetv2_predict and record time and peak "
                                                 "memory.")
    parser.add_argument("--stats", required=True, help="JSON file for the measurements")
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling interval in seconds")
    parser.add_argument("tool", choices=("train", "predict"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments of the stock command")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    return run_measured(ns.tool, args, ns.stats, ns.interval)


if __name__ == "__main__":
    sys.exit(main())
