"""Export a job's masks in the PASCAL VOC layout that mmsegmentation and DeepLab-style loaders read.

DEST/SegmentationClassPseudo/<id>.png  8-bit palette PNG, indices 0..20, 255 ignore
DEST/ImageSets/Segmentation/<split>.txt ids exported, one per line (`ids`), or a line
                                       `/JPEGImages/<id>.jpg /SegmentationClassPseudo/<id>.png`
                                       each (`pairs`, as DeepLab's train_aug.txt)
DEST/JPEGImages/<id>.jpg               the original images, with --with-images
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.data.atomic import write_staged_bytes
from pipeline.mask.codec import encode_mask
from pipeline.data.outputs import MASK_FOLDER, MaskFilter, failed_image_ids
from pipeline.data.safe_paths import file_in, key_problem
from pipeline.data.shards import sample_image

# What an export writes into its folder: all that --force may replace.
EXPORT_ENTRIES = (MASK_FOLDER, "ImageSets", "JPEGImages")
# What a line of the split list holds, for an image id.
LIST_LINES = {"ids": "{id}", "pairs": "/JPEGImages/{id}.jpg /" + MASK_FOLDER + "/{id}.png"}


class ExportError(PipelineError, ValueError):
    """The job's outputs cannot be exported as asked; the message says why and what to do."""


@dataclass
class ExportSummary:
    exported: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    split_file: Path | None = None

    def dropped_text(self) -> str | None:
        """The images dropped, by reason ("3 for mean confidence, 1 for failed in the job"); None
        where none was."""
        return ", ".join(f"{n} for {why}" for why, n in self.dropped.items()) or None


def export_voc(job, dest: str | Path, split: str = "train_aug", keep: MaskFilter | None = None,
               with_images: bool = False, replace: bool = False, progress=None,
               list_lines: str = "ids") -> ExportSummary:
    """Write the job's ok masks (those passing `keep`) in the VOC layout under dest, the split
    list's lines of the form LIST_LINES[list_lines].

    All or nothing: the export is written into a hidden folder beside dest and renamed to dest
    when complete, so a failure leaves no half-written dest. An existing non-empty dest is an
    error unless replace, and replace takes only a folder holding nothing but EXPORT_ENTRIES
    (never a job's folder, a dataset or a home folder given by mistake). Everything the export
    needs (the input shards, with_images) is found before anything is written. `progress` (a
    tqdm bar) moves by one for each mask read."""
    split_problem = key_problem(split)
    if split_problem is not None:
        raise ExportError(f"--split {split!r}: {split_problem}; the split names the file ImageSets/Segmentation/"
                          "<split>.txt, so give a plain name such as train_aug")
    dest = Path(os.path.abspath(dest))
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} is a file: -o/--output takes a folder, pass a new one")
    if dest.exists() and any(dest.iterdir()):
        if not replace:
            raise ExportError(f"{dest} already exists: pass a new -o/--output, or --force to replace it")
        foreign = sorted((p.name for p in dest.iterdir() if p.name not in EXPORT_ENTRIES),
                         key=lambda name: (name.startswith("."), name))
        if foreign:
            raise ExportError(f"{dest} holds {foreign[0]}{' and more' if len(foreign) > 1 else ''}, which no export "
                              f"writes: --force replaces only an earlier export ({', '.join(EXPORT_ENTRIES)}); pass "
                              "a new -o/--output")
    if with_images:
        job.input_shards()  # raises (naming the missing shard) before anything is written
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        summary = _export_into(job, staging, split, keep or MaskFilter(), with_images, progress,
                               LIST_LINES[list_lines])
        os.sync()  # every file of the export on disk before it takes its name
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            dest.rename(old / dest.name)
            staging.rename(dest)
            shutil.rmtree(old)
        else:
            staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary.split_file = dest / summary.split_file.relative_to(staging)
    return summary


def _mask_png(record, keep: MaskFilter) -> bytes:
    """The mask's PNG as the job wrote it (the same encoder, so the same bytes a decode and
    encode would give, in a fifth of the time), or re-encoded with the pixels `keep` leaves
    out set to 255."""
    if keep.ignore_below is None:
        return record.sample["png"]
    return encode_mask(np.asarray(keep.labels(record), np.uint8))


def _export_into(job, dest: Path, split: str, keep: MaskFilter, with_images: bool, progress,
                 list_line: str) -> ExportSummary:
    summary = ExportSummary()
    ids: list[str] = []
    for record, sample in job.joined() if with_images else ((r, None) for r in job.masks()):
        if progress is not None:
            progress.update()
        reason = "unsafe key" if key_problem(record.id) else keep.rejects(record.stats)
        if reason is None and with_images and sample is None:
            reason = "image not in its input shard"  # the shard changed since the job: a mask alone trains nothing
        if reason:
            summary.dropped[reason] = summary.dropped.get(reason, 0) + 1
            continue
        write_staged_bytes(file_in(dest / MASK_FOLDER, record.id, ".png"), _mask_png(record, keep))
        if sample is not None:
            write_staged_bytes(file_in(dest / "JPEGImages", record.id, ".jpg"), sample_image(sample))
        ids.append(record.id)
    failed = failed_image_ids(job.out_dir)
    if failed:
        summary.dropped["failed in the job"] = len(failed)
    if not ids:  # an empty split list would fail the training later, far from its cause
        raise ExportError(f"nothing to export ({summary.dropped_text() or 'the job has no mask'}): loosen "
                          "--min-confidence or --require-all-labels, or redo the failed images; an earlier export "
                          "at -o/--output is left as it was")
    summary.exported = len(ids)
    summary.split_file = file_in(dest / "ImageSets" / "Segmentation", split, ".txt")
    write_staged_bytes(summary.split_file, "".join(list_line.format(id=i) + "\n" for i in ids).encode())
    return summary
