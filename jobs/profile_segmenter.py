"""Where the segmenter's time goes on one batch: stage times and the top operators.

Usage: python jobs/profile_segmenter.py [--model sd21-random] [--device cuda] [--batch 16] [--rows 25]
Runs two warm-up batches, then one profiled batch of benchmark images, and prints the
segmenter's stage times (seconds per image) and the operators with the most device time
(self CPU time on a CPU). Optionally writes a Chrome trace with --trace FILE.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.results.bench import benchmark_images
from pipeline.config import load_config
from pipeline.segment.models import load_model
from pipeline.segment.segmenter import Segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd21-random")
    parser.add_argument("--device", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = parser.parse_args()
    model = load_model(args.model, device=args.device)
    config = load_config(args.config).model_copy(update={"batch_size": args.batch})
    segmenter = Segmenter(model, config, time_stages=True)
    samples = benchmark_images(args.batch)
    images = [torch.from_numpy(image).permute(2, 0, 1) for image, _ in samples]
    labels = [lab for _, lab in samples]
    for _ in range(2):
        segmenter.segment(images, labels)
    segmenter.times.seconds.clear()
    cuda = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        segmenter.segment(images, labels)
    stages = ", ".join(f"{k} {v / args.batch * 1000:.2f}" for k, v in segmenter.times.seconds.items())
    print(f"{args.model} on {model.device} ({model.dtype}), batch {args.batch}: ms per image: {stages}")
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
