"""A job's output folder: each shard's outputs written as it finishes, and a finished job read
back (statistics, masks, and the input shards' images and ground truth, joined by id) for
export, evaluation, the report and the training datasets."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Container, Iterator

import numpy as np
import pyarrow as pa

from pipeline.config import VOC_CLASS_NAMES
from pipeline.data.atomic import atomic_write_bytes, file_sha256
from pipeline.data.ledger import Ledger, no_job_reason
from pipeline.errors import PipelineError
from pipeline.mask.codec import apply_ignore, decode_confidence, decode_mask
from pipeline.data.shards import InputError, ShardReadError, expand_input, read_shard, shard_name, tar_bytes
from pipeline.mask.stats import STATS_SCHEMA, rows_to_table


class DamagedOutputError(ShardReadError):
    """A mask shard or statistics file of the job cannot be read or is not what the ledger
    recorded; the message names the resume that redoes it."""


def damaged_output(out_dir: Path, path: Path, cause: str) -> DamagedOutputError:
    """The error for an output file of the job in out_dir that cannot be used, and why."""
    return DamagedOutputError(f"cannot read {path}, written by the job in {out_dir}: {cause}; `pseudolabel resume "
                              f"{out_dir}` redoes each shard whose outputs no longer match the ledger's checksums")


# The export's folder of label PNGs (SegmentationClass layout).
MASK_FOLDER = "SegmentationClassPseudo"


def write_shard_outputs(out_dir: Path, shard: str, mask_samples: list[dict], rows: list[dict]) -> dict[str, str]:
    """A shard's outputs, each by atomic rename: masks/<shard>.tar (the mask samples) and
    stats/<shard>.parquet (the rows); returns their paths relative to out_dir -> sha256."""
    import pyarrow.parquet as pq

    mask_rel, stats_rel = f"masks/{shard}.tar", f"stats/{shard}.parquet"
    atomic_write_bytes(out_dir / mask_rel, tar_bytes(mask_samples))
    buffer = io.BytesIO()
    pq.write_table(rows_to_table(rows), buffer)
    atomic_write_bytes(out_dir / stats_rel, buffer.getvalue())
    return {rel: file_sha256(out_dir / rel) for rel in (mask_rel, stats_rel)}


def done_outputs(out_dir: str | Path, folder: str, suffix: str) -> list[Path]:
    """The existing out_dir/folder/<shard><suffix> files of the shards done under the folder's
    job (Ledger.done_shards), in shard order: a shard redone under another config, or not yet
    recorded, leaves files that are not the job's results."""
    paths = (Path(out_dir) / folder / f"{name}{suffix}" for name in Ledger(out_dir).done_shards())
    return [path for path in paths if path.is_file()]


def read_done_stats(out_dir: str | Path, read: Callable, empty):
    """read(dataset) over the statistics files of the shards done (`done_outputs`), or empty
    where there are none. A file that cannot be read (damaged since the job wrote it) is a
    DamagedOutputError naming it and the resume that redoes it."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    paths = done_outputs(out_dir, "stats", ".parquet")
    if not paths:
        return empty
    try:
        return read(ds.dataset([str(p) for p in paths], format="parquet"))
    except (pa.ArrowException, OSError):
        for path in paths:  # which one: read each whole
            try:
                pq.read_table(path)
            except (pa.ArrowException, OSError) as exc:
                cause = str(exc).split(f"'{path}': ", 1)[-1].split(". ")[0]  # arrow names the file, then why
                raise damaged_output(Path(out_dir), path, cause) from None
        raise


def failed_image_ids(out_dir: str | Path) -> list[str]:
    """Ids of the images a job could not segment (status other than ok in the statistics of its
    done shards). Needs no masks/, so `status` can read a job still starting."""
    import pyarrow.compute as pc

    table = read_done_stats(out_dir, lambda stats: stats.to_table(columns=["id", "status"]), None)
    return [] if table is None else table.filter(pc.field("status") != "ok").column("id").to_pylist()


@dataclass
class MaskRecord:
    """One image's job output, as its mask shard holds it; the PNGs are decoded on first use."""

    id: str
    shard: str
    sample: dict  # the mask shard's entries: png, conf.png (jobs since 0.1), json

    @cached_property
    def labels(self) -> np.ndarray:
        """uint8 [H, W]: 0 background, 1..C the classes, 255 ignore."""
        return decode_mask(self.sample["png"])

    @cached_property
    def confidence(self) -> np.ndarray | None:
        """float32 [H, W] in [0, 1]: the winning score per pixel; None from jobs before 0.1."""
        return decode_confidence(self.sample["conf.png"]) if "conf.png" in self.sample else None

    @cached_property
    def stats(self) -> dict:
        return json.loads(self.sample["json"])


class NoConfidenceMapError(PipelineError, ValueError):
    """Pixels are to be left out by their score, and a mask has no confidence map."""


@dataclass
class MaskFilter:
    """Which of a job's masks to train on, and which of their pixels (the export's and the
    streamed dataset's filters). min_mean_confidence drops images whose mean winning score is
    lower; require_all_labels drops images where a labelled class got no pixel; ignore_below
    turns pixels with a lower winning score into 255."""

    min_mean_confidence: float | None = None
    require_all_labels: bool = False
    ignore_below: float | None = None

    def rejects(self, stats: dict) -> str | None:
        """Why an image is dropped, by its statistics (a mask's json, or its row of the job's
        statistics), or None."""
        mean = stats.get("mean_confidence")
        if self.min_mean_confidence is not None and (mean is None or math.isnan(mean)
                                                     or mean < self.min_mean_confidence):
            return "mean confidence"
        if self.require_all_labels and stats.get("missed_labels"):
            return "missed label"
        return None

    def labels(self, record: MaskRecord) -> np.ndarray:
        """uint8 [H, W]: the record's labels, pixels scoring below ignore_below set to 255."""
        if self.ignore_below is None:
            return record.labels
        if record.confidence is None:
            raise NoConfidenceMapError(f"{record.id} has no confidence map (a job from before pseudolabel 0.1 wrote "
                                       "them): rerun the job into a new output folder to leave pixels out by score "
                                       "(--ignore-below)")
        return apply_ignore(record.labels, record.confidence, self.ignore_below)


class JobOutput:
    """A job's output folder (masks/, stats/, ledger/, job.json)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        if not (self.out_dir / "masks").is_dir():
            raise InputError(f"{no_job_reason(self.out_dir, 'masks/')}: pass the -o/--output folder of a "
                             "pseudolabel run")

    def stats(self) -> pa.Table:
        """Every image's statistics row, of the shards done (the whole job once it is complete)."""
        return read_done_stats(self.out_dir, lambda stats: stats.to_table(), STATS_SCHEMA.empty_table())

    def masks_written(self) -> int:
        """How many masks the shards done hold (their ok rows), read from the statistics alone."""
        import pyarrow.dataset as ds

        return read_done_stats(self.out_dir, lambda stats: stats.count_rows(filter=ds.field("status") == "ok"), 0)

    def mask_shards(self) -> list[Path]:
        """The mask shards of the shards done, in shard order."""
        return done_outputs(self.out_dir, "masks", ".tar")

    def masks(self, shards: list[Path] | None = None) -> Iterator[MaskRecord]:
        """Every mask of the given mask shards (default: those of the shards done), in shard order.
        Each shard is read whole and checked first: one that cannot be read, or holds other masks
        than the ledger recorded (a copy cut at a tar block boundary reads as a shorter whole
        tar), is a DamagedOutputError naming the resume that redoes it."""
        ledger = Ledger(self.out_dir)
        for tar in self.mask_shards() if shards is None else shards:
            try:
                samples = list(read_shard(str(tar)))
            except ShardReadError as exc:
                raise damaged_output(self.out_dir, tar, exc.cause) from None
            entry = ledger.get(tar.stem)
            expected = entry.samples - entry.failed_samples if entry is not None and entry.outputs else None
            if expected is not None and len(samples) != expected:
                raise damaged_output(self.out_dir, tar, f"it holds {len(samples)} masks, the ledger recorded {expected}")
            for sample in samples:
                if "png" not in sample:
                    raise damaged_output(self.out_dir, tar, f"its sample {sample['__key__']!r} has no mask")
                yield MaskRecord(id=sample["__key__"], shard=tar.stem, sample=sample)

    def joined(self, shards: list[Path] | None = None,
               ids: Container[str] | None = None) -> Iterator[tuple[MaskRecord, dict | None]]:
        """Each mask (only those in `ids`, when given) with the raw sample of the input shard it
        was made from (jpg, json, gt.png), one shard at a time so memory stays flat: in input
        order, then any mask whose image the input shard no longer holds, with None."""
        input_urls = None  # read from job.json once, at the first shard with a wanted mask
        for tar in self.mask_shards() if shards is None else shards:
            masks = {r.id: r for r in self.masks([tar]) if ids is None or r.id in ids}
            if not masks:
                continue
            if input_urls is None:
                input_urls = self.input_shards()
            for sample in read_shard(input_urls[tar.stem]):
                record = masks.pop(sample["__key__"], None)
                if record is not None:
                    yield record, sample
            for record in masks.values():
                yield record, None

    def job(self) -> dict:
        """The job's record (config, config hash, model, input); {} without job.json."""
        return Ledger(self.out_dir).job() or {}

    @property
    def class_names(self) -> list[str]:
        """The job's class names (VOC's when the job left no record)."""
        classes = self.job().get("config", {}).get("classes")
        return [c["name"] for c in classes] if classes else list(VOC_CLASS_NAMES)

    def input_shards(self) -> dict[str, str]:
        """Input shard name -> url, from the job's recorded input."""
        job = self.job()
        if not job:
            raise InputError(f"{self.out_dir} has no job.json: the input shards are unknown")
        return {shard_name(u): u for u in expand_input(job["input"])}
