"""GoCA (Meng et al., "Making Training-Free Diffusion Segmentors Scale with the Generative
Power"): head- and layer-wise auto aggregation of cross-attention and per-pixel rescaling.

Pixel axes are flattened row-major (N = side * side). float32 or float64 in and out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_TINY = 1e-30


def head_weights(head_outputs: torch.Tensor) -> torch.Tensor:
    """Head-wise weights. head_outputs: [B, H, N, D], each head's contribution A_h V_h W_o,h to
    the layer output. Each head's weight at a pixel is its dot product with the sum over
    heads, clamped at 0 and normalised over heads. Returns [B, H, N]."""
    total = head_outputs.sum(dim=1, keepdim=True)
    dots = (head_outputs * total).sum(dim=-1).clamp_min(0)
    return dots / dots.sum(dim=1, keepdim=True).clamp_min(_TINY)


def aggregate_heads(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """probs [B, H, N, T] per-head attention, weights [B, H, N] -> [B, N, T] weighted sum."""
    return (probs * weights[..., None]).sum(dim=1)


def pseudo_global_attention(queries: torch.Tensor) -> torch.Tensor:
    """queries [B, N, D] of the reference layer -> softmax(Q Q^T / sqrt(D)) [B, N, N]."""
    scores = queries @ queries.transpose(1, 2) / math.sqrt(queries.shape[-1])
    return scores.softmax(dim=-1)


def resize_attention(attn: torch.Tensor, out_side: int) -> torch.Tensor:
    """Self-attention [B, N, N] (N = side^2) resized on both pixel axes to [B, M, M]
    (M = out_side^2) by bilinear interpolation (antialiased when shrinking); rows renormalised."""
    batch, n, _ = attn.shape
    side = int(round(math.sqrt(n)))
    if side == out_side:
        return attn
    resize = dict(size=(out_side, out_side), mode="bilinear", align_corners=False, antialias=out_side < side)
    keys = F.interpolate(attn.reshape(batch * n, 1, side, side), **resize).reshape(batch, side, side, -1)
    queries = F.interpolate(keys.permute(0, 3, 1, 2), **resize)  # [B, M, out, out]
    out = queries.flatten(2).transpose(1, 2)
    return out / out.sum(dim=-1, keepdim=True).clamp_min(_TINY)


def layer_weights(self_maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Layer-wise weights. self_maps: [L, B, M, M] each layer's head-averaged self-attention at
    the reference resolution; reference: [B, M, M] pseudo global attention. Cosine similarity
    of each layer to the reference, clamped at 0 and normalised over layers. Returns [L, B]."""
    flat = self_maps.flatten(2)
    ref = reference.flatten(1)[None]
    similarity = F.cosine_similarity(flat, ref, dim=-1).clamp_min(0)
    return similarity / similarity.sum(dim=0, keepdim=True).clamp_min(_TINY)


def rescale_per_pixel(maps: torch.Tensor, content_columns: list[int]) -> torch.Tensor:
    """maps [N, T] one image's cross-attention over all tokens -> [N, len(content_columns)]:
    the content tokens' scores divided by their sum at each pixel."""
    content = maps[:, content_columns]
    return content / content.sum(dim=1, keepdim=True).clamp_min(_TINY)


def gaussian_kernel(size: int, sigma: float, dtype=torch.float32) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    one = torch.exp(-(coords**2) / (2 * sigma**2))
    return (one[:, None] * one[None, :]) / one.sum() ** 2


def blur_and_minmax(maps: torch.Tensor, side: int, kernel: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """maps [N, T] -> [N, T]: each token map blurred with a kernel x kernel Gaussian
    (reflect padding) and min-max scaled to [0, 1]."""
    grid = maps.T.reshape(-1, 1, side, side)
    weight = gaussian_kernel(kernel, sigma, maps.dtype).to(maps.device)[None, None]
    blurred = F.conv2d(F.pad(grid, [kernel // 2] * 4, mode="reflect"), weight)
    flat = blurred.flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(_TINY)).T


def propagate(maps: torch.Tensor, affinity: torch.Tensor, power: int) -> torch.Tensor:
    """maps [B, N, T] propagated `power` times through the row-stochastic affinity [B, N, N]."""
    for _ in range(power):
        maps = torch.bmm(affinity, maps)
    return maps
