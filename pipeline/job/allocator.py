"""The glibc allocator of CPU workers: the settings a worker process starts with, and what
it did start with. Imports nothing heavy (the CLI's --help reads the settings)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

# glibc settings under which a process keeps the memory it frees for reuse: one heap for all
# threads, no mmap for large blocks, no trimming but the worker's own after each shard. A CPU
# worker otherwise unmaps every large tensor and the kernel faults it in again at the next
# batch (docs/performance.md, "CPU workers: glibc's allocator").
KEEP_FREED_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}
CPU_ALLOCATORS = ("keep-freed", "unchanged")

# The same settings for a process already running, as glibc's mallopt(3) parameters: (param,
# value) per variable. mallopt takes a C int, so the trim threshold is -1: never trim (the
# 64 GiB of the variable, in effect).
_MALLOPT = {"MALLOC_ARENA_MAX": (-8, 1), "MALLOC_MMAP_MAX_": (-4, 0), "MALLOC_TRIM_THRESHOLD_": (-1, -1)}


def cpu_worker_env(allocator: str, environment: Mapping[str, str]) -> dict[str, str]:
    """Environment variables a CPU worker's process starts with (Ray's runtime_env env_vars).
    "keep-freed": KEEP_FREED_MEMORY, each variable the command's own environment sets keeping
    that value; "unchanged": none, the worker has the environment Ray gives it."""
    if allocator not in CPU_ALLOCATORS:
        raise ValueError(f"--cpu-allocator must be one of {', '.join(CPU_ALLOCATORS)}, got {allocator!r}")
    if allocator == "unchanged":
        return {}
    return {name: environment.get(name, value) for name, value in KEEP_FREED_MEMORY.items()}


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value) on this process; False where the C library has none (not
    glibc) or refuses the value."""
    function = getattr(ctypes.CDLL(None), "mallopt", None)
    return function is not None and function(ctypes.c_int(param), ctypes.c_int(value)) == 1


def keep_freed_memory_here(allocator: str, environment: Mapping[str, str] | None = None) -> str:
    """Give this running process a CPU worker's allocator: with "keep-freed", each
    KEEP_FREED_MEMORY setting its start environment (default: `startup_malloc_settings()`)
    does not set is applied now through mallopt, for the allocations from then on (an
    in-process command on a CPU: segment, compare, bench); "unchanged" changes nothing.
    Returns the allocator the process then runs under: "keep-freed", or "unchanged" (no glibc,
    or left as the environment has it)."""
    if allocator not in CPU_ALLOCATORS:
        raise ValueError(f"--cpu-allocator must be one of {', '.join(CPU_ALLOCATORS)}, got {allocator!r}")
    environment = startup_malloc_settings() if environment is None else environment
    if allocator == "unchanged":
        return allocator_of(environment)
    missing = [name for name in KEEP_FREED_MEMORY if name not in environment]
    applied = [_mallopt(*_MALLOPT[name]) for name in missing]
    return "keep-freed" if all(applied) else "unchanged"


def allocator_of(environment: Mapping[str, str]) -> str:
    """The CPU allocator choice a process with this environment runs under: "keep-freed" when
    it sets every KEEP_FREED_MEMORY variable (whatever the values), else "unchanged"."""
    return "keep-freed" if all(name in environment for name in KEEP_FREED_MEMORY) else "unchanged"


def as_shell(variables: Mapping[str, str]) -> str:
    """Environment variables as a shell writes them: `NAME=value NAME=value`."""
    return " ".join(f"{name}={value}" for name, value in variables.items())


def cpu_allocator_line(asked: Mapping[str, str], started_on: list[dict]) -> str | None:
    """What the CPU workers' allocator is, from the settings their processes started with
    (`ready()["malloc"]`), or None without CPU workers or settings asked for."""
    cpu_workers = [where for where in started_on if where["device"] == "cpu"]
    if not cpu_workers or not asked:
        return None
    settings = as_shell(asked)
    missed = [where["pid"] for where in cpu_workers if any(where["malloc"].get(n) != v for n, v in asked.items())]
    if missed:
        return (f"warning: CPU worker(s) {', '.join(map(str, missed))} did not start with {settings} "
                "(Ray did not apply the actor's runtime_env): they run with glibc's defaults, slower")
    return f"CPU workers keep freed memory for reuse: {settings} (--cpu-allocator unchanged to leave glibc as is)"


def startup_malloc_settings() -> dict[str, str]:
    """The MALLOC_* environment variables this process started with: glibc reads them once, at
    start, so /proc/self/environ (the environment as the process was started) is what counts;
    os.environ where there is no /proc."""
    try:
        with open("/proc/self/environ", "rb") as environ:
            pairs = [entry.decode(errors="replace").partition("=") for entry in environ.read().split(b"\0") if entry]
        environment = {name: value for name, _, value in pairs}
    except OSError:
        environment = dict(os.environ)
    return {name: value for name, value in sorted(environment.items()) if name.startswith("MALLOC_")}
