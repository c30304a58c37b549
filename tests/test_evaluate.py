"""Evaluation against hand computation."""

import numpy as np
import pytest

from conftest import make_job_output
from pipeline.cli import main
from pipeline.results.evaluate import confusion_matrix, evaluate_job, scores_from_confusion
from pipeline.data.outputs import JobOutput


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


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="prediction is"):
        confusion_matrix(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
