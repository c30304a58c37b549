"""shard-coco: labels and semantic ground truth from a small COCO-format file the test writes."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.mask.codec import decode_mask
from pipeline.data.shards import read_shard

NAMES = load_config("coco").class_names
H, W = 40, 60
# category ids have gaps (1..90): person 1, dog 18, toothbrush 90
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}]
SQUARE = [[10, 5, 30, 5, 30, 25, 10, 25]]  # x, y pairs: columns 10..30, rows 5..25
WIDE = [[20, 10, 50, 10, 50, 20, 20, 20]]


def _rle(box):  # a crowd region as uncompressed RLE, as COCO stores crowds
    region = np.zeros((H, W), dtype=np.uint8, order="F")
    top, left, bottom, right = box
    region[top:bottom, left:right] = 1
    return {"size": [H, W], "counts": _uncompressed(region)}


def _uncompressed(region):
    flat, counts, value, run = region.flatten(order="F"), [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    return counts + [run]


@pytest.fixture()
def coco_root(tmp_path):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": H, "width": W} for i in (3, 7, 9, 11, 12)]
    for image in images[:-1]:  # the last one's file is missing
        Image.fromarray(np.full((H, W, 3), 120, np.uint8)).save(root / "train2017" / image["file_name"])
    annotations = [
        {"id": 1, "image_id": 3, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0},
        {"id": 2, "image_id": 3, "category_id": 18, "segmentation": WIDE, "iscrowd": 0},  # later: wins the overlap
        {"id": 3, "image_id": 3, "category_id": 90, "segmentation": _rle((30, 0, 40, 10)), "iscrowd": 1},
        {"id": 4, "image_id": 7, "category_id": 90, "segmentation": _rle((0, 0, 10, 10)), "iscrowd": 1},  # crowd only
        # image 9: no annotation at all
        {"id": 5, "image_id": 11, "category_id": 33, "segmentation": SQUARE, "iscrowd": 0},  # unknown category
        {"id": 6, "image_id": 12, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0},
    ]
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root


def test_shards_labels_and_ground_truth_from_the_annotations(coco_root, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shard-coco", "--coco-root", str(coco_root), "--split", "train2017", "-o", str(out)]) == 0
    samples = [s for tar in sorted(out.glob("*.tar")) for s in read_shard(str(tar))]
    assert [s["__key__"] for s in samples] == ["000000000003"]
    meta = json.loads(samples[0]["json"])
    assert meta["names"] == ["person", "dog"] and meta["labels"] == [1, NAMES.index("dog") + 1]
    gt = decode_mask(samples[0]["gt.png"])
    # pycocotools' own masks, painted in file order; the crowd region is not painted
    person = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(SQUARE, H, W)))
    dog = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(WIDE, H, W)))
    expected = np.zeros((H, W), np.uint8)
    expected[person == 1] = 1
    expected[dog == 1] = NAMES.index("dog") + 1
    assert np.array_equal(gt, expected) and (gt[30:, :10] == 0).all()
    problems = {p["id"]: p["problem"] for p in json.loads((out / "manifest.json").read_text())["problems"]}
    assert problems == {"000000000007": "no annotations", "000000000009": "no annotations",
                        "000000000011": "unknown category", "000000000012": "missing image"}
    assert "1 shard(s), 1 images" in capsys.readouterr().out


def _edit_instances(root, edit) -> None:
    path = root / "annotations" / "instances_train2017.json"
    dataset = json.loads(path.read_text())
    edit(dataset)
    path.write_text(json.dumps(dataset))


@pytest.mark.parametrize("change, message", [
    (lambda root: (root / "annotations" / "instances_train2017.json").write_text("{not json"),
     "is not a COCO instances JSON"),
    (lambda root: (root / "annotations" / "instances_train2017.json").unlink(), "not found: pass --annotations"),
    (lambda root: (root / "annotations" / "instances_train2017.json").write_text("[]"),
     "is not a COCO instances JSON (annotation file format <class 'list'> not supported)"),
    (lambda root: _edit_instances(root, lambda d: d.pop("categories")),
     "is not a COCO instances JSON (it has no list 'categories'): pass annotations/instances_<split>.json"),
    (lambda root: _edit_instances(root, lambda d: d["annotations"][1].pop("segmentation")),  # boxes only
     "is not a COCO instances JSON (annotations entry 1 has no 'segmentation')"),
])
def test_bad_annotation_files_are_one_line_errors(coco_root, tmp_path, capsys, change, message):
    change(coco_root)
    code = main(["shard-coco", "--coco-root", str(coco_root), "--split", "train2017", "-o", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_split_is_a_folder_under_the_root_and_a_plain_name(coco_root, tmp_path, capsys):
    assert main(["shard-coco", "--coco-root", str(coco_root), "--split", "train2019", "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"pseudolabel: error: {coco_root / 'train2019'} not found: pass --coco-root, "
                                       f"the folder holding train2019/ and annotations/ ({coco_root} holds "
                                       "train2017/: pass one as --split)\n")
    assert main(["shard-coco", "--coco-root", str(coco_root), "--split", "../x", "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("pseudolabel: error: --split '../x': it holds a path separator; name the "
                                       "folder of images under --coco-root (train2014, val2014, train2017, val2017, "
                                       "or your dataset's)\n")


def test_a_coco_format_dataset_of_other_categories_shards_under_its_config(tmp_path, capsys):
    # as labelling tools export COCO: categories of their own, numbered from 0, files in subfolders
    root = tmp_path / "parts"
    (root / "inspection" / "line1").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = [{"id": 1, "file_name": "line1/0001.jpg", "height": H, "width": W},
              {"id": 2, "file_name": "line1/0001.png", "height": H, "width": W}]  # the same id as the first
    for image in images:
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "inspection" / image["file_name"])
    # without `iscrowd`, as some exporters write them: instances (Detectron2's default)
    annotations = [{"id": 1, "image_id": 1, "category_id": 0, "segmentation": SQUARE},
                   {"id": 2, "image_id": 1, "category_id": 1, "segmentation": WIDE}]
    (root / "annotations" / "instances_inspection.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": [{"id": 0, "name": "Scratch"}, {"id": 1, "name": "dent"}]}))
    command = ["shard-coco", "--coco-root", str(root), "--split", "inspection", "-o", str(tmp_path / "shards")]
    assert main(command) == 2
    assert capsys.readouterr().err == (
        "pseudolabel: error: COCO category 0 'Scratch' is not a class of the config (COCO's 80 unless --config names "
        "another): pass --config, a YAML whose classes are the annotation file's categories (Scratch, dent)\n")
    (tmp_path / "parts.yaml").write_text("classes: [dent, scratch]\n")
    assert main(command + ["--config", str(tmp_path / "parts.yaml")]) == 0
    (sample,) = read_shard(str(tmp_path / "shards" / "coco-inspection-000000.tar"))
    meta = json.loads(sample["json"])
    assert (sample["__key__"], meta["names"], meta["labels"]) == ("line1_0001", ["dent", "scratch"], [1, 2])
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["classes"] == ["dent", "scratch"]
    assert manifest["problems"] == [{"id": "line1_0001", "problem": "duplicate id",
                                     "detail": "line1/0001.png maps to an id already used; kept the first"}]


def test_each_instance_mask_is_decoded_once(coco_root, tmp_path, monkeypatch):
    from pycocotools.coco import COCO

    decoded = []
    to_mask = COCO.annToMask
    monkeypatch.setattr(COCO, "annToMask", lambda coco, annotation: decoded.append(annotation["id"]) or
                        to_mask(coco, annotation))
    assert main(["shard-coco", "--coco-root", str(coco_root), "--split", "train2017", "-o",
                 str(tmp_path / "shards")]) == 0
    # the labels and the shard's ground truth come from one rendering; a missing image or an
    # unknown category (image 11) renders nothing
    assert sorted(decoded) == [1, 2]
