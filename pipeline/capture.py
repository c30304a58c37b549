"""Attention processors that record head-reduced softmax probabilities on named layers.

Only the layers a method reads get an `AttentionCaptureProcessor`; every other layer keeps
diffusers' fused `AttnProcessor2_0` (SDPA). The capturing processor computes its output with
the same SDPA call as the stock one, so the UNet's output is unchanged bit for bit, and
computes probabilities only for the heads it keeps, summed over those heads inside the
processor: full per-head maps are never stored.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .methods import goca

# Above this many (query x key) entries per head, heads are reduced one at a time.
_PER_HEAD_ENTRIES = 1 << 20


@dataclass
class CapturedAttention:
    """Per layer: the sum over kept heads of softmax probabilities [B, N_query, N_key] (float32)
    and the number of heads summed."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.sums.clear()
        self.heads.clear()

    def add(self, key: str, head_sum: torch.Tensor, n_heads: int) -> None:
        if key in self.sums:
            self.sums[key] = self.sums[key] + head_sum
            self.heads[key] += n_heads
        else:
            self.sums[key] = head_sum
            self.heads[key] = n_heads

    def pooled_by_side(self, keys: list[str]) -> dict[int, torch.Tensor]:
        """Mean over all kept heads of the given layers, grouped by query side:
        side -> [B, side*side, N_key]."""
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        for key in keys:
            if key not in self.sums:
                raise KeyError(f"layer {key} captured nothing: was the UNet run after install_capture?")
            n_query = self.sums[key].shape[1]
            side = int(round(n_query ** 0.5))
            sums[side] = sums[side] + self.sums[key] if side in sums else self.sums[key]
            counts[side] = counts.get(side, 0) + self.heads[key]
        return {side: sums[side] / counts[side] for side in sorted(sums)}

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


class AttentionCaptureProcessor:
    """SDPA attention for a transformer block's attn1/attn2 that also stores what its spec's
    records ask for into a `CapturedAttention`."""

    def __init__(self, store: CapturedAttention, spec: "CaptureSpec"):
        self.store = store
        self.spec = spec
        self.key = f"{spec.layer}:{spec.kind}"

    def _record(self, record: "Record", attn: Attention, query: torch.Tensor, key: torch.Tensor,
                head_outputs: torch.Tensor, head_sums: dict) -> None:
        """query, key [B, H, N, D]; head_outputs [B, H, Nq, D] (softmax(q k^T) v per head);
        head_sums caches the head-probability sum between the records of one call."""
        batch, heads_total, n_query, head_dim = query.shape
        store_key = record.key.format(layer=self.spec.layer, kind=self.spec.kind, side=int(round(n_query ** 0.5)))
        heads = self.spec.heads if self.spec.heads is not None else list(range(heads_total))
        if record.what == "sum":
            if "sum" not in head_sums:
                head_sums["sum"] = _head_probability_sum(query, key, heads, attn.scale)
            total = head_sums["sum"]
            if record.resize_to is None:
                self.store.add(store_key, total, len(heads))
            else:
                self.store.add(store_key, goca.resize_attention(total / len(heads), record.resize_to), 1)
        elif record.what == "goca":
            dtype = torch.promote_types(query.dtype, torch.float32)
            probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(dim=-1, dtype=dtype)
            out_weight = attn.to_out[0].weight.reshape(-1, heads_total, head_dim).permute(1, 0, 2)  # [H, Dm, D]
            contributions = torch.einsum("bhnd,hmd->bhnm", head_outputs.to(dtype), out_weight.to(dtype))
            self.store.add(store_key, goca.aggregate_heads(probs, goca.head_weights(contributions)), 1)
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
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        head_sums: dict = {}  # shared by the records of this call
        for record in self.spec.records:
            self._record(record, attn, query, key, out, head_sums)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@dataclass(frozen=True)
class Record:
    """What a capture processor stores, under which key.

    what: "sum" (sum over the kept heads of the softmax probabilities, with the head count;
    with resize_to, the head mean resized on both pixel axes to resize_to x resize_to, count 1),
    "goca" (GoCA's head-weighted aggregation) or "queries" (the layer's queries [B, N, H*D]).
    key: "{layer}", "{kind}" and "{side}" (the query map's side) are filled in at run time, so
    layers of one resolution can share a key and be pooled as they run.
    """

    what: str = "sum"
    key: str = "{layer}:{kind}"
    resize_to: int | None = None


@dataclass(frozen=True)
class CaptureSpec:
    """Which attention to capture: transformer-block parent name, attn1 (self) or attn2
    (cross), kept heads (None = all), and what to store."""

    layer: str
    kind: str  # "self" or "cross"
    heads: list[int] | None = None
    records: tuple[Record, ...] = (Record(),)


def _attention_modules(unet: torch.nn.Module, spec: CaptureSpec) -> list[tuple[str, Attention]]:
    try:
        parent = unet.get_submodule(spec.layer)
    except AttributeError:
        names = sorted(attention_layers(unet))
        raise ValueError(f"layer {spec.layer!r} is not in the UNet; layers with attention: {', '.join(names)}") from None
    attr = "attn1" if spec.kind == "self" else "attn2"
    found = [(f"{spec.layer}.{name}", m) for name, m in parent.named_modules()
             if isinstance(m, Attention) and name.endswith(attr)]
    if not found:
        raise ValueError(f"layer {spec.layer!r} has no {attr} attention")
    for name, module in found:
        if spec.heads is not None and max(spec.heads, default=-1) >= module.heads:
            raise ValueError(f"{name} has {module.heads} heads; head index {max(spec.heads)} does not exist")
    return found


class CaptureHandle:
    """Installed capture processors; `remove()` restores stock SDPA processors."""

    def __init__(self, modules: list[Attention], store: CapturedAttention):
        self.modules = modules
        self.store = store

    def remove(self) -> None:
        for module in self.modules:
            module.set_processor(AttnProcessor2_0())


def attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of every transformer (attention) block of the UNet, e.g. `down_blocks.0.attentions.0`
    (16 in SD 1.x/2.x)."""
    return [n for n, _ in unet.named_modules() if n.split(".")[-2:-1] == ["attentions"]]


def install_capture(unet: torch.nn.Module, specs: list[CaptureSpec]) -> CaptureHandle:
    """Put capturing processors on the named layers; each spec's layer key in the store is
    `<layer>:<kind>`. All transformer blocks under a named layer are pooled into that key."""
    store = CapturedAttention()
    modules = []
    for spec in specs:
        for _, module in _attention_modules(unet, spec):
            module.set_processor(AttentionCaptureProcessor(store, spec))
            modules.append(module)
    return CaptureHandle(modules, store)


@contextmanager
def capturing(unet: torch.nn.Module, specs: list[CaptureSpec]) -> Iterator[CapturedAttention]:
    """Capture processors on the named layers for the duration of a `with` block; the UNet is
    back to stock SDPA processors afterwards."""
    handle = install_capture(unet, specs)
    try:
        yield handle.store
    finally:
        handle.remove()
