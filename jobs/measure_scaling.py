"""Pipeline throughput with 1 and then N workers on the same shards (does it scale?).

Usage: python jobs/measure_scaling.py [--model sd21-random] [--num-images 8] [--per-shard 2]
       [--workers 2] [--device cpu] [--cpu-threads 1] [--config CONFIG]
Writes benchmark shards to a temporary folder, runs `run` (CRF off) once per worker count and
prints images/s from the workers being ready to the last shard written, and the speed-up.
On CPU slots, --cpu-threads fixes each worker's torch threads, so that N workers get N times
the cores of one.
"""

import argparse
import tempfile
from pathlib import Path

from pipeline.results.bench import pipeline_path, write_benchmark_shards
from pipeline.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd21-random")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    config = load_config(args.config).model_copy(update={"batch_size": args.per_shard})
    rates = {}
    with tempfile.TemporaryDirectory(prefix="pseudolabel-scaling-") as tmp:
        pattern = write_benchmark_shards(Path(tmp) / "shards", args.num_images, args.per_shard)
        for workers in (1, args.workers):
            summary = pipeline_path(args.model, config, pattern, Path(tmp) / f"out-{workers}", args.device,
                                    crf=False, workers=workers, cpu_threads=args.cpu_threads)
            done = summary.images_ok + summary.images_failed
            rates[workers] = done / summary.processing_seconds
            print(f"workers {workers}: {rates[workers]:.4f} images/s over {done} images "
                  f"({summary.images_failed} failed; {summary.processing_seconds:.1f} s processing, "
                  f"{summary.seconds:.1f} s with Ray start and model load)", flush=True)
    print(f"{args.workers} workers / 1 worker = {rates[args.workers] / rates[1]:.2f}x "
          f"({args.model}, {args.device}, {args.cpu_threads} torch threads per worker)")


if __name__ == "__main__":
    main()
