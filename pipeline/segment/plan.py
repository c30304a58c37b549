"""What a method plan is: its prompt and latent settings (`Plan`) and its per-image output
(`PlannedScores`). Each method module of methods/ defines one plan; methods/__init__.py
registers them by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Plan:
    """What every method plan says besides its captures (`specs`) and its `scores`.

    enhance: scale the class tokens' embeddings by `enhancement` (iSeg's Cat-Cross);
    emphasis: the config's Compel-style class-token weight, or None; background_context: the
    prompt ends with the background words; prompt_style: `prompts.prompt_words` style;
    noised: noise the latent to the method's timestep (else the clean latent runs with that
    timestep's embedding)."""

    enhance = False
    emphasis: float | None = None
    background_context = True
    prompt_style = "sentence"
    noised = True


@dataclass
class PlannedScores:
    """One image's scores as a plan returns them, still on the model's device.

    maps: [side * side, C] one column per labelled class (pixels row-major); background:
    [side * side] for methods that score the background themselves, else None; refinement_delta:
    the last refinement iteration's mean change (a float, or a 0-dim tensor on the device);
    side: the maps' side in pixels."""

    maps: torch.Tensor
    background: torch.Tensor | None
    refinement_delta: float | torch.Tensor
    side: int


def single_side(maps_by_side: dict[int, torch.Tensor], what: str) -> tuple[int, torch.Tensor]:
    if len(maps_by_side) != 1:
        raise ValueError(f"{what} layers must share one resolution, got sides {sorted(maps_by_side)}")
    return next(iter(maps_by_side.items()))
