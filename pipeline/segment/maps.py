"""Pure tensor functions every method uses on attention maps laid out as [B, pixels, K] over a
square grid: bring maps of several resolutions to one side, and min-max scale them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TINY = 1e-30  # the floor of a denominator: an all-zero map stays zero instead of NaN


def square_side(n_pixels: int) -> int:
    """The side of a square grid of n_pixels; ValueError when n_pixels is not a square."""
    side = math.isqrt(n_pixels)
    if side * side != n_pixels:
        raise ValueError(f"maps have {n_pixels} pixels, not a square grid")
    return side


def grid_side(maps: torch.Tensor) -> int:
    """The side of the square grid of maps [B, side^2, K]; ValueError when not square."""
    return square_side(maps.shape[1])


def upsample_maps(maps: torch.Tensor, out_side: int) -> torch.Tensor:
    """maps [B, side^2, K] -> [B, out_side^2, K], each of the K maps resized bilinearly
    (align_corners=False, no antialiasing); the maps themselves when the sides match."""
    side = grid_side(maps)
    if side == out_side:
        return maps
    batch, _, k = maps.shape
    grid = maps.transpose(1, 2).reshape(batch, k, side, side)
    grid = F.interpolate(grid, size=(out_side, out_side), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


def minmax(x: torch.Tensor, dim: int | tuple[int, ...], eps: float = 0.0) -> torch.Tensor:
    """x scaled to [0, 1] along dim: (x - min) / (max - min + eps), the denominator floored at
    TINY."""
    low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    return (x - low) / (high - low + eps).clamp_min(TINY)
