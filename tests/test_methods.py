"""Peer methods: pure functions on hand-made attention maps, and each method end to end."""

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import image_tensor, synthetic_image
from pipeline.segment.methods import iseg
from pipeline.segment.capture import resize_query_key
from pipeline.config import SegmenterConfig
from pipeline.segment.methods import diffseg, diffsegmenter, goca
from pipeline.mask.postprocess import finish_mask
from pipeline.segment.segmenter import Segmenter


def _two_block_attention(side):
    """Self-attention of a side x side image whose left and right halves attend only within
    themselves (uniformly): [N, N], rows sum to 1."""
    cols = torch.arange(side * side) % side
    left = cols < side // 2
    same = (left[:, None] == left[None, :]).float()
    return same / same.sum(dim=1, keepdim=True), left


# --- DiffSeg ---------------------------------------------------------------------------------

def test_two_blocks_of_self_attention_merge_into_two_segments():
    attn, left = _two_block_attention(8)
    proposals = diffseg.merge_proposals(attn, side=8, anchors=4, tau=1.0, iterations=3)
    assert proposals.shape == (2, 64)
    segments = diffseg.segment_labels(proposals)
    assert (segments[left] == segments[left][0]).all() and (segments[~left] == segments[~left][0]).all()
    assert segments[left][0] != segments[~left][0]


def test_anchor_grid_is_the_references():
    # 16 anchors on 64 pixels: 1, 5, ..., 61 on each axis (not 2, 6, ..., 62)
    indices = diffseg.anchor_indices(64, 16)
    rows, cols = indices // 64, indices % 64
    assert sorted(set(rows.tolist())) == list(range(1, 62, 4)) == sorted(set(cols.tolist()))
    assert len(indices) == 256


def test_first_iteration_averages_every_pixel_map_near_an_anchor():
    # Pixel maps: a peaked one at each anchor, and non-anchor pixels whose maps sit close to
    # their anchor's. The first iteration averages those in: an anchors-only merge would leave
    # each anchor's own map unchanged.
    side, n = 4, 16
    attn = torch.full((n, n), 0.1 / n)
    for pixel in range(n):
        attn[pixel, pixel] += 0.9
    anchors = diffseg.anchor_indices(side, 2)
    near = anchors[0].item() + 1
    attn[near] = 0.5 * attn[anchors[0]] + 0.5 * attn[near]
    attn = attn / attn.sum(dim=1, keepdim=True)
    tau = 1.5
    distance = iseg.symmetric_kl(attn[anchors], attn, 1e-30)
    proposals = diffseg.first_merge(attn, anchors, tau)
    for k in range(len(anchors)):
        members = distance[k] < tau
        torch.testing.assert_close(proposals[k], attn[members].mean(dim=0))
    assert (distance[0] < tau).sum() == 2  # the anchor and its neighbour
    assert not torch.allclose(proposals[0], attn[anchors[0]])


def test_later_iterations_merge_greedily_and_the_count_falls():
    # Three proposals in a chain a ~ b ~ c with a and c far apart: `a` takes a and b; b is
    # then merged and skipped; c, not yet merged, takes b and c (b counted again).
    a = torch.tensor([0.70, 0.20, 0.10])
    b = torch.tensor([0.45, 0.45, 0.10])
    c = torch.tensor([0.20, 0.70, 0.10])
    proposals = torch.stack([a, b, c])
    tau = 0.2
    distance = iseg.symmetric_kl(proposals, proposals, 1e-30)
    assert distance[0, 1] < tau and distance[1, 2] < tau and distance[0, 2] > tau
    merged = diffseg.greedy_merge(proposals, tau)
    torch.testing.assert_close(merged, torch.stack([(a + b) / 2, (b + c) / 2]))


def test_aggregation_upsamples_keys_repeats_queries_and_weights_by_side():
    # A 2x2 map whose every query attends only to key 0, and a uniform 4x4 map.
    low = torch.zeros(1, 4, 4)
    low[0, :, 0] = 1.0
    high = torch.full((1, 16, 16), 1 / 16)
    out = diffseg.aggregate_self_attention({2: low, 4: high}, out_side=4)
    assert out.shape == (1, 16, 16)
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(1, 16))
    # weights 2/6 and 4/6; every query row equal (queries repeated, the 4x4 map uniform)
    torch.testing.assert_close(out[0, 0], out[0, 15])
    assert out[0, 0, 0] > out[0, 0, 15]  # key 0's mass, upsampled, stays in the top-left


def test_aggregation_gives_every_query_pixel_its_coarse_pixels_row():
    # Query (i, j) of the 8x8 grid reads, at side s, the row of pixel (i // f, j // f), f = 8 / s:
    # written out pixel by pixel, against the broadcast the function does.
    torch.manual_seed(0)
    maps = {side: torch.softmax(torch.randn(2, side * side, side * side, dtype=torch.float64), dim=-1)
            for side in (2, 4, 8)}
    out = diffseg.aggregate_self_attention(maps, out_side=8)
    expected = torch.zeros(2, 64, 64, dtype=torch.float64)
    for side, m in maps.items():
        keys = F.interpolate(m.reshape(-1, 1, side, side), size=(8, 8), mode="bilinear", align_corners=False)
        keys = keys.reshape(2, side * side, 64)
        keys = keys / keys.sum(dim=-1, keepdim=True)
        factor = 8 // side
        for i in range(8):
            for j in range(8):
                expected[:, i * 8 + j] += side / 14 * keys[:, (i // factor) * side + j // factor]
    torch.testing.assert_close(out, expected)


def test_naming_votes_with_l2_normalised_maps():
    # Candidate 0 is large everywhere (a broad word), candidate 1 small but concentrated on the
    # segment. Raw (or min-max) means pick 0; the reference normalises each map over space (L2)
    # first, so the concentrated candidate wins.
    segments = torch.tensor([0, 0, 1, 1])
    candidates = torch.tensor([[0.50, 0.02], [0.50, 0.02], [0.60, 0.0], [0.60, 0.0]])
    assert (candidates[:2].mean(0).argmax(), candidates[2:].mean(0).argmax()) == (0, 0)
    names = diffseg.name_segments(segments, 2, candidates)
    assert names.tolist() == [1, 0]
    proposals = torch.tensor([[0.5, 0.4, 0.0, 0.1], [0.0, 0.1, 0.6, 0.3]])
    named = diffseg.named_maps(proposals, names, 3)
    assert torch.equal(named[1], proposals[0]) and torch.equal(named[0], proposals[1])
    assert (named[2] == 0).all()


def test_naming_attention_normalises_over_all_tokens_then_sums_sides():
    # Two tokens of interest and a third token that takes most of the attention at one side.
    low = torch.tensor([[[1.0, 1.0, 2.0]]]).expand(1, 4, 3)  # 2x2, every pixel the same
    high = torch.tensor([[[3.0, 1.0, 0.0]]]).expand(1, 16, 3)  # 4x4
    out = diffseg.naming_attention({2: low, 4: high}, [[0], [1]], out_side=4)
    torch.testing.assert_close(out[0, 0], torch.tensor([1 / 4 + 3 / 4, 1 / 4 + 1 / 4]))


# --- GoCA -------------------------------------------------------------------------------------

def test_head_weights_are_not_clamped():
    # Two heads agree (same direction), a third points the other way: it gets a negative weight.
    outputs = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])[None, :, None, :]  # [B=1, H=3, N=1, D=2]
    weights = goca.head_weights(outputs)
    # sum = (2, 0); dots = 2, 4, -2; normalised by their sum 4 -> 1/2, 1, -1/2
    torch.testing.assert_close(weights[0, :, 0], torch.tensor([0.5, 1.0, -0.5]))


def test_layer_weights_are_raw_dot_products_clamped_and_normalised():
    reference = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])  # [B=1, M=2, M=2]
    layer_a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # dot 0.5 + 1.0 = 1.5
    layer_b = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # dot 0.5
    layer_c = -layer_a  # negative: clamped to 0
    weights = goca.layer_weights(torch.stack([layer_a, layer_b, layer_c]), reference)
    # cosine similarity would give a/b = 0.949 / 0.316 = 3; the raw dot product 1.5 / 0.5 = 3
    # too, so scale layer_b: the dot product doubles, the cosine does not
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.75, 0.25, 0.0]))
    weights = goca.layer_weights(torch.stack([layer_a, 2 * layer_b, layer_c]), reference)
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.6, 0.4, 0.0]))


def test_self_attention_is_resized_bilinearly_on_keys_and_nearest_on_queries():
    side, out = 4, 2
    attn = torch.rand(1, side * side, side * side)
    small = resize_query_key(attn, out)
    assert small.shape == (1, 4, 4)
    # query (0, 0) of the small map is query (0, 0) of the large one (nearest, no average);
    # its keys are 2x2 means (bilinear halving); rows are not renormalised
    keys = attn[0, 0].reshape(side, side)
    torch.testing.assert_close(small[0, 0], keys.reshape(2, 2, 2, 2).mean(dim=(1, 3)).flatten())
    torch.testing.assert_close(small[0, 1], attn[0, 2].reshape(2, 2, 2, 2).mean(dim=(1, 3)).flatten())


def test_pseudo_global_attention_rows_are_stochastic():
    queries = torch.randn(2, 64, 8)
    attn = goca.pseudo_global_attention(queries)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 64))


def test_reference_queries_keep_the_first_channel_as_the_official_code():
    queries = torch.randn(1, 16, 8)
    first = goca.pseudo_global_attention(goca.reference_queries(queries, "first"))
    q0 = queries[0, :, 0]
    torch.testing.assert_close(first[0], (q0[:, None] * q0[None, :]).softmax(dim=-1))  # scale 1 / sqrt(1)
    torch.testing.assert_close(goca.pseudo_global_attention(goca.reference_queries(queries, "all")),
                               goca.pseudo_global_attention(queries))
    assert SegmenterConfig().goca.reference_query_channels == "first"


def test_rescaling_clamps_normalises_averages_groups_then_divides_by_content():
    tokens = torch.tensor([[0.5, 0.3, 0.1, 0.1, -0.2]])  # token 0: start token; 4: negative
    out = goca.rescaled_objects(tokens, [[1, 2], [3]], [1, 2, 3])
    # clamp and normalise over all tokens: 0.5, 0.3, 0.1, 0.1, 0 (sum 1); groups 0.2, 0.1;
    # content sum 0.5
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.2]]))


def test_blur_and_minmax_spreads_a_point_and_scales_to_unit_range():
    maps = torch.zeros(25, 1)
    maps[12, 0] = 1.0  # centre of a 5x5 map
    out = goca.blur_and_minmax(maps, 5, kernel=5, sigma=1.1)
    assert out.max() == 1.0 and out.min() == 0.0 and out[12, 0] == 1.0
    assert 0 < out[13, 0] < 1 and out[13, 0] == out[11, 0]
    assert math.isclose(goca.gaussian_kernel(5, 1.1).sum().item(), 1.0, rel_tol=1e-6)
    assert SegmenterConfig().goca.blur_sigma == pytest.approx(0.3 * ((5 - 1) * 0.5 - 1) + 0.8)


def test_propagation_power():
    affinity, left = _two_block_attention(4)
    maps = torch.zeros(1, 16, 1)
    maps[0, 0, 0] = 1.0
    out = goca.propagate(maps, affinity[None], 2)
    assert (out[0, ~left, 0] == 0).all() and torch.allclose(out[0, left, 0], torch.full((8,), 1 / 8))


def test_goca_background_is_the_max_of_min_maxed_objects_and_all_maps_min_maxed_after_propagation(tiny_model):
    config = SegmenterConfig(method="goca")
    segmenter = Segmenter(tiny_model, config)
    (scores,) = segmenter.segment([image_tensor(synthetic_image(48, 64, seed=3))], [[7, 17]])
    for grid in (*scores.maps, scores.background):
        assert grid.min() == pytest.approx(0.0, abs=1e-6) and grid.max() == pytest.approx(1.0, abs=1e-6)
    plan = segmenter.plan
    assert "reference" in {r.key for s in plan.specs if s.kind == "cross" for r in s.records}
    assert not any(r.what == "queries" for s in plan.specs if s.kind == "self" for r in s.records)
    propagation = [s.layer for s in plan.specs if any(r.key == "propagation" for r in s.records)]
    assert propagation == ["down_blocks.0.attentions.1", "up_blocks.3.attentions.0", "up_blocks.3.attentions.1"]


def test_goca_background_offset_moves_the_argmax_without_clamping():
    maps = torch.full((1, 4, 4), 0.4)
    background = torch.full((4, 4), 0.5)
    image = synthetic_image(4, 4, seed=0)
    labels = lambda offset: finish_mask(  # noqa: E731
        maps, [2], image, SegmenterConfig(method="goca", goca={"background_offset": offset}), background).labels
    assert (labels(0.0) == 0).all() and (labels(-0.2) == 3).all()
    # a background pushed below zero still loses to a class at zero (no clamp before the argmax)
    assert (finish_mask(maps * 0, [2], image, SegmenterConfig(method="goca", goca={"background_offset": -0.6}),
                        background).labels == 3).all()


# --- DiffSegmenter ------------------------------------------------------------------------------

def test_fusion_upsamples_before_min_max_and_averages_tokens_first():
    # 2x2 class map [0, 1, 1, 0]: upsampled bilinearly to 4x4 its corners are 0.25 and 0.75,
    # so min-max after upsampling reaches 0 and 1 there (before it would stay at 0.25 / 0.75).
    low = torch.tensor([[[0.0], [1.0], [1.0], [0.0]]])
    fused = diffsegmenter.fuse_class_maps({2: low}, [[0]], {2: 1.0}, 4)
    assert fused[0, 0, 0] == 0.0 and fused[0, 3, 0] == 1.0
    # two tokens: averaged, then min-maxed (min-maxing each first gives another map)
    tokens = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, 3.0], [3.0, 9.0]]])  # 2x2, two tokens
    fused = diffsegmenter.fuse_class_maps({2: tokens}, [[0, 1]], {2: 1.0}, 2)
    torch.testing.assert_close(fused[0, :, 0], torch.tensor([0.0, 0.5, 2.5, 6.0]) / 6.0)


def test_completion_spreads_a_class_through_its_block():
    affinity, left = _two_block_attention(4)
    maps = torch.zeros(16, 1)
    maps[0, 0] = 1.0
    completed = diffsegmenter.complete_with_self_attention(maps[None], affinity[None])[0]
    assert (completed[left, 0] > 0).all() and (completed[~left, 0] == 0).all()


def test_class_emphasis_is_compels_weighting_against_the_empty_prompt():
    z = torch.tensor([[1.0, 1.0], [3.0, 5.0], [2.0, 2.0]])
    empty = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    out = diffsegmenter.emphasise_tokens(z, empty, [[1]], 1.21)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0], [1.0 + 2.0 * 1.21, 1.0 + 4.0 * 1.21], [2.0, 2.0]]))


def test_diffsegmenter_background_is_a_constant_score():
    maps = torch.zeros(2, 8, 8)
    maps[0, :, :4] = 1.0  # class 0 on the left; class 1 weak on the right, strong at one pixel
    maps[1, :, 4:] = 0.3
    maps[1, 0, 7] = 1.0
    image = synthetic_image(8, 8, seed=0)
    config = SegmenterConfig(method="diffsegmenter")
    result = finish_mask(maps, [4, 9], image, config)
    assert (result.labels[:, :3] == 5).all()
    # after min-max class 1 is 0.3 on the right: below the constant 0.5 background there
    assert (result.labels[4:, 6] == 0).all() and result.labels[0, 7] == 10
    low = finish_mask(maps, [4, 9], image, config.model_copy(
        update={"diffsegmenter": config.diffsegmenter.model_copy(update={"background_score": 0.2})}))
    assert (low.labels[4:, 6] == 10).all()


def test_diffseg_runs_the_clean_latent(tiny_model):
    images = [torch.full((3, 32, 32), 128, dtype=torch.uint8)]
    clean = Segmenter(tiny_model, SegmenterConfig(method="diffseg")).encode_images(images)
    goca_segmenter = Segmenter(tiny_model, SegmenterConfig(method="goca"))
    noised = goca_segmenter.encode_images(images)
    # clean: the VAE mean as it is; noised: sqrt(abar) clean + sqrt(1 - abar) noise at t=100
    abar = tiny_model.scheduler.alphas_cumprod[100]
    noise = goca_segmenter._noise(1, tuple(clean.shape[1:]), clean.device, clean.dtype)
    torch.testing.assert_close(noised, abar.sqrt() * clean + (1 - abar).sqrt() * noise, atol=1e-5, rtol=1e-5)
    assert not torch.equal(clean, noised)


# --- every method end to end on the tiny model ------------------------------------------------------

@pytest.mark.parametrize("method", ["diffseg", "goca", "diffsegmenter"])
def test_method_end_to_end(tiny_model, method):
    config = SegmenterConfig(method=method)
    segmenter = Segmenter(tiny_model, config)
    image = synthetic_image(48, 64, seed=3)
    (scores,) = segmenter.segment([image_tensor(image)], [[7, 17]])
    side = 512 if method == "diffseg" else 64  # DiffSeg names segments at the model's input size
    assert scores.classes == [7, 17] and scores.maps.shape == (2, side, side)
    assert (scores.background is not None) == (method in ("diffseg", "goca"))
    result = finish_mask(scores.maps, scores.classes, image, config, scores.background)
    assert result.labels.shape == (48, 64) and set(result.labels.flat) <= {0, 8, 18}
    assert ((result.confidence >= 0) & (result.confidence <= 1)).all()


def test_all_layer_methods_keep_one_map_per_resolution(tiny_model):
    from pipeline.segment.capture import capturing

    segmenter = Segmenter(tiny_model, SegmenterConfig(method="diffseg"))
    latents = segmenter.encode_images([torch.zeros(3, 32, 32, dtype=torch.uint8)])
    embeddings, _ = segmenter.encode_prompts([[0]])
    with torch.inference_mode(), capturing(tiny_model.unet, segmenter.plan.specs) as store:
        tiny_model.unet(latents, torch.tensor([300]), encoder_hidden_states=embeddings)
    cross = sorted(k for k in store.sums if k.endswith(":cross"))
    assert len(cross) == 16 and sorted(k for k in store.sums if not k.endswith(":cross")) == [
        "self:16", "self:32", "self:64", "self:8"]
    assert store.heads["self:64"] == 5 + 5 + 5 + 5 + 5  # five 64x64 blocks of five heads, pooled
    assert store.sums["self:64"].shape == (1, 4096, 4096)


def test_compare_prints_one_row_per_method_and_scores_the_ground_truth_as_eval(tmp_path, capsys, monkeypatch):
    import shutil

    from PIL import Image

    from conftest import FAST_CONFIG, two_class_mask, write_voc_folder
    from pipeline.cli import main
    from pipeline.config import VOC_CLASS_NAMES
    from pipeline.data.shards import ShardingReport, voc_sources, write_image_shards

    images = {f"2012_00000{i}": (synthetic_image(40, 40, seed=i), two_class_mask(40, 40, 8, 0)) for i in range(3)}
    root = write_voc_folder(tmp_path / "VOC2012", images)
    report = ShardingReport()
    write_image_shards(voc_sources(root, "train", None, report), tmp_path / "shards", "voc", 2,
                       list(VOC_CLASS_NAMES), report)
    assert main(["compare", "--methods", "iseg,iseg-naive,diffsegmenter", "--input", str(tmp_path / "shards"),
                 "--model", "tiny", "--config", FAST_CONFIG, "--device", "cpu", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line.split() for line in lines if line.split() and line.split()[0] in ("iseg", "iseg-naive", "diffsegmenter")]
    assert [row[0] for row in table] == ["iseg", "iseg-naive", "diffsegmenter"]
    for row in table:
        assert row[1] == "3" and 0 <= float(row[2]) <= 100 and 0 <= float(row[3]) <= 1 and float(row[4]) > 0
    assert main(["compare", "--methods", "iseg,nope", "--input", str(tmp_path / "shards"), "--model", "tiny"]) == 2
    capsys.readouterr()
    # --gt is the ground truth, as eval's: a folder missing an id scores the others only; an
    # unusable mask is named, with the fix
    gt = tmp_path / "gt"
    gt.mkdir()
    for image_id in ("2012_000000", "2012_000001"):
        shutil.copy(root / "SegmentationClass" / f"{image_id}.png", gt)
    compare = ["compare", "--methods", "iseg", "--input", str(tmp_path / "shards"), "--gt", str(gt), "--model", "tiny",
               "--config", FAST_CONFIG, "--device", "cpu", "--no-progress"]
    assert main(compare) == 0
    assert "(mIoU over the 2 of 3 images with ground truth; pass --gt the folder" in capsys.readouterr().out
    Image.new("L", (10, 20)).save(gt / "2012_000001.png")
    assert main(compare) == 2
    assert capsys.readouterr().err == (f"pseudolabel: error: the ground truth {gt / '2012_000001.png'} is 10 x 20 pixels, "
                                       "its image 40 x 40: pass --gt the folder of these images' <id>.png index masks "
                                       "(mode P or L, values 0..C and 255: VOC's SegmentationClassAug or "
                                       "SegmentationClass)\n")
    (gt / "2012_000001.png").write_text("not a mask")
    assert main(compare) == 2
    assert "(not a picture, its first bytes are b'not a ma'): pass --gt" in capsys.readouterr().err
    # VOC shards with the COCO config: refused before the model loads (a real one takes minutes)
    monkeypatch.setattr("pipeline.segment.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["compare", "--methods", "iseg", "--input", str(tmp_path / "shards"), "--config", "coco"]) == 2
    assert "written for 20 classes (aeroplane, bicycle, bird, ...) but the config has 80" in capsys.readouterr().err


def test_compare_times_every_segmenter_after_one_untimed_batch(tmp_path, tiny_model, monkeypatch):
    # A first call that costs 1000 s more (as a process's first batch costs more; on a clock
    # moved forward, not slept) must not reach the seconds per image: each segmenter segments
    # the first batch once before the timed ones.
    import time

    from conftest import FAST_CONFIG, two_class_mask, write_voc_folder
    from pipeline.config import VOC_CLASS_NAMES, load_config
    from pipeline.data.shards import ShardingReport, voc_sources, write_image_shards
    from pipeline.results.compare import compare_methods

    images = {f"2012_00000{i}": (synthetic_image(40, 40, seed=i), two_class_mask(40, 40, 8, 0)) for i in range(3)}
    root = write_voc_folder(tmp_path / "VOC2012", images)
    write_image_shards(voc_sources(root, "train", None, ShardingReport()), tmp_path / "shards", "voc", 2,
                       list(VOC_CLASS_NAMES), ShardingReport())
    calls: dict[int, list[int]] = {}
    real_segment, real_clock, first_calls = Segmenter.segment, time.perf_counter, [0.0]

    def segment(self, images, class_lists):
        calls.setdefault(id(self), []).append(len(images))
        if len(calls[id(self)]) == 1:
            first_calls[0] += 1000.0
        return real_segment(self, images, class_lists)

    monkeypatch.setattr(Segmenter, "segment", segment)
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + first_calls[0])
    config = load_config(FAST_CONFIG).model_copy(update={"batch_size": 2})
    tallies = compare_methods(str(tmp_path / "shards"), ["iseg", "diffsegmenter"], config, tiny_model)
    assert sorted(calls.values()) == [[2, 2, 1], [2, 2, 1]]  # the first batch twice, the last once
    for tally in tallies.values():
        assert tally.images == 3 and 0 < tally.seconds < 1000.0


def test_compare_names_the_first_skipped_samples_and_refuses_input_it_cannot_segment(tmp_path, tiny_model, capsys):
    from conftest import FAST_CONFIG
    from pipeline.config import load_config
    from pipeline.data.shards import InputError, tar_bytes
    from pipeline.results.compare import compare_methods

    png = io.BytesIO()
    Image.fromarray(synthetic_image(16, 16, 0)).save(png, format="PNG")
    samples = [{"__key__": f"img{i}", "png": png.getvalue(), "json": json.dumps({"names": ["no-such-class"]}).encode()}
               for i in range(7)]
    (tmp_path / "bad-000000.tar").write_bytes(tar_bytes(samples))
    with pytest.raises(InputError, match=r"^no image of --input .* could be segmented \(7 skipped: the first, 'img0': "
                                         r"unknown class name 'no-such-class'"):
        compare_methods(str(tmp_path), ["iseg"], load_config(FAST_CONFIG), tiny_model)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"skipped 'img{i}'" for i in range(5)] + [
        "... 2 more skipped (7 in all)"]


def test_sweep_parses_values_and_rejects_bad_keys():
    from pipeline.results.compare import comparison_rows, parse_sweep
    from pipeline.config import ConfigError

    sweep = parse_sweep("goca.background_offset=-0.4:0.4:0.1")
    assert sweep.values == pytest.approx([-0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4])
    rows = comparison_rows(["iseg", "goca"], SegmenterConfig(), sweep)
    # iseg has no goca key to sweep: one row; goca one per value, all on one segmenter config
    assert [name for name, _, _ in rows][:2] == ["iseg", "goca goca.background_offset=-0.4"]
    assert len(rows) == 10 and len({r[1].model_dump_json() for r in rows[1:]}) == 1
    assert [r[2].goca.background_offset for r in rows[1:]] == pytest.approx(list(sweep.values))
    tau_rows = comparison_rows(["diffseg"], SegmenterConfig(), parse_sweep("diffseg.tau=0.9:1.1:0.1"))
    assert [r[1].diffseg.tau for r in tau_rows] == pytest.approx([0.9, 1.0, 1.1])  # segmenter config changes
    for bad in ("goca.offset=0:1:0.1", "goca.background_offset=0:1", "diffseg.tau=-1:0:0.5"):
        with pytest.raises(ConfigError, match="sweep"):
            comparison_rows(["goca", "diffseg"], SegmenterConfig(), parse_sweep(bad))


def test_a_sweep_runs_only_the_methods_whose_masks_the_key_changes():
    from pipeline.results.compare import comparison_rows, parse_sweep
    from pipeline.config import ConfigError

    methods = ["iseg", "iseg-naive", "iseg-no-cat-cross", "diffseg", "goca", "diffsegmenter"]

    def names(key: str, config=SegmenterConfig()) -> list[str]:
        return [name for name, _, _ in comparison_rows(methods, config, parse_sweep(key))]

    # iSeg's refinement: iSeg and its ablations each value, the peers (their own sections) once
    assert names("iterations=1:2:1") == ["iseg iterations=1", "iseg iterations=2", "iseg-naive iterations=1",
                                         "iseg-naive iterations=2", "iseg-no-cat-cross iterations=1",
                                         "iseg-no-cat-cross iterations=2", "diffseg", "goca", "diffsegmenter"]
    # Ent-Self's constant leaves iseg-naive alone, Cat-Cross's gain iseg-no-cat-cross
    assert names("ent=0.01:0.02:0.01")[2:4] == ["iseg-naive", "iseg-no-cat-cross ent=0.01"]
    assert names("enhancement=1:2:1")[2:5] == ["iseg-naive enhancement=1", "iseg-naive enhancement=2",
                                               "iseg-no-cat-cross"]
    assert len(names("scale_before_resize=0:1:1")) == 12  # every method reads the input
    with pytest.raises(ConfigError, match="changes no mask of iseg, goca under this config"):
        comparison_rows(["iseg", "goca"], SegmenterConfig(), parse_sweep("background.threshold=0.3:0.5:0.1"))
    threshold = SegmenterConfig(background={"rule": "threshold"})
    assert names("background.threshold=0.3:0.4:0.1", threshold)[:2] == ["iseg background.threshold=0.3",
                                                                         "iseg background.threshold=0.4"]
    with pytest.raises(ConfigError, match="changes no mask of diffseg"):
        comparison_rows(["diffseg"], SegmenterConfig(), parse_sweep("crf.iterations=5:10:5"))  # the CRF is off
    assert not SegmenterConfig().changes_masks("crf.iterations")
    assert SegmenterConfig(crf={"enabled": True}).changes_masks("crf.iterations")


def test_compare_sweep_prints_one_row_per_value(tmp_path, capsys):
    from conftest import FAST_CONFIG, two_class_mask, write_voc_folder
    from pipeline.cli import main
    from pipeline.config import VOC_CLASS_NAMES
    from pipeline.data.shards import ShardingReport, voc_sources, write_image_shards

    images = {f"2012_00000{i}": (synthetic_image(40, 40, seed=i), two_class_mask(40, 40, 8, 0)) for i in range(2)}
    root = write_voc_folder(tmp_path / "VOC2012", images)
    write_image_shards(voc_sources(root, "train", None, ShardingReport()), tmp_path / "shards", "voc", 2,
                       list(VOC_CLASS_NAMES), ShardingReport())
    assert main(["compare", "--methods", "diffsegmenter", "--sweep", "diffsegmenter.background_score=0:1:0.5",
                 "--input", str(tmp_path / "shards"), "--model", "tiny", "--config", FAST_CONFIG,
                 "--device", "cpu", "--no-progress"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("diffsegmenter ")]
    assert [row[1] for row in rows] == ["diffsegmenter.background_score=0", "diffsegmenter.background_score=0.5",
                                        "diffsegmenter.background_score=1"]
    # background score 0 never beats a min-maxed class at its peak; 1 wins wherever no class is at 1
    confidences = [float(row[4]) for row in rows]
    assert confidences[0] < confidences[2] and all(row[2] == "2" for row in rows)
    assert main(["compare", "--methods", "goca", "--sweep", "goca.nope=0:1:1", "--input", str(tmp_path / "shards"),
                 "--model", "tiny"]) == 2


def test_every_config_method_has_one_plan_and_one_compare_name():
    from pipeline.config import METHOD_VARIANTS, METHODS
    from pipeline.segment.methods import PLANS

    assert set(PLANS) == set(METHODS) and set(METHODS) <= set(METHOD_VARIANTS)
