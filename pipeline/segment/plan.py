"""What a method plan is: its prompt and latent settings (`Plan`) and its per-image output
(`PlannedScores`). Each method module of methods/ defines one plan; methods/__init__.py
registers them by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from pipeline.config import ConfigError
from pipeline.segment.capture import layer_side


class Plan:
    """What every method plan says besides its captures (`specs`) and its `scores`.

    enhance: scale the class tokens' embeddings by `enhancement` (iSeg's Cat-Cross);
    emphasis: the config's Compel-style class-token weight, or None; background_context: the
    prompt ends with the background words; prompt_style: `prompts.prompt_words` style;
    noised: noise the latent to the method's timestep (else the clean latent runs with that
    timestep's embedding); notes: what the method does otherwise than its config says on this
    model, one line each, for the user (set by a plan's constructor)."""

    enhance = False
    notes: tuple[str, ...] = ()
    emphasis: float | None = None
    background_context = True
    prompt_style = "sentence"
    noised = True


def note_lines(notes: Iterable[str]) -> list[str]:
    """Plans' notes (`Plan.notes`, of one segmenter or of a job's several workers) as lines to
    print, each note once."""
    return [f"note: {note}" for note in dict.fromkeys(notes)]


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


def layer_sides(unet: torch.nn.Module, layers: list[str], image_size: int) -> dict[str, int]:
    """Layer name -> the side in pixels of its attention maps for images of image_size."""
    return {name: layer_side(name, image_size // 8, len(unet.down_blocks)) for name in layers}


def require_one_side(sides: dict[str, int], key: str) -> None:
    """ConfigError unless the layers (`layer_sides`) that config key names share one side."""
    if len(set(sides.values())) > 1:
        listing = ", ".join(f"{name} is {side} px" for name, side in sides.items())
        raise ConfigError(f"{key} must share one resolution, but {listing}: name layers of one side")


def require_side_weights(sides: dict[str, int], weights: dict[int, float], readers: str, weights_key: str,
                         layers_named: bool = True) -> None:
    """ConfigError unless weights (config key weights_key) weigh every side the layers
    (`layer_sides`; the config's own where layers_named) read."""
    missing = sorted(set(sides.values()) - set(weights))
    if missing:
        raise ConfigError(f"{weights_key} has no weight for side {', '.join(map(str, missing))}, which {readers} read: "
                          f"add `{missing[0]}: <weight>` to it"
                          + (", or name layers of the sides it weighs" if layers_named else ""))
