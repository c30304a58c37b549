"""Peer methods: pure functions on hand-made attention maps, and each method end to end."""

import math

import pytest
import torch

from conftest import image_tensor, synthetic_image
from pipeline.config import SegmenterConfig
from pipeline.methods import diffseg, diffsegmenter, goca
from pipeline.postprocess import finish_mask
from pipeline.segmenter import Segmenter


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


def test_a_small_tau_keeps_every_anchor_apart():
    attn = torch.eye(16) * 0.9 + 0.1 / 16
    proposals = diffseg.merge_proposals(attn / attn.sum(1, keepdim=True), side=4, anchors=4, tau=0.01, iterations=2)
    assert proposals.shape == (16, 16)


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


def test_naming_picks_the_best_candidate_per_segment():
    segments = torch.tensor([0, 0, 1, 1])
    candidates = torch.tensor([[0.9, 0.1], [0.8, 0.0], [0.1, 0.7], [0.2, 0.9]])  # background, class
    names = diffseg.name_segments(segments, 2, candidates)
    assert names.tolist() == [0, 1]
    proposals = torch.tensor([[0.5, 0.4, 0.0, 0.1], [0.0, 0.1, 0.6, 0.3]])
    named = diffseg.named_maps(proposals, names, 3)
    assert torch.equal(named[0], proposals[0]) and torch.equal(named[1], proposals[1])
    assert (named[2] == 0).all()


# --- GoCA -------------------------------------------------------------------------------------

def test_head_weights_follow_agreement_with_the_summed_output():
    # Two heads agree (same direction), a third points the other way: it gets weight 0.
    outputs = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])[None, :, None, :]  # [B=1, H=3, N=1, D=2]
    weights = goca.head_weights(outputs)
    # sum = (2, 0); dots = 2, 4, -2 -> clamped 2, 4, 0 -> normalised 1/3, 2/3, 0
    torch.testing.assert_close(weights[0, :, 0], torch.tensor([1 / 3, 2 / 3, 0.0]))
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]])[None]  # [1, 3, 1, 2]
    torch.testing.assert_close(goca.aggregate_heads(probs, weights)[0, 0], torch.tensor([1 / 3, 2 / 3]))


def test_layer_weights_prefer_layers_like_the_pseudo_global_attention():
    reference = _two_block_attention(4)[0][None]
    noisy = torch.full((1, 16, 16), 1 / 16)
    opposite = 1 - reference
    opposite = opposite / opposite.sum(-1, keepdim=True)
    weights = goca.layer_weights(torch.stack([reference, noisy, opposite]), reference)
    assert weights.shape == (3, 1)
    assert weights[0, 0] > weights[1, 0] > weights[2, 0]
    torch.testing.assert_close(weights.sum(dim=0), torch.ones(1))


def test_pseudo_global_attention_and_resizing_keep_rows_stochastic():
    queries = torch.randn(2, 64, 8)
    attn = goca.pseudo_global_attention(queries)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 64))
    small = goca.resize_attention(attn, 4)
    assert small.shape == (2, 16, 16)
    torch.testing.assert_close(small.sum(-1), torch.ones(2, 16))


def test_per_pixel_rescaling_keeps_content_tokens_only():
    maps = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.9, 0.05, 0.0, 0.05]])  # token 0 is the start token
    out = goca.rescale_per_pixel(maps, [1, 3])
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.25], [0.5, 0.5]]))


def test_blur_and_minmax_spreads_a_point_and_scales_to_unit_range():
    maps = torch.zeros(25, 1)
    maps[12, 0] = 1.0  # centre of a 5x5 map
    out = goca.blur_and_minmax(maps, 5, kernel=5, sigma=1.0)
    assert out.max() == 1.0 and out.min() == 0.0 and out[12, 0] == 1.0
    assert 0 < out[13, 0] < 1 and out[13, 0] == out[11, 0]
    assert math.isclose(goca.gaussian_kernel(5, 1.0).sum().item(), 1.0, rel_tol=1e-6)


def test_propagation_power():
    affinity, left = _two_block_attention(4)
    maps = torch.zeros(1, 16, 1)
    maps[0, 0, 0] = 1.0
    out = goca.propagate(maps, affinity[None], 2)
    assert (out[0, ~left, 0] == 0).all() and torch.allclose(out[0, left, 0], torch.full((8,), 1 / 8))


# --- DiffSegmenter ------------------------------------------------------------------------------

def test_fusion_minmax_scales_each_resolution_before_weighting():
    low = torch.tensor([[[2.0], [4.0], [4.0], [2.0]]])  # 2x2 -> min-max [0, 1, 1, 0]
    high = torch.arange(16.0).reshape(1, 16, 1)  # 4x4 -> min-max 0..1
    fused = diffsegmenter.fuse_minmax({2: low, 4: high}, {2: 0.5, 4: 0.5}, 4)
    assert fused.shape == (1, 16, 1)
    assert fused[0, 15, 0].item() == pytest.approx(0.5 * 0.0 + 0.5 * 1.0)
    assert fused.max() <= 1.0


def test_completion_and_weak_class_filter():
    affinity, left = _two_block_attention(4)
    maps = torch.zeros(16, 2)
    maps[0, 0] = 1.0  # class 0: one strong pixel on the left
    maps[15, 1] = 0.1  # class 1: a weak pixel on the right
    keep = diffsegmenter.keep_strong_classes(maps, 0.3)
    assert keep.tolist() == [True, False]
    completed = diffsegmenter.complete_with_self_attention(maps[None], affinity[None])[0]
    assert (completed[left, 0] > 0).all() and (completed[~left, 0] == 0).all()


# --- every method end to end on the tiny model ------------------------------------------------------

@pytest.mark.parametrize("method", ["diffseg", "goca", "diffsegmenter"])
def test_method_end_to_end(tiny_model, method):
    config = SegmenterConfig(method=method)
    segmenter = Segmenter(tiny_model, config)
    image = synthetic_image(48, 64, seed=3)
    (scores,) = segmenter.segment([image_tensor(image)], [[7, 17]])
    assert scores.classes == [7, 17] and scores.maps.shape == (2, 64, 64)
    assert (scores.background is not None) == (method in ("diffseg", "goca"))
    result = finish_mask(scores.maps, scores.classes, image, config, scores.background)
    assert result.labels.shape == (48, 64) and set(result.labels.flat) <= {0, 8, 18}
    assert ((result.confidence >= 0) & (result.confidence <= 1)).all()


def test_all_layer_methods_keep_one_map_per_resolution(tiny_model):
    from pipeline.capture import capturing

    segmenter = Segmenter(tiny_model, SegmenterConfig(method="diffseg"))
    latents = segmenter.encode_images([torch.zeros(3, 32, 32, dtype=torch.uint8)])
    embeddings, _ = segmenter.encode_prompts([[0]])
    with torch.inference_mode(), capturing(tiny_model.unet, segmenter.plan.specs) as store:
        tiny_model.unet(latents, torch.tensor([300]), encoder_hidden_states=embeddings)
    assert sorted(store.sums) == ["cross:16", "cross:32", "self:16", "self:32", "self:64", "self:8"]
    assert store.heads["self:64"] == 5 + 5 + 5 + 5 + 5  # five 64x64 blocks of five heads, pooled
    assert store.sums["self:64"].shape == (1, 4096, 4096)


def test_compare_prints_one_row_per_method(tmp_path, capsys):
    from conftest import FAST_CONFIG, two_class_mask, write_voc_folder
    from pipeline.cli import main
    from pipeline.config import VOC_CLASS_NAMES
    from pipeline.shards import ShardingReport, voc_sources, write_image_shards

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
