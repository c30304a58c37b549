"""DiffSeg (Tian et al., "Diffuse, Attend, and Segment"): label-free segments from KL merging of
self-attention aggregated over all transformer blocks; segments named by label cross-attention.

Pixel axes are flattened row-major (N = side * side). float32 or float64 in and out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..iseg import symmetric_kl


def aggregate_self_attention(maps_by_side: dict[int, torch.Tensor], out_side: int = 64) -> torch.Tensor:
    """Multi-resolution aggregation: side -> [B, side^2, side^2] head- and layer-averaged
    self-attention. Key axes are upsampled bilinearly to out_side, query axes repeated, each map
    weighted by its side (64:32:16:8, normalised) and the sum renormalised so rows sum to 1.
    Returns [B, out_side^2, out_side^2]."""
    total_weight = float(sum(maps_by_side))
    aggregated = None
    for side, maps in sorted(maps_by_side.items()):
        batch = maps.shape[0]
        keys = maps.reshape(batch * side * side, 1, side, side)
        if side != out_side:
            keys = F.interpolate(keys, size=(out_side, out_side), mode="bilinear", align_corners=False)
        keys = keys.reshape(batch, side, side, out_side * out_side)
        keys = keys / keys.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        factor = out_side // side
        full = keys.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
        term = (side / total_weight) * full.reshape(batch, out_side * out_side, out_side * out_side)
        aggregated = term if aggregated is None else aggregated.add_(term)
    return aggregated / aggregated.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def anchor_indices(side: int, anchors: int) -> torch.Tensor:
    """Pixel indices of an anchors x anchors grid, centred in its cells."""
    coords = torch.arange(anchors) * side // anchors + side // (2 * anchors)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return (rows * side + cols).flatten()


def merge_proposals(attn: torch.Tensor, side: int, anchors: int = 16, tau: float = 1.0, iterations: int = 3,
                    eps: float = 1e-8) -> torch.Tensor:
    """Iterative merging for one image. attn: [N, N] aggregated self-attention (rows sum to 1).
    Starts from the rows of the anchor pixels; each iteration replaces every proposal by the
    mean of all proposals within symmetric KL distance tau of it, keeping one of each distinct
    group. Returns proposals [K, N], each a distribution over pixels."""
    proposals = attn[anchor_indices(side, anchors)]
    for _ in range(iterations):
        distance = symmetric_kl(proposals, proposals, eps)
        groups = torch.unique((distance < tau).to(proposals.dtype), dim=0)
        proposals = (groups @ proposals) / groups.sum(dim=1, keepdim=True)
    return proposals


def segment_labels(proposals: torch.Tensor) -> torch.Tensor:
    """proposals [K, N] -> int64 [N], the proposal with the highest value at each pixel."""
    return proposals.argmax(dim=0)


def name_segments(segments: torch.Tensor, n_segments: int, candidate_maps: torch.Tensor) -> torch.Tensor:
    """Name each segment by the candidate whose map is highest on average over its pixels.
    segments: int64 [N]; candidate_maps: [N, M] (e.g. background then the classes).
    Returns int64 [n_segments] candidate indices (0 for a segment without pixels)."""
    members = F.one_hot(segments, n_segments).to(candidate_maps.dtype)  # [N, K]
    sums = members.T @ candidate_maps  # [K, M]
    means = sums / members.sum(dim=0).clamp_min(1)[:, None]
    return means.argmax(dim=1)


def named_maps(proposals: torch.Tensor, names: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """Per candidate, the maximum over the proposals named after it: [n_candidates, N] (zero
    for a candidate no proposal is named after). The argmax over candidates equals the
    argmax over proposals followed by naming."""
    out = torch.zeros(n_candidates, proposals.shape[1], dtype=proposals.dtype, device=proposals.device)
    for candidate in range(n_candidates):
        chosen = proposals[names == candidate]
        if len(chosen):
            out[candidate] = chosen.amax(dim=0)
    return out
