"""Several methods over the same shards with one model load: mIoU (where ground truth exists),
mean confidence and seconds per image, in one table. In-process (no Ray): a comparison is
a sample-sized decision aid, not the production job."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, SegmenterConfig
from .evaluate import confusion_matrix, scores_from_confusion
from .masks import ImageDecodeError, decode_image, decode_mask
from .postprocess import finish_mask
from .runner import expand_input
from .safe_paths import UnsafeKeyError, check_key, file_in
from .segmenter import Segmenter
from .shards import read_shard
from .worker import sample_classes

# Method names `compare` takes: the config's methods and the paper's two iSeg ablations.
VARIANTS = {
    "iseg": {"method": "iseg"},
    "iseg-naive": {"method": "iseg", "ent_self": False},
    "iseg-no-cat-cross": {"method": "iseg", "cat_cross": False},
    "diffseg": {"method": "diffseg"},
    "goca": {"method": "goca"},
    "diffsegmenter": {"method": "diffsegmenter"},
}


@dataclass
class MethodTally:
    confusion: np.ndarray
    confidences: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    scored: int = 0


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown or not methods:
        raise ConfigError(f"unknown method(s) {unknown or text!r}: use a comma-separated list of {', '.join(VARIANTS)}")
    return methods


def _samples(input_pattern: str, config: SegmenterConfig, limit: int | None):
    """(id, image, classes, gt bytes or None) of every usable sample; unusable ones are
    reported and skipped."""
    count = 0
    for url in expand_input(input_pattern):
        for sample in read_shard(url):
            if limit is not None and count >= limit:
                return
            try:
                key = check_key(sample["__key__"])
                image = decode_image(sample.get("jpg", b""), key, config.max_image_pixels)
                classes = sample_classes(sample, config)
            except (ImageDecodeError, ConfigError, UnsafeKeyError) as exc:
                print(f"skipped {sample['__key__']!r}: {exc}")
                continue
            count += 1
            yield sample["__key__"], image, classes, sample.get("gt.png")


def compare_methods(input_pattern: str, methods: list[str], config: SegmenterConfig, model,
                    gt_dir: str | Path | None = None, limit: int | None = None, progress=None) -> dict[str, MethodTally]:
    """Run each method on every sample (batches of config.batch_size) and tally the results."""
    segmenters = {m: Segmenter(model, config.model_copy(update=VARIANTS[m])) for m in methods}
    n_classes = len(config.classes) + 1
    tallies = {m: MethodTally(np.zeros((n_classes, n_classes + 1), dtype=np.int64)) for m in methods}
    batch: list = []

    def run_batch():
        for method, segmenter in segmenters.items():
            start = time.perf_counter()
            scores = segmenter.segment([torch.from_numpy(img).permute(2, 0, 1) for _, img, _, _ in batch],
                                       [classes for _, _, classes, _ in batch])
            results = [finish_mask(s.maps, s.classes, img, segmenter.config, s.background)
                       for s, (_, img, _, _) in zip(scores, batch)]
            tally = tallies[method]
            tally.seconds += time.perf_counter() - start
            for result, (image_id, _, _, gt_bytes) in zip(results, batch):
                tally.images += 1
                tally.confidences.append(float(result.confidence.mean()))
                gt_path = file_in(gt_dir, image_id, ".png") if gt_dir is not None else None
                if gt_path is not None and gt_path.is_file():
                    gt_bytes = gt_path.read_bytes()
                if gt_bytes is not None:
                    gt = decode_mask(gt_bytes)
                    if gt.shape == result.labels.shape:
                        tally.confusion += confusion_matrix(result.labels, gt, n_classes)
                        tally.scored += 1
        if progress is not None:
            progress.update(len(batch))
        batch.clear()

    for item in _samples(input_pattern, config, limit):
        batch.append(item)
        if len(batch) == config.batch_size:
            run_batch()
    if batch:
        run_batch()
    return tallies


def format_comparison(tallies: dict[str, MethodTally]) -> str:
    lines = [f"{'method':20} {'images':>6} {'mIoU':>6} {'mean conf':>9} {'s/image':>8}"]
    for method, tally in tallies.items():
        miou = f"{scores_from_confusion(tally.confusion).miou:6.1f}" if tally.scored else "     -"
        conf = float(np.mean(tally.confidences)) if tally.confidences else float("nan")
        per_image = tally.seconds / tally.images if tally.images else float("nan")
        lines.append(f"{method:20} {tally.images:6d} {miou} {conf:9.3f} {per_image:8.2f}")
    return "\n".join(lines)
