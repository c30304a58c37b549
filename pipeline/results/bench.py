"""Throughput benchmark: the bare model (VAE encode + one UNet forward, stock attention) against
the segmenter (the full iSeg path in-process) and the pipeline (`run` over shards: decode, Ray,
post-process, writing), on the same images and the same model.

Every measurement runs one untimed warm-up batch first. The segmenter's timed pass runs as in
a job, without synchronising the device between stages; its stage breakdown comes from one
more batch that does. Its prompts are encoded before the timed pass, once per label set, and
their cost is reported on its own line: a job encodes each label set once per worker (the
worker keeps the text embeddings), so that cost grows with the number of distinct label
sets, not with the number of images. Pipeline figures are taken from the workers being ready
to the last shard written (Ray start, model load and a GPU worker's warm-up batch excluded:
they are paid once per job, not per image); the end-to-end wall time is printed beside them.

With rounds > 1 the in-process passes (bare, segmenter, whole UNet, compiled) are timed in
turn, round after round, and each figure is the median over the rounds; a ratio is the median
of the rounds' ratios, so a machine whose speed drifts between passes moves both sides of it.
"""

from __future__ import annotations

import io
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from pipeline.config import VOC_CLASS_NAMES, SegmenterConfig
from pipeline.job.allocator import KEEP_FREED_MEMORY, as_shell
from pipeline.segment.models import ModelBundle
from pipeline.segment.segmenter import Segmenter


# Distinct label sets among the benchmark images (cycled): a job encodes each label set's prompt
# once per worker, so its text cost depends on how many sets a dataset has, not on its size.
LABEL_SETS = 100


def benchmark_image(index: int, seed: int = 0, label_sets: int = LABEL_SETS) -> tuple[np.ndarray, list[int]]:
    """One VOC-sized textured image (375 x 500, every third one 500 x 375) and its labels: label
    set number index % label_sets, of 1-3 VOC classes; the same for the same arguments."""
    rng = np.random.default_rng([seed, index])
    height, width = (375, 500) if index % 3 else (500, 375)
    base = rng.integers(0, 255, size=(height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    image = np.array(Image.fromarray(base).resize((width, height), Image.BILINEAR))
    set_number = index % label_sets
    labels = np.random.default_rng([seed, set_number, 1]).choice(20, size=1 + set_number % 3, replace=False)
    return image, sorted(labels.tolist())


def benchmark_images(n: int, seed: int = 0, label_sets: int = LABEL_SETS) -> list[tuple[np.ndarray, list[int]]]:
    """The first n benchmark images with their labels."""
    return [benchmark_image(i, seed, label_sets) for i in range(n)]


def write_benchmark_shards(folder: Path, n_images: int, per_shard: int, label_sets: int = LABEL_SETS) -> str:
    """Shards of the first n_images benchmark images (JPEG, VOC label names), written one shard
    at a time so that memory does not grow with n_images; returns their input pattern."""
    from pipeline.data.shards import encode_json, tar_bytes

    folder.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, n_images, per_shard)):
        entries = []
        for index in range(start, min(start + per_shard, n_images)):
            image, labels = benchmark_image(index, label_sets=label_sets)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=90)
            meta = {"id": f"bench_{index:06d}", "names": [VOC_CLASS_NAMES[c] for c in labels],
                    "labels": [c + 1 for c in labels], "width": image.shape[1], "height": image.shape[0]}
            entries.append({"__key__": f"bench_{index:06d}", "jpg": buffer.getvalue(), "json": encode_json(meta)})
        (folder / f"bench-{number:06d}.tar").write_bytes(tar_bytes(entries))
    return str(folder / "bench-*.tar")


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BenchResult:
    bare_images_per_s: float = 0.0
    bare_batch_size: int = 0
    bare_by_batch: dict[int, float] = field(default_factory=dict)
    segmenter_images_per_s: float = 0.0  # as configured (early exit by default)
    segmenter_full_unet_images_per_s: float = 0.0  # the same with early_exit off
    segmenter_compiled_images_per_s: float = 0.0  # the same with compile on (measured when configured off)
    compile_first_batch_s: float = 0.0  # the compiled segmenter's warm-up batches, compiling included
    eager_first_batch_s: float = 0.0  # the same warm-up, eager
    segmenter_stages: dict[str, float] = field(default_factory=dict)  # seconds per image
    prompt_sets: int = 0  # distinct label sets whose prompts were encoded before the timed pass
    prompt_seconds_per_set: float = 0.0
    pipeline_images_per_s: float = 0.0
    pipeline_crf_images_per_s: float = 0.0
    pipeline_wall_s: float = 0.0
    pipeline_model_busy: float = 0.0  # fraction of the CRF-off pipeline's processing time the model ran
    pipeline_host_queueing: float = 0.0  # fraction of that model time the worker's host spent queueing batches
    peak_device_mb: float = 0.0
    peak_worker_rss_mb: float = 0.0
    peak_worker_device_mb: float = 0.0
    rounds: dict[str, list[float]] = field(default_factory=dict)  # pass -> images/s of each round
    compiled_pass: str = ""  # the pass of `rounds` that ran compiled, if one did
    # CPU_ALLOCATORS choice of this process, which the pipeline's CPU workers are given too, so
    # that pipeline and in-process figures are measured under the same allocator
    allocator: str = "unchanged"

    def over_bare(self, name: str) -> float:
        """The median over the rounds of pass `name`'s images/s over the bare model's in the same
        round (the plain ratio of the figures without rounds)."""
        pairs = list(zip(self.rounds.get(name, []), self.rounds.get("bare", [])))
        if pairs:
            return statistics.median(rate / bare for rate, bare in pairs)
        figure = {"segmenter": self.segmenter_images_per_s, "whole UNet": self.segmenter_full_unet_images_per_s,
                  "compiled": self.segmenter_compiled_images_per_s}.get(name, 0.0)
        return figure / self.bare_images_per_s if self.bare_images_per_s else 0.0

    @property
    def ratio_line(self) -> str:
        """The tracked last line; `pipeline/bare=n/a` when the pipeline was not run (--no-pipeline),
        rather than a 0.00 that reads as a measured figure."""
        if self.pipeline_images_per_s and self.bare_images_per_s:
            pipe = f"{self.pipeline_images_per_s / self.bare_images_per_s:.2f}"
        else:
            pipe = "n/a"
        return f"segmenter/bare={self.over_bare('segmenter'):.2f} pipeline/bare={pipe}"


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def timed_seconds(run: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of run takes, the device synchronised around it."""
    sync_device(device)
    start = time.perf_counter()
    run()
    sync_device(device)
    return time.perf_counter() - start


def images_per_second(run: Callable[[], None], n_images: int, device: torch.device) -> float:
    """n_images over the seconds one call of run takes (`timed_seconds`)."""
    return n_images / timed_seconds(run, device)


def bare_pass(model: ModelBundle, config: SegmenterConfig, images: list[torch.Tensor],
              batch_size: int) -> Callable[[], None]:
    """After one untimed batch, a callable that runs VAE encode + one UNet forward with stock
    attention (text embeddings given) over images in batches of batch_size."""
    segmenter = Segmenter(model, config)  # only for its image preprocessing and noise
    context = torch.zeros(batch_size, model.tokenizer.model_max_length, model.text_encoder.config.hidden_size,
                          device=model.device, dtype=model.dtype)

    @torch.inference_mode()
    def run_batch(batch):
        latents = segmenter.encode_images(batch)
        t = torch.full((len(batch),), config.timestep, device=model.device, dtype=torch.long)
        model.unet(latents, t, encoder_hidden_states=context[: len(batch)])

    run_batch(images[:batch_size])

    def run():
        for batch in _batches(images, batch_size):
            run_batch(batch)
    return run


def segment_queued(segmenter: Segmenter, images: list[torch.Tensor], labels: list[list[int]],
                   batch_size: int) -> None:
    """Segment images in batches as a worker does: each batch is queued before the last one's
    results are waited for; returns once the last results are on the host."""
    pending = None
    for index in range(0, len(images), batch_size):
        launched = segmenter.launch(images[index : index + batch_size], labels[index : index + batch_size])
        if pending is not None:
            pending.wait()
        pending = launched
    if pending is not None:
        pending.wait()


@dataclass
class SegmenterPass:
    """The segmenter warmed up on the images: `run` segments them all as a worker does."""
    segmenter: Segmenter
    run: Callable[[], None]
    warm_up_s: float  # the untimed first batch (and one of the last batch's size, if smaller)
    prompt_sets: int  # label sets encoded before the timed passes
    seconds_per_prompt_set: float


def segmenter_pass(model: ModelBundle, config: SegmenterConfig, images: list[torch.Tensor],
                   labels: list[list[int]], batch_size: int) -> SegmenterPass:
    """The full method in-process, warmed up with a batch of each size a pass meets (a compiled
    model compiles for each), then every label set's prompt encoded (timed, after the warm-up
    so the text encoder is warm), so that a timed pass measures what every later image costs.
    The pass runs as a job does, without stage timing (`stage_seconds` has it)."""
    segmenter = Segmenter(model, config)
    start = time.perf_counter()
    segmenter.segment(images[:batch_size], labels[:batch_size])
    if len(images) % batch_size:
        last = len(images) % batch_size
        segmenter.segment(images[-last:], labels[-last:])
    sync_device(model.device)
    warm_up = time.perf_counter() - start
    label_sets = sorted({tuple(sorted(set(classes))) for classes in labels[batch_size:]}
                        - {tuple(sorted(set(classes))) for classes in labels[:batch_size]})
    sync_device(model.device)
    start = time.perf_counter()
    if label_sets:
        segmenter.encode_prompts([list(classes) for classes in label_sets])
    sync_device(model.device)
    per_set = (time.perf_counter() - start) / len(label_sets) if label_sets else 0.0
    return SegmenterPass(segmenter, lambda: segment_queued(segmenter, images, labels, batch_size), warm_up,
                         len(label_sets), per_set)


def stage_seconds(segmenter: Segmenter, images: list[torch.Tensor], labels: list[list[int]]) -> dict[str, float]:
    """Seconds per image of each segmenter stage over one batch of images, the device
    synchronised after each stage."""
    segmenter.time_stages = True
    segmenter.times.seconds.clear()
    segmenter.segment(images, labels)
    segmenter.time_stages = False
    return {k: v / len(images) for k, v in segmenter.times.seconds.items()}


def pipeline_path(model_spec: str, config: SegmenterConfig, pattern: str, out_dir: Path, device: str | None,
                  crf: bool, workers: int | None = None, cpu_threads: int | None = None,
                  cpu_allocator: str = "keep-freed"):
    """JobSummary of `run` over the shards of pattern into out_dir (CRF on or off), on a private
    Ray of this machine: a cluster running here would time other machines, and could not read
    the benchmark's shards."""
    from pipeline.job.runner import run_job

    return run_job(pattern, out_dir, config.with_crf(crf), model_spec, address="local", workers=workers,
                   device=device, progress=False, cpu_threads=cpu_threads, cpu_allocator=cpu_allocator)


def run_benchmark(model: ModelBundle, model_spec: str, config: SegmenterConfig, n_images: int,
                  batch_sizes: list[int], device: str | None, with_pipeline: bool = True,
                  pipeline_images: int | None = None, shard_size: int | None = None,
                  crf_modes: tuple[bool, ...] = (False, True), workers: int | None = None,
                  cpu_threads: int | None = None, label_sets: int = LABEL_SETS, with_compile: bool = True,
                  rounds: int = 1, allocator: str = "unchanged", log=print) -> BenchResult:
    """bare and segmenter on n_images in-process (the segmenter as configured, then with the
    whole UNet, then with `compile` switched, unless not with_compile), timed in turn `rounds`
    times (the bare model at the best of batch_sizes; the sweep's pass is its first round); the
    pipeline over pipeline_images (default n_images) in shards of shard_size (default half of
    them), once per CRF mode; the images carry label_sets distinct label sets, cycled.
    allocator: the CPU_ALLOCATORS choice this process runs under, given to the pipeline's CPU
    workers too, so that in-process and pipeline figures are taken under the same one."""
    samples = benchmark_images(n_images, label_sets=label_sets)
    images = [torch.from_numpy(image).permute(2, 0, 1) for image, _ in samples]
    labels = [lab for _, lab in samples]
    result = BenchResult(allocator=allocator)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    bare_runs = {}
    for size in batch_sizes:
        bare_runs[size] = bare_pass(model, config, images, size)
        result.bare_by_batch[size] = images_per_second(bare_runs[size], len(images), model.device)
        log(f"bare model, batch {size}: {result.bare_by_batch[size]:.3f} images/s")
    size = result.bare_batch_size = max(result.bare_by_batch, key=result.bare_by_batch.get)
    seg_config = config.model_copy(update={"batch_size": size})
    configured = segmenter_pass(model, seg_config, images, labels, size)
    result.prompt_sets, result.prompt_seconds_per_set = configured.prompt_sets, configured.seconds_per_prompt_set
    passes: dict[str, Callable[[], None]] = {"bare": bare_runs[size], "segmenter": configured.run}
    if seg_config.early_exit:
        passes["whole UNet"] = segmenter_pass(model, seg_config.model_copy(update={"early_exit": False}),
                                              images, labels, size).run
    if with_compile:
        other = segmenter_pass(model, seg_config.model_copy(update={"compile": not seg_config.compile}), images,
                               labels, size)
        compiled, eager = (configured, other) if seg_config.compile else (other, configured)
        result.compile_first_batch_s, result.eager_first_batch_s = compiled.warm_up_s, eager.warm_up_s
        passes["eager" if seg_config.compile else "compiled"] = other.run
    result.rounds = {name: [] for name in passes}
    result.rounds["bare"].append(result.bare_by_batch[size])
    for round_number in range(1, rounds + 1):
        for name, run in passes.items():
            if name == "bare" and round_number == 1:
                continue
            result.rounds[name].append(images_per_second(run, len(images), model.device))
            log(f"{name}, batch {size}{f', round {round_number}' if rounds > 1 else ''}: "
                f"{result.rounds[name][-1]:.3f} images/s")
    median = {name: statistics.median(rates) for name, rates in result.rounds.items()}
    result.bare_images_per_s = median["bare"]
    result.segmenter_images_per_s = median["segmenter"]
    result.segmenter_full_unet_images_per_s = median.get("whole UNet", 0.0)
    if with_compile:
        result.compiled_pass = "segmenter" if seg_config.compile else "compiled"
        result.segmenter_compiled_images_per_s = median[result.compiled_pass]
    result.segmenter_stages = stage_seconds(configured.segmenter, images[:size], labels[:size])
    if model.device.type == "cuda":
        result.peak_device_mb = torch.cuda.max_memory_allocated(model.device) / 2**20
    if with_pipeline:
        pipeline_images = pipeline_images or n_images
        per_shard = shard_size or max(seg_config.batch_size, pipeline_images // 2 or 1)
        with tempfile.TemporaryDirectory(prefix="pseudolabel-bench-") as tmp:
            pattern = write_benchmark_shards(Path(tmp) / "shards", pipeline_images, per_shard, label_sets)
            for crf in crf_modes:
                summary = pipeline_path(model_spec, seg_config, pattern, Path(tmp) / f"out-crf-{crf}", device,
                                        crf, workers, cpu_threads, result.allocator)
                rate = (summary.images_ok + summary.images_failed) / summary.processing_seconds
                log(f"pipeline, CRF {'on' if crf else 'off'}: {rate:.3f} images/s over {pipeline_images} images "
                    f"in shards of {per_shard} ({summary.seconds:.1f} s end to end with Ray start, model load and warm-up; "
                    f"model busy {summary.model_busy:.0%} of the processing time, the host queueing batches "
                    f"{summary.host_queueing:.0%} of the model time)")
                if crf:
                    result.pipeline_crf_images_per_s = rate
                else:
                    result.pipeline_images_per_s, result.pipeline_wall_s = rate, summary.seconds
                    result.pipeline_model_busy = summary.model_busy
                    result.pipeline_host_queueing = summary.host_queueing
                result.peak_worker_rss_mb = max(result.peak_worker_rss_mb, summary.peak_worker_rss_mb)
                result.peak_worker_device_mb = max(result.peak_worker_device_mb, summary.peak_worker_device_mb)
    return result


def allocator_line(allocator: str) -> str:
    """The report's line on the glibc allocator of a CPU bench (in-process and pipeline)."""
    settings = as_shell(KEEP_FREED_MEMORY)
    if allocator == "keep-freed":
        return (f"allocator     keep-freed here and in the pipeline's workers ({settings}), as a job's CPU "
                "workers run by default")
    return ("allocator     glibc's defaults here and in the pipeline's workers (--cpu-allocator unchanged, or a C "
            "library without mallopt); a job's CPU workers keep freed memory by default, 1.24-2.03x the images/s "
            "in jobs on the development CPU")


def format_report(result: BenchResult, model_spec: str, device: torch.device, n_images: int,
                  label_sets: int = LABEL_SETS) -> str:
    host_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    lines = [
        f"model {model_spec} on {device}, {n_images} images (500x375 / 375x500; "
        f"up to {label_sets} distinct label sets, cycled)",
        f"bare model    {result.bare_images_per_s:8.3f} images/s (VAE encode + UNet forward, batch {result.bare_batch_size}; "
        + ", ".join(f"batch {b}: {v:.3f}" for b, v in result.bare_by_batch.items()) + ")",
        f"segmenter     {result.segmenter_images_per_s:8.3f} images/s (full method in-process"
        + (", UNet stopped after the last layer read)" if result.segmenter_full_unet_images_per_s else ")"),
    ]
    if result.segmenter_full_unet_images_per_s:
        lines.append(f"segmenter     {result.segmenter_full_unet_images_per_s:8.3f} images/s (the same, whole UNet: "
                     "early_exit false)")
    if result.segmenter_compiled_images_per_s:
        ratio = result.over_bare(result.compiled_pass)
        lines.append(f"compiled      {result.segmenter_compiled_images_per_s:8.3f} images/s (the segmenter with "
                     f"compile true: compiled/bare={ratio:.2f}; its first batches took "
                     f"{result.compile_first_batch_s:.1f} s against {result.eager_first_batch_s:.1f} s eager, "
                     "paid once per worker)")
    n_rounds = len(result.rounds.get("bare", []))
    if n_rounds > 1:
        lines.insert(1, f"rounds        {n_rounds}: the in-process figures are medians of their rounds (the batch sizes "
                        "are the sweep's single pass), the ratios medians of the rounds' ratios")
        lines += [f"  {name:<12}" + " ".join(f"{rate:.3f}" for rate in rates) + " images/s by round"
                  + (f"; over bare {' '.join(f'{r / b:.2f}' for r, b in zip(rates, result.rounds['bare']))}"
                     if name != "bare" else "")
                  for name, rates in result.rounds.items()]
    if device.type == "cpu":
        lines.append(allocator_line(result.allocator))
    lines += [
        f"prompts       {result.prompt_sets} label sets encoded before the timed pass, "
        f"{result.prompt_seconds_per_set * 1e3:.1f} ms each (paid once per label set per worker)",
    ]
    if result.pipeline_images_per_s:
        lines += [
            f"pipeline      {result.pipeline_images_per_s:8.3f} images/s (run over shards, CRF off; "
            f"{result.pipeline_wall_s:.1f} s end to end; model busy {result.pipeline_model_busy:.0%}, "
            f"host queueing {result.pipeline_host_queueing:.0%} of it)",
        ]
    if result.pipeline_crf_images_per_s:
        lines.append(f"pipeline+CRF  {result.pipeline_crf_images_per_s:8.3f} images/s (run over shards, CRF on)")
    lines.append("segmenter stages, seconds per image (one more batch, synchronised per stage): "
                 + ", ".join(f"{k} {v:.4f}" for k, v in result.segmenter_stages.items()))
    memory = f"peak host RSS {host_rss:.0f} MiB (benchmark process)"
    if result.peak_worker_rss_mb:
        memory += f", {result.peak_worker_rss_mb:.0f} MiB (pipeline worker)"
    if device.type == "cuda":
        memory += (f"; peak GPU memory {result.peak_device_mb:.0f} MiB in-process, "
                   f"{result.peak_worker_device_mb:.0f} MiB per pipeline actor")
    lines.append(memory)
    lines.append(result.ratio_line)
    return "\n".join(lines)
