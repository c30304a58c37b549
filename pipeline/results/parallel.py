"""Reading a job's shards in several processes: each mask shard is independent, and decoding
its PNGs is CPU work that one Python process does one at a time."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity, as a container or taskset limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def shard_map(task: Callable[[str], T], shards: list[str], processes: int) -> Iterator[Iterator[T]]:
    """task(shard) for each shard, yielded in shard order: in this process when processes is 1
    or there is one shard, else in a pool of up to `processes` processes started by a fork
    server (a clean process to fork from: this one may hold threads, which fork does not copy)."""
    if processes <= 1 or len(shards) <= 1:
        yield map(task, shards)
        return
    context = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(min(processes, len(shards)), mp_context=context)
    try:
        yield pool.map(task, shards)
    finally:
        pool.shutdown(cancel_futures=True)  # a failure or Ctrl-C leaves no shard queued
