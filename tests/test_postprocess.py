"""Scores -> mask at the original size, ignore region, dense CRF."""

import numpy as np
import pytest
import torch

from conftest import synthetic_image
from pipeline.config import CrfConfig, SegmenterConfig
from pipeline.mask.codec import decode_mask, encode_mask, voc_palette
from pipeline.mask.postprocess import class_scores_to_mask, finish_mask


def _left_right_maps(side=8):
    """Two classes: class A strong on the left half, class B on the right half."""
    left = torch.zeros(side, side)
    left[:, : side // 2] = 1.0
    return torch.stack([left + 0.01, 1.0 - left + 0.01])


def test_mask_has_the_original_size_and_the_right_labels():
    result = class_scores_to_mask(_left_right_maps(), [7, 17], (30, 50), SegmenterConfig())
    assert result.labels.shape == (30, 50) and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) == {8, 18}
    assert (result.labels[:, :20] == 8).all() and (result.labels[:, 30:] == 18).all()
    assert result.scores.shape == (3, 30, 50)
    assert ((result.confidence >= 0) & (result.confidence <= 1)).all()


def test_weak_everywhere_class_leaves_background():
    maps = torch.zeros(1, 8, 8)
    maps[0, :2, :2] = 1.0  # one small hot corner
    result = class_scores_to_mask(maps, [0], (16, 16), SegmenterConfig())
    assert result.labels[0, 0] == 1 and result.labels[15, 15] == 0


def test_ignore_region_marks_low_confidence_pixels():
    config = SegmenterConfig(ignore_below=0.9)
    image = synthetic_image(30, 50, seed=0)
    result = finish_mask(_left_right_maps(), [7, 17], image, config)
    low = result.confidence < 0.9
    assert low.any() and (result.labels[low] == 255).all() and (result.labels[~low] != 255).all()


@pytest.mark.parametrize("preset", ["label", "scores"])
def test_crf_snaps_labels_to_image_regions(preset):
    # Image: red left half, blue right half. Scores put the class boundary at 3/8 of the
    # width instead of 1/2: the CRF moves it onto the colour edge.
    image = synthetic_image(48, 64, seed=2)
    side = 8
    left = torch.zeros(side, side)
    left[:, :3] = 1.0
    maps = torch.stack([left, 1.0 - left])
    plain = SegmenterConfig()
    with_crf = SegmenterConfig(crf=CrfConfig(enabled=True, preset=preset))
    before = finish_mask(maps, [7, 17], image, plain)
    after = finish_mask(maps, [7, 17], image, with_crf)
    assert before.crf_changed is None and 0 < after.crf_changed < 0.5
    truth = np.where(np.arange(64) < 32, 8, 18)[None].repeat(48, axis=0)
    assert (after.labels == truth).mean() > (before.labels == truth).mean()
    assert set(np.unique(after.labels)) <= {0, 8, 18}


def test_palette_png_keeps_index_values():
    labels = np.array([[0, 1, 20], [255, 15, 0]], dtype=np.uint8)
    data = encode_mask(labels)
    assert (decode_mask(data) == labels).all()
    from io import BytesIO

    from PIL import Image

    img = Image.open(BytesIO(data))
    assert img.mode == "P"
    assert img.getpalette()[3:6] == [128, 0, 0]  # aeroplane in the VOC colormap
    assert voc_palette()[15].tolist() == [192, 128, 128]  # person
