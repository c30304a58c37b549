"""COCO instance annotations -> image-level labels and semantic ground truth, with pycocotools.

The semantic mask of an image follows COCO-Stuff's `cocoSegmentationToSegmentationMap`
(cocoapi, `PythonAPI/pycocotools/cocostuffhelper.py`), the converter behind the COCO ground
truth of the weakly supervised literature: the image's non-crowd instance masks (polygons or
RLE, decoded by pycocotools' `annToMask`) are painted in annotation-file order, a later instance
overwriting an earlier one where they overlap; crowd regions are not painted (their pixels stay
background); values are the contiguous class indices of the config's classes (1..80 for
`configs/coco.yaml`, the default; 0 background). The image-level labels are the classes present
in that mask, as the official iSeg code derives them from its ground-truth masks: a crowd-only
class, or an instance wholly covered by later ones, is not a label.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import numpy as np

from pipeline.config import match_class
from pipeline.mask.codec import encode_mask
from pipeline.data.safe_paths import key_problem
from pipeline.data.shards import ShardingError, ShardingReport, SourceImage, first_names, sample_key, split_folders

SPLITS = ("train2014", "val2014", "train2017", "val2017")


def load_coco(annotations: Path):
    """pycocotools' COCO index over an instances JSON, loaded once (train2014's 450 MB file
    takes a few GB of memory while sharding)."""
    from pycocotools.coco import COCO

    if not annotations.is_file():
        raise ShardingError(f"annotation file {annotations} not found: pass --annotations "
                            "annotations/instances_<split>.json of the COCO download")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO(str(annotations))
        problem = instances_problem(coco.dataset)
        if problem is None:
            for annotation in coco.dataset["annotations"]:  # the index holds these same dicts
                annotation.setdefault("iscrowd", 0)  # left out by some exporters: Detectron2's default
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as exc:
        problem = str(exc) or type(exc).__name__
    if problem:
        raise ShardingError(f"annotation file {annotations} is not a COCO instances JSON ({problem}): pass "
                            "annotations/instances_<split>.json")
    return coco


# The keys each entry of an instances JSON needs here (pycocotools reads them).
REQUIRED_KEYS = {"images": ("id", "file_name", "width", "height"),
                 "annotations": ("id", "image_id", "category_id", "segmentation"),
                 "categories": ("id", "name")}


def instances_problem(dataset) -> str | None:
    """What keeps a parsed instances JSON from being rendered, in a few words (the first
    entry lacking a key, say), or None. Files from labelling tools' COCO exporters often
    leave out `categories`; an annotation without `iscrowd` is an instance (`load_coco`)."""
    for section, keys in REQUIRED_KEYS.items():
        entries = dataset.get(section)
        if not isinstance(entries, list):
            return f"it has no list {section!r}"
        for number, entry in enumerate(entries):
            missing = [k for k in keys if k not in entry] if isinstance(entry, dict) else list(keys)
            if missing:
                return f"{section} entry {number} has no {missing[0]!r}"
    return None


def category_indices(coco, class_names: list[str]) -> dict[int, int]:
    """COCO category id -> contiguous class index (1-based, the mask value) by name, matched
    as every class name is (`match_class`: the config's `traffic_light` is COCO's `traffic light`)."""
    indices = {}
    spellings = [(name,) for name in class_names]
    categories = coco.loadCats(coco.getCatIds())
    for category in categories:
        index = match_class(category["name"], spellings)
        if index is None:
            names = first_names([c["name"] for c in categories], 8)
            raise ShardingError(f"COCO category {category['id']} {category['name']!r} is not a class of the config "
                                f"(COCO's 80 unless --config names another): pass --config, a YAML whose classes "
                                f"are the annotation file's categories ({names})")
        indices[category["id"]] = index + 1
    return indices


def semantic_mask(coco, image_id: int, indices: dict[int, int]) -> np.ndarray:
    """uint8 [H, W] class indices of one image (module doc: painting order, crowd regions).
    Raises KeyError naming a category id that is not in `indices`."""
    info = coco.imgs[image_id]
    # painted column-major, the layout pycocotools decodes instance masks in (a third faster)
    mask = np.zeros((info["width"], info["height"]), dtype=np.uint8).T
    for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
        np.copyto(mask, indices[annotation["category_id"]], where=coco.annToMask(annotation).view(bool))
    return np.ascontiguousarray(mask)


def coco_sources(coco_root: str | Path, split: str, annotations: str | Path | None, class_names: list[str],
                 report: ShardingReport, progress: Callable[[list[int]], Iterable[int]] = iter) -> list[SourceImage]:
    """The images of a COCO split with labels and their ground-truth PNG, each mask rendered
    once (the PNGs of a split are held until written: about 4 KB an image); images without a
    labelled pixel, with an unknown category or without their file go to the report.
    progress wraps the image ids as they are rendered (a progress bar)."""
    root = Path(coco_root)
    problem = key_problem(split)
    if problem is not None:
        raise ShardingError(f"--split {split!r}: {problem}; name the folder of images under --coco-root "
                            f"({', '.join(SPLITS)}, or your dataset's)")
    images_dir = root / split
    if not images_dir.is_dir():
        there = split_folders(root)
        held = f" ({root} holds {', '.join(f'{name}/' for name in there)}: pass one as --split)" if there else ""
        raise ShardingError(f"{images_dir} not found: pass --coco-root, the folder holding {split}/ and "
                            f"annotations/{held}")
    coco = load_coco(Path(annotations) if annotations else root / "annotations" / f"instances_{split}.json")
    indices = category_indices(coco, class_names)
    sources, seen = [], set()
    for image_id in progress(sorted(coco.imgs)):
        info = coco.imgs[image_id]
        key = sample_key(str(PurePosixPath(info["file_name"]).with_suffix("")))  # COCO's own: the file's stem
        path = images_dir / info["file_name"]
        if key in seen:
            report.problem(key, "duplicate id", f"{info['file_name']} maps to an id already used; kept the first")
            continue
        seen.add(key)
        if not path.is_file():
            report.problem(key, "missing image", f"{path} not found; not sharded")
            continue
        try:
            mask = semantic_mask(coco, image_id, indices)
        except KeyError as exc:
            report.problem(key, "unknown category", f"category id {exc.args[0]} is not in the annotation file's "
                                                    "categories; not sharded")
            continue
        present = [int(v) for v in np.flatnonzero(np.bincount(mask.ravel(), minlength=len(class_names) + 1)[1:]) + 1]
        if not present:
            crowd = bool(coco.getAnnIds(imgIds=image_id, iscrowd=True))
            report.problem(key, "no annotations", "only crowd regions; not sharded" if crowd
                           else "no instance annotation; not sharded")
            continue
        sources.append(SourceImage(key, path, [class_names[v - 1] for v in present], gt_png=encode_mask(mask),
                                   label_source="mask"))
    return sources
