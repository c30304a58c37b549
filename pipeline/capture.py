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
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

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


def _head_probability_sum(query: torch.Tensor, key: torch.Tensor, heads: list[int], scale: float) -> torch.Tensor:
    """query [B, H, Nq, D], key [B, H, Nk, D] -> sum over `heads` of softmax(q k^T * scale),
    [B, Nq, Nk] in float32 (float64 for a float64 model)."""
    n_query, n_key = query.shape[2], key.shape[2]
    dtype = torch.promote_types(query.dtype, torch.float32)
    if n_query * n_key <= _PER_HEAD_ENTRIES:
        q, k = query[:, heads], key[:, heads]
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        return scores.softmax(dim=-1, dtype=dtype).sum(dim=1)
    total = None
    for head in heads:
        scores = torch.matmul(query[:, head], key[:, head].transpose(-1, -2)) * scale
        probs = scores.softmax(dim=-1, dtype=dtype)
        total = probs if total is None else total.add_(probs)
    return total


class AttentionCaptureProcessor:
    """SDPA attention for a transformer block's attn1/attn2 that also records
    the sum of the kept heads' probabilities into a `CapturedAttention` under `key`."""

    def __init__(self, store: CapturedAttention, key: str, heads: list[int] | None):
        self.store = store
        self.key = key
        self.heads = heads

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
        heads = self.heads if self.heads is not None else list(range(attn.heads))
        self.store.add(self.key, _head_probability_sum(query, key, heads, attn.scale), len(heads))

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@dataclass(frozen=True)
class CaptureSpec:
    """Which attention to capture: transformer-block parent name, attn1 (self) or attn2
    (cross), and kept heads (None = all)."""

    layer: str
    kind: str  # "self" or "cross"
    heads: list[int] | None = None


def _attention_modules(unet: torch.nn.Module, spec: CaptureSpec) -> list[tuple[str, Attention]]:
    try:
        parent = unet.get_submodule(spec.layer)
    except AttributeError:
        names = sorted(n for n, _ in unet.named_modules() if n.split(".")[-2:-1] == ["attentions"])
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


def install_capture(unet: torch.nn.Module, specs: list[CaptureSpec]) -> CaptureHandle:
    """Put capturing processors on the named layers; each spec's layer key in the store is
    `<layer>:<kind>`. All transformer blocks under a named layer are pooled into that key."""
    store = CapturedAttention()
    modules = []
    for spec in specs:
        for _, module in _attention_modules(unet, spec):
            module.set_processor(AttentionCaptureProcessor(store, f"{spec.layer}:{spec.kind}", spec.heads))
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
