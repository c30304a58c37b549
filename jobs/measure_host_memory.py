"""Driver and worker memory as a job runs over many shards (is host memory flat?).

Usage: python jobs/measure_host_memory.py [--shards 24] [--per-shard 2] [--batch-size N] [--model tiny]
                                          [--config CONFIG] [--cpu-allocator keep-freed|unchanged]
Writes synthetic shards to a temporary folder, runs the job, samples the RSS of the driver and
of the largest segmenter worker every 0.5 s and prints their maximum per quarter of the run
(the first quarter includes the worker's model load), with the workers' peak RSS. Beside each
RSS it prints the private part (RSS less shared pages): RSS also counts the pages of Ray's
shared-memory object store that a process has touched, which grow as results pass through it.
"""

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pipeline.job.allocator import CPU_ALLOCATORS
from pipeline.results.bench import pipeline_path, write_benchmark_shards
from pipeline.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--per-shard", type=int, default=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--config", default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: --per-shard")
    parser.add_argument("--cpu-allocator", choices=CPU_ALLOCATORS, default="keep-freed",
                        help="glibc settings of the CPU worker, as `pseudolabel run --cpu-allocator`")
    args = parser.parse_args()
    config = load_config(args.config).model_copy(update={"batch_size": args.batch_size or args.per_shard})
    driver = psutil.Process()
    # (time, driver, largest segmenter worker), each (RSS, private) in MiB; private = RSS less
    # shared pages (the object store's shared memory the process touched, mapped libraries)
    trace: list[tuple[float, tuple[float, float], tuple[float, float]]] = []
    running = True

    def rss_and_private(memory) -> tuple[float, float]:
        return memory.rss / 2**20, (memory.rss - memory.shared) / 2**20

    def worker_memory() -> tuple[float, float]:
        largest = (0.0, 0.0)
        for process in psutil.process_iter(["cmdline", "memory_info"]):
            if (process.info["cmdline"] or [""])[0].startswith("ray::ShardWorker") and process.info["memory_info"]:
                largest = max(largest, rss_and_private(process.info["memory_info"]))
        return largest

    def sample() -> None:
        while running:
            trace.append((time.perf_counter(), rss_and_private(driver.memory_info()), worker_memory()))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_benchmark_shards(Path(tmp) / "shards", args.shards * args.per_shard, args.per_shard)
        summary = pipeline_path(args.model, config, pattern, Path(tmp) / "out", device=None, crf=False,
                                cpu_allocator=args.cpu_allocator)
    running = False
    start, end = trace[0][0], trace[-1][0]
    print(f"{summary.line}")
    for quarter in range(4):
        lo, hi = start + quarter * (end - start) / 4, start + (quarter + 1) * (end - start) / 4
        window = [(d, w) for t, d, w in trace if lo <= t <= hi]
        print(f"quarter {quarter + 1}: driver RSS max {max(d[0] for d, _ in window):.0f} MiB "
              f"(private {max(d[1] for d, _ in window):.0f}), segmenter worker RSS max "
              f"{max(w[0] for _, w in window):.0f} MiB (private {max(w[1] for _, w in window):.0f})")
    print(f"worker peak RSS {summary.peak_worker_rss_mb:.0f} MiB")


if __name__ == "__main__":
    main()
