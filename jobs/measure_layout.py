"""Time the VAE encoder and the UNet forward in the NCHW and NHWC (channels-last) layouts.

Usage: python jobs/measure_layout.py [--model sd21-random] [--device cuda] [--batch 16] [--rounds 5]

Three layouts, timed in turn round after round on the same random inputs (medians printed, and
each layout's median over NCHW's):
- nchw: weights and inputs contiguous, as a segmenter at batch 1 runs;
- nhwc-activations: NCHW weights, a channels-last UNet input, as a segmenter runs at a batch of
  two or more (the scheduler's `add_noise` of the expanded noise returns a channels-last tensor);
- nhwc: weights and inputs channels-last (a second copy of the VAE and the UNet).
Nothing here is part of a job; it answers whether a layout is worth a switch (docs/performance.md,
"The channels-last layout").
"""

import argparse
import copy
import statistics

import torch

from pipeline.results.bench import timed_seconds
from pipeline.segment.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd21-random")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=512)
    args = parser.parse_args()
    model = load_model(args.model, device=args.device)
    device, dtype, batch, side = model.device, model.dtype, args.batch, args.image_size
    nhwc_vae = copy.deepcopy(model.vae).to(memory_format=torch.channels_last)
    nhwc_unet = copy.deepcopy(model.unet).to(memory_format=torch.channels_last)
    generator = torch.Generator(device).manual_seed(0)
    pixels = torch.rand(batch, 3, side, side, generator=generator, device=device, dtype=dtype) * 2 - 1
    latents = torch.randn(batch, model.unet.config.in_channels, side // 8, side // 8, generator=generator,
                          device=device, dtype=dtype)
    context = torch.randn(batch, model.tokenizer.model_max_length, model.text_encoder.config.hidden_size,
                          generator=generator, device=device, dtype=dtype)
    steps = torch.full((batch,), 100, device=device, dtype=torch.long)
    channels_last = torch.channels_last
    runs = {
        "vae nchw": lambda: model.vae.encode(pixels),
        "vae nhwc": lambda: nhwc_vae.encode(pixels.contiguous(memory_format=channels_last)),
        "unet nchw": lambda: model.unet(latents, steps, encoder_hidden_states=context),
        "unet nhwc-activations": lambda: model.unet(latents.contiguous(memory_format=channels_last), steps,
                                                    encoder_hidden_states=context),
        "unet nhwc": lambda: nhwc_unet(latents.contiguous(memory_format=channels_last), steps,
                                       encoder_hidden_states=context),
    }
    seconds = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up: cuDNN's algorithm choice, allocator growth
        for _ in range(args.rounds):
            for name, run in runs.items():
                seconds[name].append(timed_seconds(run, device))
    print(f"model {args.model} on {device} ({dtype}), batch {batch}, {side} px, {args.rounds} rounds in turn")
    for name, values in seconds.items():
        median = statistics.median(values)
        baseline = statistics.median(seconds[name.split()[0] + " nchw"])
        print(f"{name:<22} median {median * 1e3:9.1f} ms per batch ({batch / median:7.2f} images/s), "
              f"over nchw {median / baseline:.2f}; rounds " + " ".join(f"{v * 1e3:.1f}" for v in values))


if __name__ == "__main__":
    main()
