"""Batch of (image, labels) -> per-class score maps, with one VAE encode and one UNet forward.

Uses the model bundle (models.py), the capture processors (capture.py), the prompts
(prompts.py) and the pure method (iseg.py). Knows nothing of files or Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import iseg
from .capture import CapturedAttention, CaptureSpec, capturing
from .config import SegmenterConfig
from .models import ModelBundle
from .prompts import build_class_prompt


@dataclass
class ClassScores:
    """Method output for one image.

    classes: 0-based class indices, ascending; maps: float32 [C, side, side] on CPU, one
    refined map per class (each sums to 1 over pixels); refinement_delta: mean absolute
    change of the maps in the last refinement iteration.
    """

    classes: list[int]
    maps: torch.Tensor
    refinement_delta: float


@dataclass
class StageTimes:
    """Seconds spent per stage over the segmenter's lifetime."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class Segmenter:
    """iSeg over a loaded model. `segment(images, class_lists)` runs one batch."""

    def __init__(self, model: ModelBundle, config: SegmenterConfig):
        self.model = model
        self.config = config
        use_subsets = model.heads_per_block == list(config.head_layout)
        self.cross_specs = [CaptureSpec(l.name, "cross", l.heads if use_subsets else None)
                            for l in config.cross_attention.layers]
        self.self_specs = [CaptureSpec(l.name, "self", l.heads if use_subsets else None)
                           for l in config.self_attention.layers]
        self.times = StageTimes()

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _timed(self, stage: str, start: float) -> float:
        self._sync()
        now = time.perf_counter()
        self.times.add(stage, now - start)
        return now

    def _noise(self, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The same seeded noise for every image (as the reference), so an image's result
        does not depend on its batch."""
        generator = torch.Generator().manual_seed(self.config.noise_seed)
        one = torch.randn(shape, generator=generator, dtype=torch.float32)
        return one.expand(batch, *shape)

    @torch.inference_mode()
    def encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """images: uint8 [3, H, W] -> noised latents [B, 4, S/8, S/8] at the configured timestep."""
        size = self.config.image_size
        pixels = torch.stack([
            F.interpolate(img[None].to(torch.float32) / 255.0, size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)[0]
            for img in images
        ]).to(self.model.device, self.model.dtype)
        vae = self.model.vae
        latents = vae.encode(2.0 * pixels - 1.0).latent_dist.mean * vae.config.scaling_factor
        noise = self._noise(len(images), tuple(latents.shape[1:])).to(latents.device, latents.dtype)
        timesteps = torch.full((len(images),), self.config.timestep, device=latents.device, dtype=torch.long)
        return self.model.scheduler.add_noise(latents, noise, timesteps)

    @torch.inference_mode()
    def encode_prompts(self, class_lists: list[list[int]]) -> tuple[torch.Tensor, list[list[list[int]]]]:
        """Cat-Cross text embeddings [B, 77, D] (class tokens enhanced) and per image the
        token columns of each class."""
        tokenizer = self.model.tokenizer
        prompts = [
            build_class_prompt(tokenizer, [self.config.classes[c] for c in classes], self.config.background_context)
            for classes in class_lists
        ]
        ids = tokenizer([p.text for p in prompts], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")["input_ids"].to(self.model.device)
        embeddings = self.model.text_encoder(ids)[0]
        if self.config.cat_cross:
            gain = torch.ones(embeddings.shape[:2], device=embeddings.device, dtype=embeddings.dtype)
            for row, prompt in enumerate(prompts):
                gain[row, prompt.all_columns] = self.config.enhancement
            embeddings = embeddings * gain[:, :, None]
        return embeddings, [p.columns for p in prompts]

    @torch.inference_mode()
    def segment(self, images: list[torch.Tensor], class_lists: list[list[int]]) -> list[ClassScores]:
        """images: uint8 [3, H, W] tensors; class_lists: per image the 0-based indices of its
        labelled classes (non-empty). Returns one ClassScores per image."""
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
        embeddings, columns = self.encode_prompts(class_lists)
        start = self._timed("text", start)
        latents = self.encode_images(images)
        start = self._timed("vae", start)
        timesteps = torch.full((len(images),), self.config.timestep, device=latents.device, dtype=torch.long)
        with capturing(self.model.unet, self.cross_specs + self.self_specs) as store:
            self.model.unet(latents, timesteps, encoder_hidden_states=embeddings)
        start = self._timed("unet", start)
        scores = self._refine(store, columns)
        self._timed("refine", start)
        return [ClassScores(classes=c, maps=m, refinement_delta=d) for c, (m, d) in zip(class_lists, scores)]

    def _refine(self, store: CapturedAttention, columns: list[list[list[int]]]) -> list[tuple[torch.Tensor, float]]:
        """Cat-Cross fusion, Ent-Self and iterative refinement on the captured maps."""
        cross_by_side = store.pooled_by_side([f"{s.layer}:cross" for s in self.cross_specs])
        self_by_side = store.pooled_by_side([f"{s.layer}:self" for s in self.self_specs])
        if len(self_by_side) != 1:
            raise ValueError(f"self-attention layers must share one resolution, got sides {sorted(self_by_side)}")
        side, self_attn = next(iter(self_by_side.items()))
        fused = iseg.fuse_cross_attention(cross_by_side, self.config.cross_attention.resolution_weights, side)

        class_maps = []
        for row, image_columns in enumerate(columns):
            tokens = fused[row]
            if self.config.cat_cross:
                tokens = iseg.kl_cluster_average(tokens, side, self.config.cluster.n_clusters,
                                                 self.config.cluster.iterations)
            class_maps.append(iseg.class_maps_from_tokens(tokens, image_columns))
        n_max = max(m.shape[1] for m in class_maps)
        padded = torch.stack([F.pad(m, (0, n_max - m.shape[1])) for m in class_maps])  # [B, N, Cmax]

        if self.config.ent_self:
            propagation = iseg.entropy_reduced_self_attention(self_attn, self.config.ent)
        else:
            propagation = self_attn
        iterations = self.config.iterations
        before = iseg.iterative_refinement(padded, propagation, max(iterations - 1, 0))
        after = iseg.iterative_refinement(before, propagation, 1) if iterations else before
        results = []
        for row, m in enumerate(class_maps):
            n = m.shape[1]
            maps = after[row, :, :n].T.reshape(n, side, side).float().cpu()
            delta = (after[row, :, :n] - before[row, :, :n]).abs().mean().item() if iterations else 0.0
            results.append((maps, delta))
        return results
