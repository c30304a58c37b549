"""Evaluation against hand computation."""

import json

import numpy as np
import pytest

from conftest import make_job_output
from pipeline.cli import main
from pipeline.results.evaluate import confusion_matrix, evaluate_job, scores_from_confusion
from pipeline.data.outputs import JobOutput
from pipeline.mask.codec import decode_mask


def test_identical_masks_score_100(tmp_path, capsys):
    out, _ = make_job_output(tmp_path, lambda gt, i: gt)
    scores, conf = evaluate_job(JobOutput(out))
    assert scores.images == 4 and scores.miou == 100 and scores.pixel_accuracy == 100 and scores.coverage == 100
    assert conf.shape == (21, 22)
    assert main(["eval", str(out)]) == 0
    assert "mIoU            100.0" in capsys.readouterr().out
    assert (out / "eval.json").is_file()


def test_known_shift_gives_the_hand_computed_iou():
    # gt: 1 x 10, class 1 on pixels 0..4, background on 5..9. Prediction shifted right by 2:
    # class 1 on 2..6. Class 1: TP 3, gt 5, pred 5 -> IoU 3/7. Background: TP 3 (7..9),
    # gt 5, pred 5 -> 3/7. Pixel accuracy 6/10.
    gt = np.array([[1] * 5 + [0] * 5], dtype=np.uint8)
    pred = np.array([[0, 0] + [1] * 5 + [0] * 3], dtype=np.uint8)
    scores = scores_from_confusion(confusion_matrix(pred, gt))
    assert scores.iou[1] == pytest.approx(100 * 3 / 7) and scores.iou[0] == pytest.approx(100 * 3 / 7)
    assert all(v is None for v in scores.iou[2:])
    assert scores.miou == pytest.approx(100 * 3 / 7) and scores.pixel_accuracy == pytest.approx(60)


def test_predicted_ignore_is_a_miss_and_lowers_coverage():
    gt = np.array([[1, 1, 1, 1, 0, 0, 255, 255]], dtype=np.uint8)
    pred = np.array([[1, 1, 255, 255, 0, 0, 1, 255]], dtype=np.uint8)
    conf = confusion_matrix(pred, gt)
    assert conf[1, 21] == 2 and conf.sum() == 6  # gt 255 pixels are not scored
    scores = scores_from_confusion(conf)
    assert scores.iou[1] == pytest.approx(50.0)  # TP 2, gt 4 (2 of them predicted 255), pred 2
    assert scores.coverage == pytest.approx(100 * 4 / 6)
    assert scores.pixel_accuracy == pytest.approx(100 * 4 / 6)


def test_shifted_job_scores_below_100_and_gt_folder_option(tmp_path):
    out, gts = make_job_output(tmp_path, lambda gt, i: np.roll(gt, 3, axis=1))
    from_shards, _ = evaluate_job(JobOutput(out))
    folder = tmp_path / "gt"
    folder.mkdir()
    from pipeline.mask.codec import encode_mask

    for image_id, gt in gts.items():
        (folder / f"{image_id}.png").write_bytes(encode_mask(gt))
    from_folder, _ = evaluate_job(JobOutput(out), gt_dir=folder)
    assert 0 < from_shards.miou < 100 and from_shards.miou == from_folder.miou


def test_scores_of_a_random_weight_model_say_so(tmp_path, capsys):
    note = ("model tiny has random weights: these figures show the wiring and the cost, not the method's quality, "
            "which needs the real weights")
    real, _ = make_job_output(tmp_path / "real", lambda gt, i: gt)
    assert main(["eval", str(real), "--no-progress", "--processes", "1"]) == 0
    assert "random weights" not in capsys.readouterr().out
    toy, _ = make_job_output(tmp_path / "toy", lambda gt, i: gt, model="tiny")
    assert main(["eval", str(toy), "--no-progress", "--processes", "1"]) == 0
    assert f"({note})\n" in capsys.readouterr().out
    assert main(["report", str(toy), "-o", str(tmp_path / "report"), "--no-progress", "--processes", "1"]) == 0
    assert "Model tiny has random weights" in (tmp_path / "report" / "index.html").read_text()


def test_shards_scored_in_several_processes_add_up_to_the_same_scores(tmp_path, capsys):
    out, gts = make_job_output(tmp_path, lambda gt, i: np.roll(gt, i, axis=1), per_shard=1)  # 4 shards
    (tmp_path / "gt").mkdir()
    from pipeline.mask.codec import encode_mask

    for image_id, gt in list(gts.items())[1:]:  # the first image has no ground truth in the folder
        (tmp_path / "gt" / f"{image_id}.png").write_bytes(encode_mask(gt))
    written = {}
    for processes in ("1", "3"):
        for gt in ([], ["--gt", str(tmp_path / "gt")]):
            path = tmp_path / f"eval-{processes}-{len(gt)}.json"
            assert main(["eval", str(out), "--processes", processes, "-o", str(path), "--no-progress", *gt]) == 0
            written[processes, len(gt)] = json.loads(path.read_text())
    assert written["1", 0]["images"] == 4 and written["1", 2]["skipped"] == ["2011_000000"]
    assert 0 < written["1", 0]["miou"] < 100
    assert written["3", 0] == written["1", 0] and written["3", 2] == written["1", 2]
    assert written["1", 0]["confusion"] == in_one_confusion(out)
    assert main(["eval", str(out), "--processes", "0"]) == 2
    assert capsys.readouterr().err == "pseudolabel: error: --processes must be at least 1, got 0\n"


def in_one_confusion(out):
    """The confusion matrix summed over every mask of the job, image by image."""
    job = JobOutput(out)
    total = 0
    for record, sample in job.joined():
        total = total + confusion_matrix(record.labels, decode_mask(sample["gt.png"]))
    return total.tolist()


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="prediction is"):
        confusion_matrix(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))


@pytest.mark.parametrize("n_classes", [21, 81])
def test_confusion_matrix_counts_every_scored_pixel_pair(n_classes):
    rng = np.random.default_rng(n_classes)
    gt = rng.integers(0, n_classes, (37, 53)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, n_classes, gt.shape).astype(np.uint8)
    pred[rng.random(gt.shape) < 0.1] = 255
    expected = np.zeros((n_classes, n_classes + 1), np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if g < n_classes:
            expected[g, n_classes if p == 255 else p] += 1
    assert (confusion_matrix(pred, gt, n_classes) == expected).all()


def test_a_prediction_outside_the_classes_is_an_error():
    with pytest.raises(ValueError, match="labels above 20"):
        confusion_matrix(np.full((2, 2), 21, np.uint8), np.zeros((2, 2), np.uint8))


def test_ground_truth_that_is_not_its_images_index_mask_is_one_line_naming_it(tmp_path, capsys):
    from PIL import Image

    from pipeline.data.shards import read_shard, tar_bytes
    from pipeline.mask.codec import encode_mask

    out, gts = make_job_output(tmp_path, lambda gt, i: gt, per_shard=1)
    folder = tmp_path / "gt"
    folder.mkdir()
    for image_id, gt in gts.items():
        (folder / f"{image_id}.png").write_bytes(encode_mask(gt))
    first = sorted(gts)[0]
    height, width = gts[first].shape
    fix = ("pass --gt the folder of these images' <id>.png index masks (mode P or L, values 0..C and 255: VOC's "
           "SegmentationClassAug or SegmentationClass)")
    cases = {"colour": (lambda p: Image.fromarray(gts[first]).convert("RGB").save(p, format="PNG"),
                        f"cannot read the ground truth {folder}/{first}.png as an index mask (mask PNG has mode RGB; "
                        f"index masks are mode P or L): {fix}"),
             "not a PNG": (lambda p: p.write_bytes(b"<html>"), f"cannot read the ground truth {folder}/{first}.png as "
                                                              "an index mask (not a picture, its first bytes are b'<html>'): "),
             "resized": (lambda p: p.write_bytes(encode_mask(gts[first][: height // 2, : width // 2])),
                         f"the ground truth {folder}/{first}.png is {width // 2} x {height // 2} pixels, its image "
                         f"{width} x {height}: {fix}")}
    for name, (write, message) in cases.items():
        write(folder / f"{first}.png")
        for processes in ("1", "2"):
            assert main(["eval", str(out), "--gt", str(folder), "--processes", processes, "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"pseudolabel: error: {message}") and err.count("\n") == 1, (name, err)

    shard = tmp_path / "shards" / "voc-train-000000.tar"  # from the input shard: named by image and shard
    samples = list(read_shard(str(shard)))
    samples[0]["gt.png"] = encode_mask(gts[first][:4, :4])
    shard.write_bytes(tar_bytes(samples))
    assert main(["eval", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"pseudolabel: error: the ground truth {first}.gt.png in {shard} is 4 x 4 pixels, its image {width} x "
        f"{height}: shard the dataset again from its ground truth, or pass --gt the folder of its <id>.png index "
        "masks\n")


def test_eval_with_nothing_to_score_says_why_in_one_line(tmp_path, capsys, monkeypatch):
    from pipeline.data.outputs import JobOutput

    out, _ = make_job_output(tmp_path, lambda gt, i: gt)
    (tmp_path / "other-gt").mkdir()
    (tmp_path / "other-gt" / "2008_000001.png").write_bytes(b"")  # another dataset's ids
    assert main(["eval", str(out), "--gt", str(tmp_path / "other-gt"), "--processes", "1"]) == 2
    assert capsys.readouterr().err == (
        f"pseudolabel: error: no image has ground truth: its shards carry no gt.png and --gt {tmp_path / 'other-gt'} "
        "holds no <id>.png of its ids (such as 2011_000000.png): pass the folder of this dataset's masks\n")
    monkeypatch.setattr(JobOutput, "masks", lambda self, shards=None: iter(()))  # every image failed in the job
    assert main(["eval", str(out), "--processes", "1"]) == 2
    assert capsys.readouterr().err == (f"pseudolabel: error: job {out} has no mask to score: every image failed (see "
                                       f"`pseudolabel status {out}` and the stats' error column)\n")
