"""Per-image quality statistics and their Parquet schema (one row per image)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.mask.codec import IGNORE_INDEX

if TYPE_CHECKING:  # the reading side (export, eval, report, datasets) imports this without torch
    from pipeline.mask.postprocess import MaskResult

STATS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" or "failed"
    pa.field("error", pa.string()),  # why a failed image failed
    pa.field("labels", pa.list_(pa.int16())),  # mask values of the labelled classes (class index + 1)
    pa.field("names", pa.list_(pa.string())),  # their class names
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("background_fraction", pa.float32()),
    pa.field("class_pixel_fraction", pa.list_(pa.float32())),  # aligned with labels
    pa.field("class_mean_confidence", pa.list_(pa.float32())),  # aligned with labels; NaN when no pixel
    pa.field("mean_confidence", pa.float32()),  # mean winning score over the image
    pa.field("min_confidence", pa.float32()),
    pa.field("ignore_fraction", pa.float32()),  # share of 255 pixels
    pa.field("missed_labels", pa.list_(pa.int16())),  # labelled classes that received no pixel
    pa.field("crf_changed_fraction", pa.float32()),  # null when the CRF is off
    pa.field("refinement_delta", pa.float32()),  # mean |change| of the class maps in the last iteration
    pa.field("seconds", pa.float32()),  # this image's share of the model time plus its post-process
])


def mask_statistics(result: MaskResult, class_names: list[str]) -> dict:
    """The quality columns of one finished mask (labels, fractions, confidences)."""
    labels = result.labels
    total = labels.size
    label_values = [c + 1 for c in result.classes]
    fractions, confidences, missed = [], [], []
    for value in label_values:
        where = labels == value
        count = int(where.sum())
        fractions.append(count / total)
        confidences.append(float(result.confidence[where].mean()) if count else float("nan"))
        if count == 0:
            missed.append(value)
    return {
        "labels": label_values,
        "names": [class_names[c] for c in result.classes],
        "height": int(labels.shape[0]),
        "width": int(labels.shape[1]),
        "background_fraction": float(np.mean(labels == 0)),
        "class_pixel_fraction": fractions,
        "class_mean_confidence": confidences,
        "mean_confidence": float(result.confidence.mean()),
        "min_confidence": float(result.confidence.min()),
        "ignore_fraction": float(np.mean(labels == IGNORE_INDEX)),
        "missed_labels": missed,
        "crf_changed_fraction": result.crf_changed,
    }


def failed_row(sample_id: str, shard: str, error: str, **known) -> dict:
    """A row for an image that produced no mask."""
    return {"id": sample_id, "shard": shard, "status": "failed", "error": error, **known}


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows (missing columns become null) -> a table with STATS_SCHEMA."""
    columns = {field.name: [row.get(field.name) for row in rows] for field in STATS_SCHEMA}
    return pa.Table.from_pydict(columns, schema=STATS_SCHEMA)
