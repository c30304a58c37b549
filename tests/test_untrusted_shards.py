"""Shards are untrusted: crafted keys, labels and images fail alone and write nothing outside
the output and export folders (CPU, tiny model; the whole job on Ray is in test_runner)."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import FAST_CONFIG, synthetic_image
from pipeline.config import load_config
from pipeline.mask.codec import ImageDecodeError, decode_image
from pipeline.data.safe_paths import MAX_KEY_BYTES, UnsafeKeyError, check_key, file_in, key_problem
from pipeline.data.shards import ShardingReport, folder_sources, tar_bytes, write_image_shards
from pipeline.job.worker import ShardWorker

BAD_KEYS = ["../../escaped_x", "/tmp/absolute_x", "bad\nkey", "k" * (MAX_KEY_BYTES + 1), ".hidden", "a\\b", "",
            " padded", "trailing "]


def jpeg(height=48, width=64, seed=0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_image(height, width, seed)).save(buffer, format="JPEG")
    return buffer.getvalue()


def crafted_shard(path: Path, members: list[tuple[str, dict, bytes]]) -> Path:
    """A tar written member by member, as anyone could: (key, json, jpg) in order."""
    with tarfile.open(path, "w") as tar:
        for key, meta, data in members:
            for name, payload in ((f"{key}.jpg", data), (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def crafted_members() -> list[tuple[str, dict, bytes]]:
    cat = {"names": ["cat"], "labels": [8]}
    return ([("good_1", cat, jpeg(seed=1))]
            + [(key, cat, jpeg(seed=2)) for key in BAD_KEYS[:4]]
            + [("disagree", {"names": ["aeroplane"], "labels": [-1]}, jpeg(seed=3)),
               ("too_big", cat, jpeg(300, 400, seed=4)),
               ("good_2", {"names": ["dog", "sofa"]}, jpeg(seed=5))])


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_refused_with_a_line_naming_them(key):
    assert key_problem(key) is not None
    with pytest.raises(UnsafeKeyError, match="unsafe sample key") as raised:
        check_key(key)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("key", ["2007_000032", "000000391895", "kitchen_001", "café-2", "old sofa",
                                 "k" * MAX_KEY_BYTES])
def test_plain_names_are_safe_keys(key):
    assert check_key(key) == key


def test_file_in_refuses_paths_that_leave_the_folder(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    assert file_in(folder, "2007_000032", ".png") == folder / "2007_000032.png"
    with pytest.raises(UnsafeKeyError):
        file_in(folder, "../escaped", ".png")
    (folder / "link").symlink_to(tmp_path)  # a name that resolves outside through a link
    with pytest.raises(UnsafeKeyError, match="outside"):
        file_in(folder, "link")


def test_shard_writers_refuse_unsafe_keys(tmp_path):
    with pytest.raises(UnsafeKeyError):
        tar_bytes([{"__key__": "../../escaped_x", "png": b"x"}])
    images = tmp_path / "photos"
    images.mkdir()
    (images / "ok.jpg").write_bytes(jpeg())
    (images / "bad\x01name.jpg").write_bytes(jpeg())
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"image": name, "labels": ["cat"]}) + "\n"
                              for name in ("ok.jpg", "bad\x01name.jpg")))
    report = ShardingReport()
    write_image_shards(folder_sources(images, labels, report), tmp_path / "shards", "photos", 8, ["cat"], report)
    with tarfile.open(tmp_path / "shards" / "photos-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["ok.jpg", "ok.json"]
    assert [p["problem"] for p in report.problems] == ["unsafe key"]


def test_an_image_over_the_pixel_limit_fails_before_decoding():
    data = jpeg(300, 400)
    assert decode_image(data, "image big", max_pixels=120_000).shape == (300, 400, 3)
    with pytest.raises(ImageDecodeError, match=r"image big is 400 x 300 = 120,000 pixels, over the limit of "
                                               r"119,999: .*max_image_pixels"):
        decode_image(data, "image big", max_pixels=119_999)


def test_crafted_samples_fail_alone_and_the_others_are_done(tiny_model, tmp_path):
    config = load_config(FAST_CONFIG).model_copy(update={"max_image_pixels": 100_000})
    shard = crafted_shard(tmp_path / "crafted-000000.tar", crafted_members())
    worker = ShardWorker("tiny", config.model_dump_json(), device="cpu")
    result = worker.process_shard(str(shard), "crafted-000000")
    rows = {row["id"]: row for row in result.rows}
    assert [row["status"] for row in result.rows] == ["ok"] + ["failed"] * 6 + ["ok"]
    for key in BAD_KEYS[:4]:
        assert rows[key]["error"].startswith("unsafe sample key"), rows[key]["error"]
    assert "labels [-1] and names ['aeroplane'] disagree" in rows["disagree"]["error"]
    assert "over the limit of 100,000" in rows["too_big"]["error"]
    assert [s["__key__"] for s in result.mask_samples] == ["good_1", "good_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted-000000.tar"]


def test_a_foreign_shards_background_label_is_left_out_as_when_sharding():
    from pipeline.config import ConfigError, SegmenterConfig
    from pipeline.data.shards import sample_classes

    config = SegmenterConfig()

    def classes(meta: dict) -> list[int]:
        return sample_classes({"__key__": "x", "json": json.dumps(meta).encode()}, config)

    # another tool's labels, the background first with its value 0
    assert classes({"names": ["background", "cat"], "labels": [0, 8]}) == [7]
    assert classes({"names": ["cat", "Background"]}) == [7]
    with pytest.raises(ConfigError, match="^image has no labels"):
        classes({"names": ["background"], "labels": [0]})
    with pytest.raises(ConfigError, match=r"labels \[9\] and names \['cat'\] disagree"):
        classes({"names": ["background", "cat"], "labels": [0, 9]})


def test_a_job_mask_shard_or_a_malformed_json_fails_its_sample_with_the_reason():
    from pipeline.config import ConfigError, SegmenterConfig
    from pipeline.data.shards import sample_classes

    config = SegmenterConfig()
    # a mask shard's sample: the mask as png, its confidence map and its statistics row
    row = {"id": "x", "status": "ok", "labels": [8], "names": ["cat"], "mean_confidence": 0.6}
    for sample in ({"png": b"", "conf.png": b"", "json": json.dumps(row).encode()},
                   {"png": b"", "json": json.dumps(row).encode()}):  # jobs before the confidence maps
        with pytest.raises(ConfigError, match="^sample is a pseudo mask with its statistics .* pass the image shards"):
            sample_classes({"__key__": "x", **sample}, config)
    with pytest.raises(ConfigError, match="^sample .json is list, not an object"):
        sample_classes({"__key__": "x", "json": b'["cat"]'}, config)
    with pytest.raises(ConfigError, match="^sample .json is not valid JSON"):
        sample_classes({"__key__": "x", "json": b'{"names": ["\xff"]}'}, config)
    # nested deeper than Python's parser recurses (200 KB): the sample fails, not its whole shard
    with pytest.raises(ConfigError, match="^sample .json is not valid JSON \\(nested deeper than "):
        sample_classes({"__key__": "x", "json": b"[" * 100_000 + b"]" * 100_000}, config)
