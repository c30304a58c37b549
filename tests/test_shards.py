"""Sharding VOC folders and labelled image folders into WebDataset tars."""

import json
import platform
import socket

import numpy as np
import pytest

from conftest import needs_curl, synthetic_image, two_class_mask, write_voc_folder
from pipeline.cli import main
from pipeline.config import VOC_CLASS_NAMES, load_config
from pipeline.data.atomic import file_sha256
from pipeline.mask.codec import decode_mask
from pipeline.data.shards import (ShardingError, ShardingReport, ShardReadError, read_shard, tar_bytes, voc_sources,
                                  write_image_shards)

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
    # the mask's classes win over the XML's, as in the official code; the difference is reported
    assert meta["2008_000001"]["names"] == ["cat", "sofa"] and meta["2008_000001"]["label_source"] == "mask"
    assert {"id": "2008_000001", "problem": "labels differ",
            "detail": "Annotations XML names ['dog', 'person'], the mask shows ['cat', 'sofa']: took the mask's, as "
                      "the official iSeg code"} in manifest["problems"]
    assert manifest["label_sources"] == {"mask": 4, "none": 1}
    assert (meta["2008_000000"]["width"], meta["2008_000000"]["height"]) == (60, 40)
    gt = decode_mask(samples[0]["gt.png"])
    assert set(np.unique(gt)) == {0, 8, 18}
    assert samples[0]["jpg"] == (root / "JPEGImages" / "2008_000000.jpg").read_bytes()
    assert "gt.png" not in samples[3]
    assert ("2008_000003", "no labels") in {(p["id"], p["problem"]) for p in manifest["problems"]}


def test_voc_images_without_a_mask_take_their_labels_from_annotations(tmp_path, capsys):
    images = {"2008_000010": (synthetic_image(40, 60, seed=1), None),
              "2008_000011": (synthetic_image(40, 60, seed=2), two_class_mask(40, 60, 8, 18))}
    root = write_voc_folder(tmp_path / "VOC2012", images,
                            annotations={"2008_000010": ["bird", "person", "bird"], "2008_000011": ["cat", "sofa"]})
    assert main(["shard-voc", "--voc-root", str(root), "--split", "train", "-o", str(tmp_path / "s")]) == 0
    assert "image-level labels from the ground-truth masks for 1, Annotations XML for 1" in capsys.readouterr().out
    meta = {s["__key__"]: json.loads(s["json"]) for s in read_shard(str(tmp_path / "s" / "voc-train-000000.tar"))}
    assert (meta["2008_000010"]["names"], meta["2008_000010"]["label_source"]) == (["bird", "person"], "xml")
    assert (meta["2008_000011"]["names"], meta["2008_000011"]["label_source"]) == (["cat", "sofa"], "mask")
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["problems"] == []  # XML and mask agree


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


def test_labels_file_and_split_errors(tmp_path, monkeypatch):
    root = _voc(tmp_path)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"2008_000003": ["horse"]}))
    report = ShardingReport()
    by_id = {s.id: s for s in voc_sources(root, "train", labels, report)}
    assert by_id["2008_000003"].names == ["horse"] and by_id["2008_000000"].names == []
    # keys that name the image file are its id
    labels.write_text(json.dumps({"2008_000003.jpg": ["horse"], "JPEGImages/2008_000000.JPG": ["cat"]}))
    by_id = {s.id: s for s in voc_sources(root, "train", labels, report)}
    assert by_id["2008_000003"].names == ["horse"] and by_id["2008_000000"].names == ["cat"]
    with pytest.raises(ShardingError, match="split list for 'train_aug' not found"):
        voc_sources(root, "train_aug", None, report)
    # the folder above VOC2012, or its JPEGImages/, names the one to pass
    for wrong in (tmp_path, root / "JPEGImages"):
        with pytest.raises(ShardingError, match=f"^{wrong} has no JPEGImages/: pass {root}, which has it$"):
            voc_sources(wrong, "train", None, report)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardingError, match="empty has no JPEGImages/: pass the VOC2012 folder"):
        voc_sources(tmp_path / "empty", "train", None, report)
    with pytest.raises(ShardingError, match=f"^{tmp_path}/nowhere does not exist: pass the VOC2012 folder"):
        voc_sources(tmp_path / "nowhere", "train", None, report)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardingError, match=f"^nowhere does not exist \\(looked for in {tmp_path}\\): pass the"):
        voc_sources("nowhere", "train", None, report)
    for text in ('{"2008_000003": ["horse"]', '[["horse"]]'):  # cut short; not an object
        labels.write_text(text)
        with pytest.raises(ShardingError, match=f"labels file {labels} is not a JSON object of image id -> "):
            voc_sources(root, "train", labels, report)
    labels.write_text('{"2008_000003": "horse"}')  # a name, not a list: would have read as h, o, r, s, e
    with pytest.raises(ShardingError, match=f"labels file {labels}: '2008_000003' maps to 'horse', not a list of "):
        voc_sources(root, "train", labels, report)


def test_a_folder_labels_file_that_is_not_text_or_lists_no_names_is_one_line(tmp_path):
    from pipeline.data.shards import folder_sources

    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"image,labels\na.jpg,cat\n\xff\xd8\xff\xe0")  # an image passed as the labels file
    with pytest.raises(ShardingError, match=rf"^labels file {labels} is not UTF-8 text \(byte 23\): pass a CSV "):
        folder_sources(tmp_path, labels, ShardingReport())
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"image": "a.jpg", "labels": "cat"}\n')
    with pytest.raises(ShardingError, match=rf"^{labels} line 1: 'labels' is 'cat', not a list of class names"):
        folder_sources(tmp_path, labels, ShardingReport())
    with pytest.raises(ShardingError, match=rf"^labels file {tmp_path} is a folder: pass a CSV"):
        folder_sources(tmp_path, tmp_path, ShardingReport())
    for images, what in ((tmp_path / "nope", "does not exist"), (labels, "is a file")):
        with pytest.raises(ShardingError, match=rf"^--image-dir {images} {what}: pass the folder the labels file's"):
            folder_sources(images, labels, ShardingReport())  # an absolute path in the file would still be found


def test_a_labels_table_may_be_tsv_and_separate_names_by_semicolons_commas_or_bars(tmp_path):
    from pipeline.data.shards import folder_sources

    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        (tmp_path / name).write_bytes(b"")
    expected = [("a", ["cat", "dog"]), ("b", ["sofa", "cat"]), ("sub_c", ["dog"])]
    # made on Windows: its path separator
    (tmp_path / "labels.CSV").write_text('image,labels\na.jpg,cat,dog\nb.jpg,"sofa, cat"\nsub\\c.jpg,dog\n')
    (tmp_path / "labels.tsv").write_text("image\tlabels\na.jpg\tcat|dog\nb.jpg\tsofa,cat\nsub/c.jpg\tdog\n")
    # as Excel saves CSV where ',' is the decimal mark: ';' between columns, with a byte-order mark
    (tmp_path / "excel.csv").write_bytes("\ufeffimage;labels\na.jpg;cat;dog\nb.jpg;sofa|cat\nsub/c.jpg;dog\n"
                                         .encode("utf-8"))
    for table in ("labels.CSV", "labels.tsv", "excel.csv"):
        sources = folder_sources(tmp_path, tmp_path / table, ShardingReport())
        assert [(s.id, s.names) for s in sources] == expected, table
    (tmp_path / "named.csv").write_text("file,classes\na.jpg,cat\n")
    with pytest.raises(ShardingError, match=rf"^{tmp_path / 'named.csv'} needs a header with columns image,labels "
                                            r"\(its first line is file,classes\): name the columns so$"):
        folder_sources(tmp_path, tmp_path / "named.csv", ShardingReport())
    (tmp_path / "labels.txt").write_text("image\tlabels\na.jpg\tcat\n")  # a table by another suffix: read as JSONL
    with pytest.raises(ShardingError, match=r"line 1 is not a JSON object with 'image' \(.*\): a labels file is a "
                                            r"CSV \(.csv, .tsv\) with columns image,labels, a JSONL file"):
        folder_sources(tmp_path, tmp_path / "labels.txt", ShardingReport())
    # one JSON value: a list of the JSONL objects, or {image: [names]}
    (tmp_path / "list.json").write_text(json.dumps([{"image": "a.jpg", "labels": ["cat"]}]))
    (tmp_path / "map.json").write_text(json.dumps({"a.jpg": ["cat"], "sub/c.jpg": ["dog"]}))
    assert [(s.id, s.names) for s in folder_sources(tmp_path, tmp_path / "list.json", ShardingReport())] == [
        ("a", ["cat"])]
    assert [(s.id, s.names) for s in folder_sources(tmp_path, tmp_path / "map.json", ShardingReport())] == [
        ("a", ["cat"]), ("sub_c", ["dog"])]
    (tmp_path / "map.json").write_text(json.dumps({"a.jpg": "cat"}))
    with pytest.raises(ShardingError, match=r"map.json entry 1: 'labels' is 'cat', not a list of class names"):
        folder_sources(tmp_path, tmp_path / "map.json", ShardingReport())


def test_folder_shards_with_csv_and_jsonl(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.v2 final.jpg", "c.jpg"):
        Image.fromarray(synthetic_image(20, 20, seed=1)).save(tmp_path / "imgs" / name)
    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,Cat;background;dog\nsub/b.v2 final.jpg,cot\nc.jpg,\nmissing.jpg,cat\n")
    assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "labels.csv"),
                 "--classes", "cat,dog", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 missing image" in out and "1 no labels" in out and "1 unknown class" in out
    samples = list(read_shard(str(tmp_path / "out" / "images-000000.tar")))
    # one id a line in the export's split list: no space to split it on
    assert [s["__key__"] for s in samples] == ["a", "sub_b_v2_final", "c"]
    # 'Cat' is the class cat, recorded as the class list spells it; 'background', in every mask, is left out
    meta = json.loads(samples[0]["json"])
    assert meta["labels"] == [1, 2] and meta["names"] == ["cat", "dog"]
    problems = json.loads((tmp_path / "out" / "manifest.json").read_text())["problems"]
    assert {"id": "sub_b_v2_final", "problem": "unknown class", "detail": "'cot' is not in the class list (did you mean 'cat'?)"} \
        in problems
    (tmp_path / "labels.jsonl").write_text('{"image": "a.jpg", "labels": ["dog"]}\n')
    assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "labels.jsonl"),
                 "--classes", "cat,dog", "-o", str(tmp_path / "out2"), "--prefix", "mine"]) == 0
    (sample,) = read_shard(str(tmp_path / "out2" / "mine-000000.tar"))
    assert json.loads(sample["json"])["names"] == ["dog"]
    capsys.readouterr()
    assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "labels.jsonl"),
                 "--classes", "cat,dog,cat", "-o", str(tmp_path / "out3")]) == 2
    assert capsys.readouterr().err == ("pseudolabel: error: --classes names one class more than once (cat; case, "
                                       "spaces, '_' and '-' are ignored): give each class once, in label order\n")
    assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "labels.jsonl"),
                 "--classes", "Background,cat,dog", "-o", str(tmp_path / "out3")]) == 2
    assert capsys.readouterr().err == ("pseudolabel: error: --classes lists the background: every mask has it as "
                                       "value 0 and the classes are 1, 2, ... in list order; give only the object "
                                       "classes\n")
    (tmp_path / "moved.csv").write_text("image,labels\nmoved/a.jpg,cat\n")
    assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "moved.csv"),
                 "--classes", "cat,dog", "-o", str(tmp_path / "out4")]) == 2
    assert capsys.readouterr().err == (  # the error alone: no progress bar before it
        "pseudolabel: error: no images to shard; the first of 1 problem(s): moved_a: missing image: "
        f"{tmp_path / 'imgs' / 'moved' / 'a.jpg'} does not exist\n")


def test_folder_ids_are_relative_to_the_image_folder_however_the_labels_file_writes_the_path(tmp_path, capsys):
    from PIL import Image

    from pipeline.config import VOC_CLASS_NAMES

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for name in ("imgs/a.jpg", "imgs/sub/b.jpg", "elsewhere/c.jpg"):
        Image.fromarray(synthetic_image(20, 20, seed=1)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text(f"image,labels\n{tmp_path}/imgs/a.jpg,cat\n./sub/b.jpg,dog\n"
                                         f"sub/../a.jpg,cat\n{tmp_path}/elsewhere/c.jpg,cat\n")
    # --config: the class list of a built-in config (or the run's YAML), not typed out
    assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "labels.csv"),
                 "--config", "voc", "-o", str(tmp_path / "out")]) == 0
    assert "a: duplicate id: sub/../a.jpg maps to an id already used" in capsys.readouterr().out
    samples = list(read_shard(str(tmp_path / "out" / "images-000000.tar")))
    outside = str(tmp_path / "elsewhere" / "c").lstrip("/").replace("/", "_")
    assert [s["__key__"] for s in samples] == ["a", "sub_b", outside]
    assert json.loads(samples[1]["json"])["labels"] == [VOC_CLASS_NAMES.index("dog") + 1]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == list(VOC_CLASS_NAMES)
    with pytest.raises(SystemExit):
        main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "labels.csv"),
              "--config", "voc", "--classes", "cat", "-o", str(tmp_path / "out2")])
    assert "argument --classes: not allowed with argument --config" in capsys.readouterr().err


def _tagged(image: np.ndarray, path, orientation: int, **save) -> bytes:
    """Save image with an EXIF orientation tag (format from the suffix); returns the file's bytes."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(image).save(path, exif=exif, **save)
    return path.read_bytes()


# Orientation 6: a viewer shows the stored pixels turned 90 degrees clockwise; 3: turned 180; 8: 90 anticlockwise.
@pytest.mark.parametrize("orientation, upright", [(6, lambda a: np.rot90(a, -1)), (3, lambda a: np.rot90(a, 2)),
                                                  (8, lambda a: np.rot90(a, 1))])
def test_upright_image_bytes_turns_the_pixels_as_a_viewer_shows_them(tmp_path, orientation, upright):
    from PIL import Image

    from pipeline.mask.codec import decode_image, exif_orientation, upright_image_bytes

    stored = synthetic_image(20, 30, seed=2)
    data = _tagged(stored, tmp_path / "photo.png", orientation)
    turned, found = upright_image_bytes(data)
    assert found == orientation
    assert np.array_equal(decode_image(turned), upright(stored))  # PNG: lossless
    with Image.open(tmp_path / "photo.png") as img:
        assert exif_orientation(img) == orientation
    assert np.array_equal(decode_image(data, upright=True), upright(stored))
    assert np.array_equal(decode_image(data), stored)  # the stored grid by default


def test_a_16_bit_greyscale_image_is_read_over_its_whole_range_not_clipped_white(tmp_path):
    from PIL import Image

    from pipeline.mask.codec import decode_image

    grey = synthetic_image(20, 30, seed=4)[..., 0]
    wide = grey.astype(np.uint16) * 257  # the same picture, 16 bits a pixel
    Image.fromarray(wide).save(tmp_path / "deep.png")
    data = (tmp_path / "deep.png").read_bytes()
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode in ("I;16", "I")
    assert np.array_equal(decode_image(data), np.repeat(grey[..., None], 3, axis=2))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(tmp_path / "deep-turned.png", exif=exif)
    assert np.array_equal(decode_image((tmp_path / "deep-turned.png").read_bytes(), upright=True),
                          np.repeat(np.rot90(grey, -1)[..., None], 3, axis=2))


def test_upright_image_bytes_keeps_upright_images_and_drops_the_tag_of_a_turned_jpeg(tmp_path):
    from PIL import Image

    from pipeline.mask.codec import upright_image_bytes

    stored = synthetic_image(20, 30, seed=3)
    plain = tmp_path / "plain.jpg"
    Image.fromarray(stored).save(plain)
    assert upright_image_bytes(plain.read_bytes()) == (plain.read_bytes(), 1)
    tagged_upright = _tagged(stored, tmp_path / "one.jpg", 1)
    assert upright_image_bytes(tagged_upright) == (tagged_upright, 1)
    assert upright_image_bytes(b"not an image") == (b"not an image", 1)
    turned, orientation = upright_image_bytes(_tagged(stored, tmp_path / "six.jpg", 6, quality=95))
    import io

    with Image.open(io.BytesIO(turned)) as img:
        assert (orientation, img.format, img.size) == (6, "JPEG", (20, 30))
        assert img.getexif().get(0x0112) is None  # no loader turns it again
        pixels = np.asarray(img, dtype=float)
    # re-encoded, so near the turned pixels, and far from the other way round
    assert np.abs(pixels - np.rot90(stored, -1)).mean() < 0.5 * np.abs(pixels - np.rot90(stored, 1)).mean()


def test_folder_shards_hold_photos_upright_and_voc_shards_keep_the_stored_grid(tmp_path, capsys):
    from pipeline.data.shards import SourceImage, _image_sample
    from pipeline.mask.codec import decode_image

    (tmp_path / "imgs").mkdir()
    stored = synthetic_image(20, 30, seed=5)
    original = _tagged(stored, tmp_path / "imgs" / "phone.png", 6)
    _tagged(stored, tmp_path / "imgs" / "flat.png", 1)
    (tmp_path / "labels.csv").write_text("image,labels\nphone.png,cat\nflat.png,dog\n")
    assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "labels.csv"),
                 "--classes", "cat,dog", "-o", str(tmp_path / "out")]) == 0
    assert "turned 1 image(s) upright by their EXIF orientation" in capsys.readouterr().out
    samples = {s["__key__"]: s for s in read_shard(str(tmp_path / "out" / "images-000000.tar"))}
    phone = json.loads(samples["phone"]["json"])
    assert (phone["width"], phone["height"], phone["exif_orientation"]) == (20, 30, 6)
    assert np.array_equal(decode_image(samples["phone"]["jpg"]), np.rot90(stored, -1))
    assert np.array_equal(decode_image(samples["flat"]["jpg"]), stored)
    assert "exif_orientation" not in json.loads(samples["flat"]["json"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["turned_upright"] == [{"id": "phone", "exif_orientation": 6}]
    # VOC and COCO annotations refer to the stored pixels: those sources keep the bytes as they are
    sample = _image_sample(SourceImage("phone", tmp_path / "imgs" / "phone.png", ["cat"]), ["cat"], ShardingReport())
    assert sample["jpg"] == original and json.loads(sample["json"])["width"] == 30


def test_irn_cls_labels_npy_with_integer_ids_labels_the_split(tmp_path, capsys):
    # IRN's cls_labels.npy (the official iSeg code ships one) keys the ids as integers: 2008000000.
    root = _voc(tmp_path)
    multi_hot = np.zeros((2, 20), dtype=np.float32)
    multi_hot[0, [11, 14]] = 1  # dog, person
    multi_hot[1, 6] = 1  # car
    np.save(tmp_path / "cls_labels.npy", {np.int32(2008000000): multi_hot[0], np.int32(2008000001): multi_hot[1]})
    assert main(["shard-voc", "--voc-root", str(root), "--split", "train", "--labels-file",
                 str(tmp_path / "cls_labels.npy"), "-o", str(tmp_path / "s")]) == 0
    meta = {s["__key__"]: json.loads(s["json"]) for s in read_shard(str(tmp_path / "s" / "voc-train-000000.tar"))}
    assert meta["2008_000000"]["names"] == ["dog", "person"] and meta["2008_000000"]["labels"] == [12, 15]
    assert (meta["2008_000001"]["names"], meta["2008_000001"]["label_source"]) == (["car"], "labels-file")
    np.save(tmp_path / "other.npy", {np.int32(2011999999): multi_hot[0]})
    assert main(["shard-voc", "--voc-root", str(root), "--split", "train", "--labels-file",
                 str(tmp_path / "other.npy"), "-o", str(tmp_path / "s2")]) == 2
    assert "labels none of the split's images (its ids look like '2011_999999', the split's like '2008_000000')" in (
        capsys.readouterr().err)
    np.save(tmp_path / "matrix.npy", multi_hot)
    assert main(["shard-voc", "--voc-root", str(root), "--split", "train", "--labels-file",
                 str(tmp_path / "matrix.npy"), "-o", str(tmp_path / "s3")]) == 2
    assert "is not a dict of image id -> 20 multi-hot labels" in capsys.readouterr().err


def test_a_deeplab_style_split_list_names_the_same_images(tmp_path, monkeypatch):
    root = _voc(tmp_path)
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    deeplab = tmp_path / "train_aug.txt"
    deeplab.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    sources = voc_sources(root, str(deeplab), None, ShardingReport())
    assert [s.id for s in sources] == ids
    monkeypatch.setenv("HOME", str(tmp_path))  # --split '~/train_aug.txt', quoted: the shell left the ~
    assert [s.id for s in voc_sources(root, "~/train_aug.txt", None, ShardingReport())] == ids


def test_a_failed_pipe_command_is_the_reason_even_when_its_empty_stream_is_seen_first(tmp_path):
    # Under load WebDataset may see the empty stream of a failed `cat` (tarfile: "empty file")
    # before the command's exit status; the command behind the opened stream is then asked.
    import subprocess
    import tarfile
    from types import SimpleNamespace

    from pipeline.data.shards import _read_failure

    url = f"pipe:cat {tmp_path}/missing.tar"
    process = subprocess.Popen(["sh", "-c", "exit 1"])
    error = tarfile.ReadError("empty file")
    assert _read_failure(url, error, SimpleNamespace(proc=process)) == (
        f"the command 'cat {tmp_path}/missing.tar' exited with status 1")
    assert _read_failure(url, error) == "ReadError: empty file"  # no stream opened: the read's own reason
    # the real thing, end to end, and a command that ends well but streams a cut tar: the tar's reason
    with pytest.raises(ShardReadError) as raised:
        list(read_shard(url))
    assert str(raised.value) == (
        f"cannot read shard {url}: the command 'cat {tmp_path}/missing.tar' exited with status 1; check that it "
        f"is complete (manifest.json has its sha256) and readable from {platform.node()}, the host that read it")
    (tmp_path / "cut.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ShardReadError, match=r"cut.tar: ReadError: "):
        list(read_shard(f"pipe:cat {tmp_path}/cut.tar"))


def test_a_sample_count_other_than_the_manifests_is_named():
    from pipeline.data.shards import sample_count_problem

    counts = {"/s/voc-000000.tar": 256}
    assert sample_count_problem("/s/voc-000000.tar", 256, counts) is None
    assert sample_count_problem("/s/other.tar", 3, counts) is None  # no manifest lists it: nothing to hold it to
    assert sample_count_problem("/s/voc-000000.tar", 250, counts).startswith(
        "the shard ends early, after 250 of the 256 samples its manifest.json lists; copy it again")
    assert sample_count_problem("/s/voc-000000.tar", 300, counts).startswith(
        "the shard holds 300 samples, not the 256 its manifest.json lists; ")


def test_a_shards_fingerprint_and_its_manifests_checksum(tmp_path):
    from pipeline.data.shards import checksum_problem, input_changed, input_fingerprint, manifest_listing

    shard = tmp_path / "voc-000000.tar"
    shard.write_bytes(b"a" * 1000)
    fingerprint = input_fingerprint(str(shard))
    assert fingerprint["size"] == 1000 and fingerprint["sha256"] == file_sha256(shard)
    assert input_fingerprint("pipe:cat x.tar") is None and input_fingerprint("https://host/x.tar") is None
    assert not input_changed(fingerprint, str(shard)) and not input_changed(None, str(shard))
    shard.write_bytes(b"a" * 999)
    assert input_changed(fingerprint, str(shard))
    assert not input_changed(fingerprint, str(shard), fingerprint["sha256"])  # its manifest says it is the same
    shard.write_bytes(b"b" * 1000)  # the size recorded, other bytes, a new time
    assert input_changed(fingerprint, str(shard)) and not input_changed(fingerprint, str(shard), read=False)
    manifests = {tmp_path: {"shards": [{"url": shard.name, "samples": 1, "sha256": fingerprint["sha256"]},
                                       {"url": "no-checksum.tar", "samples": 2}]}}
    assert manifest_listing(manifests, "samples", int) == {str(shard): 1, str(tmp_path / "no-checksum.tar"): 2}
    checksums = manifest_listing(manifests, "sha256", str)
    assert checksums == {str(shard): fingerprint["sha256"]}
    assert checksum_problem(str(shard), fingerprint, checksums) is None
    assert checksum_problem(str(tmp_path / "no-checksum.tar"), fingerprint, checksums) is None
    assert checksum_problem(str(shard), None, checksums) is None
    problem = checksum_problem(str(shard), input_fingerprint(str(shard)), checksums)
    assert problem.startswith(f"the shard's sha256 ({file_sha256(shard)[:12]}...) is not the "
                              f"{fingerprint['sha256'][:12]}... its manifest.json lists: it was damaged")


def test_a_damaged_or_foreign_manifest_is_named_or_left_alone(tmp_path, capsys):
    from pipeline.data.shards import InputError, expand_input, manifests_beside

    (tmp_path / "voc-000000.tar").write_bytes(b"")
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"shards": [{"url": "voc-000000.tar", "sam')  # cut short in a copy
    for call in (lambda: expand_input(str(tmp_path)), lambda: manifests_beside([str(tmp_path / "voc-000000.tar")])):
        with pytest.raises(InputError, match=rf"^cannot read {tmp_path}/manifest.json: Unterminated string .*; copy "
                                             "it again with its shards, or shard the dataset again$"):
            call()
    assert main(["run", "--model", "tiny", "--input", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"pseudolabel: error: cannot read {tmp_path}/manifest.json: ")
    manifest.write_text("[" * 100_000 + "]" * 100_000)  # nested deeper than Python's parser recurses
    with pytest.raises(InputError, match=rf"^cannot read {tmp_path}/manifest.json: maximum recursion depth"):
        manifests_beside([str(tmp_path / "voc-000000.tar")])
    manifest.write_text('{"shards": [{"url": 3}]}')
    with pytest.raises(InputError, match=r"manifest.json does not list shards as sharding writes it \("):
        expand_input(str(tmp_path))
    manifest.write_text('[{"url": "voc-000000.tar"}]')  # another tool's file of that name
    assert manifests_beside([str(tmp_path / "voc-000000.tar")]) == {}
    with pytest.raises(InputError, match="manifest.json does not list shards as sharding writes it"):
        expand_input(str(tmp_path))


def test_sharding_again_into_a_folder_removes_the_shards_of_before_that_it_does_not_write(tmp_path, capsys):
    import glob

    root = _voc(tmp_path)
    out = tmp_path / "s"
    assert main(["shard-voc", "--voc-root", str(root), "--split", "train", "-o", str(out), "--shard-size", "2"]) == 0
    (out / "notes.tar").write_bytes(b"not the tool's")  # not in the manifest: left alone
    capsys.readouterr()
    assert main(["shard-voc", "--voc-root", str(root), "--split", "train", "-o", str(out), "--shard-size", "4"]) == 0
    assert ("removed 1 shard(s) of the sharding there before, which this one does not write again: "
            "voc-train-000002.tar\n") in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.tar", "voc-train-000000.tar",
                                                     "voc-train-000001.tar"]
    ids = [s["__key__"] for path in sorted(glob.glob(str(out / "voc-train-*.tar"))) for s in read_shard(path)]
    assert len(ids) == len(set(ids)) == 5  # each image once


def test_a_manifest_whose_classes_differ_only_in_spelling_is_accepted(tmp_path):
    from pipeline.data.shards import InputError, check_shard_classes

    check_shard_classes({tmp_path: {"classes": ["Cat", "Dining Table"]}}, ["cat", "diningtable"])
    with pytest.raises(InputError, match=r"written for 2 classes \(diningtable, cat\)"):  # the order still counts
        check_shard_classes({tmp_path: {"classes": ["diningtable", "cat"]}}, ["cat", "diningtable"])


def test_without_config_shards_of_a_built_in_configs_classes_run_with_it(tmp_path, capsys):
    """COCO shards run without --config take the coco config (said in a line); a --config given
    is kept, and VOC shards, shards without a manifest or of mixed classes take the default."""
    from pipeline.cli.options import input_config
    from pipeline.config import load_config

    coco_names = [name.upper() for name in load_config("coco").class_names]  # matched as names are
    folders = {}
    for name, classes in (("coco", coco_names), ("voc", load_config("voc").class_names), ("bare", None)):
        folder = folders[name] = tmp_path / name
        folder.mkdir()
        (folder / f"{name}-000000.tar").write_bytes(b"")
        if classes is not None:
            (folder / "manifest.json").write_text(json.dumps(
                {"classes": classes, "shards": [{"url": f"{name}-000000.tar", "samples": 0}]}))
    assert len(input_config(None, str(folders["coco"])).class_names) == 80
    assert capsys.readouterr().out == ("config: coco, the built-in config of the classes the shards' manifest.json "
                                       "lists (--config to choose another)\n")
    assert len(input_config("voc", str(folders["coco"])).class_names) == 20  # refused later, naming coco
    for inputs in (folders["voc"], folders["bare"], f"{folders['coco']}::{folders['voc']}"):
        assert input_config(None, str(inputs)).class_names == load_config("voc").class_names
    assert capsys.readouterr().out == ""


def test_without_config_or_classes_shards_run_with_the_classes_or_config_they_were_made_with(tmp_path, capsys):
    """shard-folder --classes shards run with no --classes were refused, naming the --classes to
    pass, though the manifest's names are the only ones their labels can mean. A config file
    the shards were made with is the run's; shards whose class list has no recorded source
    (another tool's, an older manifest) are still refused, as a config of their classes may
    hold prompts and settings of its own."""
    from PIL import Image

    from pipeline.cli.options import input_config
    from pipeline.data.shards import InputError, check_shard_classes, expand_input, manifests_beside

    (tmp_path / "imgs").mkdir()
    Image.fromarray(synthetic_image(20, 20, seed=1)).save(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,person\n")
    names = ["red plane", "person", "monitor", "dog", "a", "b"]
    (tmp_path / "mine.yaml").write_text("classes: [{name: red plane, prompt: aeroplane}, person, monitor, dog, a, b]\n"
                                        "ent: 0.02\n")

    def shard(folder, *classes):
        assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file",
                     str(tmp_path / "labels.csv"), *classes, "-o", str(tmp_path / folder)]) == 0
        capsys.readouterr()
        return str(tmp_path / folder)

    given = shard("given", "--classes", ",".join(names))
    config = input_config(None, given, method="diffseg")
    assert config.class_names == names and config.method == "diffseg"
    assert [c.prompt for c in config.classes][:2] == ["red plane", "person"]  # each name its own prompt
    assert capsys.readouterr().out == (
        "classes: the 6 the shards' manifest.json lists (red plane, person, monitor, dog, a, ...), given to "
        "shard-folder as --classes, each its own prompt, with the voc config's settings (--classes or --config to "
        "choose others)\n")
    assert input_config("voc", given).class_names == load_config("voc").class_names  # refused later, naming the fix
    assert input_config(None, given, "cat,dog").class_names == ["cat", "dog"] and capsys.readouterr().out == ""

    made = shard("made", "--config", str(tmp_path / "mine.yaml"))
    config = input_config(None, made)
    assert config.classes[0].prompt == "aeroplane" and config.ent == 0.02  # the file's prompts and settings
    assert capsys.readouterr().out == (f"config: {tmp_path / 'mine.yaml'}, the config the shards were made with "
                                       "(their manifest.json; --config to choose another)\n")
    (tmp_path / "mine.yaml").unlink()  # gone since: the default, refused with the file to pass
    assert input_config(None, made).class_names == load_config("voc").class_names
    with pytest.raises(InputError, match=rf"pass --config {tmp_path / 'mine.yaml'}, the config they were made with$"):
        check_shard_classes(manifests_beside(expand_input(made)), load_config("voc").class_names)

    manifest = json.loads((tmp_path / "given" / "manifest.json").read_text())
    del manifest["classes_from"]  # a manifest that does not say where its classes came from
    (tmp_path / "given" / "manifest.json").write_text(json.dumps(manifest))
    assert input_config(None, given).class_names == load_config("voc").class_names
    assert capsys.readouterr().out == ""


def test_a_labels_file_finds_images_whose_accents_are_composed_otherwise_than_it_writes_them(tmp_path):
    """macOS stores `café.jpg` decomposed (e + combining accent), and copies keep it so; a labels
    file typed elsewhere has it composed (é), or the other way round."""
    import unicodedata

    from pipeline.data.shards import folder_sources

    stored = {"café.jpg": "NFD", "crème.jpg": "NFC"}
    for name, form in stored.items():
        (tmp_path / unicodedata.normalize(form, name)).write_bytes(b"")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"image,labels\n{unicodedata.normalize('NFC', 'café.jpg')},cat\n"
                      f"{unicodedata.normalize('NFD', 'crème.jpg')},dog\nmissing.jpg,dog\n")
    report = ShardingReport()
    sources = folder_sources(tmp_path, labels, report)
    assert [s.image.name for s in sources] == [unicodedata.normalize(form, name) for name, form in stored.items()]
    assert [s.names for s in sources] == [["cat"], ["dog"]]
    assert [p["id"] for p in report.problems] == ["missing"]


def test_label_files_and_split_lists_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    # Excel's "CSV UTF-8" and Windows Notepad start the file with U+FEFF (and end lines with CRLF)
    from PIL import Image

    from pipeline.data.shards import folder_sources

    (tmp_path / "imgs").mkdir()
    Image.fromarray(synthetic_image(20, 20, seed=1)).save(tmp_path / "imgs" / "a.jpg")
    csv_file = tmp_path / "labels.csv"
    csv_file.write_bytes("image,labels\r\na.jpg,cat;dog\r\n".encode("utf-8-sig"))
    jsonl_file = tmp_path / "labels.jsonl"
    jsonl_file.write_bytes('{"image": "a.jpg", "labels": ["cat"]}\r\n'.encode("utf-8-sig"))
    for labels, names in ((csv_file, ["cat", "dog"]), (jsonl_file, ["cat"])):
        (source,) = folder_sources(tmp_path / "imgs", labels, ShardingReport())
        assert (source.id, source.names) == ("a", names)
    images = {"2007_000001": (synthetic_image(20, 20, seed=1), two_class_mask(20, 20, 8, 0))}
    root = write_voc_folder(tmp_path / "VOC2012", images)
    split = tmp_path / "ids.txt"
    split.write_bytes("2007_000001\r\n".encode("utf-8-sig"))
    labels_json = tmp_path / "labels.json"
    labels_json.write_bytes('{"2007_000001": ["dog"]}'.encode("utf-8-sig"))
    (source,) = voc_sources(root, str(split), labels_json, ShardingReport())
    assert (source.id, source.names) == ("2007_000001", ["dog"])


def test_a_shard_prefix_that_is_not_a_plain_name_is_refused(tmp_path, capsys):
    # '--prefix ../../x' wrote the shards outside the output folder
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.fromarray(synthetic_image(20, 20, seed=1)).save(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,cat\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["shard-folder", "--image-dir", str(tmp_path / "imgs"), "--labels-file", str(tmp_path / "labels.csv"),
                 "--classes", "cat", "-o", str(tmp_path / "out" / "deep"), "--prefix", "../../x"]) == 2
    assert capsys.readouterr().err.startswith("pseudolabel: error: shard name prefix '../../x': it holds a path "
                                              "separator; the shards are named <prefix>-000000.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@needs_curl
def test_urls_with_a_query_and_commands_with_glob_characters_are_taken_as_they_are(tmp_path, http_folder):
    """WebDataset globs no URL or command, but the input was globbed as a local path where it
    held `*`, `?` or `[`: a presigned URL (`...tar?X-Amz-Signature=...`) matched no shard."""
    from pipeline.data.shards import expand_input, shard_name

    assert main(["shard-voc", "--voc-root", str(_voc(tmp_path)), "--split", "train", "-o", str(tmp_path / "s"),
                 "--shard-size", "2"]) == 0
    signed = f"{http_folder(tmp_path)}/s/voc-train-000000.tar?X-Amz-Expires=3600&X-Amz-Signature=0a1b"
    assert expand_input(signed) == [signed] and shard_name(signed) == "voc-train-000000"
    assert [s["__key__"] for s in read_shard(signed)] == ["2008_000000", "2008_000001"]
    command = f"pipe:cat {tmp_path}/s/voc-train-00000?.tar"
    assert expand_input(command) == [command]
    assert [s["__key__"] for s in read_shard(f"pipe:cat {tmp_path}/s/*000002.tar")] == ["2008_000004"]
    assert expand_input(str(tmp_path / "s" / "voc-train-00000?.tar")) == [  # a local glob still is one
        str(tmp_path / "s" / f"voc-train-00000{i}.tar") for i in range(3)]


@needs_curl
def test_shards_on_a_server_named_by_its_ipv6_address_are_one_input_beside_others(tmp_path, http_folder):
    """`http://[::1]:PORT/shards/` was split at its `::` as several inputs are (WebDataset's
    separator), into `http://[` and the rest, and `run` stopped with a traceback."""
    from pipeline.cli import build_parser
    from pipeline.data.shards import expand_input, split_inputs

    assert main(["shard-voc", "--voc-root", str(_voc(tmp_path)), "--split", "train", "-o", str(tmp_path / "s"),
                 "--shard-size", "2"]) == 0
    base = http_folder(tmp_path, host="::1")
    assert base.startswith("http://[::1]:")
    local = str(tmp_path / "s" / "voc-train-000002.tar")
    args = build_parser().parse_args(["run", "--input", f"{base}/s/", local, "-o", str(tmp_path / "out")])
    assert split_inputs(args.input) == [f"{base}/s/", local]
    assert expand_input(args.input) == [f"{base}/s/voc-train-00000{i}.tar" for i in range(3)] + [local]
    assert [s["__key__"] for s in read_shard(f"{base}/s/voc-train-000001.tar")] == ["2008_000002", "2008_000003"]
    assert expand_input(f"{base}/s/voc-train-{{000000..000001}}.tar") == [f"{base}/s/voc-train-00000{i}.tar"
                                                                          for i in range(2)]
    assert split_inputs("a/::http://[fe80::1:2]:80/x-{0..3}.tar::pipe:cat b.tar") == [
        "a/", "http://[fe80::1:2]:80/x-{0..3}.tar", "pipe:cat b.tar"]


@needs_curl
def test_shards_served_over_http_are_listed_checked_and_hashed_by_the_manifest_beside_them(tmp_path, http_folder,
                                                                                           monkeypatch):
    """Shards on a web server (an object store's HTTP endpoint) get a local folder's guards:
    the manifest.json beside them lists them, picks the config and holds their checksums."""
    import hashlib
    import urllib.error
    import urllib.request

    from pipeline.cli.options import input_config
    from pipeline.data.shards import (InputError, expand_input, input_changed, input_fingerprint, manifest_listing,
                                      manifests_beside)

    assert main(["shard-voc", "--voc-root", str(_voc(tmp_path)), "--split", "train", "-o", str(tmp_path / "s"),
                 "--shard-size", "2"]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "bare").mkdir()  # another tool's shards: no manifest
    base = http_folder(tmp_path)
    urls = [f"{base}/s/voc-train-00000{i}.tar" for i in range(3)]
    assert expand_input(f"{base}/s/") == expand_input(f"{base}/s/manifest.json") == urls
    assert manifests_beside(urls) == {f"{base}/s": manifest}
    assert manifest_listing(manifests_beside(urls), "samples", int) == dict(zip(urls, [2, 2, 1]))
    listed = manifest_listing(manifests_beside(urls), "sha256", str)

    digest = hashlib.sha256()
    assert [s["__key__"] for s in read_shard(urls[0], digest)] == ["2008_000000", "2008_000001"]
    assert digest.hexdigest() == listed[urls[0]] == file_sha256(tmp_path / "s" / "voc-train-000000.tar")
    recorded = input_fingerprint(urls[0], digest.hexdigest())
    assert recorded == {"sha256": listed[urls[0]]} and input_fingerprint(urls[0]) is None
    assert not input_changed(recorded, urls[0], listed[urls[0]]) and not input_changed(recorded, urls[0])
    assert input_changed(recorded, urls[0], "0" * 64)  # sharded again: its manifest lists another checksum

    coco = load_config("coco").class_names  # a served manifest of COCO's classes picks the coco config
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "classes": coco}))
    assert input_config(None, f"{base}/s/").class_names == coco

    assert manifests_beside([f"{base}/bare/a-000000.tar"]) == {}  # the server has none there
    with pytest.raises(InputError, match=rf"^{base}/bare/manifest.json is not there \(the server has none\): pass "
                                         rf"the shards' URLs as a brace pattern such as '{base}/bare/NAME-"):
        expand_input(f"{base}/bare/")
    with pytest.raises(ShardReadError, match=rf"^cannot read shard {base}/s/voc-train-000009.tar: curl exited with "
                                             r"status 22: the server answered with an HTTP error \(404 not found"):
        list(read_shard(f"{base}/s/voc-train-000009.tar"))
    (tmp_path / "s" / "manifest.json").write_text('{"shards": [')
    with pytest.raises(InputError, match=rf"^cannot read {base}/s/manifest.json: Expecting value"):
        manifests_beside(urls)
    def unavailable(url, timeout):
        raise urllib.error.HTTPError(url, 503, "Service Unavailable", {}, None)

    with monkeypatch.context() as patched:  # a server that fails is no "no manifest"
        patched.setattr(urllib.request, "urlopen", unavailable)
        with pytest.raises(InputError, match=rf"^cannot read {base}/s/manifest.json: the server answered 503 "
                                             "Service Unavailable; check the server, or try again$"):
            manifests_beside(urls)
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(InputError, match=rf"^cannot read http://127.0.0.1:{port}/s/manifest.json: .*refused; check "
                                         "that the server is up and reachable from this machine$"):
        expand_input(f"http://127.0.0.1:{port}/s/")


def test_shards_read_in_threads_while_another_imports_webdataset_all_read(tmp_path):
    """A worker's prefetch threads read shards while its main thread writes one: each first use
    imports webdataset, and a submodule imported while another thread initialises the package
    came back partly initialised (ImportError, KeyError: 'webdataset'), failing whole shards."""
    import subprocess
    import sys

    shard = tmp_path / "a-000000.tar"
    shard.write_bytes(tar_bytes([{"__key__": "x", "json": b"{}"}]))
    script = """
import sys, threading
from pipeline.data.shards import read_shard, tar_bytes
barrier, errors = threading.Barrier(8), []
def use(i):
    barrier.wait()
    try:
        tar_bytes([{"__key__": "a", "txt": b"x"}]) if i % 2 else list(read_shard(sys.argv[1]))
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=use, args=(i,)) for i in range(8)]
[thread.start() for thread in threads]
[thread.join() for thread in threads]
print(errors)
"""
    done = subprocess.run([sys.executable, "-c", script, str(shard)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"
