"""The pure tensor functions against hand-computed cases and properties."""

import math

import pytest
import torch

from pipeline.segment.methods import iseg


def test_entropy_reduced_self_attention_matches_hand_computation():
    attn = torch.tensor([[[0.5, 0.5], [0.25, 0.75]]], dtype=torch.float64)
    ent = 0.1 * math.log(10.0)  # eta = 0.1
    # column max: col0 0.5, col1 0.75 -> [[1, 2/3], [0.5, 1]]; then a + 0.1 * (1 + ln a)
    step = lambda a: a + 0.1 * (1 + math.log(a))  # noqa: E731
    row0 = [step(1.0), step(2 / 3)]
    row1 = [step(0.5), step(1.0)]
    expected = torch.tensor([[v / sum(row0) for v in row0], [v / sum(row1) for v in row1]], dtype=torch.float64)
    out = iseg.entropy_reduced_self_attention(attn.clone(), ent)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[0], expected)


def test_entropy_reduced_self_attention_zeroes_weak_responses():
    # Row 0 attends weakly (0.002) to key 2; after normalisation 0.002/0.9 -> the descent
    # step drives it negative, so it is clamped to zero.
    attn = torch.tensor([[[0.598, 0.4, 0.002], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]]])
    out = iseg.entropy_reduced_self_attention(attn.clone(), 0.015)
    assert out[0, 0, 2] == 0
    torch.testing.assert_close(out.sum(dim=2), torch.ones(1, 3))
    assert (out >= 0).all()


def test_entropy_reduced_self_attention_with_zero_ent_only_normalises():
    attn = torch.rand(2, 16, 16).softmax(dim=2)
    out = iseg.entropy_reduced_self_attention(attn.clone(), 0.0)
    colmax = attn / attn.amax(dim=1, keepdim=True)
    torch.testing.assert_close(out, colmax / colmax.sum(dim=2, keepdim=True))


def test_entropy_reduced_self_attention_matches_the_literal_formula():
    # The implementation folds the "+1" into a factor e; compare with the formula as written
    # (column max, A + eta * (1 + ln A) on positive entries, clamp, row-normalise), on rows
    # with exact zeros and entries far below the clamp point. The input must not change.
    generator = torch.Generator().manual_seed(3)
    attn = (4 * torch.randn(3, 64, 64, generator=generator, dtype=torch.float64)).softmax(dim=2)
    attn[:, :, 5] = 0.0
    attn[0, 7, 9] = 1e-40
    attn = attn / attn.sum(dim=2, keepdim=True)
    before = attn.clone()
    for ent in (0.015, 0.1):
        eta = ent / math.log(10.0)
        scaled = attn / attn.amax(dim=1, keepdim=True).clamp_min(1e-30)
        stepped = torch.where(scaled > 0, scaled + eta * (1 + torch.log(scaled.clamp_min(1e-30))), scaled)
        stepped = stepped.clamp_min(0)
        expected = stepped / stepped.sum(dim=2, keepdim=True)
        out = iseg.entropy_reduced_self_attention(attn, ent)
        torch.testing.assert_close(out, expected)
        assert torch.isfinite(out).all()
        assert (out[:, :, 5] == 0).all()
    assert torch.equal(attn, before)


def test_iterative_refinement_hand_case():
    cross = torch.tensor([[[3.0], [1.0], [2.0]]], dtype=torch.float64)  # one class, 3 pixels
    p = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    # normalise: [2, 0, 1] / 3; P @ c = [2/3, 1/3, 1/3]; shift min -> [1/3, 0, 0]; /sum -> [1, 0, 0]
    out = iseg.iterative_refinement(cross, p, 1)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    zero = iseg.iterative_refinement(cross, p, 0)
    torch.testing.assert_close(zero[0, :, 0], torch.tensor([2 / 3, 0.0, 1 / 3], dtype=torch.float64))


def test_iterative_refinement_spreads_within_self_attention_blocks():
    # Two blocks of 4 pixels that only attend inside their block: a class seeded on one
    # pixel of block A ends uniform over block A and zero on block B.
    p = torch.zeros(1, 8, 8)
    p[0, :4, :4] = 0.25
    p[0, 4:, 4:] = 0.25
    cross = torch.zeros(1, 8, 2)
    cross[0, 1, 0] = 1.0
    cross[0, 6, 1] = 1.0
    out = iseg.iterative_refinement(cross, p, 3)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.25] * 4 + [0.0] * 4))
    torch.testing.assert_close(out[0, :, 1], torch.tensor([0.0] * 4 + [0.25] * 4))


def test_iterative_refinement_columns_are_distributions():
    cross = torch.randn(2, 64, 3)
    p = torch.rand(2, 64, 64).softmax(dim=2)
    out = iseg.iterative_refinement(cross, p, 5)
    assert out.shape == (2, 64, 3)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2, 3))
    torch.testing.assert_close(out.amin(dim=1), torch.zeros(2, 3))


def test_grid_seeds_for_the_reference_setting():
    seeds = iseg.grid_seed_indices(64, 32)
    assert len(seeds) == 36  # stride 64 // sqrt(32) = 11 -> rows/cols 0, 11, ..., 55
    assert seeds[:3].tolist() == [0, 11, 22]
    assert seeds[6].item() == 11 * 64


def _two_groups(side, noise_scale):
    a = torch.tensor([0.7, 0.1, 0.1, 0.05, 0.05])
    b = torch.tensor([0.05, 0.05, 0.1, 0.1, 0.7])
    top = torch.arange(side * side) < side * side // 2
    x = torch.where(top[:, None], a, b) + noise_scale * torch.rand(side * side, 5, generator=torch.Generator().manual_seed(0))
    return x, top


def test_kl_cluster_average_drops_duplicate_seeds():
    # Seeds (0,0),(0,4) fall in the top group and (4,0),(4,4) in the bottom one; identical
    # seeds leave one cluster of each pair empty, which is dropped.
    x, top = _two_groups(8, 0.0)
    out = iseg.kl_cluster_average(x, 8, n_clusters=4, iterations=5)
    assert len(torch.unique(out, dim=0)) == 2
    torch.testing.assert_close(out[top], x[top])


def test_kl_cluster_average_rows_are_means_of_pure_clusters():
    x, top = _two_groups(8, 0.05)
    out = iseg.kl_cluster_average(x, 8, n_clusters=4, iterations=10)
    assert out.shape == x.shape
    for row in torch.unique(out, dim=0):
        members = (out == row).all(dim=1)
        assert top[members].all() or (~top[members]).all(), "a cluster mixes the two groups"
        torch.testing.assert_close(row, x[members].mean(dim=0))


def test_kl_cluster_average_means_raw_values_not_substituted_zeros():
    # Zeros become 1e-6 for the distance only; a cluster's mean is of the raw values
    # (the official code multiplies its cluster matrix by the unsubstituted maps).
    out = iseg.kl_cluster_average(torch.zeros(16, 3), 4, n_clusters=4, iterations=2)
    torch.testing.assert_close(out, torch.zeros(16, 3), rtol=0, atol=0)
    x = torch.tensor([[0.0, 1.0]] * 8 + [[0.5, 0.5]] * 8)
    out = iseg.kl_cluster_average(x, 4, n_clusters=4, iterations=3)
    assert out[:8, 0].eq(0).all(), "the mean of raw zeros is zero, not 1e-6"


def _two_token_rows(values):
    return torch.tensor([[v, 1.0 - v] for v in values], dtype=torch.float64)


def test_kl_cluster_average_keeps_the_last_rounds_assignment():
    # Side 4, 4 clusters: seeds at pixels 0, 2, 8, 10. Pixel 1 (0.59) starts nearer the seed
    # 0.5 than 0.7; eleven pixels at 0.3 pull that centre to 0.34 in the first update, after
    # which 0.59 is nearer 0.7. The official code keeps the assignment of its last round, so
    # with one round pixel 1 stays in cluster 0; assigning once more would move it.
    values = [0.3] * 16
    values[0], values[1], values[2], values[8], values[10] = 0.5, 0.59, 0.7, 0.99, 0.97
    x = _two_token_rows(values)
    for dtype in (torch.float16, torch.float32):
        out = iseg.kl_cluster_average(x, 4, n_clusters=4, iterations=1, distance_dtype=dtype)
        cluster0 = [v for i, v in enumerate(values) if i not in (2, 8, 10)]
        torch.testing.assert_close(out[1], _two_token_rows([sum(cluster0) / len(cluster0)])[0])
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
        torch.testing.assert_close(out[2], x[2], rtol=0, atol=0)


def test_symmetric_kl_half_rounds_as_the_official_float16_distance():
    # A point that is nearer centre 1 in exact arithmetic but whose float16 distances (every
    # step rounded to float16, as the official kl_dis) put centre 0 first.
    c0 = [0.1633262038230896, 0.22011446952819824, 0.6165593862533569]
    c1 = [0.16320425271987915, 0.2209121733903885, 0.6158835291862488]
    p = [0.15303784608840942, 0.22137115895748138, 0.625590980052948]
    centres, point = torch.tensor([[c0, c1]]), torch.tensor([[p]])
    half = iseg.symmetric_kl_half(centres, point, 1e-5)[0, :, 0]
    exact = iseg.symmetric_kl(point, centres, 1e-5)[0, 0]
    assert half.dtype == torch.float16
    assert half.argmin() == 0 and exact.argmin() == 1
    # By hand, in float16: a, b cast with eps added; q = ln a - ln b; 0.5*sum(a q) - 0.5*sum(b q).
    a, b = torch.tensor(c0).half() + 1e-5, torch.tensor(p).half() + 1e-5
    q = torch.log(a) - torch.log(b)
    assert half[0] == torch.sum(a * q) * 0.5 + (-torch.sum(b * q) * 0.5)
    # The clustering follows the distance it is given: pixels 1, 3.. (all p) join centre 0
    # (pixel 0) under float16 and centre 1 (pixel 2) under float32.
    rows = [p] * 16
    rows[0], rows[2], rows[8], rows[10] = c0, c1, [0.9, 0.05, 0.05], [0.05, 0.05, 0.9]
    x = torch.tensor(rows)
    half_out = iseg.kl_cluster_average(x, 4, n_clusters=4, iterations=1, distance_dtype=torch.float16)
    exact_out = iseg.kl_cluster_average(x, 4, n_clusters=4, iterations=1, distance_dtype=torch.float32)
    assert torch.equal(half_out[1], half_out[0]) and not torch.equal(half_out[1], half_out[2])
    assert torch.equal(exact_out[1], exact_out[2]) and not torch.equal(exact_out[1], exact_out[0])


def test_symmetric_kl_half_blocks_agree_with_one_block(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(3, 50, 7, generator=generator).softmax(dim=-1)
    centres = points[:, :9]
    whole = iseg.symmetric_kl_half(centres, points, 1e-5)
    monkeypatch.setattr(iseg, "_HALF_KL_BLOCK", 50 * 7 * 3 * 2)  # two centres per block
    assert torch.equal(iseg.symmetric_kl_half(centres, points, 1e-5), whole)


def _kl_cluster_reference(x, side, n_clusters, iterations, eps=1e-5):
    """One image, the official formulation: empty clusters removed from the centre list, the
    last round's assignment kept, raw values averaged; float32 distance."""
    points = torch.where(x == 0, torch.full_like(x, 1e-6), x)
    centres = points[iseg.grid_seed_indices(side, n_clusters)]
    for _ in range(iterations):
        members = torch.nn.functional.one_hot(iseg.symmetric_kl(points, centres, eps).argmin(1), len(centres))
        counts = members.sum(0)
        centres = (members.T.to(x.dtype) @ points)[counts > 0] / counts[counts > 0, None]
    members = members[:, counts > 0].to(x.dtype)
    return members @ ((members.T @ x) / members.sum(0)[:, None])


def test_kl_cluster_average_batch_matches_per_image_reference_with_dropped_clusters():
    generator = torch.Generator().manual_seed(3)
    # 6 distinct rows per image for 16 seeds: identical seeds, so clusters empty out and are dropped.
    palette = torch.rand(4, 6, 5, generator=generator, dtype=torch.float64).softmax(dim=-1)
    pick = torch.randint(0, 6, (4, 144), generator=generator)
    batch = torch.stack([palette[b, pick[b]] for b in range(4)])  # [4, 144, 5]
    out = iseg.kl_cluster_average(batch, 12, n_clusters=16, iterations=6, distance_dtype=torch.float32)
    assert out.shape == batch.shape
    for b in range(4):
        expected = _kl_cluster_reference(batch[b], 12, 16, 6)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-12)
        single = iseg.kl_cluster_average(batch[b], 12, 16, 6, distance_dtype=torch.float32)
        torch.testing.assert_close(single, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(iseg.kl_cluster_average(batch[b], 12, 16, 6), out[b], rtol=0, atol=1e-12)


def test_kl_cluster_average_stops_at_a_fixed_point_with_the_result_of_all_rounds(monkeypatch):
    # Rows near 5 distinct distributions: the assignment settles within a few rounds, and each
    # round after would repeat it, so the rounds stop there with the result of all 20.
    generator = torch.Generator().manual_seed(7)
    palette = torch.rand(5, 12, generator=generator, dtype=torch.float64).softmax(dim=-1)
    rows = (palette[torch.randint(0, 5, (256,), generator=generator)]
            + 0.01 * torch.rand(256, 12, generator=generator, dtype=torch.float64))
    rounds = []
    for name in ("symmetric_kl", "symmetric_kl_half"):
        distance = getattr(iseg, name)
        monkeypatch.setattr(iseg, name, lambda *args, distance=distance: rounds.append(1) or distance(*args))
    out = iseg.kl_cluster_average(rows, 16, n_clusters=16, iterations=20, distance_dtype=torch.float32)
    assert 2 <= len(rounds) < 20
    torch.testing.assert_close(out, _kl_cluster_reference(rows, 16, 16, 20), rtol=0, atol=1e-12)
    rounds.clear()
    half = iseg.kl_cluster_average(rows, 16, n_clusters=16, iterations=20)
    settled = len(rounds) - 1  # the last round only found the assignment repeated
    assert 1 <= settled < 19
    assert torch.equal(half, iseg.kl_cluster_average(rows, 16, n_clusters=16, iterations=settled))


def test_the_gpu_centres_equal_the_cpu_centres_and_empty_clusters_stay_zero(monkeypatch):
    # The centres of a round: gathered per cluster on the CPU (the official order), from one
    # one-hot matmul on a GPU. Cluster 2 of image 0 and cluster 0 of image 1 have no point.
    generator = torch.Generator().manual_seed(5)
    points = torch.rand(2, 50, 7, generator=generator, dtype=torch.float64)
    nearest = torch.stack([torch.tensor([0, 1, 3] * 16 + [0, 1]), torch.tensor([1, 2, 3] * 16 + [1, 2])])
    members = torch.nn.functional.one_hot(nearest, 4).to(points.dtype)
    gathered = iseg.gathered_means(points, nearest, 4)
    torch.testing.assert_close(iseg.one_hot_means(points, members, members.sum(dim=1)), gathered)
    assert gathered[0, 2].abs().sum() == 0 and gathered[1, 0].abs().sum() == 0
    assert torch.equal(gathered[0, 3], points[0, nearest[0] == 3].mean(dim=0))
    # The whole clustering with the GPU's centres, on the dropped-cluster case above.
    palette = torch.rand(2, 6, 5, generator=generator, dtype=torch.float64).softmax(dim=-1)
    pick = torch.randint(0, 6, (2, 144), generator=generator)
    batch = torch.stack([palette[b, pick[b]] for b in range(2)])
    cpu = iseg.kl_cluster_average(batch, 12, n_clusters=16, iterations=6, distance_dtype=torch.float32)

    def one_hot_centres(points, nearest, n_centres):
        members = torch.nn.functional.one_hot(nearest, n_centres).to(points.dtype)
        return iseg.one_hot_centres(points, members, members.sum(dim=1))

    monkeypatch.setattr(iseg, "gathered_means", one_hot_centres)
    gpu_like = iseg.kl_cluster_average(batch, 12, n_clusters=16, iterations=6, distance_dtype=torch.float32)
    torch.testing.assert_close(gpu_like, cpu, rtol=0, atol=1e-12)


def test_float16_gpu_centres_round_once_as_the_cpu_mean_of_the_gathered_members():
    # A GPU takes the centres from one matmul; in float16 it must sum in float32 and round once,
    # as torch's float16 mean over a cluster's gathered members (the official and CPU path).
    generator = torch.Generator().manual_seed(6)
    points = torch.rand(2, 300, 7, generator=generator).half()
    nearest = torch.randint(0, 5, (2, 300), generator=generator)
    nearest[1][nearest[1] == 2] = 3  # an empty cluster
    members = torch.nn.functional.one_hot(nearest, 5).half()
    counts = members.sum(dim=1, dtype=torch.float32)
    gathered = iseg.gathered_means(points, nearest, 5)
    centres = iseg.one_hot_centres(points, members, counts)
    assert centres.dtype == torch.float16 and torch.equal(centres, gathered)
    assert not torch.equal(iseg.one_hot_means(points, members, counts), gathered)  # rounding the sums first


def test_fuse_cross_attention_weights_and_normalises():
    # 2x2 map with all mass on pixel 0 for token 0, and a uniform 4x4 map; output side 4.
    low = torch.zeros(1, 4, 1)
    low[0, 0, 0] = 5.0  # normalised to 1 on pixel 0 -> after upsampling, sums to 4 (4x more pixels)
    high = torch.ones(1, 16, 1)  # normalised to 1/16 everywhere
    fused = iseg.fuse_cross_attention({2: low, 4: high}, {2: 0.7, 4: 0.3}, out_side=4)
    assert fused.shape == (1, 16, 1)
    grid = fused[0, :, 0].reshape(4, 4)
    # top-left 2x2 block of the upsampled one-hot has bilinear values 1, 0.75, 0.75, 0.5625
    assert grid[0, 0].item() == pytest.approx(0.7 * 1.0 + 0.3 / 16)
    assert grid[3, 3].item() == pytest.approx(0.3 / 16)
    with pytest.raises(ValueError, match="no fusion weight"):
        iseg.fuse_cross_attention({8: torch.ones(1, 64, 1)}, {16: 1.0}, 16)


def test_float16_fusion_and_class_columns_round_as_the_official_float16_code():
    # On a float16 model the official code fuses, and averages class tokens, in float16: each
    # map normalised, upsampled and weighted in float16, the weighted maps stacked and summed
    # (rounded once), a class the float16 mean of its token columns. The reference below is
    # that sequence of torch calls.
    generator = torch.Generator().manual_seed(3)
    by_side = {side: torch.rand(2, side * side, 6, generator=generator).softmax(dim=-1).half() for side in (8, 16)}
    weights = {8: 0.3, 16: 0.7}
    columns = [[[1], [2, 3, 4]], [[5], [1, 2]]]

    def official(maps, side):
        grid = maps.transpose(1, 2).reshape(2, 6, side, side)
        normed = grid / grid.sum(dim=(-2, -1), keepdim=True)
        if side != 16:
            normed = torch.nn.functional.interpolate(normed, size=(16, 16), mode="bilinear", align_corners=False)
        return weights[side] * normed

    reference = torch.stack([official(maps, side) for side, maps in by_side.items()]).sum(0).flatten(-2).transpose(1, 2)
    fused = iseg.fuse_cross_attention(by_side, weights, 16)
    assert fused.dtype == torch.float16 and torch.equal(fused, reference)
    classes = iseg.class_maps_from_token_batch(fused, columns)
    expected = torch.stack([torch.stack([reference[b][:, cols].mean(1) for cols in per_image], dim=1)
                            for b, per_image in enumerate(columns)])
    assert classes.dtype == torch.float16 and torch.equal(classes, expected)
    in_float32 = iseg.fuse_cross_attention({s: m.float() for s, m in by_side.items()}, weights, 16)
    assert not torch.equal(in_float32.half(), reference)  # float32 stages round elsewhere


def test_float16_cluster_means_count_members_exactly_past_2048():
    # 2049 pixels of one vector and 2047 of another on a 64 x 64 grid: two clusters. float16
    # counts stop at 2048, so a float16 count would give 2049 members the mean sum / 2048.
    a, b = torch.tensor([0.25, 0.75]), torch.tensor([0.6, 0.4])
    x = torch.cat([a.expand(2049, 2), b.expand(2047, 2)]).half()
    out = iseg.kl_cluster_average(x, 64, n_clusters=32, iterations=2)
    assert out.dtype == torch.float16
    expected_a = (x[:2049].float().sum(0).half().float() / 2049).half()  # sum rounded, then the quotient
    expected_b = (x[2049:].float().sum(0).half().float() / 2047).half()
    assert torch.equal(out[0], expected_a) and torch.equal(out[-1], expected_b)
    assert not torch.equal(expected_a, (x[:2049].float().sum(0).half() / torch.tensor(2049.0).half()))


def test_iseg_class_maps_of_float16_attention_are_float32():
    from pipeline.config import SegmenterConfig

    config = SegmenterConfig()
    generator = torch.Generator().manual_seed(4)
    cross = {side: torch.rand(1, side * side, 77, generator=generator).softmax(dim=-1).half() for side in (16, 32)}
    self_attn = torch.rand(1, 4096, 4096, generator=generator).softmax(dim=-1).half()
    maps, deltas = iseg.iseg_class_maps(cross, self_attn, [[[5], [6, 7]]], config)
    assert maps.dtype == torch.float32 and maps.shape == (1, 4096, 2) and torch.isfinite(maps).all()
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(1, 2))


def test_class_maps_from_tokens_averages_columns():
    maps = torch.arange(12.0).reshape(3, 4)
    out = iseg.class_maps_from_tokens(maps, [[1], [2, 3]])
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.5], [5.0, 6.5], [9.0, 10.5]]))


def test_class_maps_from_token_batch_matches_each_image_and_zero_pads():
    maps = torch.rand(2, 5, 7, dtype=torch.float64)
    columns = [[[1], [2, 3], [4, 5, 6]], [[6]]]
    out = iseg.class_maps_from_token_batch(maps, columns)
    assert out.shape == (2, 5, 3) and out.dtype == torch.float64
    torch.testing.assert_close(out[0], iseg.class_maps_from_tokens(maps[0], columns[0]))
    torch.testing.assert_close(out[1, :, :1], iseg.class_maps_from_tokens(maps[1], columns[1]))
    assert not out[1, :, 1:].any()


def test_squared_background_labels_hand_case():
    # 1 x 3 pixels, 3 classes; class 2 absent.
    scores = torch.tensor([[[[0.0, 0.5, 1.0]], [[1.0, 0.6, 0.0]], [[5.0, 5.0, 5.1]]]])
    present = torch.tensor([[True, True, False]])
    # class 0 scaled [0, .5, 1]; class 1 scaled [1, .6, 0]; max [1, .6, 1]; bg = [0, .16, 0]
    labels = iseg.squared_background_labels(scores, present)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[[2, 2, 1]]]
    only_weak = torch.tensor([[[[0.0, 0.2, 1.0]]]])
    # scaled [0, .2, 1]: bg [1, .64, 0] -> background, background, class
    assert iseg.squared_background_labels(only_weak, torch.tensor([[True]])).tolist() == [[[0, 0, 1]]]


def test_threshold_background_labels_hand_case():
    scores = torch.tensor([[[[0.0, 0.3, 0.44, 1.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    present = torch.tensor([[True, False]])
    labels = iseg.threshold_background_labels(scores, present, threshold=0.45)
    # scaled [0, .3, .44, 1] -> only the last reaches 0.45
    assert labels.tolist() == [[[0, 0, 0, 1]]]
    full = iseg.threshold_background_scores(scores, present, 0.45)
    assert full[0, 0, 0, 1].item() == pytest.approx(0.7, abs=1e-5)
