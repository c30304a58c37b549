"""DiffSegmenter (Wang et al., "Diffusion Model is Secretly a Training-free Open Vocabulary
Semantic Segmenter"): multi-resolution cross-attention fusion completed once by self-attention.

As the official code (VCG-team/DiffSegmenter at b3a8686, `open_vocabulary/voc12/
ptp_stable_best.py` and `evaluation_voc12.py`); docs/methods.md lists what differs. Pixel axes
are flattened row-major (N = side * side). float32 or float64 in and out.
"""

from __future__ import annotations

import torch
from pipeline.config import SegmenterConfig
from pipeline.segment.capture import CapturedAttention, CaptureSpec, Record, attention_layers
from pipeline.segment.maps import minmax, upsample_maps
from pipeline.segment.models import ModelBundle
from pipeline.segment.plan import Plan, PlannedScores, layer_sides, require_side_weights
from pipeline.segment.prompts import ClassPrompt

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
        term = weights[side] * minmax(upsample_maps(classes, out_side), dim=1)
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


class DiffSegmenterPlan(Plan):
    """DiffSegmenter: each class's cross-attention fused over resolutions (upsampled, then
    min-max scaled), completed once by the averaged full-resolution self-attention; class
    tokens weighted as Compel's `class++`. The background is a constant score (post-process)."""

    background_context = False

    def __init__(self, model: ModelBundle, config: SegmenterConfig):
        self.config = config
        self.emphasis = config.diffsegmenter.class_emphasis
        layers = attention_layers(model.unet)
        require_side_weights(layer_sides(model.unet, layers, config.image_size),
                             config.diffsegmenter.resolution_weights, "DiffSegmenter's layers (every attention layer)",
                             "diffsegmenter.resolution_weights", layers_named=False)
        self.specs = [CaptureSpec(layer, "cross", records=(Record("sum", "cross:{side}"),)) for layer in layers]
        self.specs += [CaptureSpec(layer, "self", records=(Record("sum", "self:{side}"),)) for layer in layers]

    def scores(self, store: CapturedAttention, prompts: list[ClassPrompt]) -> list[PlannedScores]:
        settings = self.config.diffsegmenter
        side, self_attn = max(store.pooled_by_prefix("self:").items())
        cross_by_side = store.pooled_by_prefix("cross:")
        results = []
        for row, prompt in enumerate(prompts):
            classes = fuse_class_maps({s: maps[row : row + 1] for s, maps in cross_by_side.items()},
                                                    prompt.columns, settings.resolution_weights, side)
            completed = complete_with_self_attention(classes, self_attn[row : row + 1])[0]
            results.append(PlannedScores(completed, None, 0.0, side))
        return results
