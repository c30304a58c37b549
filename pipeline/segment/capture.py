"""Attention processors that record head-reduced softmax probabilities on named layers.

Only the layers a method reads get an `AttentionCaptureProcessor`; every other layer keeps
its processor. Two kernels:

- "official" (the default): the read layers compute their output as the official iSeg code's
  recording processor does (diffusers' classic path: `baddbmm` scores, softmax, `bmm`), and the
  probabilities of that same softmax are recorded, head by head in float32. With
  `Record.keep_heads` every kept head's map is stored, so the head mean can be summed in the
  order the official code sums it (`pooled_by_side(order=...)`).
- "fused": the output comes from the same SDPA call as diffusers' `AttnProcessor2_0`, so the
  UNet is unchanged bit for bit from a plain one, and the probabilities are computed only for
  the kept heads and summed inside the processor: no per-head map is stored.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor

from pipeline.config import ConfigError
from pipeline.segment.maps import grid_side, square_side

# Above this many (query x key) entries per head, heads are reduced one at a time.
_PER_HEAD_ENTRIES = 1 << 20


@dataclass
class CapturedAttention:
    """Per layer: the sum over kept heads of softmax probabilities [B, N_query, N_key] (float32)
    and the number of heads summed."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)
    head_maps: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # key -> head -> [B, Nq, Nk]

    def clear(self) -> None:
        self.sums.clear()
        self.heads.clear()
        self.head_maps.clear()

    def add_head_maps(self, key: str, by_head: dict[int, torch.Tensor]) -> None:
        """Keep each head's map [B, Nq, Nk] of by_head (head index -> map) under key, in its own
        dtype (the model's: float16 on a GPU, as the official code keeps them); keys are kept in
        the order they are first added (the UNet's forward order)."""
        maps = self.head_maps.setdefault(key, {})
        for head, probs in by_head.items():
            if head in maps:
                raise ValueError(f"{key} recorded head {head} twice: name one attention module per layer key")
            maps[head] = probs

    def add(self, key: str, head_sum: torch.Tensor, n_heads: int) -> None:
        if key in self.sums:
            self.sums[key] = self.sums[key] + head_sum
            self.heads[key] += n_heads
        else:
            self.sums[key] = head_sum
            self.heads[key] = n_heads

    def pooled_by_side(self, keys: list[str], order: dict[int, list[tuple[str, int]]] | None = None,
                       key_major: bool = True) -> dict[int, torch.Tensor]:
        """Mean over all kept heads of the given layers, grouped by query side:
        side -> [B, side*side, N_key]. Layers recorded head by head (`add_head_maps`) are
        stacked in `order[side]` ((key, head) pairs) where given, else layer by layer in
        forward order and heads ascending, and averaged with one `mean` over the stack: a view
        of key-major memory (key_major), else row-major, queries outermost. Their means keep
        the maps' dtype (float16 maps: summed in float32, rounded once, as torch's float16
        mean); summed layers (`add`) are float32."""
        in_order: dict[int, list[torch.Tensor]] = {}
        for key in (k for k in self.head_maps if k in keys):  # forward order
            for probs in self.head_maps[key].values():
                in_order.setdefault(grid_side(probs), []).append(probs)
        for side, pairs in (order or {}).items():
            missing = [pair for pair in pairs if pair[1] not in self.head_maps.get(pair[0], {})]
            if missing:
                raise KeyError(f"the head order of side {side} names heads not recorded: {missing[:3]}")
            in_order[side] = [self.head_maps[key][head] for key, head in pairs]
        # One `mean` over the stacked maps, laid out key-major as the official code's `.mean(1)`
        # over its [B, heads, keys, h, w] maps leaves them: torch's rounding of a reduction
        # depends on the layout and the head count, and so does every later op's.
        if key_major:
            means = {side: torch.stack(maps, dim=1).transpose(-1, -2).mean(dim=1).transpose(-1, -2)
                     for side, maps in in_order.items()}
        else:
            means = {side: _sequential_mean(maps) for side, maps in in_order.items()}
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        for key in keys:
            if key in self.head_maps:
                continue
            if key not in self.sums:
                raise KeyError(f"layer {key} captured nothing: was the UNet run after install_capture?")
            side = grid_side(self.sums[key])
            sums[side] = sums[side] + self.sums[key] if side in sums else self.sums[key]
            counts[side] = counts.get(side, 0) + self.heads[key]
        if set(means) & set(sums):
            raise ValueError("layers of one side are recorded both head by head and summed: use one Record kind per side")
        pooled = {side: sums[side] / counts[side] for side in sums}
        pooled.update(means)
        return dict(sorted(pooled.items()))

    def pooled_by_prefix(self, prefix: str) -> dict[int, torch.Tensor]:
        """`pooled_by_side` over every key starting with prefix (e.g. "self:" for the
        per-resolution keys "self:{side}")."""
        return self.pooled_by_side([k for k in self.sums if k.startswith(prefix)])


@lru_cache(maxsize=None)
def _head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The kept heads as an index tensor on device, made once per process: indexing a GPU
    tensor with a Python list copies the list to the GPU and synchronises, at every call."""
    return torch.tensor(heads, device=device)


def _head_probability_sum(query: torch.Tensor, key: torch.Tensor, heads: list[int], scale: float) -> torch.Tensor:
    """query [B, H, Nq, D], key [B, H, Nk, D] -> sum over `heads` of softmax(q k^T * scale),
    [B, Nq, Nk] in float32 (float64 for a float64 model). The scale is applied to the queries
    (exact where the scale is a power of two, as SD 2.1's 1/8), sparing a pass over the
    Nq x Nk scores."""
    n_query, n_key = query.shape[2], key.shape[2]
    dtype = torch.promote_types(query.dtype, torch.float32)
    if n_query * n_key <= _PER_HEAD_ENTRIES:
        index = _head_index(tuple(heads), query.device)
        q, k = query.index_select(1, index) * scale, key.index_select(1, index)
        return torch.matmul(q, k.transpose(-1, -2)).softmax(dim=-1, dtype=dtype).sum(dim=1)
    total = None
    for head in heads:
        probs = torch.matmul(query[:, head] * scale, key[:, head].transpose(-1, -2)).softmax(dim=-1, dtype=dtype)
        total = probs if total is None else total.add_(probs)
    return total


def _left_to_right_sum(maps: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of same-shape maps, added one at a time in the given order into one new
    row-major tensor (the maps themselves are left as they are). Maps may come from a
    generator, so that only one converted map exists at a time."""
    maps = iter(maps)
    first, second = next(maps), next(maps, None)
    total = first.clone() if second is None else first + second
    for more in maps:
        total.add_(more)
    return total


def _sequential_mean(maps: list[torch.Tensor]) -> torch.Tensor:
    """The mean of same-shape maps, summed left to right into one new row-major tensor, in
    their dtype; float16 maps are summed and divided in float32 and rounded once (as torch's
    float16 mean). A CPU matmul with a 4096 x 4096 map as its left operand runs at a fifth of
    the speed over key-major memory, and each fresh 64 MiB tensor costs its page faults (a
    stack and a mean of two such maps took 0.14 s per image on the development CPU)."""
    dtype = maps[0].dtype
    compute = torch.promote_types(dtype, torch.float32)
    return _left_to_right_sum(m.to(compute) for m in maps).div_(len(maps)).to(dtype)


def _sequential_head_sum(probs: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """probs [B, H, Nq, Nk] -> the sum over `heads` [B, Nq, Nk] in float32, one head at a time
    in the listed order (as a mean over a head axis sums)."""
    dtype = torch.promote_types(probs.dtype, torch.float32)
    return _left_to_right_sum(probs[:, head].to(dtype) for head in heads)


def resize_query_key(attn: torch.Tensor, out_side: int) -> torch.Tensor:
    """Self-attention [B, N, N] (N = side^2) -> [B, M, M] (M = out_side^2): the key axes
    bilinearly (no antialiasing), the query axes by nearest neighbour; rows are not
    renormalised (GoCA's resize of a layer to its reference layer's side)."""
    batch, n, _ = attn.shape
    side = grid_side(attn)
    if side == out_side:
        return attn
    keys = F.interpolate(attn.reshape(batch * n, 1, side, side), size=(out_side, out_side), mode="bilinear",
                         align_corners=False)
    keys = keys.reshape(batch, side, side, out_side * out_side).permute(0, 3, 1, 2)  # [B, M, side, side]
    queries = F.interpolate(keys, size=(out_side, out_side), mode="nearest")  # [B, M_key, out, out]
    return queries.flatten(2).transpose(1, 2)


KERNELS = ("official", "fused")


class UNetStopped(Exception):
    """Raised by the capture processor of the last attention a method reads, once it has
    recorded (early exit): the rest of the UNet, and that layer's own output, would be thrown
    away. The caller of the UNet catches it."""


def forward_rank(layer: str) -> tuple[int, int, int]:
    """Where a UNet transformer block (`down_blocks.1.attentions.0`, `mid_block.attentions.0`)
    runs in the forward pass: down blocks, mid block, up blocks, each in index order."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        return (1, 0, int(parts[-1]))
    return (0 if parts[0] == "down_blocks" else 2, int(parts[1]), int(parts[-1]))


def layer_side(layer: str, latent_side: int, n_blocks: int) -> int:
    """The attention map side of a UNet transformer block (64, 32, 16 or 8 for SD at 512 px)."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        return latent_side >> (n_blocks - 1)
    level = int(parts[1]) if parts[0] == "down_blocks" else n_blocks - 1 - int(parts[1])
    return latent_side >> level


class AttentionCaptureProcessor:
    """Attention for a transformer block's attn1/attn2 that also stores what its spec's
    records ask for into a `CapturedAttention`; kernel "official" or "fused" (module doc)."""

    def __init__(self, store: CapturedAttention, spec: "CaptureSpec", kernel: str = "official",
                 stop_after: bool = False):
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel {kernel!r}: use one of {', '.join(KERNELS)}")
        self.store = store
        self.spec = spec
        self.kernel = kernel
        self.stop_after = stop_after  # raise UNetStopped once recorded (the last layer read)
        self.key = f"{spec.layer}:{spec.kind}"

    def _kept_heads(self, heads_total: int) -> list[int]:
        return sorted(self.spec.heads) if self.spec.heads is not None else list(range(heads_total))

    def _record(self, record: "Record", attn: Attention, query: torch.Tensor, key: torch.Tensor,
                head_outputs: torch.Tensor, probs: torch.Tensor | None, head_sums: dict,
                kept_only: bool = False) -> None:
        """query, key [B, H, N, D]; head_outputs [B, H, Nq, D] (softmax(q k^T) v per head);
        probs [B, H', Nq, Nk] (the official kernel's softmax: of every head, or with kept_only of
        the kept heads alone, in ascending order) or None (fused: computed here for the kept
        heads only); head_sums caches the head sum between the records of one call."""
        batch, heads_total, n_query, head_dim = query.shape
        store_key = record.key.format(layer=self.spec.layer, kind=self.spec.kind, side=square_side(n_query))
        heads = self._kept_heads(heads_total)
        slots = list(range(len(heads))) if kept_only else heads  # into probs' head axis
        if record.what == "sum" and record.keep_heads and probs is not None:
            self.store.add_head_maps(store_key, {head: probs[:, slot] for head, slot in zip(heads, slots)})
        elif record.what == "sum":
            if "sum" not in head_sums:
                head_sums["sum"] = (_sequential_head_sum(probs, slots) if probs is not None
                                    else _head_probability_sum(query, key, heads, attn.scale))
            total = head_sums["sum"]
            if record.resize_to is None:
                self.store.add(store_key, total, len(heads))
            else:
                self.store.add(store_key, resize_query_key(total / len(heads), record.resize_to), 1)
        elif record.what == "weighted":
            dtype = torch.promote_types(query.dtype, torch.float32)
            if probs is None:
                probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(dim=-1, dtype=dtype)
            out_weight = attn.to_out[0].weight.reshape(-1, heads_total, head_dim).permute(1, 0, 2)  # [H, Dm, D]
            contributions = torch.einsum("bhnd,hmd->bhnm", head_outputs.to(dtype), out_weight.to(dtype))
            weights = record.head_weights(contributions)  # [B, H, Nq]
            self.store.add(store_key, (probs.to(dtype) * weights[..., None]).sum(dim=1), 1)
        elif record.what == "queries":
            self.store.add(store_key, query.transpose(1, 2).reshape(batch, n_query, -1).to(torch.float32), 1)
        else:
            raise ValueError(f"unknown capture record {record.what!r}")

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        unsupported = [name for name in ("spatial_norm", "group_norm", "norm_q", "norm_k")
                       if getattr(attn, name, None) is not None]
        if unsupported or attention_mask is not None or hidden_states.ndim != 3 or attn.norm_cross:
            raise NotImplementedError(
                f"attention capture on {self.key} supports plain transformer-block attention only "
                f"(found {unsupported or 'a mask, norm or 4-D input'})"
            )
        batch, n_query = hidden_states.shape[:2]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        # the layer's output is computed unless the UNet stops here and no record reads it
        needs_output = not self.stop_after or any(r.what == "weighted" for r in self.spec.records)
        kept_only = False  # the official kernel's probs hold every head
        if self.kernel == "official":
            # diffusers' classic path, as the official code's processor: [B*H, N, D] per head,
            # baddbmm(q, k^T, alpha=scale), softmax (upcast where the layer says), bmm.
            by_head = lambda t: t.view(batch, -1, t.shape[1], t.shape[2])  # [B*H, ...] -> [B, H, ...]  # noqa: E731
            query, key = (by_head(attn.head_to_batch_dim(t)) for t in (attn.to_q(hidden_states), attn.to_k(context)))
            if needs_output:
                probs = attn.get_attention_scores(query.flatten(0, 1), key.flatten(0, 1))
                value = attn.head_to_batch_dim(attn.to_v(context))
                out, probs = by_head(torch.bmm(probs, value)), by_head(probs)
            else:
                # Nothing reads this layer's output: the scores and softmax of the kept heads only
                # (every head is its own batch entry of baddbmm and softmax, so the same bits).
                kept_only = True
                index = _head_index(tuple(self._kept_heads(attn.heads)), query.device)
                kept = lambda t: t.index_select(1, index).flatten(0, 1)  # noqa: E731
                probs, out = by_head(attn.get_attention_scores(kept(query), kept(key))), None
        else:
            head_dim = attn.to_k.out_features // attn.heads
            by_head = lambda t: t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731
            query, key, probs, out = by_head(attn.to_q(hidden_states)), by_head(attn.to_k(context)), None, None
            if needs_output:
                out = F.scaled_dot_product_attention(query, key, by_head(attn.to_v(context)), attn_mask=None,
                                                     dropout_p=0.0, is_causal=False)
        head_sums: dict = {}  # shared by the records of this call
        for record in self.spec.records:
            self._record(record, attn, query, key, out, probs, head_sums, kept_only)
        if self.stop_after:
            raise UNetStopped(self.key)

        out = out.transpose(1, 2).reshape(batch, n_query, -1).to(hidden_states.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@dataclass(frozen=True)
class Record:
    """What a capture processor stores, under which key.

    what: "sum" (sum over the kept heads of the softmax probabilities, with the head count;
    with resize_to, the head mean resized by `resize_query_key`, count 1; with keep_heads,
    under the official kernel, every kept head's map), "weighted" (the sum over all heads of
    the probabilities, each weighted per query by `head_weights(contributions)`, where
    contributions [B, H, Nq, Dm] are the heads' outputs through the output projection and the
    weights [B, H, Nq]; count 1) or "queries" (the layer's queries [B, N, H*D]).
    key: "{layer}", "{kind}" and "{side}" (the query map's side) are filled in at run time, so
    layers of one resolution can share a key and be pooled as they run.
    """

    what: str = "sum"
    key: str = "{layer}:{kind}"
    resize_to: int | None = None
    keep_heads: bool = False  # "sum" under the official kernel: keep each head's map (add_head_maps)
    head_weights: Callable[[torch.Tensor], torch.Tensor] | None = None  # "weighted": per-query head weights


@dataclass(frozen=True)
class CaptureSpec:
    """Which attention to capture: transformer-block parent name, attn1 (self) or attn2
    (cross), kept heads (None = all), and what to store."""

    layer: str
    kind: str  # "self" or "cross"
    heads: list[int] | None = None
    records: tuple[Record, ...] = (Record(),)


def attention_modules(unet: torch.nn.Module, spec: CaptureSpec) -> list[tuple[str, Attention]]:
    """The (name, module) of every attention module the spec names; a ConfigError names a
    layer or head that this UNet does not have."""
    try:
        parent = unet.get_submodule(spec.layer)
    except AttributeError:
        names = sorted(attention_layers(unet))
        raise ConfigError(f"layer {spec.layer!r} is not in the UNet; layers with attention: {', '.join(names)}: "
                          "name those in the config") from None
    attr = "attn1" if spec.kind == "self" else "attn2"
    found = [(f"{spec.layer}.{name}", m) for name, m in parent.named_modules()
             if isinstance(m, Attention) and name.endswith(attr)]
    if not found:
        raise ConfigError(f"layer {spec.layer!r} has no {attr} attention: name a layer of "
                          f"{', '.join(sorted(attention_layers(unet)))} in the config")
    for name, module in found:
        if spec.heads is not None and max(spec.heads, default=-1) >= module.heads:
            raise ConfigError(f"{name} has {module.heads} heads; head index {max(spec.heads)} does not exist: "
                              f"give heads 0..{module.heads - 1} in the config")
    return found


def _swap_processors(new: list[tuple[Attention, object]]) -> list[tuple[Attention, object]]:
    """Set each module's processor; returns the (module, previous processor) pairs that undo it."""
    previous = [(module, module.processor) for module, _ in new]
    for module, processor in new:
        module.set_processor(processor)
    return previous


class CaptureHandle:
    """Installed capture processors; `remove()` puts back the processors they replaced."""

    def __init__(self, replaced: list[tuple[Attention, object]], store: CapturedAttention):
        self.replaced = replaced
        self.store = store

    def remove(self) -> None:
        _swap_processors(self.replaced)


def attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of every transformer (attention) block of the UNet, e.g. `down_blocks.0.attentions.0`
    (16 in SD 1.x/2.x)."""
    return [n for n, _ in unet.named_modules() if n.split(".")[-2:-1] == ["attentions"]]


def check_named_layers(unet: torch.nn.Module, config) -> None:
    """ConfigError naming the first layer a SegmenterConfig names (`named_layers`) that is not
    a transformer block of this UNet, with the UNet's own."""
    blocks = attention_layers(unet)
    for key, name in config.named_layers():
        if name not in blocks:
            raise ConfigError(f"config key {key}: layer {name!r} is not in the UNet; layers with attention: "
                              f"{', '.join(sorted(blocks))}: name one of those")


def install_capture(unet: torch.nn.Module, specs: list[CaptureSpec], kernel: str = "official",
                    stop_early: bool = False) -> CaptureHandle:
    """Put capturing processors on the named layers; each spec's layer key in the store is
    `<layer>:<kind>`. All transformer blocks under a named layer are pooled into that key.
    stop_early: the last of these attention modules in forward order raises UNetStopped once
    it has recorded."""
    store = CapturedAttention()
    found = [(spec, module, (forward_rank(spec.layer), position))
             for spec in specs for position, (_, module) in enumerate(attention_modules(unet, spec))]
    # within a transformer block attn1 runs before attn2; blocks run in order
    last = max(found, key=lambda item: (item[2], item[0].kind == "cross"))[1] if stop_early and found else None
    replaced = _swap_processors([(module, AttentionCaptureProcessor(store, spec, kernel, stop_after=module is last))
                                 for spec, module, _ in found])
    return CaptureHandle(replaced, store)


@contextmanager
def capturing(unet: torch.nn.Module, specs: list[CaptureSpec], kernel: str = "official",
              stop_early: bool = False) -> Iterator[CapturedAttention]:
    """Capture processors on the named layers for the duration of a `with` block; the UNet's
    own processors are back afterwards. With stop_early, run the UNet inside
    `try: ... except UNetStopped` (install_capture)."""
    handle = install_capture(unet, specs, kernel, stop_early)
    try:
        yield handle.store
    finally:
        handle.remove()


@contextmanager
def classic_attention(model: torch.nn.Module, layers: list[CaptureSpec] | None = None) -> Iterator[None]:
    """diffusers' classic attention (`baddbmm` scores, softmax, `bmm`) on the attn1/attn2 of the
    named layers, or on every attention module of `model` (e.g. the VAE) when layers is None,
    for the duration of a `with` block: the kernels the official code runs there."""
    if layers is None:
        modules = [m for m in model.modules() if isinstance(m, Attention)]
    else:
        modules = [m for spec in layers for _, m in attention_modules(model, spec)]
    previous = _swap_processors([(module, AttnProcessor()) for module in modules])
    try:
        yield
    finally:
        _swap_processors(previous)
