"""DiffSeg (Tian et al., "Diffuse, Attend, and Segment"): label-free segments from KL merging of
self-attention aggregated over all transformer blocks; segments named by cross-attention.

As the official code (google/diffseg at 77ea596, `diffseg/segmentor.py`); docs/methods.md lists
what differs. Pixel axes are flattened row-major (N = side * side). float32 or float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.segment.methods.iseg import symmetric_kl
from pipeline.config import SegmenterConfig
from pipeline.segment.capture import CapturedAttention, CaptureSpec, Record, attention_layers
from pipeline.segment.maps import grid_side, upsample_maps
from pipeline.segment.models import ModelBundle
from pipeline.segment.plan import Plan, PlannedScores
from pipeline.segment.prompts import ClassPrompt

# Added to every probability before its log: the reference takes logs of the raw maps (it has
# no eps); this only keeps an exact zero from turning a distance into NaN.
_LOG_FLOOR = 1e-30


def aggregate_self_attention(maps_by_side: dict[int, torch.Tensor], out_side: int = 64) -> torch.Tensor:
    """Multi-resolution aggregation: side -> [B, side^2, side^2] head- and layer-averaged
    self-attention. Key axes are upsampled bilinearly to out_side, each map renormalised to sum
    1, query axes repeated, each side weighted by side / sum of sides (64:32:16:8).
    Returns [B, out_side^2, out_side^2], rows summing to 1. The query repeat is a broadcast
    add into the result, so no repeated copy of a side's maps is ever made."""
    total_weight = float(sum(maps_by_side))
    reference = next(iter(maps_by_side.values()))
    batch, n_pixels = reference.shape[0], out_side * out_side
    aggregated = torch.zeros(batch, n_pixels, n_pixels, dtype=reference.dtype, device=reference.device)
    for side, maps in sorted(maps_by_side.items()):
        keys = maps.reshape(batch * side * side, 1, side, side)
        if side != out_side:
            keys = F.interpolate(keys, size=(out_side, out_side), mode="bilinear", align_corners=False)
        keys = keys.reshape(batch, side, side, n_pixels)
        keys = keys / keys.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        factor = out_side // side
        # query (i, j) of the out_side grid reads the side grid's (i // factor, j // factor)
        queries = aggregated.view(batch, side, factor, side, factor, n_pixels)
        queries.add_(((side / total_weight) * keys)[:, :, None, :, None, :])
    return aggregated


def anchor_indices(side: int, anchors: int) -> torch.Tensor:
    """Pixel indices of the reference's anchors x anchors sampling grid: evenly spaced by
    (side - 1) // (anchors - 1) and centred (1, 5, ..., 61 for 16 anchors on 64 pixels)."""
    if anchors == 1:
        coords = torch.tensor([(side - 1) // 2])
    else:
        step = (side - 1) // (anchors - 1)
        start = (side - 1 - step * (anchors - 1)) // 2
        coords = start + step * torch.arange(anchors)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return (rows * side + cols).flatten()


def first_merge(attn: torch.Tensor, anchors: torch.Tensor, tau: float) -> torch.Tensor:
    """The first merging iteration: each anchor's map is replaced by the mean of every pixel's
    map within symmetric KL distance tau of it. attn [N, N] (rows sum to 1), anchors int64 [K]
    pixel indices -> proposals [K, N]."""
    distance = symmetric_kl(attn[anchors], attn, _LOG_FLOOR)  # [K, N]
    within = (distance < tau).to(attn.dtype)
    return (within @ attn) / within.sum(dim=1, keepdim=True)


def greedy_merge(proposals: torch.Tensor, tau: float) -> torch.Tensor:
    """A later merging iteration: in order, each proposal not yet merged becomes the mean of
    every proposal within distance tau of it (merged ones included), and all of those are
    marked merged; their number falls. proposals [K, N] -> [K', N], K' <= K."""
    distance = symmetric_kl(proposals, proposals, _LOG_FLOOR)
    within = distance < tau
    merged = torch.zeros(len(proposals), dtype=torch.bool, device=proposals.device)
    kept = []
    for index in range(len(proposals)):
        if merged[index]:
            continue
        merged[index] = True
        members = within[index]
        merged |= members
        kept.append(proposals[members].mean(dim=0))
    return torch.stack(kept)


def merge_proposals(attn: torch.Tensor, side: int, anchors: int = 16, tau: float = 1.0,
                    iterations: int = 3) -> torch.Tensor:
    """Iterative attention merging for one image (the paper's Algorithm 1): `first_merge` from
    the anchor grid, then `greedy_merge` iterations - 1 times. attn [N, N] aggregated
    self-attention. Returns proposals [K, N], each a distribution over pixels."""
    proposals = first_merge(attn, anchor_indices(side, anchors).to(attn.device), tau)
    for _ in range(iterations - 1):
        proposals = greedy_merge(proposals, tau)
    return proposals


def segment_labels(proposals: torch.Tensor) -> torch.Tensor:
    """proposals [K, N] -> int64 [N], the proposal with the highest value at each pixel (the
    reference's non-maximum suppression): the label-free segment map."""
    return proposals.argmax(dim=0)


def upsample_proposals(proposals: torch.Tensor, side: int, out_side: int) -> torch.Tensor:
    """proposals [K, side^2] -> [K, out_side^2], bilinear (half-pixel centres, as the
    reference's Keras UpSampling2D)."""
    grid = proposals.reshape(1, -1, side, side)
    return F.interpolate(grid, size=(out_side, out_side), mode="bilinear", align_corners=False).flatten(2)[0]


def naming_attention(maps_by_side: dict[int, torch.Tensor], columns: list[list[int]], out_side: int) -> torch.Tensor:
    """The reference's cross-attention for naming: side -> [B, side^2, T] block-weighted
    head means. Each side's maps are upsampled bilinearly to out_side and normalised over all
    T tokens at each pixel; the sides are summed with weight 1. Returns [B, out_side^2,
    len(columns)], candidate i the mean of its token columns."""
    out = None
    for side, maps in sorted(maps_by_side.items()):
        wanted = torch.stack([maps[..., cols].mean(dim=-1) for cols in columns], dim=-1)
        # bilinear is linear: upsampling the token sum equals summing the upsampled tokens
        grid = upsample_maps(torch.cat([wanted, maps.sum(dim=-1, keepdim=True)], dim=-1), out_side)
        term = grid[..., :-1] / grid[..., -1:]
        out = term if out is None else out + term
    return out


def name_segments(segments: torch.Tensor, n_segments: int, candidate_maps: torch.Tensor) -> torch.Tensor:
    """Name each segment by the reference's mean vote: candidate maps L2-normalised over the
    pixels, averaged over the segment's pixels, highest wins. segments: int64 [N];
    candidate_maps: [N, M]. Returns int64 [n_segments] candidate indices (0 for a segment
    without pixels)."""
    normalised = candidate_maps / candidate_maps.norm(dim=0, keepdim=True).clamp_min(1e-30)
    members = F.one_hot(segments, n_segments).to(normalised.dtype)  # [N, K]
    means = (members.T @ normalised) / members.sum(dim=0).clamp_min(1)[:, None]
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
        sides = {layer: grid_side(maps) for layer, maps in means.items()}
        top = max(sides.values())
        by_side: dict[int, torch.Tensor] = {}
        for layer, maps in means.items():
            weight = 1 / 3 if layer.startswith("up_blocks") and sides[layer] == top else 1 / 5
            side = sides[layer]
            by_side[side] = by_side[side] + weight * maps if side in by_side else weight * maps
        return by_side

    def scores(self, store: CapturedAttention, prompts: list[ClassPrompt]) -> list[PlannedScores]:
        settings = self.config.diffseg
        self_by_side = store.pooled_by_prefix("self:")
        side, out_side = max(self_by_side), self.config.image_size
        aggregated = aggregate_self_attention(self_by_side, side)
        cross_by_side = self._naming_cross_attention(store)
        results = []
        for row, prompt in enumerate(prompts):
            proposals = merge_proposals(aggregated[row], side, settings.anchors, settings.tau,
                                                settings.merge_iterations)
            proposals = upsample_proposals(proposals, side, out_side)
            # candidates: each class, then each background word (a segment named by one is background)
            candidates = prompt.columns + prompt.background_groups
            naming = naming_attention({s: maps[row : row + 1] for s, maps in cross_by_side.items()},
                                              candidates, out_side)[0]
            names = name_segments(segment_labels(proposals), len(proposals), naming)
            named = named_maps(proposals, names, len(candidates))
            n_classes = len(prompt.columns)
            background = (named[n_classes:].amax(dim=0) if len(candidates) > n_classes
                          else torch.zeros_like(named[0]))
            results.append(PlannedScores(named[:n_classes].T, background, 0.0, out_side))
        return results
