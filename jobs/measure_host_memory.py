"""Driver and worker memory as a job runs over many shards (is host memory flat?).

Usage: python jobs/measure_host_memory.py [--shards 24] [--per-shard 2] [--model tiny] [--config CONFIG]
Writes synthetic shards to a temporary folder, runs the job, samples the RSS of the driver and
of the largest segmenter worker every 0.5 s and prints their maximum per quarter of the run
(the first quarter includes the worker's model load), with the workers' peak RSS.
"""

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pipeline.bench import pipeline_path, write_benchmark_shards
from pipeline.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--per-shard", type=int, default=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    config = load_config(args.config).model_copy(update={"batch_size": args.per_shard})
    driver = psutil.Process()
    trace: list[tuple[float, float, float]] = []  # (time, driver RSS, largest segmenter worker RSS) MiB
    running = True

    def worker_rss() -> float:
        rss = 0.0
        for process in psutil.process_iter(["cmdline", "memory_info"]):
            if (process.info["cmdline"] or [""])[0].startswith("ray::ShardWorker") and process.info["memory_info"]:
                rss = max(rss, process.info["memory_info"].rss / 2**20)
        return rss

    def sample() -> None:
        while running:
            trace.append((time.perf_counter(), driver.memory_info().rss / 2**20, worker_rss()))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_benchmark_shards(Path(tmp) / "shards", args.shards * args.per_shard, args.per_shard)
        summary = pipeline_path(args.model, config, pattern, Path(tmp) / "out", device=None, crf=False)
    running = False
    start, end = trace[0][0], trace[-1][0]
    print(f"{summary.line}")
    for quarter in range(4):
        lo, hi = start + quarter * (end - start) / 4, start + (quarter + 1) * (end - start) / 4
        window = [(driver_rss, rss) for t, driver_rss, rss in trace if lo <= t <= hi]
        print(f"quarter {quarter + 1}: driver RSS max {max(d for d, _ in window):.0f} MiB, "
              f"segmenter worker RSS max {max(w for _, w in window):.0f} MiB")
    print(f"worker peak RSS {summary.peak_worker_rss_mb:.0f} MiB")


if __name__ == "__main__":
    main()
