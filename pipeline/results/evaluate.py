"""Pseudo-mask quality against ground truth: confusion matrix, IoU, mIoU, accuracy, coverage.

Pixels whose ground truth is outside [0, n_classes) (VOC borders, 255) are not scored. A
prediction of 255 (ignore) on a scored pixel is counted in its own column: it is a miss for
the ground-truth class (so mIoU is not inflated by ignoring hard pixels) and it lowers the
coverage, reported separately.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import UnidentifiedImageError

from pipeline.errors import PipelineError
from pipeline.data.atomic import atomic_write_bytes
from pipeline.mask.codec import IGNORE_INDEX, decode_mask
from pipeline.data.safe_paths import file_in, key_problem
from pipeline.results.parallel import shard_map


class GroundTruthError(PipelineError, ValueError):
    """A ground-truth mask cannot be read as an index mask, or is not its image's size."""


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, n_classes: int = 21) -> np.ndarray:
    """int64 [n_classes, n_classes + 1] from uint8 [H, W] label maps: rows ground truth, columns
    prediction, the last column counting predicted 255. Pixels with ground truth outside
    [0, n_classes) are skipped. One count over all 256 x 256 value pairs, then the rows and
    columns that are scored (a quarter of the time of selecting the scored pixels first)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction is {pred.shape} but ground truth is {gt.shape}")
    pairs = gt.astype(np.intp) * 256 + np.asarray(pred, np.uint8)
    counts = np.bincount(pairs.ravel(), minlength=256 * 256).reshape(256, 256)[:n_classes]
    if counts[:, n_classes:IGNORE_INDEX].any():
        raise ValueError(f"prediction has labels above {n_classes - 1} other than {IGNORE_INDEX}")
    return np.concatenate([counts[:, :n_classes], counts[:, IGNORE_INDEX:IGNORE_INDEX + 1]], axis=1)


@dataclass
class Scores:
    """Percentages. iou: per class (None for a class absent from both prediction and ground truth)."""

    iou: list[float | None]
    miou: float
    pixel_accuracy: float
    coverage: float
    images: int = 0
    skipped: list[str] = field(default_factory=list)


def scores_from_confusion(conf: np.ndarray) -> Scores:
    """IoU = TP / (gt + pred - TP) per class (predicted 255 counts in gt, not in pred);
    mIoU over classes present in ground truth or prediction."""
    n = conf.shape[0]
    tp = np.diag(conf[:, :n]).astype(np.float64)
    gt_total = conf.sum(axis=1).astype(np.float64)
    pred_total = conf[:, :n].sum(axis=0).astype(np.float64)
    union = gt_total + pred_total - tp
    iou = [float(100 * t / u) if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    scored = conf.sum()
    return Scores(
        iou=iou,
        miou=float(np.mean(present)) if present else 0.0,
        pixel_accuracy=float(100 * tp.sum() / scored) if scored else 0.0,
        coverage=float(100 * (1 - conf[:, n].sum() / scored)) if scored else 0.0,
    )


def gt_file(gt_dir: str | Path, image_id: str) -> bytes | None:
    """The bytes of gt_dir/<id>.png; None when missing or the id is not a safe file name."""
    path = file_in(gt_dir, image_id, ".png") if key_problem(image_id) is None else None
    return path.read_bytes() if path is not None and path.is_file() else None


def evaluate_job(job, gt_dir: str | Path | None = None, processes: int = 1,
                 progress=None) -> tuple[Scores, np.ndarray]:
    """Score a job's masks against ground truth: PNGs `<id>.png` in gt_dir, else the `gt.png`
    entries of the job's input shards. The classes are the job's (background + its config's
    classes: 21 for VOC, 81 for COCO). Images without ground truth are listed in `skipped`.

    Each mask shard is scored on its own, by up to `processes` processes at once (decoding the
    PNGs is most of the work); `progress` (a tqdm bar) moves by each shard's images."""
    n_classes = len(job.class_names) + 1
    conf = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    images, skipped = 0, []
    shards = [str(tar) for tar in job.mask_shards()]
    task = partial(_shard_confusion, job, None if gt_dir is None else str(gt_dir), n_classes)
    with shard_map(task, shards, processes) as results:
        for shard_conf, shard_images, shard_skipped in results:
            conf += shard_conf
            images += shard_images
            skipped += shard_skipped
            if progress is not None:
                progress.update(shard_images + len(shard_skipped))
    result = scores_from_confusion(conf)
    result.images, result.skipped = images, skipped
    return result, conf


def _shard_confusion(job, gt_dir: str | None, n_classes: int, tar: str) -> tuple[np.ndarray, int, list[str]]:
    """One mask shard's confusion matrix, how many of its masks were scored, and the ids of
    those without ground truth. Ground truth that is not an index mask of its image's size is
    a GroundTruthError naming it: an mIoU over the rest would not be the dataset's. job (a
    JobOutput, its folder alone) travels to the pool's processes pickled."""
    conf = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    images, skipped = 0, []
    if gt_dir is not None:
        pairs = ((record, gt_file(gt_dir, record.id)) for record in job.masks([Path(tar)]))
    else:
        pairs = ((record, sample.get("gt.png") if sample else None) for record, sample in job.joined([Path(tar)]))
    for record, data in pairs:
        if data is None:
            skipped.append(record.id)
            continue
        gt = ground_truth_mask(data, record.labels.shape, partial(_gt_place_and_fix, job, gt_dir, record))
        conf += confusion_matrix(record.labels, gt, n_classes)
        images += 1
    return conf, images, skipped


def ground_truth_mask(data: bytes, shape: tuple[int, int], place: Callable[[], tuple[str, str]]) -> np.ndarray:
    """A ground-truth PNG's bytes -> uint8 [H, W] index mask of its image's shape (H, W). Bytes
    that are not an index mask, or one of another size, are a GroundTruthError naming where
    they lie and the fix: place() -> (where, fix), asked only then."""
    try:
        gt = decode_mask(data)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        reason = (f"not a picture, its first bytes are {data[:8]!r}" if isinstance(exc, UnidentifiedImageError)
                  else str(exc))  # the former's text names only the in-memory buffer
        where, fix = place()
        raise GroundTruthError(f"cannot read the ground truth {where} as an index mask ({reason}): {fix}") from None
    if gt.shape != tuple(shape):
        where, fix = place()
        raise GroundTruthError(f"the ground truth {where} is {gt.shape[1]} x {gt.shape[0]} pixels, its image "
                               f"{shape[1]} x {shape[0]}: {fix}")
    return gt


def gt_place_and_fix(image_id: str, gt_dir: str | Path | None, shard_url: str) -> tuple[str, str]:
    """Where an image's unusable ground truth lies (gt_dir/<id>.png, else its shard's
    <id>.gt.png) and how to give a usable one."""
    if gt_dir is not None:
        return str(file_in(gt_dir, image_id, ".png")), (
            "pass --gt the folder of these images' <id>.png index masks (mode P or L, values 0..C and 255: VOC's "
            "SegmentationClassAug or SegmentationClass)")
    return (f"{image_id}.gt.png in {shard_url}",
            "shard the dataset again from its ground truth, or pass --gt the folder of its <id>.png index masks")


def _gt_place_and_fix(job, gt_dir: str | None, record) -> tuple[str, str]:
    """gt_place_and_fix of a job's mask (the input shards are listed only here, for the error)."""
    return gt_place_and_fix(record.id, gt_dir, job.input_shards()[record.shard] if gt_dir is None else "")


def format_table(scores: Scores, class_names: list[str]) -> str:
    """A plain-text table: per-class IoU, then mIoU, pixel accuracy and coverage."""
    names = ["background"] + list(class_names)
    lines = [f"{'class':14} {'IoU':>6}"]
    for name, value in zip(names, scores.iou):
        lines.append(f"{name:14} {'-' if value is None else f'{value:6.1f}':>6}")
    lines.append(f"{'mIoU':14} {scores.miou:6.1f}")
    lines.append(f"{'pixel acc.':14} {scores.pixel_accuracy:6.1f}")
    lines.append(f"{'coverage':14} {scores.coverage:6.1f}")
    lines.append(f"({scores.images} images scored, {len(scores.skipped)} without ground truth)")
    return "\n".join(lines)


def write_json(scores: Scores, conf: np.ndarray, class_names: list[str], path: Path) -> None:
    payload = asdict(scores) | {"classes": ["background"] + list(class_names), "confusion": conf.tolist()}
    atomic_write_bytes(path, json.dumps(payload, indent=2).encode())
