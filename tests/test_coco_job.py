"""An 80-class (COCO) job end to end: eval, report and export take the classes from the job."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_image, two_class_mask
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.mask.codec import encode_mask
from pipeline.job.runner import run_job
from pipeline.data.shards import ShardingReport, SourceImage, write_image_shards

LABELS = [("person", "toothbrush"), ("giraffe", "toothbrush"), ("person", "hair_drier")]


@pytest.fixture(scope="module")
def coco_job(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco")
    config = load_config("coco")  # the built-in name, from any folder
    names = config.class_names
    sources = []
    for i, (left, right) in enumerate(LABELS):
        Image.fromarray(synthetic_image(48, 64, seed=i)).save(tmp / f"{i}.jpg")
        gt = two_class_mask(48, 64, names.index(left) + 1, names.index(right) + 1)
        (tmp / f"{i}.png").write_bytes(encode_mask(gt))
        sources.append(SourceImage(f"coco-{i}", tmp / f"{i}.jpg", [left, right], tmp / f"{i}.png"))
    write_image_shards(sources, tmp / "shards", "coco-train", 2, names, ShardingReport())
    # the COCO settings at 256 px (maps 8/16/32), fast on the tiny model
    fast = config.model_copy(update={
        "image_size": 256, "batch_size": 2,
        "cross_attention": config.cross_attention.model_copy(update={"resolution_weights": {8: 0.7, 16: 0.3}}),
        "diffsegmenter": config.diffsegmenter.model_copy(update={"resolution_weights": {4: 0.3, 8: 0.5, 16: 0.1,
                                                                                         32: 0.1}})})
    summary = run_job(str(tmp / "shards"), tmp / "out", fast, "tiny", workers=1, progress=False)
    assert summary.shards_failed == 0
    return tmp


def test_eval_scores_81_classes_with_the_coco_names(coco_job, capsys):
    assert main(["eval", str(coco_job / "out")]) == 0
    table = capsys.readouterr().out
    assert "toothbrush" in table and "giraffe" in table
    result = json.loads((coco_job / "out" / "eval.json").read_text())
    assert len(result["classes"]) == 81 and result["classes"][80] == "toothbrush"
    assert np.asarray(result["confusion"]).shape == (81, 82)
    assert result["images"] == 3


def test_report_lists_80_classes(coco_job):
    assert main(["report", str(coco_job / "out"), "-o", str(coco_job / "report")]) == 0
    page = (coco_job / "report" / "index.html").read_text()
    assert "<td>toothbrush</td>" in page and "mIoU" in page


def test_export_keeps_coco_indices(coco_job, capsys):
    dest = coco_job / "export"
    assert main(["export", str(coco_job / "out"), "-o", str(dest)]) == 0
    assert "exported 3 masks" in capsys.readouterr().out
    values = set()
    for path in (dest / "SegmentationClassPseudo").iterdir():
        values |= set(np.unique(np.asarray(Image.open(path))).tolist())
    assert values <= {0, 1, 24, 79, 80, 255} and values & {1, 24, 79, 80}
