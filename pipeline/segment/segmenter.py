"""Batch of (image, labels) -> per-class score maps, with one VAE encode and one UNet forward.

One segmenter serves every method of the config (`iseg`, `diffseg`, `goca`, `diffsegmenter`):
a method is a *plan* (methods/, one module per method) that says what to capture, how to prompt,
and how to turn the captured attention into class maps. Model loading,
capture, batching and the output format are shared. Knows nothing of files or Ray.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.errors import ImageError
from pipeline.config import SegmenterConfig
from pipeline.segment.capture import (CaptureSpec, UNetStopped, attention_modules, capturing, check_named_layers,
                                      classic_attention)
from pipeline.segment.methods import PLANS, diffsegmenter
from pipeline.segment.models import CompiledBlocks, ModelBundle
from pipeline.segment.prompts import ClassPrompt, build_class_prompt
from pipeline.segment.transfer import stack_to_device, start_copy_to_host, to_device


class LabelError(ImageError, ValueError):
    """An image's labels cannot be segmented (none, or outside the config's classes)."""


@dataclass
class ClassScores:
    """Method output for one image.

    classes: 0-based class indices, ascending; maps: float32 [C, side, side] on CPU, one map
    per class; background: float32 [side, side] for methods that score the background
    themselves (the mask is then the argmax over background and classes), else None (the
    config's background rule applies); refinement_delta: mean absolute change of the maps in
    the last refinement iteration (0 for methods without iterations).
    """

    classes: list[int]
    maps: torch.Tensor
    refinement_delta: float
    background: torch.Tensor | None = None


@dataclass
class StageTimes:
    """Seconds spent per stage over the segmenter's lifetime."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def _stack_on_device(images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Same-shape uint8 [3, H, W] images -> uint8 [n, 3, H, W] on device.

    Decoded images arrive as channel-first views of [H, W, 3] arrays. Stacking those views
    would transpose every image on the host (about 16 ms per 32 VOC-sized images on one
    core, in the thread that launches the model's kernels); they are stacked in their own
    memory order instead (a plain copy) and transposed on the device."""
    if all(image.permute(1, 2, 0).is_contiguous() for image in images):
        stacked = stack_to_device([image.permute(1, 2, 0) for image in images], device)
        return stacked.permute(0, 3, 1, 2).contiguous()
    return stack_to_device(images, device)


def _linear_taps(source: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps along one axis, as OpenCV computes them: half-pixel centres, the source
    position rounded to float32, edges clamped. Returns (left index [size], right index [size],
    weight of the right sample [size] float32)."""
    position = ((torch.arange(size, dtype=torch.float64) + 0.5) * (source / size) - 0.5).to(torch.float32)
    left = torch.floor(position)
    weight = position - left
    left = left.to(torch.long)
    outside = (left < 0) | (left >= source - 1)
    weight[outside] = 0.0
    left = left.clamp(0, source - 1)
    return left.to(device), (left + 1).clamp(max=source - 1).to(device), weight.to(device)


def _lerp_fused(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 a + (b - a) * weight with one rounding of the multiply-add, as a fused
    multiply-add does (the product is exact in float64)."""
    return ((b - a).to(torch.float64) * weight + a).to(torch.float32)


def resize_to_model(images: torch.Tensor, size: int, scale_first: bool = True) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> float32 [n, 3, size, size] in [0, 1], bit for bit as the official
    code's `cv2.resize(..., INTER_LINEAR)` on float32 images (OpenCV's IPP path on x86: each
    axis a fused lerp, rows first, then columns; no antialiasing, so images wider than `size`
    are sampled, not low-pass filtered). scale_first: divide by 255 before the resize (the
    official VOC loader) or after it (its COCO loader); that changes only the last bit."""
    height, width = images.shape[-2:]
    pixels = images.to(torch.float32)
    if scale_first:
        pixels = pixels / 255.0
    left, right, weight = _linear_taps(width, size, images.device)
    rows = _lerp_fused(pixels[..., left], pixels[..., right], weight)
    top, bottom, weight = _linear_taps(height, size, images.device)
    resized = _lerp_fused(rows[..., top, :], rows[..., bottom, :], weight[:, None])
    return resized if scale_first else resized / 255.0


# Distinct prompts whose text embeddings are kept (one per class set of the images seen).
_TEXT_CACHE_SIZE = 4096

class Segmenter:
    """The configured method over a loaded model. `segment(images, class_lists)` runs one batch.

    time_stages: record seconds per stage in `times`. On a GPU this synchronises the device
    after each stage, which keeps the host from queueing the next stage's kernels while the
    last one runs, so jobs leave it off and benchmarks turn it on for a breakdown pass.
    """

    def __init__(self, model: ModelBundle, config: SegmenterConfig, time_stages: bool = False):
        self.model = model
        self.config = config
        check_named_layers(model.unet, config)
        self.plan = PLANS[config.method](model, config)
        self.official_kernel = config.attention_kernel == "official"
        captured = {(s.layer, s.kind) for s in self.plan.specs}
        self.classic_layers = [CaptureSpec(layer, kind) for layer, _, kind in
                               (name.rpartition(":") for name in config.classic_attention_layers)
                               if (layer, kind) not in captured]
        for spec in [*self.plan.specs, *self.classic_layers]:  # a layer or head not in this UNet fails here
            attention_modules(model.unet, spec)
        self.time_stages = time_stages
        self.times = StageTimes()
        self._text_cache: dict[str, torch.Tensor] = {}  # prompt text -> text-encoder output [77, D]
        self._prompt_cache: dict[tuple[int, ...], ClassPrompt] = {}  # class indices -> prompt
        self._noise_cache: dict[tuple, torch.Tensor] = {}  # (shape, device, dtype) -> the method's noise
        self.compiled = CompiledBlocks(model) if config.compile else None

    @property
    def notes(self) -> tuple[str, ...]:
        """What the user should know of this model and method (`ModelBundle.notes`, `Plan.notes`)."""
        return self.model.notes + tuple(self.plan.notes)

    @property
    def cross_specs(self) -> list[CaptureSpec]:
        return [s for s in self.plan.specs if s.kind == "cross"]

    @property
    def self_specs(self) -> list[CaptureSpec]:
        return [s for s in self.plan.specs if s.kind == "self"]

    def _timed(self, stage: str, start: float) -> float:
        if not self.time_stages:
            return start
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        now = time.perf_counter()
        self.times.add(stage, now - start)
        return now

    def _noise(self, batch: int, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The same seeded noise for every image (as the reference), so an image's result
        does not depend on its batch: [batch, *shape], an expanded view of one noise tensor.
        Drawn as the official code draws it (`randn_like` of the latents after seeding): on the
        latents' device, in their dtype, from a generator of that device seeded noise_seed, so a
        GPU gets the official GPU noise (CUDA's generator draws other numbers than the CPU's)."""
        key = (shape, device, dtype)
        if key not in self._noise_cache:
            generator = torch.Generator(device).manual_seed(self.config.noise_seed)
            self._noise_cache[key] = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self._noise_cache[key].expand(batch, *shape)

    @torch.inference_mode()
    def encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """images: uint8 [3, H, W] -> latents [B, 4, S/8, S/8], noised to the method's timestep
        unless its plan runs the clean latent."""
        size, device = self.config.image_size, self.model.device
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(index)
        pixels = torch.empty(len(images), 3, size, size, dtype=self.model.dtype, device=device)
        for indices in by_shape.values():  # images of one size cross (as uint8) and resize together
            resized = resize_to_model(_stack_on_device([images[i] for i in indices], device), size,
                                      self.config.scale_before_resize)
            pixels.index_copy_(0, to_device(torch.tensor(indices), device), resized.to(self.model.dtype))
        vae = self.model.vae
        with classic_attention(vae) if self.official_kernel else nullcontext():
            latents = vae.encode(2.0 * pixels - 1.0).latent_dist.mean * vae.config.scaling_factor
        if not self.plan.noised:
            return latents
        noise = self._noise(len(images), tuple(latents.shape[1:]), latents.device, latents.dtype)
        timesteps = torch.full((len(images),), self.config.method_timestep, device=latents.device, dtype=torch.long)
        return self.model.scheduler.add_noise(latents, noise, timesteps)

    @torch.inference_mode()
    def encode_prompts(self, class_lists: list[list[int]]) -> tuple[torch.Tensor, list[ClassPrompt]]:
        """Text embeddings [B, 77, D] (class tokens enhanced for iSeg's Cat-Cross, or weighted
        as the plan's emphasis says) and the prompts."""
        tokenizer = self.model.tokenizer
        context = self.config.background_context if self.plan.background_context else None
        for classes in class_lists:
            if tuple(classes) not in self._prompt_cache:
                self._prompt_cache[tuple(classes)] = build_class_prompt(
                    tokenizer, [self.config.classes[c] for c in classes], context, self.plan.prompt_style)
        prompts = [self._prompt_cache[tuple(classes)] for classes in class_lists]
        texts = [p.text for p in prompts] + ([""] if self.plan.emphasis is not None else [])
        missing = sorted(set(texts) - set(self._text_cache))
        if missing:
            if len(self._text_cache) + len(missing) > _TEXT_CACHE_SIZE:
                self._text_cache.clear()
                self._prompt_cache.clear()
                missing = sorted(set(texts))
            ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")["input_ids"]
            ids = to_device(ids, self.model.device)
            self._text_cache.update(zip(missing, self.model.text_encoder(ids)[0]))
        embeddings = torch.stack([self._text_cache[p.text] for p in prompts])
        if self.plan.emphasis is not None:
            empty = self._text_cache[""]
            embeddings = torch.stack([diffsegmenter.emphasise_tokens(row, empty, prompt.columns, self.plan.emphasis)
                                      for row, prompt in zip(embeddings, prompts)])
        if self.plan.enhance and self.config.cat_cross:
            # float16 embeddings are multiplied in float32 and rounded once, as the official
            # in-place `*= 1.6` computes them (a float16 gain would round 1.6 to 1.5996 first)
            compute = torch.promote_types(embeddings.dtype, torch.float32)
            gain = torch.ones(embeddings.shape[:2], dtype=compute)
            for row, prompt in enumerate(prompts):
                gain[row, prompt.all_columns] = self.config.enhancement
            gain = to_device(gain, embeddings.device)[:, :, None]
            embeddings = (embeddings.to(compute) * gain).to(embeddings.dtype)
        return embeddings, prompts

    def segment(self, images: list[torch.Tensor], class_lists: list[list[int]]) -> list[ClassScores]:
        """images: uint8 [3, H, W] tensors; class_lists: per image the 0-based indices of its
        labelled classes (non-empty). Returns one ClassScores per image."""
        return self.launch(images, class_lists).wait()

    @torch.inference_mode()
    def launch(self, images: list[torch.Tensor], class_lists: list[list[int]]) -> "PendingScores":
        """`segment` without waiting for the device: queues the batch and the copy of its
        results to the host, and returns a handle whose wait() gives the ClassScores. On a GPU
        the host can queue the next batch while this one runs; on a CPU the work is done when
        this returns. Nothing in the batch makes the host wait for the GPU (see transfer.py)."""
        if len(images) != len(class_lists):
            raise ValueError("one class list per image is needed")
        class_lists = [sorted(set(classes)) for classes in class_lists]
        for classes in class_lists:
            if not classes:
                raise LabelError("every image needs at least one labelled class: give it one")
            bad = [c for c in classes if not 0 <= c < len(self.config.classes)]
            if bad:
                raise LabelError(f"class indices {bad} are outside 0..{len(self.config.classes) - 1}: use the "
                                 "config's classes")

        start = time.perf_counter()
        embeddings, prompts = self.encode_prompts(class_lists)
        start = self._timed("text", start)
        with self.compiled.active() if self.compiled else nullcontext():
            latents = self.encode_images(images)
            start = self._timed("vae", start)
            timesteps = torch.full((len(images),), self.config.method_timestep, device=latents.device,
                                   dtype=torch.long)
            with (classic_attention(self.model.unet, self.classic_layers) if self.official_kernel else nullcontext(),
                  capturing(self.model.unet, self.plan.specs, self.config.attention_kernel,
                            stop_early=self.config.early_exit) as store):
                try:
                    self.model.unet(latents, timesteps, encoder_hidden_states=embeddings)
                except UNetStopped:  # the last layer the method reads is recorded: nothing after it is
                    pass
        start = self._timed("unet", start)
        planned = self.plan.scores(store, prompts)
        # One device-to-host copy for the whole batch: maps, backgrounds and refinement deltas
        # still on the device, flattened end to end.
        parts = [p for one in planned for p in (one.maps.T, one.background, one.refinement_delta)
                 if isinstance(p, torch.Tensor)]
        host, wait = start_copy_to_host(torch.cat([p.reshape(-1).float() for p in parts]))
        images_layout = [(classes, one.side, one.background is not None,
                          None if isinstance(one.refinement_delta, torch.Tensor) else one.refinement_delta)
                         for classes, one in zip(class_lists, planned)]
        self._timed("refine", start)
        return PendingScores(host, images_layout, wait)


@dataclass
class PendingScores:
    """A launched batch (`Segmenter.launch`); wait() gives its ClassScores once the device is done.

    host: float32 [total], every image's maps [C, side*side], then its background [side*side]
    if any, then its refinement delta [1] if it was computed on the device; layout: per image
    (classes, side, has a background, delta: a float, or None when it is in host)."""

    host: torch.Tensor
    layout: list[tuple[list[int], int, bool, float | None]]
    wait_for_copy: Callable[[], None]

    def wait(self) -> list[ClassScores]:
        self.wait_for_copy()
        results, offset = [], 0
        for classes, side, has_background, delta in self.layout:
            n = side * side
            grid = self.host[offset : offset + len(classes) * n].reshape(len(classes), side, side)
            offset += len(classes) * n
            background = None
            if has_background:
                background, offset = self.host[offset : offset + n].reshape(side, side), offset + n
            if delta is None:
                delta, offset = float(self.host[offset]), offset + 1
            results.append(ClassScores(classes=classes, maps=grid, refinement_delta=delta, background=background))
        return results
