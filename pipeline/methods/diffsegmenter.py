"""DiffSegmenter (Wang et al., "Diffusion Model is Secretly a Training-free Open Vocabulary
Semantic Segmenter"): multi-resolution cross-attention fusion completed once by self-attention,
with weak-class filtering.

Pixel axes are flattened row-major (N = side * side). float32 or float64 in and out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-30


def fuse_minmax(maps_by_side: dict[int, torch.Tensor], weights: dict[int, float], out_side: int) -> torch.Tensor:
    """side -> [B, side^2, T] head- and layer-averaged cross-attention. Each token map is
    min-max scaled over pixels, upsampled bilinearly to out_side and weighted by weights[side].
    Returns [B, out_side^2, T]."""
    fused = None
    for side, maps in maps_by_side.items():
        if side not in weights:
            raise ValueError(f"no DiffSegmenter weight for {side}x{side} cross-attention maps")
        low, high = maps.amin(dim=1, keepdim=True), maps.amax(dim=1, keepdim=True)
        scaled = (maps - low) / (high - low).clamp_min(_TINY)
        grid = scaled.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], side, side)
        if side != out_side:
            grid = F.interpolate(grid, size=(out_side, out_side), mode="bilinear", align_corners=False)
        term = weights[side] * grid.flatten(2).transpose(1, 2)
        fused = term if fused is None else fused + term
    return fused


def complete_with_self_attention(maps: torch.Tensor, self_attn: torch.Tensor) -> torch.Tensor:
    """maps [B, N, C] refined once by the averaged self-attention [B, N, N]."""
    return torch.bmm(self_attn, maps)


def keep_strong_classes(maps: torch.Tensor, ratio: float) -> torch.Tensor:
    """maps [N, C] of one image -> bool [C]: classes whose peak reaches ratio x the strongest peak."""
    peaks = maps.amax(dim=0)
    return peaks >= ratio * peaks.max()
