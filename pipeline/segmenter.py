"""Batch of (image, labels) -> per-class score maps, with one VAE encode and one UNet forward.

One segmenter serves every method of the config (`iseg`, `diffseg`, `goca`, `diffsegmenter`):
a method is a *plan* that says what to capture, how to prompt, and how to turn the captured
attention into class maps with the pure functions of iseg.py and methods/. Model loading,
capture, batching and the output format are shared. Knows nothing of files or Ray.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import iseg
from .capture import (CapturedAttention, CaptureSpec, Record, UNetStopped, attention_layers, attention_modules,
                      capturing, classic_attention, forward_rank)
from .config import SegmenterConfig
from .methods import diffseg, diffsegmenter, goca
from .models import ModelBundle
from .prompts import ClassPrompt, build_class_prompt
from .transfer import stack_to_device, start_copy_to_host, to_device


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


def _single_side(maps_by_side: dict[int, torch.Tensor], what: str) -> tuple[int, torch.Tensor]:
    if len(maps_by_side) != 1:
        raise ValueError(f"{what} layers must share one resolution, got sides {sorted(maps_by_side)}")
    return next(iter(maps_by_side.items()))


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


def _layer_side(layer: str, latent_side: int, n_blocks: int) -> int:
    """The attention map side of a UNet transformer block (64, 32, 16 or 8 for SD at 512 px)."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        return latent_side >> (n_blocks - 1)
    level = int(parts[1]) if parts[0] == "down_blocks" else n_blocks - 1 - int(parts[1])
    return latent_side >> level


def official_head_order(unet: torch.nn.Module, specs: list[CaptureSpec], head_order: dict[int, list[int]],
                        latent_side: int) -> dict[int, list[tuple[str, int]]]:
    """The official code's head indices (per side, into the heads of that side's layers
    concatenated in forward order) as (store key, head) pairs; they must name exactly the heads
    the specs keep."""
    n_blocks = len(unet.down_blocks)
    pairs_by_side: dict[int, list[tuple[str, int]]] = {}
    for side, indices in head_order.items():
        at_side = sorted((s for s in specs if _layer_side(s.layer, latent_side, n_blocks) == side),
                         key=lambda s: forward_rank(s.layer))
        concatenated = [(f"{s.layer}:{s.kind}", head) for s in at_side
                        for head in range(attention_modules(unet, s)[0][1].heads)]
        kept = {(f"{s.layer}:{s.kind}", head) for s in at_side for head in s.heads or ()}
        pairs = [concatenated[i] for i in indices if 0 <= i < len(concatenated)]
        if len(pairs) != len(indices) or set(pairs) != kept or len(set(pairs)) != len(pairs):
            raise ValueError(f"cross_attention.head_order[{side}] does not name the heads cross_attention.layers "
                             f"keep at side {side}: make it match them, or set head_order to null")
        pairs_by_side[side] = pairs
    return pairs_by_side


class Plan:
    """What every method plan says besides its captures (`specs`) and its `scores`.

    enhance: scale the class tokens' embeddings by `enhancement` (iSeg's Cat-Cross);
    emphasis: the config's Compel-style class-token weight, or None; background_context: the
    prompt ends with the background words; prompt_style: `prompts.prompt_words` style;
    noised: noise the latent to the method's timestep (else the clean latent runs with that
    timestep's embedding)."""

    enhance = False
    emphasis: float | None = None
    background_context = True
    prompt_style = "sentence"
    noised = True


class IsegPlan(Plan):
    """iSeg: Cat-Cross, Ent-Self, iterative refinement (and its ablations via the config)."""

    enhance = True

    def __init__(self, model: ModelBundle, config: SegmenterConfig):
        self.config = config
        use_subsets = model.heads_per_block == list(config.head_layout)
        records = (Record(keep_heads=True),)
        self.cross_specs = [CaptureSpec(l.name, "cross", l.heads if use_subsets else None, records)
                            for l in config.cross_attention.layers]
        self.self_specs = [CaptureSpec(l.name, "self", l.heads if use_subsets else None, records)
                           for l in config.self_attention.layers]
        self.specs = self.cross_specs + self.self_specs
        order = config.cross_attention.head_order
        # the official order of the head mean; the fused kernel sums heads inside the processor
        per_head = config.attention_kernel == "official"
        self.cross_order = (official_head_order(model.unet, self.cross_specs, order, config.image_size // 8)
                            if order and use_subsets and per_head else None)

    def scores(self, store: CapturedAttention, prompts: list[ClassPrompt]) -> list[tuple]:
        cross_by_side = store.pooled_by_side([f"{s.layer}:cross" for s in self.cross_specs], self.cross_order)
        side, self_attn = _single_side(store.pooled_by_side([f"{s.layer}:self" for s in self.self_specs]), "self")
        maps, deltas = iseg.iseg_class_maps(cross_by_side, self_attn, [prompt.columns for prompt in prompts],
                                            self.config)
        return [(maps[row, :, :len(prompt.columns)], None, delta, side)
                for row, (prompt, delta) in enumerate(zip(prompts, deltas))]


class DiffSegPlan(Plan):
    """DiffSeg: self-attention of every block aggregated and merged by KL into segments on the
    clean latent; segments upsampled to the model's input size and each named by the
    cross-attention of the label tokens or a background word."""

    noised = False  # the reference runs the VAE's latent as it is, with the timestep's embedding

    def __init__(self, model: ModelBundle, config: SegmenterConfig):
        self.config = config
        self.layers = attention_layers(model.unet)
        self.specs = [CaptureSpec(layer, "self", records=(Record("sum", "self:{side}"),)) for layer in self.layers]
        self.specs += [CaptureSpec(layer, "cross", records=(Record("sum", "{layer}:cross"),)) for layer in self.layers]

    def _naming_cross_attention(self, store: CapturedAttention) -> dict[int, torch.Tensor]:
        """side -> [B, side^2, T]: the reference's per-resolution cross-attention, each block's
        head mean summed with weight 1/5, except 1/3 for the up blocks of the largest side."""
        means = {layer: store.sums[f"{layer}:cross"] / store.heads[f"{layer}:cross"] for layer in self.layers}
        sides = {layer: int(round(maps.shape[1] ** 0.5)) for layer, maps in means.items()}
        top = max(sides.values())
        by_side: dict[int, torch.Tensor] = {}
        for layer, maps in means.items():
            weight = 1 / 3 if layer.startswith("up_blocks") and sides[layer] == top else 1 / 5
            side = sides[layer]
            by_side[side] = by_side[side] + weight * maps if side in by_side else weight * maps
        return by_side

    def scores(self, store: CapturedAttention, prompts: list[ClassPrompt]) -> list[tuple]:
        settings = self.config.diffseg
        self_by_side = store.pooled_by_prefix("self:")
        side, out_side = max(self_by_side), self.config.image_size
        aggregated = diffseg.aggregate_self_attention(self_by_side, side)
        cross_by_side = self._naming_cross_attention(store)
        results = []
        for row, prompt in enumerate(prompts):
            proposals = diffseg.merge_proposals(aggregated[row], side, settings.anchors, settings.tau,
                                                settings.merge_iterations)
            proposals = diffseg.upsample_proposals(proposals, side, out_side)
            # candidates: each class, then each background word (a segment named by one is background)
            candidates = prompt.columns + prompt.background_groups
            naming = diffseg.naming_attention({s: maps[row : row + 1] for s, maps in cross_by_side.items()},
                                              candidates, out_side)[0]
            names = diffseg.name_segments(diffseg.segment_labels(proposals), len(proposals), naming)
            named = diffseg.named_maps(proposals, names, len(candidates))
            n_classes = len(prompt.columns)
            background = (named[n_classes:].amax(dim=0) if len(candidates) > n_classes
                          else torch.zeros_like(named[0]))
            results.append((named[:n_classes].T, background, 0.0, out_side))
        return results


class GocaPlan(Plan):
    """GoCA: head-weighted cross-attention of every block, layer weights from the similarity of
    each block's self-attention to a pseudo global attention, per-pixel rescaling over content
    tokens, blur and min-max, propagation through the self-attention affinity, min-max again."""

    prompt_style = "list"  # GoCA's entity list: classes, background words, "background"

    def __init__(self, model: ModelBundle, config: SegmenterConfig):
        self.config = config
        self.layers = attention_layers(model.unet)
        settings = config.goca
        for key, names in (("reference_layer", [settings.reference_layer]),
                           ("propagation_layers", settings.propagation_layers)):
            unknown = [name for name in names if name not in self.layers]
            if unknown or not names:
                raise ValueError(f"goca.{key} {unknown or names} must name UNet attention layers; "
                                 f"use some of: {', '.join(self.layers)}")
        self.reference_side = _layer_side(settings.reference_layer, config.image_size // 8,
                                          len(model.unet.down_blocks))
        self.specs = []
        for layer in self.layers:
            records = [Record("weighted", "{layer}:cross", head_weights=goca.head_weights)]
            if layer == settings.reference_layer:
                records.append(Record("queries", "reference"))
            self.specs.append(CaptureSpec(layer, "cross", records=tuple(records)))
        for layer in self.layers:
            records = [Record("sum", "{layer}:selfref", self.reference_side)]
            if layer in settings.propagation_layers:
                records.append(Record("sum", "propagation"))
            self.specs.append(CaptureSpec(layer, "self", records=tuple(records)))

    def scores(self, store: CapturedAttention, prompts: list[ClassPrompt]) -> list[tuple]:
        settings = self.config.goca
        reference = goca.pseudo_global_attention(
            goca.reference_queries(store.sums["reference"], settings.reference_query_channels))
        self_ref = torch.stack([store.sums[f"{layer}:selfref"] for layer in self.layers])  # [L, B, M, M]
        weights = goca.layer_weights(self_ref, reference)  # [L, B]
        side, affinity = _single_side(store.pooled_by_side(["propagation"]), "goca.propagation_layers")
        fused = None
        for index, layer in enumerate(self.layers):
            maps = store.sums[f"{layer}:cross"]  # [B, n, T]
            n_side = int(round(maps.shape[1] ** 0.5))
            grid = maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], n_side, n_side)
            if n_side != side:
                grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
            term = weights[index][:, None, None] * grid.flatten(2).transpose(1, 2)
            fused = term if fused is None else fused + term
        results = []
        for row, prompt in enumerate(prompts):
            n_classes = len(prompt.columns)
            objects = goca.rescaled_objects(fused[row], prompt.columns + prompt.background_groups,
                                            prompt.content_columns)
            objects = goca.blur_and_minmax(objects, side, settings.blur_kernel, settings.blur_sigma)
            maps = objects[:, :n_classes]
            if objects.shape[1] > n_classes:  # background: the strongest background object
                maps = torch.cat([maps, objects[:, n_classes:].amax(dim=1, keepdim=True)], dim=1)
            maps = goca.propagate(maps[None], affinity[row : row + 1], settings.propagation_power)[0]
            maps = goca.minmax_columns(maps)
            background = maps[:, n_classes] if maps.shape[1] > n_classes else torch.zeros_like(maps[:, 0])
            results.append((maps[:, :n_classes], background, 0.0, side))
        return results


class DiffSegmenterPlan(Plan):
    """DiffSegmenter: each class's cross-attention fused over resolutions (upsampled, then
    min-max scaled), completed once by the averaged full-resolution self-attention; class
    tokens weighted as Compel's `class++`. The background is a constant score (post-process)."""

    background_context = False

    def __init__(self, model: ModelBundle, config: SegmenterConfig):
        self.config = config
        self.emphasis = config.diffsegmenter.class_emphasis
        layers = attention_layers(model.unet)
        self.specs = [CaptureSpec(layer, "cross", records=(Record("sum", "cross:{side}"),)) for layer in layers]
        self.specs += [CaptureSpec(layer, "self", records=(Record("sum", "self:{side}"),)) for layer in layers]

    def scores(self, store: CapturedAttention, prompts: list[ClassPrompt]) -> list[tuple]:
        settings = self.config.diffsegmenter
        side, self_attn = max(store.pooled_by_prefix("self:").items())
        cross_by_side = store.pooled_by_prefix("cross:")
        results = []
        for row, prompt in enumerate(prompts):
            classes = diffsegmenter.fuse_class_maps({s: maps[row : row + 1] for s, maps in cross_by_side.items()},
                                                    prompt.columns, settings.resolution_weights, side)
            completed = diffsegmenter.complete_with_self_attention(classes, self_attn[row : row + 1])[0]
            results.append((completed, None, 0.0, side))
        return results


# Distinct prompts whose text embeddings are kept (one per class set of the images seen).
_TEXT_CACHE_SIZE = 4096

PLANS = {"iseg": IsegPlan, "diffseg": DiffSegPlan, "goca": GocaPlan, "diffsegmenter": DiffSegmenterPlan}


class Segmenter:
    """The configured method over a loaded model. `segment(images, class_lists)` runs one batch.

    time_stages: record seconds per stage in `times`. On a GPU this synchronises the device
    after each stage, which keeps the host from queueing the next stage's kernels while the
    last one runs, so jobs leave it off and benchmarks turn it on for a breakdown pass.
    """

    def __init__(self, model: ModelBundle, config: SegmenterConfig, time_stages: bool = False):
        self.model = model
        self.config = config
        self.plan = PLANS[config.method](model, config)
        self.official_kernel = config.attention_kernel == "official"
        captured = {(s.layer, s.kind) for s in self.plan.specs}
        self.classic_layers = [CaptureSpec(layer, kind) for layer, _, kind in
                               (name.rpartition(":") for name in config.classic_attention_layers)
                               if (layer, kind) not in captured]
        for spec in self.classic_layers:  # a name that is not in this UNet fails here, with the list
            attention_modules(model.unet, spec)
        self.time_stages = time_stages
        self.times = StageTimes()
        self._text_cache: dict[str, torch.Tensor] = {}  # prompt text -> text-encoder output [77, D]
        self._prompt_cache: dict[tuple[int, ...], ClassPrompt] = {}  # class indices -> prompt
        self._noise_cache: dict[tuple, torch.Tensor] = {}  # (shape, device, dtype) -> the method's noise

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
        does not depend on its batch: [batch, *shape], an expanded view of one noise tensor
        drawn on the host and moved to device once."""
        key = (shape, device, dtype)
        if key not in self._noise_cache:
            generator = torch.Generator().manual_seed(self.config.noise_seed)
            self._noise_cache[key] = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
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
            gain = torch.ones(embeddings.shape[:2], dtype=embeddings.dtype)
            for row, prompt in enumerate(prompts):
                gain[row, prompt.all_columns] = self.config.enhancement
            embeddings = embeddings * to_device(gain, embeddings.device)[:, :, None]
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
                raise ValueError("every image needs at least one labelled class")
            bad = [c for c in classes if not 0 <= c < len(self.config.classes)]
            if bad:
                raise ValueError(f"class indices {bad} are outside 0..{len(self.config.classes) - 1}")

        start = time.perf_counter()
        embeddings, prompts = self.encode_prompts(class_lists)
        start = self._timed("text", start)
        latents = self.encode_images(images)
        start = self._timed("vae", start)
        timesteps = torch.full((len(images),), self.config.method_timestep, device=latents.device, dtype=torch.long)
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
        parts = [p for maps, background, delta, _ in planned
                 for p in (maps.T, background, delta) if isinstance(p, torch.Tensor)]
        host, wait = start_copy_to_host(torch.cat([p.reshape(-1).float() for p in parts]))
        images_layout = [(classes, side, background is not None, None if isinstance(delta, torch.Tensor) else delta)
                         for classes, (_, background, delta, side) in zip(class_lists, planned)]
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
