"""WebDataset shards: writing image shards from VOC or a labelled folder, reading them back,
and writing mask shards.

An image shard sample is `<id>.jpg` (the original bytes; a labelled folder's photo with an EXIF
orientation is turned upright and re-encoded), `<id>.json` (id, labels as mask values and names,
width, height, source, exif_orientation where turned) and, where ground truth exists,
`<id>.gt.png`.
Ids have no dots (WebDataset keys). Tars are written with a fixed mtime, so the same samples
give the same bytes.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import math
import os
import platform
import re
import subprocess
import unicodedata
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.config import (VOC_CLASS_NAMES, ConfigError, SegmenterConfig, closest_class, is_background,
                             match_class, name_key)
from pipeline.data.atomic import atomic_write_bytes, atomic_write_json, file_sha256
from pipeline.data.safe_paths import check_key, key_problem
from pipeline.mask.codec import ImageDecodeError, undecodable_reason, upright_image_bytes

_MTIME = 0


class ShardingError(PipelineError, ValueError):
    """The dataset folder or split cannot be turned into shards; the message says why."""


@dataclass
class SourceImage:
    """One image to shard: its id, file, class names and optional ground truth: a mask file,
    or gt_png, the mask's PNG bytes (rendered from annotations). upright: store
    the image turned by its EXIF orientation (`upright_image_bytes`), for images that no
    annotation ties to their stored pixel grid. label_source: where names came from (`mask`,
    `xml`, `labels-file`, ...), recorded in the sample's json."""

    id: str
    image: Path
    names: list[str]
    gt: Path | None = None
    gt_png: bytes | None = None
    upright: bool = False
    label_source: str | None = None


@dataclass
class ShardingReport:
    """What sharding wrote and every problem it met (nothing is dropped silently)."""

    shards: list[dict] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)
    turned_upright: list[dict] = field(default_factory=list)  # {id, exif_orientation} per image
    label_sources: dict[str, int] = field(default_factory=dict)  # images sharded per label source
    replaced: list[str] = field(default_factory=list)  # shards of the folder's previous manifest, now removed
    classes_from: str | None = None  # CLASSES_OPTION, or the config the class list came from (`config_source`)

    def problem(self, sample_id: str, kind: str, detail: str) -> None:
        self.problems.append({"id": sample_id, "problem": kind, "detail": detail})


def first_names(names: list[str], shown: int = 3) -> str:
    """`a, b, c, ...`: the first `shown` names of a class list, for a line that cannot hold 80."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def is_name_list(value) -> bool:
    """Whether value is a list of class names (strings), as labels files and samples give them."""
    return isinstance(value, list) and all(isinstance(name, str) for name in value)


def sample_key(name: str) -> str:
    """A WebDataset key from a file stem: dots, path separators and whitespace become
    underscores (a split list holds one id a line, which loaders strip or split on spaces)."""
    return re.sub(r"[./\\\s]", "_", name)


def encode_json(value: dict) -> bytes:
    """Deterministic JSON bytes; NaN becomes null."""
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v
    return json.dumps(clean(value), sort_keys=True).encode()


def tar_bytes(samples: list[dict]) -> bytes:
    """WebDataset tar of samples ({"__key__": id, ext: bytes, ...}), in the given order.
    A key that is not a plain file name (`safe_paths.check_key`) is refused, so no member of a
    tar written here escapes the folder it is extracted into."""
    import webdataset as wds

    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, mtime=_MTIME) as writer:
        for sample in samples:
            check_key(sample["__key__"])
            writer.write(sample)
    return buffer.getvalue()


class ShardReadError(PipelineError, OSError):
    """A shard cannot be read to its end (missing, truncated, not a tar, a failing `pipe:`);
    `cause` says why, in a few words."""

    cause: str = ""


# Seconds a failed read waits for its `pipe:` command to end, to report the command's status.
_PIPE_EXIT_WAIT = 2.0


def _exit_status(stream) -> int | None:
    """The exit status of the command (a `pipe:` command, or the curl that WebDataset reads an
    http(s) URL with) behind an opened shard stream, once it has ended; else None."""
    process = getattr(stream, "proc", None)
    if isinstance(process, subprocess.Popen):
        try:
            return process.wait(timeout=_PIPE_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            return None
    return None


# What curl's exit status means, for a shard WebDataset reads from an http(s) URL with curl.
_CURL_EXITS = {6: "the host name could not be resolved", 7: "nothing answered at that address",
               18: "the transfer ended part-way", 22: "the server answered with an HTTP error (404 not found, "
               "403 forbidden, ...)", 28: "it timed out", 35: "the TLS handshake failed", 52: "the server sent nothing",
               56: "the connection broke off", 60: "the server's certificate was not trusted"}


def _read_failure(url: str, exc: Exception, stream=None) -> str:
    """A few words saying why a shard could not be read (WebDataset's exceptions carry file
    objects and pipes, which cannot cross a process boundary, so only this text travels). The
    exit status of the command behind the opened stream (`_exit_status`: a `pipe:` command, or
    the curl that fetches an http(s) URL, with its meaning) is the reason where it failed,
    whether the read saw its status or first the empty or cut stream it left."""
    reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc) or type(exc).__name__
    reason = reason.split(" @ <")[0]  # tarfile's "... @ <_io.BufferedReader ...>"
    seen = re.search(r"exit (-?\d+)", reason)
    status = int(seen.group(1)) if seen else _exit_status(stream)
    if status and url.startswith("pipe:"):
        return f"the command {url[5:].strip()!r} exited with status {status}"
    if status and url.startswith(("http://", "https://")):
        return f"curl exited with status {status}" + (f": {_CURL_EXITS[status]}" if status in _CURL_EXITS else "")
    return f"{type(exc).__name__}: {reason}"


# Where a sample may carry its image (WebDataset's image extensions), in the order looked for.
# The project's own shards always use jpg, whatever the image's format.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


def sample_image(sample: dict) -> bytes:
    """The image bytes of a shard sample: under the first of IMAGE_EXTENSIONS it has, so shards
    written by other WebDataset tools work too; an ImageDecodeError naming the sample if none."""
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    raise ImageDecodeError(f"sample {sample.get('__key__')!r} has no image (no file ending in "
                           f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}): add its image to the shard")


def read_shard(url: str, digest=None) -> Iterator[dict]:
    """Raw samples of a shard: dicts with "__key__" and bytes per extension, in tar order.
    A shard that cannot be read to its end raises ShardReadError after the samples before it.
    digest: a hashlib object that takes every byte of the shard as it is read, read to its end
    (the tar's padding too), so it holds the checksum of the very bytes the samples came from,
    of a file, a URL or a `pipe:` command alike."""
    # The package, never a submodule first: a worker's prefetch threads read shards at once, and a
    # thread importing webdataset.tariterators while another initialises webdataset deadlocks
    # Python's import locks, which it breaks by handing one a partly initialised module.
    import webdataset as wds

    opened = stream = None
    try:
        opened = stream = wds.gopen(url)
        if digest is not None:
            stream = _HashingReader(opened, digest)
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        for sample in wds.tariterators.group_by_keys(files):
            yield {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
        if digest is not None:
            stream.read_to_end()
    except Exception as exc:
        cause = _read_failure(url, exc, opened)
        error = ShardReadError(f"cannot read shard {url}: {cause}; check that it is complete (manifest.json has "
                               f"its sha256) and readable from {platform.node()}, the host that read it")
        error.cause = cause
        raise error from None
    finally:
        if opened is not None:
            # a failed read has raised already; a command cut off by a reader that stopped early
            # ends with SIGPIPE, which is no error of the shard
            with contextlib.suppress(Exception):
                opened.close()


class _HashingReader:
    """A binary stream that feeds every byte read through it to a hashlib object."""

    def __init__(self, stream, digest):
        self.stream, self.digest = stream, digest

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def read_to_end(self, chunk: int = 1 << 20) -> None:
        while self.read(chunk):
            pass


# --- sources ------------------------------------------------------------------------------------

def _split_ids(voc_root: Path, split: str) -> list[str]:
    if split in ("train", "val", "trainval"):
        candidates = [voc_root / "ImageSets" / "Segmentation" / f"{split}.txt"]
    elif split == "train_aug":
        candidates = [voc_root / "ImageSets" / "SegmentationAug" / "train_aug.txt",
                      voc_root / "ImageSets" / "Segmentation" / "train_aug.txt"]
    else:  # a file of ids; `~` expanded, as --split is also a name (not a path) in other commands
        candidates = [Path(split).expanduser()]
    for path in candidates:
        if path.is_file():  # one id per line, or DeepLab's "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
            return [PurePosixPath(line.split()[0]).stem for line in path.read_text(encoding="utf-8-sig").splitlines()
                    if line.strip()]
    raise ShardingError(
        f"split list for {split!r} not found (looked for {', '.join(map(str, candidates))}): "
        "pass train, train_aug, val or the path of a file with one image id per line"
    )


def _labels_from_xml(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    return sorted({obj.findtext("name").strip() for obj in root.iter("object") if obj.findtext("name")})


def _labels_from_mask(path: Path) -> list[str]:
    with Image.open(path) as img:
        values = np.unique(np.array(img))
    return [VOC_CLASS_NAMES[v - 1] for v in values if 0 < v <= len(VOC_CLASS_NAMES)]


def _voc_id(key) -> str:
    """A labels table's key as VOC spells the id: IRN's cls_labels.npy (also the official iSeg
    code's) keys the ids as integers, 2007000032 for 2007_000032; a key naming the image file
    (`2007_000032.jpg`, `JPEGImages/2007_000032.jpg`) is its stem."""
    text = str(int(key)) if isinstance(key, (int, np.integer)) else str(key)
    if PurePosixPath(text).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
        text = PurePosixPath(text).stem
    return f"{text[:4]}_{text[4:]}" if text.isdigit() and len(text) == 10 else text


def _labels_file(path: Path) -> dict[str, list[str]]:
    """cls_labels.npy (dict id -> 20 multi-hot, the IRN format) or JSON {id: [names]}."""
    if not path.is_file():
        raise ShardingError(f"labels file {path} not found: pass an existing .npy or .json file")
    if path.suffix == ".npy":
        try:
            table = np.load(path, allow_pickle=True).item()
            return {_voc_id(k): [VOC_CLASS_NAMES[i] for i in np.flatnonzero(np.asarray(v)[:len(VOC_CLASS_NAMES)])]
                    for k, v in table.items()}
        except (ValueError, AttributeError, TypeError, OSError) as exc:
            raise ShardingError(f"labels file {path} is not a dict of image id -> 20 multi-hot labels (IRN's "
                                f"cls_labels.npy): {exc}") from exc
    if path.suffix == ".json":
        try:
            table = json.loads(path.read_text(encoding="utf-8-sig"))
            bad = next((k for k, v in table.items() if not is_name_list(v)), None)
        except (ValueError, AttributeError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
            raise ShardingError(f"labels file {path} is not a JSON object of image id -> [class names]: "
                                f"{exc}") from exc
        if bad is not None:
            raise ShardingError(f"labels file {path}: {bad!r} maps to {table[bad]!r}, not a list of class names "
                                "({\"2007_000032\": [\"aeroplane\", \"person\"]})")
        return {_voc_id(k): v for k, v in table.items()}
    raise ShardingError(f"labels file {path} must be .npy (IRN cls_labels) or .json ({{id: [names]}})")


def voc_sources(voc_root: str | Path, split: str, labels_file: str | Path | None,
                report: ShardingReport) -> list[SourceImage]:
    """The images of a VOC split with their labels: from --labels-file, else the classes present
    in the image's ground-truth mask (SegmentationClassAug, then SegmentationClass), as the
    official iSeg code takes them and its published numbers use, else Annotations/*.xml. An
    image whose XML names other classes than its mask shows is reported (`labels differ`)."""
    root = Path(voc_root)
    if not root.exists():
        where = "" if root.is_absolute() else f" (looked for in {Path.cwd()})"
        raise ShardingError(f"{root} does not exist{where}: pass the VOC2012 folder (VOCdevkit/VOC2012)")
    if not (root / "JPEGImages").is_dir():
        near = [folder for folder in (root.parent, root / "VOC2012", root / "VOCdevkit" / "VOC2012")
                if (folder / "JPEGImages").is_dir()]
        hint = f"pass {near[0]}, which has it" if near else "pass the VOC2012 folder (VOCdevkit/VOC2012)"
        raise ShardingError(f"{root} has no JPEGImages/: {hint}")
    table = _labels_file(Path(labels_file)) if labels_file else None
    sources, seen = [], set()
    for image_id in _split_ids(root, split):
        if image_id in seen:
            report.problem(image_id, "duplicate id", "listed more than once in the split; kept once")
            continue
        seen.add(image_id)
        image = root / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            report.problem(image_id, "missing image", f"{image} does not exist")
            continue
        gt = next((p for p in (root / "SegmentationClassAug" / f"{image_id}.png",
                               root / "SegmentationClass" / f"{image_id}.png") if p.is_file()), None)
        xml = root / "Annotations" / f"{image_id}.xml"
        if table is not None:
            names, label_source = table.get(image_id, []), "labels-file"
        elif gt is not None:
            names, label_source = _labels_from_mask(gt), "mask"
            listed = _labels_from_xml(xml) if xml.is_file() else names
            if listed != names:
                report.problem(image_id, "labels differ", f"Annotations XML names {listed}, the mask shows {names}: "
                                                          "took the mask's, as the official iSeg code")
        elif xml.is_file():
            names, label_source = _labels_from_xml(xml), "xml"
        else:
            names, label_source = [], None
        sources.append(SourceImage(id=sample_key(image_id), image=image, names=names, gt=gt,
                                   label_source=label_source))
    if table is not None and sources and not any(s.names for s in sources):
        raise ShardingError(f"labels file {labels_file} labels none of the split's images (its ids look like "
                            f"{next(iter(table), 'nothing')!r}, the split's like {sources[0].id!r}): pass the labels "
                            "file of this dataset")
    return sources


def _labels_rows(labels_path: Path) -> list[tuple[str, list[str]]]:
    """(image path, class names) per row of a labels table (`.csv`, `.tsv`: columns image,labels,
    separated by `,`, a tab or `;` as its header line shows, the last as Excel writes CSV in
    many locales; names split by `;`, `,` or `|`), a JSONL file ({"image": path, "labels":
    [names]} a line) or a `.json` file (a list of those, or {image: [names]}), UTF-8 with or
    without the byte-order mark that Excel and Notepad write (as the split lists and JSON labels
    files)."""
    if labels_path.suffix.lower() in (".csv", ".tsv"):
        with open(labels_path, newline="", encoding="utf-8-sig") as handle:
            header = handle.readline()
            handle.seek(0)  # the decoder starts again, and drops a byte-order mark again
            delimiter = next((d for d in (",", "\t", ";") if {"image", "labels"} <= {c.strip() for c in
                                                                                     header.split(d)}), ",")
            reader = csv.DictReader(handle, delimiter=delimiter)
            if not reader.fieldnames or not {"image", "labels"} <= set(reader.fieldnames):
                found = ",".join(reader.fieldnames or []) or "empty"
                raise ShardingError(f"{labels_path} needs a header with columns image,labels (its first line is "
                                    f"{found[:80]}): name the columns so")
            # names past the labels column are more names (`a.jpg,cat,dog` unquoted), not dropped
            return [(r["image"], [n.strip() for field in [r["labels"] or ""] + (r.get(None) or [])
                                  for n in re.split(r"[;,|]", field) if n.strip()]) for r in reader]
    text = labels_path.read_text(encoding="utf-8-sig")
    if labels_path.suffix.lower() == ".json":  # one JSON value: [{image, labels}, ...] or {image: [names]}
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShardingError(f"{labels_path} is not valid JSON ({exc}): fix the file") from None
        records = ([{"image": image, "labels": names} for image, names in whole.items()]
                   if isinstance(whole, dict) else whole if isinstance(whole, list) else [whole])
        return [_label_row(labels_path, f"entry {number}", record) for number, record in enumerate(records, 1)]
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    return [_label_row(labels_path, f"line {number}", line) for number, line in lines]


def _label_row(labels_path: Path, where: str, record) -> tuple[str, list[str]]:
    """(image path, class names) of one labels-file record: a dict or a JSONL line."""
    try:
        record = json.loads(record) if isinstance(record, str) else record
        image, names = record["image"], record.get("labels", [])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ShardingError(f"{labels_path} {where} is not a JSON object with 'image' ({exc}): a labels file "
                            "is a CSV (.csv, .tsv) with columns image,labels, a JSONL file of {\"image\": ..., "
                            "\"labels\": [...]}, or a .json file of such objects or of {image: [names]}") from None
    if not is_name_list(names):
        raise ShardingError(f"{labels_path} {where}: 'labels' is {names!r}, not a list of class names "
                            "(\"labels\": [\"cat\", \"sofa\"])")
    return image, names


def _folder_image_id(path: str, images_dir: Path) -> str:
    """A labels file's image path as an id (`sample_key` of it without the suffix): relative to
    images_dir, also where the file gives it as an absolute path inside images_dir; any other
    absolute path without its leading /. `.` and `..` are resolved as written (`sub/../a.jpg`
    is `a`)."""
    image = Path(os.path.normpath(path))
    if image.is_absolute():
        root = Path(os.path.abspath(images_dir))
        image = image.relative_to(root) if image.is_relative_to(root) else image.relative_to(image.anchor)
    return sample_key(str(image.with_suffix("")))


def folder_sources(images_dir: str | Path, labels_path: str | Path, report: ShardingReport) -> list[SourceImage]:
    """Images of a folder labelled by a labels file (`_labels_rows`: a CSV or TSV table, JSONL
    or JSON); paths relative to images_dir."""
    images_dir, labels_path = Path(images_dir), Path(labels_path)
    if not images_dir.is_dir():
        what = "is a file" if images_dir.exists() else "does not exist"
        raise ShardingError(f"--image-dir {images_dir} {what}: pass the folder the labels file's image paths are "
                            "relative to")
    if not labels_path.is_file():
        what = "is a folder" if labels_path.is_dir() else "not found"
        raise ShardingError(f"labels file {labels_path} {what}: pass a CSV (image,labels), JSONL or JSON file")
    try:
        rows = _labels_rows(labels_path)
    except UnicodeDecodeError as exc:
        raise ShardingError(f"labels file {labels_path} is not UTF-8 text (byte {exc.start}): pass a CSV "
                            "(image,labels), JSONL or JSON file") from None
    except csv.Error as exc:
        raise ShardingError(f"labels file {labels_path} is not a CSV file: {exc}") from None
    sources, seen = [], set()
    for rel, names in rows:
        key = _folder_image_id(rel, images_dir)
        if key in seen:
            report.problem(key, "duplicate id", f"{rel} maps to an id already used; kept the first")
            continue
        seen.add(key)
        image = _written_path(images_dir, rel)
        if image is None:
            report.problem(key, "missing image", f"{images_dir / rel} does not exist")
            continue
        sources.append(SourceImage(id=key, image=image, names=names, upright=True, label_source="labels-file"))
    return sources


def _written_path(images_dir: Path, rel: str) -> Path | None:
    """The file in images_dir that a labels file's path names, or None: as written, with `\\`
    as written on Windows (kitchen\\001.jpg), or with its accents composed or decomposed other
    than the file name's (`café.jpg` typed as one character, stored by macOS as e + accent)."""
    for path in dict.fromkeys([rel, PureWindowsPath(rel).as_posix()]):
        for form in dict.fromkeys([path, unicodedata.normalize("NFC", path), unicodedata.normalize("NFD", path)]):
            if (images_dir / form).is_file():
                return images_dir / form
    return None


# --- writing --------------------------------------------------------------------------------------

def _image_sample(source: SourceImage, class_names: list[str], report: ShardingReport) -> dict:
    data = source.image.read_bytes()
    spellings = [(name,) for name in class_names]
    given = [name for name in source.names if not is_background(name)]  # every mask has the background
    indices = [match_class(name, spellings) for name in given]
    names = [name if index is None else class_names[index] for name, index in zip(given, indices)]
    meta = {"id": source.id, "names": names, "source": str(source.image),
            "labels": [None if index is None else index + 1 for index in indices]}
    if source.label_source is not None:
        meta["label_source"] = source.label_source
    if source.upright:
        data, orientation = upright_image_bytes(data)
        if orientation != 1:
            meta["exif_orientation"] = orientation
            report.turned_upright.append({"id": source.id, "exif_orientation": orientation})
    try:
        with Image.open(io.BytesIO(data)) as img:
            meta["width"], meta["height"] = img.size
    except Exception as exc:  # any decoder failure: the image still goes in, the run fails it
        report.problem(source.id, "unreadable image", f"{source.image}: {undecodable_reason(data, exc)}")
    if not given:
        report.problem(source.id, "no labels", "no image-level label found; the run will fail this image")
    for name, index in zip(given, indices):
        if index is None:
            close = closest_class(name, class_names)
            report.problem(source.id, "unknown class", f"{name!r} is not in the class list"
                           + (f" (did you mean {close!r}?)" if close else ""))
    sample = {"__key__": source.id, "jpg": data, "json": encode_json(meta)}
    if source.gt is not None:
        sample["gt.png"] = source.gt.read_bytes()
    elif source.gt_png is not None:
        sample["gt.png"] = source.gt_png
    return sample


def check_shard_prefix(prefix: str) -> None:
    """ShardingError unless prefix is a plain file name (`key_problem`): shards are named
    <prefix>-000000.tar in their folder."""
    problem = key_problem(prefix)
    if problem is not None:
        raise ShardingError(f"shard name prefix {prefix!r}: {problem}; the shards are named <prefix>-000000.tar "
                            "in the output folder, so give a plain name (--prefix, or a --split without '/')")


def write_image_shards(sources: list[SourceImage], out_dir: str | Path, prefix: str, shard_size: int,
                       class_names: list[str], report: ShardingReport, progress=None) -> ShardingReport:
    """Write `<prefix>-000000.tar`, ... of shard_size samples each, and `manifest.json`
    (shards with url, sample count and sha256; classes; problems)."""
    if shard_size < 1:
        raise ShardingError("--shard-size must be at least 1")
    check_shard_prefix(prefix)
    safe = []
    for source in sources:
        problem = key_problem(source.id)
        if problem is None:
            safe.append(source)
        else:
            report.problem(repr(source.id), "unsafe key", f"{source.image}: {problem}; not sharded (rename the file)")
    sources = safe
    if not sources:
        first = f"; the first of {len(report.problems)} problem(s): {report.problems[0]['id']}: " \
                f"{report.problems[0]['problem']}: {report.problems[0]['detail']}" if report.problems else ""
        raise ShardingError(f"no images to shard{first}")
    out_dir = Path(out_dir)
    for source in sources:
        kind = source.label_source or "none"
        report.label_sources[kind] = report.label_sources.get(kind, 0) + 1
    for number, start in enumerate(range(0, len(sources), shard_size)):
        chunk = sources[start : start + shard_size]
        path = out_dir / f"{prefix}-{number:06d}.tar"
        atomic_write_bytes(path, tar_bytes([_image_sample(s, class_names, report) for s in chunk]))
        report.shards.append({"url": path.name, "samples": len(chunk), "sha256": file_sha256(path)})
        if progress is not None:
            progress.update(len(chunk))
    report.replaced = _previous_shards(out_dir, {shard["url"] for shard in report.shards})
    atomic_write_json(out_dir / "manifest.json",
                      {"shards": report.shards, "classes": class_names, "classes_from": report.classes_from,
                       "label_sources": report.label_sources, "problems": report.problems,
                       "turned_upright": report.turned_upright})
    for name in report.replaced:  # after the new manifest: a crash between the two leaves extra files only
        (out_dir / name).unlink(missing_ok=True)
    return report


def _previous_shards(out_dir: Path, written: set[str]) -> list[str]:
    """The shard files the folder's manifest.json listed before this sharding that it did not
    write again (the shards of an earlier, larger sharding into the same folder: a glob over
    the folder would take them with the new ones, their images twice). Only plain file names
    of this folder that exist; an unreadable old manifest lists none."""
    try:
        previous = read_manifest(out_dir) or {}
    except InputError:
        return []
    listed = previous.get("shards") if isinstance(previous.get("shards"), list) else []
    names = {shard.get("url") for shard in listed if isinstance(shard, dict)}
    return sorted(name for name in names if isinstance(name, str) and name not in written
                  and key_problem(name) is None and (out_dir / name).is_file())


class InputError(PipelineError, ValueError):
    """The --input shards cannot be used as given; the message says why."""


class MissingInputError(InputError):
    """The --input pattern matches no shard, or names shards that are not there."""


# The file names a glob takes as shards (WebDataset's tar and gzipped tar).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# WebDataset's separator of several shard patterns in one input string ("a/{0..3}.tar::b/*.tar"):
# how several --input values are recorded as one job's input.
INPUT_SEPARATOR = "::"


def join_inputs(patterns: list[str]) -> str:
    """Several --input values as one input string (INPUT_SEPARATOR between them)."""
    return INPUT_SEPARATOR.join(patterns)


def split_inputs(inputs: str) -> list[str]:
    """The patterns of one input string (`join_inputs`): split at INPUT_SEPARATOR, but not
    inside a URL's bracketed IPv6 host (`http://[::1]:8000/shards/`), which split as WebDataset
    splits gave `http://[` and a traceback."""
    return re.split(r"::(?![^\[/]*\])", inputs)


def describe_input(inputs: str, shown: int = 3) -> str:
    """An input (`join_inputs`) for a line of text: its first `shown` patterns, then how many more."""
    patterns = split_inputs(inputs)
    more = f" and {len(patterns) - shown} more" if len(patterns) > shown else ""
    return INPUT_SEPARATOR.join(patterns[:shown]) + more


def expand_input(inputs: str) -> list[str]:
    """Shard paths from one input, or several joined by INPUT_SEPARATOR, each a brace pattern
    (`shards/voc-{000000..000041}.tar`), a glob (its SHARD_SUFFIXES files: `shards/*` leaves
    the manifest out), a folder holding a manifest.json (or that manifest.json): the shards it
    lists, or a folder without one (another tool's shards): its SHARD_SUFFIXES files; in order,
    without duplicates."""
    urls: list[str] = []
    for pattern in split_inputs(inputs):
        urls.extend(url for url in _expand_pattern(pattern) if url not in urls)
    return urls


def _expand_pattern(pattern: str) -> list[str]:
    """The shard paths of one input pattern (expand_input)."""
    from braceexpand import braceexpand

    path = Path(pattern)
    if path.name == "manifest.json" and path.is_file():
        path = path.parent
    if path.is_dir() and not (path / "manifest.json").is_file():
        urls = sorted(str(file) for file in path.iterdir() if file.name.endswith(SHARD_SUFFIXES) and file.is_file())
        if not urls:
            raise InputError(f"{path} holds no shard: no manifest.json and no {', '.join(SHARD_SUFFIXES)} file; pass "
                             f"the folder that sharding wrote, or a shard pattern{_sharding_hint(path)}")
    elif path.is_dir():
        urls = _listed_shards(str(path), read_manifest(path), f"'{path}/*.tar'")
    elif pattern.startswith(("http://", "https://")) and (pattern.endswith("/") or urllib.parse.urlsplit(
            pattern).path.endswith("/manifest.json")):  # a served shard folder, or its manifest
        folder = pattern.rstrip("/") if pattern.endswith("/") else shard_folder(pattern)
        urls = _listed_shards(folder, read_manifest(folder), f"'{folder}/NAME-{{000000..000009}}.tar'")
    else:
        urls = []
        for expanded in braceexpand(pattern):
            # WebDataset globs nothing: a URL's `?query` (a presigned URL), `[host]` or a command's `*` is its own
            globbed = not is_stream(expanded) and any(c in expanded for c in "*?[")
            matches = [m for m in sorted(glob.glob(expanded)) if m.endswith(SHARD_SUFFIXES)] if globbed else [expanded]
            urls.extend(u for u in matches if u not in urls)
    missing = [u for u in urls if not is_stream(u) and not Path(u).is_file()]
    urls_with_scheme = [u for u in urls if "://" in u and not u.startswith("pipe:")]
    schemes = _url_schemes() if urls_with_scheme else []  # not for local paths: it imports torch
    unopened = next((u for u in urls_with_scheme if u.split("://", 1)[0] not in schemes), None)
    if unopened is not None:
        scheme = unopened.split("://", 1)[0]
        given = pattern if pattern.startswith(f"{scheme}://") else unopened  # a brace pattern stays one
        how = {"s3": f"'pipe:aws s3 cp {given} -'", "file": repr(given.split("://", 1)[1])}.get(
            scheme, "'pipe:COMMAND' with a command that writes the shard to its output")
        raise InputError(f"input shard {unopened}: WebDataset opens no {scheme}:// URL (it opens "
                         f"{', '.join(schemes)}): pass {how}")
    for url in urls:
        _refuse_mask_shard(url)
    if not urls:
        raise MissingInputError(f"--input {pattern!r} matches no shard (a glob takes the "
                                f"{', '.join(SHARD_SUFFIXES)} files it matches)")
    if missing:
        raise MissingInputError(f"input shard {missing[0]} does not exist ({len(missing)} missing): check the input "
                                f"pattern {pattern!r} and that the shards are readable from this machine")
    return urls


def _listed_shards(folder: str, manifest: dict | None, pattern_hint: str) -> list[str]:
    """The shards a shard folder's manifest.json lists (`read_manifest`), as paths or URLs; an
    InputError where there is none or it lists none as sharding writes it."""
    listed = (manifest or {}).get("shards")
    where = beside(folder, "manifest.json")
    if manifest is None and is_stream(folder):
        raise InputError(f"{where} is not there (the server has none): pass the shards' URLs as a brace pattern "
                         f"such as {pattern_hint}")
    if not isinstance(listed, list) or not all(isinstance(s, dict) and isinstance(s.get("url"), str) for s in listed):
        raise InputError(f"{where} does not list shards as sharding writes it (\"shards\": [{{\"url\": FILE, ...}}, "
                         f"...]): shard the dataset again, or pass a shard pattern such as {pattern_hint}")
    return [beside(folder, s["url"]) for s in listed]


def is_stream(url: str) -> bool:
    """Whether a shard is a URL or a `pipe:` command rather than a local file."""
    return "://" in url or url.startswith("pipe:")


def split_folders(root: Path) -> list[str]:
    """The folders of images under a COCO-style root (train2017/, ...): all but annotations/."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != "annotations") if root.is_dir() else []


def _sharding_hint(folder: Path) -> str:
    """Where folder is a dataset rather than shards, how to shard it (with a leading "; "), else ""."""
    if (folder / "JPEGImages").is_dir():
        return f"; it is a VOC folder: shard it first, pseudolabel shard-voc --voc-root {folder} -o shards/"
    if (folder / "annotations").is_dir():
        split = next(iter(split_folders(folder)), "train2014")
        return (f"; it looks like a COCO folder: shard it first, pseudolabel shard-coco --coco-root {folder} "
                f"--split {split} -o shards/")
    if any(f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS for f in folder.iterdir()):
        return ("; it holds images: shard them first with their labels, pseudolabel shard-folder --image-dir "
                f"{folder} --labels-file labels.csv --config voc -o shards/")
    return ""


def _url_schemes() -> list[str]:
    """The URL schemes WebDataset opens shards from (http, https, gs, ...), `pipe:` aside."""
    import webdataset as wds  # the package first, as read_shard says why

    return sorted(name for name in wds.gopen_schemes if not name.startswith("_") and name != "pipe")


def _refuse_mask_shard(url: str) -> None:
    """InputError where url is a mask shard that `pseudolabel run` wrote into a job's masks/,
    naming the image shards that job read."""
    path = Path(url)
    if is_stream(url) or path.parent.name != "masks" or not (path.parent.parent / "job.json").is_file():
        return
    job = path.parent.parent
    try:
        read = json.loads((job / "job.json").read_text()).get("input")
    except (OSError, ValueError, AttributeError):  # a job.json that cannot be read: the refusal stands, no hint
        read = None
    raise InputError(f"input shard {url} holds the masks that pseudolabel run wrote into the job {job}, not "
                     "images: pass the image shards" + (f" that job read ({describe_input(read)})"
                                                        if isinstance(read, str) else ""))


def read_manifest(folder: Path | str) -> dict | None:
    """The manifest.json in folder (a local folder, or the http(s) URL of one, `shard_folder`);
    None where there is none, or where it is JSON but not an object (another tool's file of
    that name); an InputError naming it where it cannot be read or is not JSON (cut short in a
    copy, say), as its counts and checksums guard the shards."""
    path = beside(str(folder), "manifest.json")
    if is_stream(path):
        text = _fetch_manifest(path)
        if text is None:
            return None
    elif not Path(path).is_file():
        return None
    try:
        manifest = json.loads(text if is_stream(path) else Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # the last: [[[[...]]]]
        raise InputError(f"cannot read {path}: {exc}; copy it again with its shards, or shard the dataset "
                         "again") from None
    return manifest if isinstance(manifest, dict) else None


def _fetch_manifest(url: str, timeout_s: float = 30.0) -> bytes | None:
    """The bytes at an http(s) URL of a manifest.json; None where the server answers that it
    has none there (404 or 410; 401 or 403, as object stores answer for a key one may not
    list): shards without a manifest, as other tools write them. An InputError where the server
    fails (5xx) or cannot be reached, which the shards beside it could not be read from either."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403, 404, 410):
            return None
        raise InputError(f"cannot read {url}: the server answered {exc.code} {exc.reason}; check the server, or "
                         "try again") from None
    except (urllib.error.URLError, OSError) as exc:  # refused, no such host, timed out
        reason = getattr(exc, "reason", None) or exc
        raise InputError(f"cannot read {url}: {reason}; check that the server is up and reachable from this "
                         "machine") from None


def shard_folder(url: str) -> str | None:
    """Where the manifest.json of a shard would be: its local folder, or for an http(s) URL the
    URL of its folder (query and fragment left off); None for a `pipe:` command and for URLs
    of other schemes, which have none that can be told."""
    if url.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rsplit("/", 1)[0], "", ""))
    return None if is_stream(url) else str(Path(url).parent)


def beside(folder: str, name: str) -> str:
    """The path, or URL, of the file `name` in a shard folder (`shard_folder`)."""
    return f"{folder}/{name}" if is_stream(folder) else str(Path(folder) / name)


def manifests_beside(urls: list[str]) -> dict[str, dict]:
    """The manifest.json of each shard folder (`shard_folder`: a local folder, or an http(s)
    one) holding some of these shards (`read_manifest`), by folder, in folder order; pipes,
    other URLs and folders without one (other tools' shards) have none."""
    manifests = {}
    for folder in sorted({f for f in map(shard_folder, urls) if f is not None}):
        manifest = read_manifest(folder)
        if manifest is not None:
            manifests[folder] = manifest
    return manifests


def manifest_listing(manifests: dict[str, dict], key: str, kind: type) -> dict:
    """Shard path -> what its manifest lists for it under key ("samples": its sample count, an
    int; "sha256": its checksum, a str), for the shards the manifests list with such a value."""
    return {beside(str(folder), shard["url"]): shard[key] for folder, manifest in manifests.items()
            for shard in (manifest.get("shards") if isinstance(manifest.get("shards"), list) else [])
            if isinstance(shard, dict) and isinstance(shard.get("url"), str)
            and isinstance(shard.get(key), kind)}


def sample_count_problem(url: str, samples_read: int, counts: dict[str, int]) -> str | None:
    """Why a shard read to its end gave another number of samples than its manifest lists, or
    None. A tar cut at a 512-byte block boundary (a copy or download stopped part-way) ends
    cleanly for a tar reader, so only the count tells it from a whole shard."""
    expected = counts.get(url)
    if expected is None or expected == samples_read:
        return None
    found = (f"ends early, after {samples_read} of the {expected} samples" if samples_read < expected else
             f"holds {samples_read} samples, not the {expected}")
    return f"the shard {found} its manifest.json lists; copy it again or shard the dataset again"


def input_fingerprint(url: str, sha256: str | None = None) -> dict | None:
    """What a shard's ledger entry records of it, so that a resume can tell a shard changed
    since (`input_changed`): {"size": bytes, "mtime_ns": int, "sha256": hex} of a local file,
    {"sha256": hex} of a URL or a `pipe:` command, which cannot be looked at without reading
    them whole. sha256: the checksum of the bytes just read (`read_shard`'s digest); without
    it a local file is hashed, and a stream has none (None)."""
    if is_stream(url):
        return None if sha256 is None else {"sha256": sha256}
    stat = os.stat(url)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256 or file_sha256(Path(url))}


def input_changed(recorded: dict | None, url: str, listed_sha256: str | None = None, read: bool = True) -> bool:
    """Whether the shard at url holds other bytes than the fingerprint recorded when it was done
    (`input_fingerprint`). The same size and modification time count as unchanged without
    reading the file (rsync's quick check; a copy or a new shard changes the time); else the
    sha256 its manifest lists decides (listed_sha256: sharding writes the two together), or,
    without one, the file's own (unless not read: then only another size tells). A URL or a
    `pipe:` command is told by its manifest's sha256 alone. False where nothing was recorded
    (a ledger from before)."""
    if not recorded:
        return False
    if is_stream(url):
        return listed_sha256 is not None and recorded.get("sha256") not in (None, listed_sha256)
    try:
        stat = os.stat(url)
    except OSError:
        return False  # a missing shard is refused when the input is listed; nothing to compare here
    if (stat.st_size, stat.st_mtime_ns) == (recorded.get("size"), recorded.get("mtime_ns")):
        return False
    if listed_sha256 is not None:
        return listed_sha256 != recorded.get("sha256")
    return stat.st_size != recorded.get("size") or (read and file_sha256(Path(url)) != recorded.get("sha256"))


def checksum_problem(url: str, fingerprint: dict | None, checksums: dict[str, str]) -> str | None:
    """Why a shard's bytes are not those its manifest lists the sha256 of, or None (also where
    no manifest lists one). Such a shard was damaged, or changed without its manifest, since
    it was written: its images or labels are not the ones the manifest describes."""
    expected = checksums.get(url)
    if fingerprint is None or expected is None or fingerprint["sha256"] == expected:
        return None
    return (f"the shard's sha256 ({fingerprint['sha256'][:12]}...) is not the {expected[:12]}... its manifest.json "
            "lists: it was damaged or changed since it was written; copy it again, or shard the dataset again "
            "(which writes a new manifest)")


def check_shard_classes(manifests: dict[str, dict], class_names: list[str]) -> None:
    """InputError when a manifest beside the shards (`manifests_beside`) lists other classes
    than the config's (by `name_key`, in order): every image's labels would fail (their values
    number the manifest's classes). Shards without a manifest are checked image by image as
    they run."""
    for folder, manifest in manifests.items():
        listed = manifest.get("classes")
        if not is_name_list(listed) or not listed or list(map(name_key, listed)) == list(map(name_key, class_names)):
            continue
        match = built_in_config_listed({folder: manifest})
        made_with = manifest.get("classes_from")
        fix = (f"pass --config {match}" if match
               else f"pass --config {made_with}, the config they were made with" if isinstance(made_with, str)
               and made_with != CLASSES_OPTION
               else f"pass --classes '{','.join(listed)}'" if not any("," in name or "'" in name for name in listed)
               else f"pass a config whose classes are the manifest's, in its order: a YAML file holding the line "
                    f"classes: {json.dumps(listed)}")
        first = [first_names(names) for names in (listed, class_names)]
        raise InputError(f"the shards in {folder} were written for {len(listed)} classes ({first[0]}) but the config "
                         f"has {len(class_names)} ({first[1]}): {fix}")


# A manifest's `classes_from` where shard-folder was given the class list as --classes (else the
# config it was given, `config_source`).
CLASSES_OPTION = "--classes"


def config_source(config: str) -> str:
    """How a manifest records the --config a class list came from: a built-in name as it is,
    a file by its absolute path."""
    from pipeline.config import is_built_in_name

    return config if is_built_in_name(config) else os.path.abspath(config)


def classes_listed(manifests: dict[str, dict]) -> tuple[list[str], str | None] | None:
    """(class names in label order, where they came from: CLASSES_OPTION, a config, or None
    where unrecorded or not the same in every manifest) that every manifest beside the shards
    lists (`manifests_beside`); None where there is no manifest, one lists none, or two differ."""
    listed = [manifest.get("classes") for manifest in manifests.values()]
    if not listed or not all(is_name_list(names) and names and names == listed[0] for names in listed):
        return None
    sources = {manifest.get("classes_from") for manifest in manifests.values()}
    source = sources.pop() if len(sources) == 1 else None
    return listed[0], source if isinstance(source, str) else None


def built_in_config_listed(manifests: dict[str, dict]) -> str | None:
    """The built-in config (BUILT_IN_CONFIGS) whose classes, in its order, every manifest beside
    the shards lists (`classes_listed`); None where there is no manifest or none matches."""
    from pipeline.config import BUILT_IN_CONFIGS, built_in_config, load_config

    listed = classes_listed(manifests)
    if listed is None:
        return None
    keys = list(map(name_key, listed[0]))
    return next((name for name in BUILT_IN_CONFIGS
                 if list(map(name_key, load_config(built_in_config(name)).class_names)) == keys), None)


# The last `<name>.tar` of a path, a URL (before its query) or a `pipe:` command.
_TAR_NAME = re.compile(r"([^/\s?#]+)\.tar(?=[?#\s]|$)")


def shard_name(url: str) -> str:
    """The name a shard's outputs take (masks/<name>.tar, ledger/<name>.json): its file name
    without .tar, also inside a URL or a `pipe:` command (`pipe:aws s3 cp s3://b/voc-000003.tar -`
    -> voc-000003); else the input's last path component."""
    found = _TAR_NAME.findall(url)
    return found[-1] if found else url.rstrip("/").split("/")[-1]


def sample_classes(sample: dict, config: SegmenterConfig) -> list[int]:
    """A shard sample's labelled classes as sorted 0-based indices of config's classes; a
    ConfigError names what is wrong (no .json, bad JSON, no labels, an unknown class)."""
    if "json" not in sample:
        raise ConfigError("sample has no .json with its labels: reshard it with pseudolabel shard-voc/shard-folder")
    try:
        meta = json.loads(sample["json"])
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ConfigError(f"sample .json is not valid JSON ({exc}): reshard it") from exc
    except RecursionError:  # a crafted [[[[...]]]]
        raise ConfigError("sample .json is not valid JSON (nested deeper than Python's parser goes): reshard it") \
            from None
    if not isinstance(meta, dict):
        raise ConfigError(f"sample .json is {type(meta).__name__}, not an object with its labels' names: reshard it")
    if "conf.png" in sample or {"status", "mean_confidence"} <= meta.keys():
        raise ConfigError("sample is a pseudo mask with its statistics (a mask shard that pseudolabel run wrote), "
                          "not an image with labels: pass the image shards the job read")
    names, labels = meta.get("names") or [], meta.get("labels")
    if not is_name_list(names):
        raise ConfigError(f"sample .json names {names!r} are not a list of class names: reshard it")
    kept = [i for i, name in enumerate(names) if not is_background(name)]  # every mask has the background
    if len(kept) < len(names):
        if isinstance(labels, list) and len(labels) == len(names):
            labels = [labels[i] for i in kept]
        names = [names[i] for i in kept]
    if not names:
        raise ConfigError("image has no labels: give it at least one image-level label")
    classes = [config.class_index(name) for name in names]
    if labels is not None and labels != [c + 1 for c in classes]:
        raise ConfigError(f"sample .json labels {labels!r} and names {names!r} disagree (the config numbers "
                          f"those names {[c + 1 for c in classes]}): fix the .json or reshard the image")
    return sorted(set(classes))
