"""GoCA (Meng et al., "Making Training-Free Diffusion Segmentors Scale with the Generative
Power"): head- and layer-wise auto aggregation of cross-attention and per-pixel rescaling.

As the official code (Darkbblue/goca at 475892f, `src-main/components/cross_attn_dispatch.py`
and `postprocess_dispatch.py` with `configs/config-model/config_model_15.py`); docs/methods.md
lists what differs. Pixel axes are flattened row-major (N = side * side). float32 or float64.
"""

from __future__ import annotations

import math

import torch
from pipeline.config import ConfigError, SegmenterConfig
from pipeline.segment.capture import CapturedAttention, CaptureSpec, Record, attention_layers, layer_side
from pipeline.segment.maps import TINY, minmax, upsample_maps
from pipeline.segment.models import ModelBundle
from pipeline.segment.plan import Plan, PlannedScores, layer_sides, require_one_side, single_side
from pipeline.segment.prompts import ClassPrompt
import torch.nn.functional as F



def head_weights(head_outputs: torch.Tensor) -> torch.Tensor:
    """Head-wise weights ('dot-product w/o clamp'). head_outputs: [B, H, N, D], each head's
    contribution A_h V_h W_o,h to the layer output. Each head's weight at a pixel is its dot
    product with the sum over heads, divided by the sum of those dots (the squared norm of the
    sum); a head opposing the others gets a negative weight. Returns [B, H, N]."""
    total = head_outputs.sum(dim=1, keepdim=True)
    dots = (head_outputs * total).sum(dim=-1)
    return dots / dots.sum(dim=1, keepdim=True).clamp_min(TINY)


def pseudo_global_attention(queries: torch.Tensor) -> torch.Tensor:
    """queries [B, N, D] of the reference layer (all heads, D = the layer's inner dimension)
    -> softmax(Q Q^T / sqrt(D)) [B, N, N]."""
    scores = queries @ queries.transpose(1, 2) / math.sqrt(queries.shape[-1])
    return scores.softmax(dim=-1)


def reference_queries(queries: torch.Tensor, channels: str) -> torch.Tensor:
    """queries [B, N, D] -> the channels the pseudo global attention is built from: "first"
    ([B, N, 1], channel 0 alone, as the official code's double index leaves it) or "all"."""
    return queries[..., :1] if channels == "first" else queries


def layer_weights(self_maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Layer-wise weights ('dot-product similarity'). self_maps: [L, B, M, M] each layer's
    head-averaged self-attention resized to the reference side (`capture.resize_query_key`);
    reference: [B, M, M] pseudo
    global attention. The raw dot product of each layer with the reference, clamped at 0 and
    normalised over layers. Returns [L, B]."""
    similarity = (self_maps * reference[None]).flatten(2).sum(dim=-1).clamp_min(0)
    return similarity / similarity.sum(dim=0, keepdim=True).clamp_min(TINY)


def rescaled_objects(tokens: torch.Tensor, groups: list[list[int]], rescaling_columns: list[int]) -> torch.Tensor:
    """One image's layer-aggregated cross-attention tokens [N, T] -> [N, len(groups)]: clamped
    at 0 and normalised over all T tokens at each pixel, each group (a class's or a background
    object's tokens) averaged, then divided by the sum over the rescaling (content) tokens."""
    raw = tokens.clamp_min(0)
    raw = raw / raw.sum(dim=1, keepdim=True).clamp_min(TINY)
    objects = torch.stack([raw[:, group].mean(dim=1) for group in groups], dim=1)
    return objects / raw[:, rescaling_columns].sum(dim=1, keepdim=True).clamp_min(TINY)


def gaussian_kernel(size: int, sigma: float, dtype=torch.float32) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    one = torch.exp(-(coords**2) / (2 * sigma**2))
    return (one[:, None] * one[None, :]) / one.sum() ** 2


def blur_and_minmax(maps: torch.Tensor, side: int, kernel: int = 5, sigma: float = 1.1) -> torch.Tensor:
    """maps [N, G] -> [N, G]: each map blurred with a kernel x kernel Gaussian (reflect
    padding, as torchvision's gaussian_blur) and min-max scaled to [0, 1]."""
    grid = maps.T.reshape(-1, 1, side, side)
    weight = gaussian_kernel(kernel, sigma, maps.dtype).to(maps.device)[None, None]
    blurred = F.conv2d(F.pad(grid, [kernel // 2] * 4, mode="reflect"), weight)
    return minmax(blurred.flatten(1).T, dim=0)


def propagate(maps: torch.Tensor, affinity: torch.Tensor, power: int) -> torch.Tensor:
    """maps [B, N, G] propagated `power` times through the affinity [B, N, N]."""
    for _ in range(power):
        maps = torch.bmm(affinity, maps)
    return maps


class GocaPlan(Plan):
    """GoCA: head-weighted cross-attention of every block, layer weights from the similarity of
    each block's self-attention to a pseudo global attention, per-pixel rescaling over content
    tokens, blur and min-max, propagation through the self-attention affinity, min-max again."""

    prompt_style = "list"  # GoCA's entity list: classes, background words, "background"

    def __init__(self, model: ModelBundle, config: SegmenterConfig):
        self.config = config
        self.layers = attention_layers(model.unet)
        settings = config.goca
        if not settings.propagation_layers:  # the names themselves are checked by the Segmenter
            raise ConfigError(f"goca.propagation_layers is empty: name some of {', '.join(self.layers)}")
        require_one_side(layer_sides(model.unet, settings.propagation_layers, config.image_size),
                         "goca.propagation_layers")
        self.reference_side = layer_side(settings.reference_layer, config.image_size // 8,
                                          len(model.unet.down_blocks))
        self.specs = []
        for layer in self.layers:
            records = [Record("weighted", "{layer}:cross", head_weights=head_weights)]
            if layer == settings.reference_layer:
                records.append(Record("queries", "reference"))
            self.specs.append(CaptureSpec(layer, "cross", records=tuple(records)))
        for layer in self.layers:
            records = [Record("sum", "{layer}:selfref", self.reference_side)]
            if layer in settings.propagation_layers:
                records.append(Record("sum", "propagation"))
            self.specs.append(CaptureSpec(layer, "self", records=tuple(records)))

    def scores(self, store: CapturedAttention, prompts: list[ClassPrompt]) -> list[PlannedScores]:
        settings = self.config.goca
        reference = pseudo_global_attention(
            reference_queries(store.sums["reference"], settings.reference_query_channels))
        self_ref = torch.stack([store.sums[f"{layer}:selfref"] for layer in self.layers])  # [L, B, M, M]
        weights = layer_weights(self_ref, reference)  # [L, B]
        side, affinity = single_side(store.pooled_by_side(["propagation"]), "propagation_layers")
        fused = None
        for index, layer in enumerate(self.layers):
            term = weights[index][:, None, None] * upsample_maps(store.sums[f"{layer}:cross"], side)  # [B, N, T]
            fused = term if fused is None else fused + term
        results = []
        for row, prompt in enumerate(prompts):
            n_classes = len(prompt.columns)
            objects = rescaled_objects(fused[row], prompt.columns + prompt.background_groups,
                                            prompt.content_columns)
            objects = blur_and_minmax(objects, side, settings.blur_kernel, settings.blur_sigma)
            maps = objects[:, :n_classes]
            if objects.shape[1] > n_classes:  # background: the strongest background object
                maps = torch.cat([maps, objects[:, n_classes:].amax(dim=1, keepdim=True)], dim=1)
            maps = propagate(maps[None], affinity[row : row + 1], settings.propagation_power)[0]
            maps = minmax(maps, dim=0)
            background = maps[:, n_classes] if maps.shape[1] > n_classes else torch.zeros_like(maps[:, 0])
            results.append(PlannedScores(maps[:, :n_classes], background, 0.0, side))
        return results
