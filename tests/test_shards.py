"""Sharding VOC folders and labelled image folders into WebDataset tars."""

import json

import numpy as np
import pytest

from conftest import synthetic_image, two_class_mask, write_voc_folder
from pipeline.cli import main
from pipeline.config import VOC_CLASS_NAMES
from pipeline.data.atomic import file_sha256
from pipeline.mask.codec import decode_mask
from pipeline.data.shards import ShardingError, ShardingReport, read_shard, voc_sources, write_image_shards

VOC = list(VOC_CLASS_NAMES)


def _voc(tmp_path):
    images = {f"2008_00000{i}": (synthetic_image(40, 60, seed=i), two_class_mask(40, 60, 8, 18)) for i in range(5)}
    images["2008_000003"] = (images["2008_000003"][0], None)  # no mask, no xml: no labels
    return write_voc_folder(tmp_path / "VOC2012", images, annotations={"2008_000001": ["dog", "person"]})


def test_voc_shards_carry_image_labels_and_ground_truth(tmp_path):
    root = _voc(tmp_path)
    assert main(["shard-voc", "--voc-root", str(root), "--split", "train", "-o", str(tmp_path / "s"),
                 "--shard-size", "2"]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [s["url"] for s in manifest["shards"]] == [f"voc-train-00000{i}.tar" for i in range(3)]
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    for shard in manifest["shards"]:
        assert file_sha256(tmp_path / "s" / shard["url"]) == shard["sha256"]
    samples = [s for shard in manifest["shards"] for s in read_shard(str(tmp_path / "s" / shard["url"]))]
    assert [s["__key__"] for s in samples] == [f"2008_00000{i}" for i in range(5)]
    meta = {s["__key__"]: json.loads(s["json"]) for s in samples}
    assert meta["2008_000000"]["names"] == ["cat", "sofa"] and meta["2008_000000"]["labels"] == [8, 18]
    assert meta["2008_000001"]["names"] == ["dog", "person"]  # Annotations/ wins over the mask
    assert (meta["2008_000000"]["width"], meta["2008_000000"]["height"]) == (60, 40)
    gt = decode_mask(samples[0]["gt.png"])
    assert set(np.unique(gt)) == {0, 8, 18}
    assert samples[0]["jpg"] == (root / "JPEGImages" / "2008_000000.jpg").read_bytes()
    assert "gt.png" not in samples[3]
    assert {"id": "2008_000003", "problem": "no labels"}.items() <= manifest["problems"][0].items()


def test_sharding_is_deterministic_and_reports_duplicates_and_missing(tmp_path):
    root = _voc(tmp_path)
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids + ["2008_000001", "2009_999999"]))
    digests = []
    for out in ("a", "b"):
        report = ShardingReport()
        sources = voc_sources(root, "train", None, report)
        write_image_shards(sources, tmp_path / out, "voc-train", 10, VOC, report)
        digests.append(file_sha256(tmp_path / out / "voc-train-000000.tar"))
        kinds = {(p["id"], p["problem"]) for p in report.problems}
        assert ("2008_000001", "duplicate id") in kinds and ("2009_999999", "missing image") in kinds
    assert digests[0] == digests[1]


def test_labels_file_and_split_errors(tmp_path):
    root = _voc(tmp_path)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"2008_000003": ["horse"]}))
    report = ShardingReport()
    by_id = {s.id: s for s in voc_sources(root, "train", labels, report)}
    assert by_id["2008_000003"].names == ["horse"] and by_id["2008_000000"].names == []
    with pytest.raises(ShardingError, match="split list for 'train_aug' not found"):
        voc_sources(root, "train_aug", None, report)
    with pytest.raises(ShardingError, match="has no JPEGImages"):
        voc_sources(tmp_path, "train", None, report)


def test_folder_shards_with_csv_and_jsonl(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.v2.jpg", "c.jpg"):
        Image.fromarray(synthetic_image(20, 20, seed=1)).save(tmp_path / "imgs" / name)
    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,cat;dog\nsub/b.v2.jpg,zebra\nc.jpg,\nmissing.jpg,cat\n")
    assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "labels.csv"),
                 "--classes", "cat,dog", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 missing image" in out and "1 no labels" in out and "1 unknown class" in out
    samples = list(read_shard(str(tmp_path / "out" / "images-000000.tar")))
    assert [s["__key__"] for s in samples] == ["a", "sub_b_v2", "c"]
    assert json.loads(samples[0]["json"])["labels"] == [1, 2]
    (tmp_path / "labels.jsonl").write_text('{"image": "a.jpg", "labels": ["dog"]}\n')
    assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "labels.jsonl"),
                 "--classes", "cat,dog", "-o", str(tmp_path / "out2"), "--prefix", "mine"]) == 0
    (sample,) = read_shard(str(tmp_path / "out2" / "mine-000000.tar"))
    assert json.loads(sample["json"])["names"] == ["dog"]
