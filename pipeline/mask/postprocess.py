"""Class score maps -> label mask at the original image size (CPU stage).

Follows the reference: upsample each class map to the model's input size, min-max it, place
it into its class channel, upsample to the original size, then apply the background rule.
The optional ignore region marks pixels whose winning score is low as 255.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.segment.maps import minmax
from pipeline.segment.methods import iseg
from pipeline.config import SegmenterConfig
from pipeline.mask.codec import IGNORE_INDEX
from pipeline.mask.crf import crf_refine


@dataclass
class MaskResult:
    """labels: uint8 [H, W] (0 background, k + 1 for class k, 255 ignore);
    crf_changed: share of pixels whose label the CRF changed (None when the CRF is off);
    confidence: float32 [H, W], the winning score of each pixel in [0, 1];
    scores: float32 [1 + C, H, W] background then the image's classes (in `classes` order)."""

    labels: np.ndarray
    confidence: np.ndarray
    scores: np.ndarray
    classes: list[int]
    crf_changed: float | None = None


def upsample_class_maps(maps: torch.Tensor, model_size: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """maps [C, s, s] -> [C, H, W]: bilinear to model_size, min-max per class, bilinear to out_hw."""
    grid = F.interpolate(maps[None].float(), size=(model_size, model_size), mode="bilinear", align_corners=False)
    grid = minmax(grid, (2, 3))
    return F.interpolate(grid, size=out_hw, mode="bilinear", align_corners=False)[0]


def _labelled(full: torch.Tensor, winner: torch.Tensor, confidence: torch.Tensor, classes: list[int]) -> MaskResult:
    """full [1 + C, H, W] background then classes; winner int64 [H, W] index into full."""
    lookup = torch.tensor([0] + [c + 1 for c in classes], dtype=torch.uint8)
    return MaskResult(labels=lookup[winner].numpy(), confidence=confidence.numpy().astype(np.float32),
                      scores=full.numpy().astype(np.float32), classes=classes)


def class_scores_to_mask(maps: torch.Tensor, classes: list[int], out_hw: tuple[int, int], config: SegmenterConfig,
                         background_map: torch.Tensor | None = None) -> MaskResult:
    """One image's class maps [C, s, s] for 0-based `classes` -> MaskResult of size out_hw,
    by the configured method's rule.

    Only the image's classes are scored: absent classes can never win a pixel.
    - With a background_map [s, s] (DiffSeg, GoCA: the method scores the background) the maps
      go bilinearly to out_hw; GoCA's background gets `goca.background_offset` added; the label
      is the argmax over background and classes; the confidence is the winner's share of the
      (non-negative) scores.
    - DiffSegmenter: maps bilinearly to out_hw, min-max per class, the background a constant
      `diffsegmenter.background_score`; the confidence is the winning score.
    - iSeg: `upsample_class_maps`, then the config's background rule; the confidence is the
      winning score.
    """
    if background_map is not None:
        offset = config.goca.background_offset if config.method == "goca" else 0.0
        grid = torch.cat([background_map[None] + offset, maps]).float()[None]
        full = F.interpolate(grid, size=out_hw, mode="bilinear", align_corners=False)[0]
        winner = full.argmax(dim=0)
        shares = full.clamp_min(0)
        shares = shares / shares.sum(dim=0, keepdim=True).clamp_min(1e-30)
        return _labelled(shares, winner, shares.gather(0, winner[None])[0], classes)
    if config.method == "diffsegmenter":
        scores = F.interpolate(maps[None].float(), size=out_hw, mode="bilinear", align_corners=False)
        scores = minmax(scores, (2, 3))[0]
        full = torch.cat([torch.full_like(scores[:1], config.diffsegmenter.background_score), scores])
    else:
        scores = upsample_class_maps(maps, config.image_size, out_hw)[None]
        present = torch.ones(1, len(classes), dtype=torch.bool)
        if config.background.rule == "squared":
            full = iseg.squared_background_scores(scores, present)[0]
        else:
            full = iseg.threshold_background_scores(scores, present, config.background.threshold)[0]
    confidence, winner = full.max(dim=0)
    return _labelled(full, winner, confidence, classes)


def apply_ignore(labels: np.ndarray, confidence: np.ndarray, ignore_below: float | None) -> np.ndarray:
    """labels with pixels whose confidence is below `ignore_below` set to 255 (None: unchanged)."""
    if ignore_below is None:
        return labels
    return np.where(confidence < ignore_below, np.uint8(IGNORE_INDEX), labels).astype(np.uint8)


def finish_mask(maps: torch.Tensor, classes: list[int], image: np.ndarray, config: SegmenterConfig,
                background_map: torch.Tensor | None = None) -> MaskResult:
    """The whole CPU post-process of one image: mask at the size of image (uint8 [H, W, 3]),
    the dense CRF when enabled, then the ignore region."""
    result = class_scores_to_mask(maps, classes, image.shape[:2], config, background_map)
    if config.crf.enabled:
        refined = crf_refine(image, result.labels, result.scores, result.classes, config.crf)
        result.crf_changed = float(np.mean(refined != result.labels))
        result.labels = refined
    result.labels = apply_ignore(result.labels, result.confidence, config.ignore_below)
    return result
