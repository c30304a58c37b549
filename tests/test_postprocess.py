"""Scores -> mask at the original size, ignore region, dense CRF."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_crf, synthetic_image, write_voc_shards
from pipeline.config import CrfConfig, SegmenterConfig
from pipeline.mask.codec import decode_mask, encode_mask, voc_palette
from pipeline.mask.postprocess import class_scores_to_mask, finish_mask
from pipeline.segment.maps import minmax
from pipeline.segment.methods import iseg


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
    assert result.scores is None  # only the CRF reads them
    assert class_scores_to_mask(_left_right_maps(), [7, 17], (30, 50), SegmenterConfig(),
                                keep_scores=True).scores.shape == (3, 30, 50)
    assert ((result.confidence >= 0) & (result.confidence <= 1)).all()


def _whole_image_reference(maps, out_hw, config, background_map=None):
    """The mask rule written plainly on all classes at once ([1 + C, H, W] at the image's size):
    (labels index into background then classes, confidence, scores)."""
    if background_map is not None:
        offset = config.goca.background_offset if config.method == "goca" else 0.0
        full = F.interpolate(torch.cat([background_map[None] + offset, maps])[None], size=out_hw, mode="bilinear")[0]
        winner = full.argmax(dim=0)
        shares = full.clamp_min(0) / full.clamp_min(0).sum(dim=0, keepdim=True).clamp_min(1e-30)
        return winner, shares.gather(0, winner[None])[0], shares
    if config.method == "diffsegmenter":
        scaled = minmax(F.interpolate(maps[None], size=out_hw, mode="bilinear"), (2, 3))[0]
        full = torch.cat([torch.full_like(scaled[:1], config.diffsegmenter.background_score), scaled])
    else:
        grid = minmax(F.interpolate(maps[None], size=(config.image_size,) * 2, mode="bilinear"), (2, 3))
        scores = F.interpolate(grid, size=out_hw, mode="bilinear")
        present = torch.ones(1, maps.shape[0], dtype=torch.bool)
        if config.background.rule == "squared":
            full = iseg.squared_background_scores(scores, present)[0]
        else:
            full = iseg.threshold_background_scores(scores, present, config.background.threshold)[0]
    confidence, winner = full.max(dim=0)
    return winner, confidence, full


@pytest.mark.parametrize("method", ["iseg-squared", "iseg-threshold", "diffsegmenter", "goca", "diffseg"])
@pytest.mark.parametrize("classes", [1, 3, 9])
def test_the_mask_taken_one_class_at_a_time_equals_the_rule_on_all_classes_at_once(method, classes):
    """Bit for bit, ties included (maps of few distinct values tie often after resizing), at
    image sizes from about 100 px a side: below that torch's bilinear kernel may take another
    path for a batch of 8 or more maps than for one (1 ulp apart), as it does for the official
    code's batch of 20."""
    torch.manual_seed(classes)
    name, _, rule = method.partition("-")
    config = SegmenterConfig(method=name, background={"rule": rule or "squared"})
    maps = torch.randint(0, 3, (classes, 8, 8)).float() * torch.rand(classes, 1, 1)
    background_map = torch.rand(8, 8) if name in ("goca", "diffseg") else None
    labels = list(range(3, 3 + classes))
    for out_hw in [(120, 160), (375, 500), (333, 97)]:
        winner, confidence, scores = _whole_image_reference(maps, out_hw, config, background_map)
        result = class_scores_to_mask(maps, labels, out_hw, config, background_map, keep_scores=True)
        lookup = torch.tensor([0] + [c + 1 for c in labels])
        assert np.array_equal(result.labels, lookup[winner].numpy().astype(np.uint8))
        assert np.array_equal(result.confidence, confidence.numpy())
        assert np.array_equal(result.scores, scores.numpy())
        assert result.confidence.dtype == np.float32
        without_scores = class_scores_to_mask(maps, labels, out_hw, config, background_map)
        assert np.array_equal(without_scores.labels, result.labels) and without_scores.scores is None
        assert np.array_equal(without_scores.confidence, result.confidence)


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


@needs_crf
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


def test_overlay_blends_the_class_colours_only_where_a_class_is():
    from pipeline.mask.codec import overlay

    image = synthetic_image(6, 4, seed=3)
    labels = np.array([[0, 8, 8, 255]] * 6, dtype=np.uint8)
    truth = np.array([[0, 0, 8, 8]] * 6, dtype=np.uint8)
    picture = np.asarray(overlay(image, labels, truth))
    assert picture.shape == (6, 12, 3)
    blended, mask, gt = picture[:, :4], picture[:, 4:8], picture[:, 8:]
    # background and ignore pixels are the image's; a class pixel is half image, half its colour
    assert (blended[:, [0, 3]] == image[:, [0, 3]]).all()
    cat = voc_palette()[8].astype(int)
    assert (np.abs(blended[:, 1:3].astype(int) - (image[:, 1:3].astype(int) + cat) / 2) <= 1).all()
    assert (mask == voc_palette()[labels]).all() and (gt == voc_palette()[truth]).all()


@needs_crf
def test_an_image_over_the_crf_pixel_limit_is_refined_scaled_down_and_its_labels_scaled_back():
    from PIL import Image

    from pipeline.mask.crf import _refine, crf_refine

    image = np.asarray(Image.fromarray(synthetic_image(48, 64, seed=2)))  # read-only, as numpy's view of a PIL image
    side = 8
    left = torch.zeros(side, side)
    left[:, :3] = 1.0
    scores_config = SegmenterConfig()
    result = class_scores_to_mask(torch.stack([left, 1.0 - left]), [7, 17], (48, 64), scores_config, keep_scores=True)
    for preset in ("label", "scores"):
        whole = CrfConfig(enabled=True, preset=preset, max_pixels=None)
        limited = whole.model_copy(update={"max_pixels": 48 * 64 // 4})
        full_size = crf_refine(image, result.labels, result.scores, result.classes, whole)
        scaled = crf_refine(image, result.labels, result.scores, result.classes, limited)
        assert scaled.shape == (48, 64) and scaled.dtype == np.uint8 and set(np.unique(scaled)) <= {0, 8, 18}
        # what the CRF gives on the half-size image, its kernels half as wide in pixels, each
        # label repeated over the 2 x 2 pixels it stands for
        small = _refine(np.asarray(Image.fromarray(image).resize((32, 24), Image.Resampling.BILINEAR)),
                        result.labels[::2, ::2].copy(), F.avg_pool2d(torch.from_numpy(result.scores)[None], 2)[0].numpy(),
                        result.classes, whole, pixel_scale=0.5)
        assert np.array_equal(scaled, small.repeat(2, axis=0).repeat(2, axis=1))
        assert (scaled == full_size).mean() > 0.9  # the same picture, at another resolution
        at_limit = whole.model_copy(update={"max_pixels": 48 * 64})
        assert np.array_equal(crf_refine(image, result.labels, result.scores, result.classes, at_limit), full_size)


def test_the_crf_without_its_module_is_one_line_naming_the_install(monkeypatch, tmp_path, capsys):
    import sys

    from pipeline.cli import main
    from pipeline.mask.crf import CRF_INSTALL, CrfUnavailableError, crf_refine

    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # as on Python 3.13, where pydensecrf2 does not build
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    image = synthetic_image(8, 8, seed=0)
    with pytest.raises(CrfUnavailableError, match="needs the pydensecrf module"):
        crf_refine(image, np.zeros((8, 8), np.uint8), np.zeros((2, 8, 8), np.float32), [0], CrfConfig(enabled=True))
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.fromarray(image).save(photo)
    assert main(["segment", str(photo), "--labels", "cat", "--model", "tiny", "-o", str(tmp_path / "m.png"),
                 "--crf"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and CRF_INSTALL in error and not (tmp_path / "m.png").exists()
    write_voc_shards(tmp_path, "2010_00000", [(8, 0)])
    assert main(["run", "--input", str(tmp_path / "shards"), "-o", str(tmp_path / "out"), "--model", "tiny",
                 "--crf"]) == 2
    assert CRF_INSTALL in capsys.readouterr().err and not (tmp_path / "out" / "job.json").exists()
