"""DiffSegmenter (Wang et al., "Diffusion Model is Secretly a Training-free Open Vocabulary
Semantic Segmenter"): multi-resolution cross-attention fusion completed once by self-attention.

As the official code (VCG-team/DiffSegmenter at b3a8686, `open_vocabulary/voc12/
ptp_stable_best.py` and `evaluation_voc12.py`); docs/methods.md lists what differs. Pixel axes
are flattened row-major (N = side * side). float32 or float64 in and out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-30


def fuse_class_maps(maps_by_side: dict[int, torch.Tensor], columns: list[list[int]], weights: dict[int, float],
                    out_side: int) -> torch.Tensor:
    """side -> [B, side^2, T] head- and layer-averaged cross-attention. Per side, each class's
    map (the mean of its token columns) is upsampled bilinearly to out_side, min-max scaled
    over pixels and weighted by weights[side]; the sides are summed.
    Returns [B, out_side^2, len(columns)]."""
    fused = None
    for side, maps in sorted(maps_by_side.items()):
        if side not in weights:
            raise ValueError(f"no DiffSegmenter weight for {side}x{side} cross-attention maps")
        classes = torch.stack([maps[..., cols].mean(dim=-1) for cols in columns], dim=-1)
        grid = classes.transpose(1, 2).reshape(maps.shape[0], len(columns), side, side)
        if side != out_side:
            grid = F.interpolate(grid, size=(out_side, out_side), mode="bilinear", align_corners=False)
        flat = grid.flatten(2)
        low, high = flat.amin(dim=-1, keepdim=True), flat.amax(dim=-1, keepdim=True)
        term = weights[side] * ((flat - low) / (high - low).clamp_min(_TINY)).transpose(1, 2)
        fused = term if fused is None else fused + term
    return fused


def complete_with_self_attention(maps: torch.Tensor, self_attn: torch.Tensor) -> torch.Tensor:
    """maps [B, N, C] refined once by the averaged self-attention [B, N, N]."""
    return torch.bmm(self_attn, maps)


def emphasise_tokens(embeddings: torch.Tensor, empty: torch.Tensor, columns: list[list[int]],
                     weight: float) -> torch.Tensor:
    """Compel's prompt weighting, as the reference's `class++`: the embedding [T, D] of each
    listed token column moves away from the empty prompt's embedding [T, D] by `weight`
    (empty + (z - empty) * weight); other columns are unchanged."""
    gain = torch.ones(embeddings.shape[0], 1, dtype=embeddings.dtype, device=embeddings.device)
    gain[sorted({c for cols in columns for c in cols})] = weight
    return empty + (embeddings - empty) * gain
