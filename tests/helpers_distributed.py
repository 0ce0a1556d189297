"""Running test scenarios on several ``gloo`` ranks (spawned processes) and collecting what each rank saw.

Convention shared by the distributed tests: the worker ``worker(rank, *args)`` saves a dict to
``<out_dir>/rank<r>.pt`` (``torch.save``), with the key ``"crash"`` holding the traceback if it failed.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def run_ranks(worker: Callable, args: Sequence, out_dir: str | Path, world: int, timeout_s: float) -> list[dict]:
    """Spawn ``world`` processes of ``worker``, wait for all of them and return each rank's saved dict.

    Fails the test if the ranks do not finish within ``timeout_s`` (a deadlock: every process is killed) or if a
    rank reports a crash (all crashes in the message).
    """
    context = mp.start_processes(worker, args=tuple(args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} gloo ranks did not finish within {timeout_s} s (deadlock?)")
    results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    crashes = [f"rank {r}:\n{result['crash']}" for r, result in enumerate(results) if "crash" in result]
    assert not crashes, "\n".join(crashes)
    return results
