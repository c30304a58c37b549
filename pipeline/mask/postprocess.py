"""Class score maps -> label mask at the original image size (CPU stage).

Follows the reference: upsample each class map to the model's input size, min-max it, place
it into its class channel, upsample to the original size, then apply the background rule.
The optional ignore region marks pixels whose winning score is low as 255.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.segment.maps import minmax
from pipeline.segment.methods import iseg
from pipeline.config import SegmenterConfig
from pipeline.mask.codec import apply_ignore
from pipeline.mask.crf import crf_refine


@dataclass
class MaskResult:
    """labels: uint8 [H, W] (0 background, k + 1 for class k, 255 ignore);
    crf_changed: share of pixels whose label the CRF changed (None when the CRF is off);
    confidence: float32 [H, W], the winning score of each pixel in [0, 1];
    scores: float32 [1 + C, H, W] background then the image's classes (in `classes` order),
    kept only when asked for (the CRF reads them), else None."""

    labels: np.ndarray
    confidence: np.ndarray
    scores: np.ndarray | None
    classes: list[int]
    crf_changed: float | None = None


def _labelled(winner: torch.Tensor, confidence: torch.Tensor, scores: torch.Tensor | None,
              classes: list[int]) -> MaskResult:
    """winner [H, W] index into background then classes; confidence float32 [H, W]."""
    lookup = np.array([0] + [c + 1 for c in classes], dtype=np.uint8)
    return MaskResult(labels=lookup[winner.numpy()], confidence=confidence.numpy(),
                      scores=None if scores is None else scores.numpy(), classes=classes)


def _winning_class(channels: Iterator[torch.Tensor], count: int, kept: Callable[[torch.Tensor], torch.Tensor],
                   background: Callable[[torch.Tensor], torch.Tensor], keep_scores: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The argmax over [background, kept(class 1), ..., kept(class count)] and its value, one
    class at a time, so that the memory held is a few [H, W] planes whatever the number of classes.

    channels yields each class's scaled score float32 [H, W]; kept gives the score it competes
    with; background gives the background's score from the best scaled class score. Ties go to
    the lower index, as argmax. Returns winner uint8 [H, W], confidence float32 [H, W], and
    scores [1 + count, H, W] (background, then each kept class) when keep_scores, else None.
    """
    best = kept_best = winner = scores = None
    for index, channel in enumerate(channels, start=1):
        competing = kept(channel)
        if best is None:
            best, kept_best = channel.clone(), competing.clone()
            winner = torch.ones(channel.shape, dtype=torch.uint8)
            scores = torch.empty((1 + count, *channel.shape)) if keep_scores else None
        else:
            torch.maximum(best, channel, out=best)
            winner.masked_fill_(competing > kept_best, index)
            torch.maximum(kept_best, competing, out=kept_best)
        if scores is not None:
            scores[index] = competing
    background_score = background(best)
    winner.masked_fill_(background_score >= kept_best, 0)
    if scores is not None:
        scores[0] = background_score
    return winner, torch.maximum(background_score, kept_best), scores


def _interpolated(maps: torch.Tensor, out_hw: tuple[int, int]) -> Iterator[torch.Tensor]:
    """Each map of [C, h, w] bilinearly resized to out_hw, one at a time: [1, 1, H, W] float32."""
    for channel in range(maps.shape[0]):
        yield F.interpolate(maps[None, channel:channel + 1].float(), size=out_hw, mode="bilinear", align_corners=False)


def class_scores_to_mask(maps: torch.Tensor, classes: list[int], out_hw: tuple[int, int], config: SegmenterConfig,
                         background_map: torch.Tensor | None = None, keep_scores: bool = False) -> MaskResult:
    """One image's class maps [C, s, s] for 0-based `classes` -> MaskResult of size out_hw,
    by the configured method's rule (the scores kept when keep_scores).

    Only the image's classes are scored: absent classes can never win a pixel.
    - With a background_map [s, s] (DiffSeg, GoCA: the method scores the background) the maps
      go bilinearly to out_hw; GoCA's background gets `goca.background_offset` added; the label
      is the argmax over background and classes; the confidence is the winner's share of the
      (non-negative) scores.
    - DiffSegmenter: maps bilinearly to out_hw, min-max per class, the background a constant
      `diffsegmenter.background_score`; the confidence is the winning score.
    - iSeg: each map bilinearly to the model's input size, min-max, bilinearly to out_hw, then
      the config's background rule on the maps min-maxed again; the confidence is the winning score.
    The last two go one class at a time (`_winning_class`): a 48-megapixel photo holds a few
    planes of its size, not a few per class.
    """
    if background_map is not None:
        offset = config.goca.background_offset if config.method == "goca" else 0.0
        grid = torch.cat([background_map[None] + offset, maps]).float()[None]
        full = F.interpolate(grid, size=out_hw, mode="bilinear", align_corners=False)[0]
        winner = full.argmax(dim=0)
        shares = full.clamp_min_(0)  # in place from here: one [1 + C, H, W] tensor held, not three
        total = shares.sum(dim=0, keepdim=True).clamp_min_(1e-30)
        if keep_scores:
            shares.div_(total)
            return _labelled(winner, shares.gather(0, winner[None])[0], shares, classes)
        return _labelled(winner, shares.gather(0, winner[None])[0] / total[0], None, classes)
    if config.method == "diffsegmenter":
        channels = (minmax(up, (2, 3))[0, 0] for up in _interpolated(maps, out_hw))
        constant = config.diffsegmenter.background_score
        winner, confidence, scores = _winning_class(channels, len(classes), lambda scaled: scaled,
                                                    lambda best: torch.full_like(best, constant), keep_scores)
        return _labelled(winner, confidence, scores, classes)
    size = config.image_size
    grid = minmax(F.interpolate(maps[None].float(), size=(size, size), mode="bilinear", align_corners=False), (2, 3))
    channels = (iseg.scale_class_scores(up)[0, 0] for up in _interpolated(grid[0], out_hw))
    if config.background.rule == "squared":
        kept, background = (lambda scaled: scaled), iseg.squared_background
    else:
        threshold = config.background.threshold
        kept = partial(iseg.threshold_kept, threshold=threshold)
        background = partial(iseg.threshold_background, threshold=threshold)
    winner, confidence, scores = _winning_class(channels, len(classes), kept, background, keep_scores)
    return _labelled(winner, confidence, scores, classes)


def finish_mask(maps: torch.Tensor, classes: list[int], image: np.ndarray, config: SegmenterConfig,
                background_map: torch.Tensor | None = None) -> MaskResult:
    """The whole CPU post-process of one image: mask at the size of image (uint8 [H, W, 3]),
    the dense CRF when enabled, then the ignore region."""
    result = class_scores_to_mask(maps, classes, image.shape[:2], config, background_map, keep_scores=config.crf.enabled)
    if config.crf.enabled:
        refined = crf_refine(image, result.labels, result.scores, result.classes, config.crf)
        result.crf_changed = float(np.mean(refined != result.labels))
        result.labels = refined
    result.labels = apply_ignore(result.labels, result.confidence, config.ignore_below)
    return result
