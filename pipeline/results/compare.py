"""Several methods over the same shards with one model load: mIoU (where ground truth exists),
mean confidence and seconds per image, in one table. In-process (no Ray): a comparison is
a sample-sized decision aid, not the production job."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from pipeline.config import METHOD_VARIANTS, ConfigError, SegmenterConfig
from pipeline.results.evaluate import (confusion_matrix, ground_truth_mask, gt_file, gt_place_and_fix,
                                       scores_from_confusion)
from pipeline.mask.codec import ImageDecodeError, decode_image
from pipeline.mask.postprocess import finish_mask
from pipeline.data.safe_paths import UnsafeKeyError, check_key
from pipeline.segment.plan import note_lines
from pipeline.segment.segmenter import Segmenter
from pipeline.data.shards import InputError, expand_input, read_shard, sample_classes, sample_image

# Keys that change only the post-process: a sweep over one of them segments each image once.
POSTPROCESS_KEYS = frozenset({"goca.background_offset", "diffsegmenter.background_score", "background.threshold",
                              "ignore_below"})


@dataclass
class MethodTally:
    confusion: np.ndarray
    confidences: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    scored: int = 0

    def add(self, result, gt: np.ndarray | None) -> None:
        """Count one image's finished mask (a MaskResult), scored where it has ground truth."""
        self.images += 1
        self.confidences.append(float(result.confidence.mean()))
        if gt is not None:
            self.confusion += confusion_matrix(result.labels, gt, self.confusion.shape[0])
            self.scored += 1


@dataclass(frozen=True)
class Sweep:
    """A config key (dotted path, e.g. goca.background_offset) and the values it takes."""

    key: str
    values: tuple[float, ...]


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_VARIANTS]
    if unknown or not methods:
        raise ConfigError(f"unknown method(s) {unknown or text!r}: use a comma-separated list of "
                          f"{', '.join(METHOD_VARIANTS)}")
    return methods


def parse_sweep(text: str) -> Sweep:
    """`KEY=START:STOP:STEP` -> Sweep with START, START + STEP, ... up to STOP inclusive."""
    key, _, span = text.partition("=")
    try:
        start, stop, step = (float(part) for part in span.split(":"))
    except ValueError:
        raise ConfigError(f"--sweep {text!r}: write KEY=START:STOP:STEP, e.g. "
                          "goca.background_offset=-0.4:0.4:0.1") from None
    if not key or step <= 0 or stop < start:
        raise ConfigError(f"--sweep {text!r}: needs a key, STEP > 0 and STOP >= START")
    count = int(np.floor((stop - start) / step + 1e-9)) + 1
    return Sweep(key, tuple(round(start + i * step, 10) for i in range(count)))


def with_value(config: SegmenterConfig, key: str, value: float) -> SegmenterConfig:
    """A copy of config with the dotted key set to value, validated as a config file is."""
    data = config.model_dump()
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        raise ConfigError(f"--sweep key {key!r} is not a config key: name one such as goca.background_offset, "
                          "diffsegmenter.background_score or diffseg.tau")
    node[leaf] = value
    try:
        return SegmenterConfig.model_validate(data)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"--sweep {key}={value:g}: {message}") from None


def comparison_rows(methods: list[str], config: SegmenterConfig, sweep: Sweep | None
                    ) -> list[tuple[str, SegmenterConfig, SegmenterConfig]]:
    """(row name, config the segmenter runs, config the post-process applies) per table row."""
    rows = []
    bases = {method: config.with_method(method) for method in methods}
    if sweep is not None and not any(base.changes_masks(sweep.key) for base in bases.values()):
        raise ConfigError(f"--sweep {sweep.key} changes no mask of {', '.join(methods)} under this config "
                          "(another method's key, or a setting its switch leaves off): pick a key these methods "
                          "read, or the method that reads it with --methods")
    for method, base in bases.items():
        if sweep is None or not base.changes_masks(sweep.key):  # its masks would be the same on every row
            rows.append((method, base, base))
            continue
        for value in sweep.values:
            swept = with_value(base, sweep.key, value)
            rows.append((f"{method} {sweep.key}={value:g}", base if sweep.key in POSTPROCESS_KEYS else swept, swept))
    return rows


@dataclass
class ComparedImage:
    """A usable shard sample: its image uint8 [H, W, 3], labelled classes (0-based) and ground
    truth uint8 [H, W] (None where it has none)."""

    id: str
    image: np.ndarray
    classes: list[int]
    gt: np.ndarray | None


# Samples that cannot be segmented are named one a line up to this many, then counted.
SKIPPED_NAMED = 5


def _samples(input_pattern: str, config: SegmenterConfig, gt_dir: str | Path | None, limit: int | None,
             skipped: list[tuple[str, str]]):
    """A ComparedImage per usable sample, its ground truth gt_dir/<id>.png when gt_dir is given
    (as `eval --gt`), else its shard's gt.png. Samples that cannot be segmented are added to
    skipped as (key, reason), the first SKIPPED_NAMED printed; ground truth that cannot be
    scored is a GroundTruthError naming it."""
    count = 0
    for url in expand_input(input_pattern):
        for sample in read_shard(url):
            if limit is not None and count >= limit:
                return
            try:
                key = check_key(sample["__key__"])
                image = decode_image(sample_image(sample), key, config.max_image_pixels)
                classes = sample_classes(sample, config)
            except (ImageDecodeError, ConfigError, UnsafeKeyError) as exc:
                skipped.append((sample["__key__"], str(exc)))
                if len(skipped) <= SKIPPED_NAMED:
                    print(f"skipped {sample['__key__']!r}: {exc}")
                continue
            count += 1
            data = gt_file(gt_dir, key) if gt_dir is not None else sample.get("gt.png")
            gt = None if data is None else ground_truth_mask(data, image.shape[:2],
                                                             partial(gt_place_and_fix, key, gt_dir, url))
            yield ComparedImage(key, image, classes, gt)


def compare_methods(input_pattern: str, methods: list[str], config: SegmenterConfig, model,
                    gt_dir: str | Path | None = None, limit: int | None = None, progress=None,
                    sweep: Sweep | None = None) -> dict[str, MethodTally]:
    """Run each method (each value of the sweep) on every sample, in batches of the config's
    batch size on the model's device, and tally the results per table row. Rows whose
    segmenter config is the same share one segmentation of each batch (a post-process sweep
    segments once). Each segmenter first segments the first batch once untimed, so seconds
    per image are what a long job pays (the first batch's label sets then have their prompts
    encoded, as a job's recurring label sets do)."""
    rows = comparison_rows(methods, config, sweep)
    # one segmenter per distinct segmenter config, with the (name, post-process config) rows it serves
    groups: dict[str, tuple[Segmenter, list[tuple[str, SegmenterConfig]]]] = {}
    for name, segment_config, finish_config in rows:
        key = segment_config.model_dump_json()
        if key not in groups:
            groups[key] = (Segmenter(model, segment_config), [])
        groups[key][1].append((name, finish_config))
    for line in note_lines(note for segmenter, _ in groups.values() for note in segmenter.notes):
        print(line)
    n_classes = len(config.classes) + 1
    tallies = {name: MethodTally(np.zeros((n_classes, n_classes + 1), dtype=np.int64)) for name, _, _ in rows}
    batch_size = config.batch_size_on(model.device.type)
    batch: list = []
    warmed_up = False

    def run_batch():
        nonlocal warmed_up
        images = [torch.from_numpy(item.image).permute(2, 0, 1) for item in batch]
        class_lists = [item.classes for item in batch]
        if not warmed_up:
            # One untimed batch per segmenter first: a process's one-off costs (the heap growing
            # to its working size, a GPU's first kernels) are nobody's cost per image.
            for segmenter, _ in groups.values():
                segmenter.segment(images, class_lists)
            warmed_up = True
        for segmenter, served in groups.values():
            start = time.perf_counter()
            scores = segmenter.segment(images, class_lists)
            segment_seconds = time.perf_counter() - start
            for name, finish_config in served:
                start = time.perf_counter()
                results = [finish_mask(s.maps, s.classes, item.image, finish_config, s.background)
                           for s, item in zip(scores, batch)]
                tally = tallies[name]
                tally.seconds += segment_seconds + time.perf_counter() - start
                for result, item in zip(results, batch):
                    tally.add(result, item.gt)
        if progress is not None:
            progress.update(len(batch))
        batch.clear()

    skipped: list[tuple[str, str]] = []
    for item in _samples(input_pattern, config, gt_dir, limit, skipped):
        batch.append(item)
        if len(batch) == batch_size:
            run_batch()
    if batch:
        run_batch()
    if len(skipped) > SKIPPED_NAMED:
        print(f"... {len(skipped) - SKIPPED_NAMED} more skipped ({len(skipped)} in all)")
    if not next(iter(tallies.values())).images:
        first = f": the first, {skipped[0][0]!r}: {skipped[0][1]}" if skipped else ""
        raise InputError(f"no image of --input {input_pattern} could be segmented ({len(skipped)} skipped{first})")
    return tallies


def format_comparison(tallies: dict[str, MethodTally]) -> str:
    """One row per table row: images, mIoU ('-' without ground truth), mean confidence, s/image."""
    width = max([20] + [len(name) for name in tallies])
    lines = [f"{'method':{width}} {'images':>6} {'mIoU':>6} {'mean conf':>9} {'s/image':>8}"]
    for method, tally in tallies.items():
        miou = f"{scores_from_confusion(tally.confusion).miou:6.1f}" if tally.scored else "     -"
        conf = float(np.mean(tally.confidences)) if tally.confidences else float("nan")
        per_image = tally.seconds / tally.images if tally.images else float("nan")
        lines.append(f"{method:{width}} {tally.images:6d} {miou} {conf:9.3f} {per_image:8.2f}")
    first = next(iter(tallies.values()), None)  # every row sees the same images
    if first is not None and first.scored < first.images:
        lines.append(f"(mIoU over the {first.scored} of {first.images} images with ground truth; pass --gt the folder "
                     "of the others' <id>.png masks)")
    return "\n".join(lines)
