"""iSeg: its pure tensor functions (Cat-Cross, Ent-Self, iterative refinement, background rules)
and its plan (what it captures and how it turns that into class maps).

The functions take tensors and return tensors: no models, no files, no devices chosen there. Every function accepts
float32 or float64 and returns the same dtype; the stages the official code runs in float16 on a
float16 model (fusion, the cluster average, the class columns) also take float16 and round as it
does. Pixel axes are flattened row-major (N = side * side) unless a function says otherwise.
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, SegmenterConfig
from pipeline.segment.capture import (CapturedAttention, CaptureSpec, Record, attention_modules, forward_rank,
                                      layer_side)
from pipeline.segment.maps import TINY, grid_side, minmax, upsample_maps
from pipeline.segment.models import ModelBundle
from pipeline.segment.plan import Plan, PlannedScores, layer_sides, require_one_side, require_side_weights, single_side
from pipeline.segment.prompts import ClassPrompt
from pipeline.segment.transfer import to_device

# Guards divisions by an all-zero row or column; far below any value the method produces.


def fuse_cross_attention(
    maps_by_side: dict[int, torch.Tensor], weights: dict[int, float], out_side: int
) -> torch.Tensor:
    """Weighted fusion of cross-attention over resolutions.

    maps_by_side: side -> [B, side*side, T] head-averaged probabilities of one resolution.
    Each token map is normalised to sum 1 over pixels, upsampled bilinearly
    (align_corners=False) to out_side x out_side and weighted by weights[side], in the maps'
    dtype; the weighted maps are summed in float32 or wider and rounded once to that dtype (as
    the official stack-and-sum). Returns [B, out_side*out_side, T].
    """
    if not maps_by_side:
        raise ValueError("no cross-attention maps to fuse")
    dtype = next(iter(maps_by_side.values())).dtype
    wide = torch.promote_types(dtype, torch.float32)
    fused = None
    for side, maps in maps_by_side.items():
        if grid_side(maps) != side:
            raise ValueError(f"maps for side {side} have {maps.shape[1]} pixels, expected {side * side}")
        if side not in weights:
            raise ValueError(f"no fusion weight for {side}x{side} cross-attention maps")
        normalised = maps / maps.sum(dim=1, keepdim=True).clamp_min(TINY)
        term = (weights[side] * upsample_maps(normalised, out_side)).to(wide)
        fused = term if fused is None else fused + term
    return fused.to(dtype)


def symmetric_kl(points: torch.Tensor, centres: torch.Tensor, eps: float,
                 point_terms: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """0.5 * (KL(p||q) + KL(q||p)) between rows of points [..., N, T] and centres [..., K, T]
    -> [..., N, K] (leading batch axes shared). Logs are taken of (value + eps).
    point_terms: `kl_terms(points, eps)` when already computed (k-means reuses them)."""
    log_p, p_log_p = point_terms if point_terms is not None else kl_terms(points, eps)
    log_q, q_log_q = kl_terms(centres, eps)
    kl_pq = p_log_p - points @ log_q.transpose(-1, -2)
    kl_qp = q_log_q.transpose(-1, -2) - log_p @ centres.transpose(-1, -2)
    return 0.5 * (kl_pq + kl_qp)


def kl_terms(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., M, T] -> (log(x + eps) [..., M, T], sum over T of x * log(x + eps) [..., M, 1])."""
    log_x = torch.log(x + eps)
    return log_x, (x * log_x).sum(dim=-1, keepdim=True)


def grid_seed_indices(side: int, n_clusters: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixel indices of k-means seeds on a regular grid, stride side // sqrt(n_clusters),
    made on device (no host-to-device copy).

    For side 64 and 32 clusters the stride is 11, giving a 6x6 grid of 36 seeds.
    """
    stride = max(1, int(side // math.sqrt(n_clusters)))
    coords = torch.arange(0, side, stride, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return (rows * side + cols).flatten()


# Elements of one [batch, centres, pixels, tokens] block of the float16 distance: bounds its
# temporaries (about 64 MiB each) whatever the batch size.
_HALF_KL_BLOCK = 1 << 25


def symmetric_kl_half(centres: torch.Tensor, points: torch.Tensor, eps: float) -> torch.Tensor:
    """The official iSeg code's KL distance, op for op in float16: centres [B, K, T], points
    [B, N, T] -> float16 [B, K, N].

    Both sides are cast to float16 and eps added there; then 0.5 * sum_T a (ln a - ln b)
    - 0.5 * sum_T b (ln a - ln b), every intermediate rounded to float16 as the reference
    computes it. float16 distances tie often, and k-means then keeps the lowest centre, so the
    rounding itself decides clusters: a float32 distance moves 16-24% of pixels on random
    weights. Computed in blocks of centres so the [B, K, N, T] difference never exists whole.
    """
    a = centres.to(torch.float16) + eps
    b = points.to(torch.float16) + eps
    log_a, log_b = torch.log(a), torch.log(b)
    batch, n_centres, n_tokens = a.shape
    n_points = b.shape[1]
    step = max(1, _HALF_KL_BLOCK // max(1, batch * n_points * n_tokens))
    out = torch.empty(batch, n_centres, n_points, dtype=torch.float16, device=a.device)
    for k in range(0, n_centres, step):
        quotient = log_a[:, k : k + step, None, :] - log_b[:, None, :, :]  # [B, k, N, T]
        forward = torch.sum(a[:, k : k + step, None, :] * quotient, dim=-1) * 0.5
        backward = -torch.sum(b[:, None, :, :] * quotient, dim=-1) * 0.5
        out[:, k : k + step] = forward + backward
    return out


def gathered_means(points: torch.Tensor, nearest: torch.Tensor, n_centres: int) -> torch.Tensor:
    """Cluster centres [B, K, T] as the official code computes them on the CPU: torch's own
    mean over each cluster's gathered points [B, N, T] (nearest [B, N]: each point's cluster);
    rows of empty clusters are 0. A one-hot matmul sums in another order, and near-flat
    attention (random weights) turns those last-bit differences into other clusters within a
    few rounds. One host synchronisation per image and cluster."""
    centres = torch.zeros(points.shape[0], n_centres, points.shape[2], dtype=points.dtype, device=points.device)
    for image, (image_points, image_nearest) in enumerate(zip(points, nearest)):
        for cluster in torch.unique(image_nearest).tolist():
            centres[image, cluster] = image_points[image_nearest == cluster].mean(dim=0)
    return centres


def one_hot_means(values: torch.Tensor, members: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Cluster means [B, K, T] of values [B, N, T] from one matmul: members [B, N, K] (values'
    dtype) is each point's one-hot cluster, counts [B, K] the cluster sizes (float32 or wider:
    float16 counts stop being exact above 2048); rows of empty clusters are 0. The sums are
    rounded to values' dtype, then the quotients (as the official matmul then division). No
    host synchronisation (the centres on a GPU, where no reduction order matches the CPU
    reference anyway)."""
    return ((members.transpose(1, 2) @ values) / counts.clamp_min(1)[:, :, None]).to(values.dtype)


def one_hot_centres(points: torch.Tensor, members: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Cluster centres [B, K, T] as a GPU computes them: `one_hot_means` of points [B, N, T]
    summed in counts' dtype (float32 or wider) and rounded once to points' dtype, as torch's
    mean of a float16 cluster's gathered members rounds (`gathered_means`, the official and
    CPU path); members [B, N, K] one-hot, counts [B, K] cluster sizes."""
    wide = counts.dtype
    return one_hot_means(points.to(wide), members.to(wide), counts).to(points.dtype)


def kl_cluster_average(
    x: torch.Tensor, side: int, n_clusters: int = 32, iterations: int = 20, eps: float = 1e-5,
    distance_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Replace each pixel vector by the mean of its KL-k-means cluster (Cat-Cross).

    x: [N, T] or a batch [B, N, T], N = side*side non-negative pixel vectors (one column per
    token); images of a batch are clustered independently, in one chain of batched kernels.
    As the official code: zeros become 1e-6 for the clustering; seeds are the grid pixels of
    `grid_seed_indices`; each of `iterations` rounds assigns pixels to the nearest centre by
    symmetric KL (`symmetric_kl_half` for float16, `symmetric_kl` for float32) and moves the
    centres to their members' means. The result keeps the last round's assignment (no extra
    assignment after the last move) and averages the raw values of x, not the substituted
    ones. A cluster that loses all its pixels is dropped for good (ties go to the lowest seed
    index, as if dropped clusters were removed). Means are taken in x's dtype (float16 x as
    the official code on a float16 model). On the CPU the rounds stop once an assignment
    repeats the one before: a fixed point, so the result is the one all rounds give. Returns
    x's shape and dtype.
    """
    if x.shape[-2] != side * side:
        raise ValueError(f"x has {x.shape[-2]} rows, expected side*side = {side * side}")
    if iterations < 1:
        raise ValueError("kl_cluster_average needs at least one iteration")
    raw = x[None] if x.ndim == 2 else x
    points = torch.where(raw == 0, torch.full_like(raw, 1e-6), raw)
    centres = points[:, grid_seed_indices(side, n_clusters, points.device)]  # [B, K, T]
    n_centres = centres.shape[1]
    alive = torch.ones(centres.shape[:2], dtype=torch.bool, device=points.device)  # [B, K]
    point_terms = kl_terms(points, eps) if distance_dtype == torch.float32 else None
    on_host, previous = points.device.type == "cpu", None
    for _ in range(iterations):
        if distance_dtype == torch.float16:
            distance = symmetric_kl_half(centres, points, eps)  # [B, K, N]
            nearest = distance.masked_fill(~alive[:, :, None], math.inf).argmin(dim=1)
        else:
            distance = symmetric_kl(points, centres, eps, point_terms)  # [B, N, K]
            nearest = distance.masked_fill(~alive[:, None, :], math.inf).argmin(dim=2)
        if on_host and previous is not None and torch.equal(nearest, previous):
            # A fixed point: the same members give the same centres (bit for bit), so every
            # later round repeats this one; the result is the last round's, computed already.
            # Checked on the host only: on a GPU the comparison would make it wait.
            break
        previous = nearest
        members = F.one_hot(nearest, n_centres).to(points.dtype)  # [B, N, K]
        counts = members.sum(dim=1, dtype=torch.promote_types(points.dtype, torch.float32))  # [B, K]
        alive = alive & (counts > 0)
        if points.device.type == "cpu":
            centres = gathered_means(points, nearest, n_centres)
        else:
            centres = one_hot_centres(points, members, counts)
    # the official average: the members' sums rounded to x's dtype, then the quotients
    return (members @ one_hot_means(raw, members, counts)).reshape(x.shape)


def class_maps_from_tokens(token_maps: torch.Tensor, columns: list[list[int]]) -> torch.Tensor:
    """Per-class maps as the mean of each class's token columns.

    token_maps: [N, T]; columns: one list of token positions per class. Returns [N, C].
    """
    return class_maps_from_token_batch(token_maps[None], [columns])[0]


def class_maps_from_token_batch(token_maps: torch.Tensor, columns: list[list[list[int]]]) -> torch.Tensor:
    """`class_maps_from_tokens` for a batch in one matmul.

    token_maps: [B, N, T]; columns: per image, one list of token positions per class.
    Returns [B, N, Cmax] in token_maps' dtype (computed in float32 or wider and rounded once,
    as torch's float16 mean), Cmax the most classes of an image; an image's columns past its
    own classes are zero.
    """
    batch, _, n_tokens = token_maps.shape
    weights = np.zeros((batch, n_tokens, max(len(c) for c in columns)))  # built on the host, one copy over
    for row, per_class in enumerate(columns):
        for index, cols in enumerate(per_class):
            weights[row, cols, index] = 1.0 / len(cols)
    compute = torch.promote_types(token_maps.dtype, torch.float32)
    weights = to_device(torch.from_numpy(weights), token_maps.device).to(compute)
    return torch.bmm(token_maps.to(compute), weights).to(token_maps.dtype)


def entropy_reduced_self_attention(attn: torch.Tensor, ent: float) -> torch.Tensor:
    """Ent-Self: reduce the entropy of self-attention by one gradient-descent step.

    attn: [B, N, N], queries on axis 1, keys on axis 2, rows summing to 1 over keys.
    Each key column is divided by its maximum over queries, then every positive entry moves
    A <- A + eta * (1 + ln A) with eta = ent / ln 10 (a descent step on -sum A ln A),
    negatives are clamped to 0 and rows renormalised. Returns the row-stochastic [B, N, N].

    Computed as e*A + e*eta*ln(e*A) = e*(A + eta*(1 + ln A)): the factor e cancels in the row
    normalisation, which saves the passes that add 1 and mask zeros (ln 0 = -inf, clamped to
    0) over the N x N tensor; attn itself is left unchanged.
    """
    if ent == 0:
        refined = attn / attn.amax(dim=1, keepdim=True).clamp_min(TINY)
    else:
        refined = attn * (math.e / attn.amax(dim=1, keepdim=True).clamp_min(TINY))  # e * A
        refined.add_(torch.log(refined), alpha=math.e * ent / math.log(10.0)).clamp_(min=0.0)
    return refined.div_(refined.sum(dim=2, keepdim=True).clamp_min(TINY))


def shift_and_normalise(maps: torch.Tensor) -> torch.Tensor:
    """maps [B, N, C]: each class column shifted to minimum 0 and divided by its sum."""
    shifted = maps - maps.amin(dim=1, keepdim=True)
    return shifted / shifted.sum(dim=1, keepdim=True).clamp_min(TINY)


def iterative_refinement(cross: torch.Tensor, self_attn: torch.Tensor, iterations: int) -> torch.Tensor:
    """Refine class maps by repeated propagation through a fixed self-attention.

    cross: [B, N, C] initial class maps; self_attn: [B, N, N] row-stochastic (as returned by
    `entropy_reduced_self_attention`, or raw for naive iteration). C <- P C, then each
    column is shifted to min 0 and normalised to sum 1; `iterations` times. Returns [B, N, C].
    """
    maps = shift_and_normalise(cross)
    for _ in range(iterations):
        maps = shift_and_normalise(torch.bmm(self_attn, maps))
    return maps


def scale_class_scores(scores: torch.Tensor) -> torch.Tensor:
    """Class scores [..., H, W] at the mask's size min-max scaled over (H, W) (+1e-6), as both
    background rules read them."""
    return minmax(scores, (-2, -1), eps=1e-6)


def squared_background(best: torch.Tensor) -> torch.Tensor:
    """VOC rule: a pixel's background score (1 - best)^2 from its best scaled class score (any shape)."""
    return (1.0 - best) ** 2


def threshold_background(best: torch.Tensor, threshold: float) -> torch.Tensor:
    """COCO rule: a pixel whose best scaled class score is below `threshold` is background,
    scored 1 - best; elsewhere the background scores 0 (any shape)."""
    return torch.where(best >= threshold, torch.zeros_like(best), 1.0 - best)


def threshold_kept(scaled: torch.Tensor, threshold: float) -> torch.Tensor:
    """COCO rule: scaled class scores below `threshold` dropped to 0 (any shape)."""
    return torch.where(scaled >= threshold, scaled, torch.zeros_like(scaled))


def squared_background_scores(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """VOC rule. scores [B, C, H, W] (any range), present bool [B, C].

    Classes are min-max scaled (+1e-6), absent classes zeroed, and background scored
    (1 - max over classes)^2. Returns [B, 1 + C, H, W], background first.
    """
    scaled = scale_class_scores(scores) * present[:, :, None, None].to(scores.dtype)
    return torch.cat([squared_background(scaled.amax(dim=1, keepdim=True)), scaled], dim=1)


def squared_background_labels(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """VOC rule labels: int64 [B, H, W], 0 background, k + 1 for class k."""
    return squared_background_scores(scores, present).argmax(dim=1)


def threshold_background_scores(
    scores: torch.Tensor, present: torch.Tensor, threshold: float = 0.45
) -> torch.Tensor:
    """COCO rule. Min-max scaled class scores below `threshold` are dropped; a pixel left
    with no class is background, scored 1 - its best class score. Returns [B, 1 + C, H, W]."""
    scaled = scale_class_scores(scores) * present[:, :, None, None].to(scores.dtype)
    best = scaled.amax(dim=1, keepdim=True)
    return torch.cat([threshold_background(best, threshold), threshold_kept(scaled, threshold)], dim=1)


def threshold_background_labels(scores: torch.Tensor, present: torch.Tensor, threshold: float = 0.45) -> torch.Tensor:
    """COCO rule labels: int64 [B, H, W], 0 background, k + 1 for class k."""
    return threshold_background_scores(scores, present, threshold).argmax(dim=1)


def iseg_class_maps(cross_by_side: dict[int, torch.Tensor], self_attn: torch.Tensor,
                    columns: list[list[list[int]]], config: "SegmenterConfig") -> tuple[torch.Tensor, list]:
    """The whole of iSeg after the UNet, for a batch: head-averaged cross-attention by side
    (side -> [B, side*side, T]) and self-attention [B, N, N] (N = side*side of the self layer)
    -> refined class maps [B, N, Cmax] (an image's columns past its own classes are zero) and
    per image the refinement delta (mean absolute change in the last iteration; a 0-d tensor
    on the maps' device, or 0.0 without iterations).

    Fusion, Cat-Cross KL cluster averaging (config.cat_cross), class columns, Ent-Self
    (config.ent_self) and `config.iterations` rounds of refinement, with the config's constants.
    As the official code, the stages up to the class columns run in the attention's dtype
    (float16 from a float16 model) and the rest in float32 or wider: the maps returned are
    float32 for float16 attention.
    """
    side = grid_side(self_attn)
    fused = fuse_cross_attention(cross_by_side, config.cross_attention.resolution_weights, side)
    if config.cat_cross:
        fused = kl_cluster_average(fused, side, config.cluster.n_clusters, config.cluster.iterations,
                                   distance_dtype=getattr(torch, config.cluster.distance_dtype))
    compute = torch.promote_types(fused.dtype, torch.float32)
    padded = class_maps_from_token_batch(fused, columns).to(compute)  # [B, N, Cmax]
    self_attn = self_attn.to(compute)
    propagation = entropy_reduced_self_attention(self_attn, config.ent) if config.ent_self else self_attn
    iterations = config.iterations
    before = iterative_refinement(padded, propagation, max(iterations - 1, 0))
    after = iterative_refinement(before, propagation, 1) if iterations else before
    if not iterations:
        return after, [0.0] * len(columns)
    # mean over each image's own columns; padding columns stay zero in both
    widths = torch.tensor([len(c) for c in columns], dtype=after.dtype) * after.shape[1]
    return after, list((after - before).abs().sum(dim=(1, 2)) / to_device(widths, after.device))


def official_head_order(unet: torch.nn.Module, specs: list[CaptureSpec], head_order: dict[int, list[int]],
                        latent_side: int) -> dict[int, list[tuple[str, int]]]:
    """The official code's head indices (per side, into the heads of that side's layers
    concatenated in forward order) as (store key, head) pairs; they must name exactly the heads
    the specs keep."""
    n_blocks = len(unet.down_blocks)
    pairs_by_side: dict[int, list[tuple[str, int]]] = {}
    for side, indices in head_order.items():
        at_side = sorted((s for s in specs if layer_side(s.layer, latent_side, n_blocks) == side),
                         key=lambda s: forward_rank(s.layer))
        concatenated = [(f"{s.layer}:{s.kind}", head) for s in at_side
                        for head in range(attention_modules(unet, s)[0][1].heads)]
        kept = {(f"{s.layer}:{s.kind}", head) for s in at_side for head in s.heads or ()}
        pairs = [concatenated[i] for i in indices if 0 <= i < len(concatenated)]
        if len(pairs) != len(indices) or set(pairs) != kept or len(set(pairs)) != len(pairs):
            raise ConfigError(f"cross_attention.head_order[{side}] does not name the heads cross_attention.layers "
                             f"keep at side {side}: make it match them, or set head_order to null")
        pairs_by_side[side] = pairs
    return pairs_by_side


class IsegPlan(Plan):
    """iSeg: Cat-Cross, Ent-Self, iterative refinement (and its ablations via the config)."""

    enhance = True

    def __init__(self, model: ModelBundle, config: SegmenterConfig):
        self.config = config
        use_subsets = model.heads_per_block == list(config.head_layout)
        if not use_subsets and any(l.heads for l in [*config.cross_attention.layers, *config.self_attention.layers]):
            self.notes = (f"this model's attention blocks have {model.heads_per_block} heads, where head_layout "
                          f"expects {list(config.head_layout)} (SD 2.x's, by default): the config's head subsets are "
                          "left out and every head is averaged, a setting the published numbers were not measured in",)
        records = (Record(keep_heads=True),)
        self.cross_specs = [CaptureSpec(l.name, "cross", l.heads if use_subsets else None, records)
                            for l in config.cross_attention.layers]
        self.self_specs = [CaptureSpec(l.name, "self", l.heads if use_subsets else None, records)
                           for l in config.self_attention.layers]
        self.specs = self.cross_specs + self.self_specs
        require_side_weights(layer_sides(model.unet, [s.layer for s in self.cross_specs], config.image_size),
                             config.cross_attention.resolution_weights, "cross_attention.layers",
                             "cross_attention.resolution_weights")
        require_one_side(layer_sides(model.unet, [s.layer for s in self.self_specs], config.image_size),
                         "self_attention.layers")
        order = config.cross_attention.head_order
        # the official order of the head mean; the fused kernel sums heads inside the processor
        per_head = config.attention_kernel == "official"
        self.cross_order = (official_head_order(model.unet, self.cross_specs, order, config.image_size // 8)
                            if order and use_subsets and per_head else None)

    def scores(self, store: CapturedAttention, prompts: list[ClassPrompt]) -> list[PlannedScores]:
        cross_by_side = store.pooled_by_side([f"{s.layer}:cross" for s in self.cross_specs], self.cross_order)
        # Self-attention row-major: Ent-Self already rounds unlike the official code (docs/method.md),
        # so the layout costs no agreement, and the ten propagation products run 5x faster on a CPU.
        self_keys = [f"{s.layer}:self" for s in self.self_specs]
        side, self_attn = single_side(store.pooled_by_side(self_keys, key_major=False), "self")
        maps, deltas = iseg_class_maps(cross_by_side, self_attn, [prompt.columns for prompt in prompts],
                                            self.config)
        return [PlannedScores(maps[row, :, :len(prompt.columns)], None, delta, side)
                for row, (prompt, delta) in enumerate(zip(prompts, deltas))]
