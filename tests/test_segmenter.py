"""The segmenter on the tiny model: shapes, batch independence, method switches."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FAST_CONFIG, image_tensor, synthetic_image
from pipeline.segment.capture import capturing
from pipeline.config import ConfigError, SegmenterConfig, load_config
from pipeline.segment.models import load_model
from pipeline.mask.postprocess import finish_mask
from pipeline.segment.segmenter import Segmenter, resize_to_model


@pytest.fixture(scope="module")
def segmenter(tiny_model):
    return Segmenter(tiny_model, SegmenterConfig())


def test_scores_are_one_refined_map_per_class(segmenter):
    image = synthetic_image(96, 128, seed=1)
    (scores,) = segmenter.segment([image_tensor(image)], [[17, 7, 7]])
    assert scores.classes == [7, 17]
    assert scores.maps.shape == (2, 64, 64) and scores.maps.dtype == torch.float32
    torch.testing.assert_close(scores.maps.sum(dim=(1, 2)), torch.ones(2))
    assert (scores.maps >= 0).all()
    assert scores.refinement_delta >= 0
    assert segmenter.times.seconds == {}  # stage timing is off unless asked for


def test_stage_timing_records_every_stage_when_asked(tiny_model):
    timed = Segmenter(tiny_model, SegmenterConfig(), time_stages=True)
    timed.segment([image_tensor(synthetic_image(64, 64, seed=2))], [[3]])
    assert set(timed.times.seconds) == {"text", "vae", "unet", "refine"}
    assert all(seconds > 0 for seconds in timed.times.seconds.values())


def test_an_image_gives_the_same_result_alone_and_in_a_batch_of_four():
    # float64 so that the only possible difference is a logic one (noise, prompts, class
    # padding, per-image clustering): batched kernels' float32 rounding (~1e-7) can flip
    # k-means near-ties on random weights, which says nothing about the pipeline.
    model64 = load_model("tiny", device="cpu", dtype=torch.float64)
    segmenter = Segmenter(model64, load_config(FAST_CONFIG))  # 256 px: the same code paths
    images = [synthetic_image(96 + 16 * (i % 2), 128, seed=i) for i in range(4)]  # two sizes, resized in groups
    labels = [[7, 17], [0], [10, 15, 19], [14]]
    (alone,) = segmenter.segment([image_tensor(images[2])], [labels[2]])
    batch = segmenter.segment([image_tensor(im) for im in images], labels)
    assert torch.equal(batch[2].maps, alone.maps)
    config = segmenter.config
    mask_alone = finish_mask(alone.maps, alone.classes, images[2], config).labels
    mask_batch = finish_mask(batch[2].maps, batch[2].classes, images[2], config).labels
    assert (mask_alone == mask_batch).all()
    assert [b.classes for b in batch] == [sorted(x) for x in labels]


def test_decoded_and_channel_first_images_encode_to_the_same_latents(segmenter):
    # Decoded images are channel-first views of [H, W, 3] arrays and are uploaded in that
    # memory order; a caller's own contiguous [3, H, W] tensors take the other path.
    images = [synthetic_image(72, 96, seed=i) for i in range(3)]
    views = [image_tensor(image) for image in images]
    assert not views[0].is_contiguous()
    with torch.inference_mode():
        from_views = segmenter.encode_images(views)
        from_contiguous = segmenter.encode_images([view.contiguous() for view in views])
        mixed = segmenter.encode_images([views[0], views[1].contiguous(), views[2]])
    assert torch.equal(from_views, from_contiguous)
    assert torch.equal(mixed, from_views)
    assert not torch.equal(from_views[0], from_views[1])


def test_batches_launched_ahead_and_waited_out_of_order_give_their_own_results(tiny_model):
    # A worker launches the next batch before waiting for the last one (two shards in flight).
    segmenter = Segmenter(tiny_model, load_config(FAST_CONFIG))  # 256 px: the same code paths
    first = ([image_tensor(synthetic_image(64, 80, seed=i)) for i in range(2)], [[2, 9], [4]])
    second = ([image_tensor(synthetic_image(80, 64, seed=10 + i)) for i in range(3)], [[1], [5, 6, 18], [12]])
    expected = [segmenter.segment(*first), segmenter.segment(*second)]
    pending = [segmenter.launch(*first), segmenter.launch(*second)]
    got = [pending[1].wait(), pending[0].wait()][::-1]
    for want_batch, got_batch in zip(expected, got):
        assert [s.classes for s in got_batch] == [s.classes for s in want_batch]
        for want, have in zip(want_batch, got_batch):
            assert torch.equal(have.maps, want.maps)
            assert have.refinement_delta == want.refinement_delta > 0.0
    assert not torch.equal(got[0][0].maps[0], got[1][0].maps[0])


def test_float32_attention_in_a_batch_differs_only_by_rounding(segmenter):
    images = [image_tensor(synthetic_image(80, 80, seed=i)) for i in range(4)]
    labels = [[1], [2, 3], [4], [5]]
    with torch.inference_mode():
        maps = []
        for batch_images, batch_labels in (([images[1]], [labels[1]]), (images, labels)):
            latents = segmenter.encode_images(batch_images)
            embeddings, _ = segmenter.encode_prompts(batch_labels)
            t = torch.full((len(batch_images),), 100)
            with capturing(segmenter.model.unet, segmenter.cross_specs + segmenter.self_specs) as store:
                segmenter.model.unet(latents, t, encoder_hidden_states=embeddings)
                maps.append({k: v.clone() for k, v in store.sums.items()})
    alone, batch = maps
    for key in alone:
        torch.testing.assert_close(batch[key][1], alone[key][0], rtol=1e-5, atol=1e-6)


def test_head_subsets_apply_only_to_the_sd2_head_layout(tiny_model):
    subset = Segmenter(tiny_model, SegmenterConfig())
    assert subset.self_specs[0].heads == [1, 2]
    other = Segmenter(tiny_model, SegmenterConfig(head_layout=[8, 8, 8, 8]))
    assert all(spec.heads is None for spec in other.cross_specs + other.self_specs)
    # said, since the published numbers were measured with the subsets (a job's workers report it, segment prints it)
    assert subset.plan.notes == ()
    assert other.plan.notes == ("this model's attention blocks have [5, 10, 20, 20] heads, where head_layout expects "
                                "[8, 8, 8, 8] (SD 2.x's, by default): the config's head subsets are left out and every "
                                "head is averaged, a setting the published numbers were not measured in",)
    assert Segmenter(tiny_model, SegmenterConfig(method="goca", head_layout=[8, 8, 8, 8])).plan.notes == ()


def test_a_768_px_v_prediction_model_is_named_as_not_the_one_the_method_was_set_on(tiny_model):
    """stabilityai/stable-diffusion-2-1 (768 px, v-prediction) in place of its -base: the same
    heads and layers, so it runs, and nothing said that the constants and numbers are 2.1-base's."""
    import dataclasses

    from diffusers import DDIMScheduler

    assert Segmenter(tiny_model, SegmenterConfig()).notes == ()
    scheduler = DDIMScheduler.from_config({**tiny_model.scheduler.config, "prediction_type": "v_prediction"})
    unet = type(tiny_model.unet).from_config({**tiny_model.unet.config, "sample_size": 96})
    v_model = dataclasses.replace(tiny_model, scheduler=scheduler, unet=unet)
    (note,) = Segmenter(v_model, SegmenterConfig()).notes
    assert note.startswith("this model works at 768 px and predicts v (SD 2.1-base: 512 px, the noise; "
                           "stabilityai/stable-diffusion-2-1 is the 768 px v-prediction one)")
    # with a plan's own note, both are said
    assert len(Segmenter(v_model, SegmenterConfig(head_layout=[8, 8, 8, 8])).notes) == 2


@pytest.mark.parametrize("switch", [{"ent_self": False}, {"cat_cross": False}])
def test_ablation_switches_change_the_maps(tiny_model, segmenter, switch):
    image = image_tensor(synthetic_image(64, 64, seed=5))
    (full,) = segmenter.segment([image], [[2, 11]])
    (ablated,) = Segmenter(tiny_model, SegmenterConfig(**switch)).segment([image], [[2, 11]])
    assert not torch.allclose(full.maps, ablated.maps)
    torch.testing.assert_close(ablated.maps.sum(dim=(1, 2)), torch.ones(2))


def test_bad_class_lists_are_rejected(segmenter):
    image = image_tensor(synthetic_image(32, 32, seed=0))
    with pytest.raises(ValueError, match="at least one labelled class"):
        segmenter.segment([image], [[]])
    with pytest.raises(ValueError, match="outside 0..19"):
        segmenter.segment([image], [[20]])


def test_resize_samples_like_opencv_bilinear_without_antialiasing():
    # Vertical stripes two pixels wide, 1024 -> 512 px: half-pixel bilinear sampling lands
    # between the two pixels of one stripe (OpenCV INTER_LINEAR, the official resize), so the
    # stripes survive at full contrast; an antialiased resize would blur them to grey.
    row = torch.tensor([255, 255, 0, 0], dtype=torch.uint8).repeat(256)
    image = row.expand(3, 1024, 1024)[None]
    resized = resize_to_model(image, 512)
    assert resized.shape == (1, 3, 512, 512) and resized.dtype == torch.float32
    assert torch.equal(resized[0, 0, 0, :4], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    # Upsampling (every VOC image) interpolates between neighbours.
    small = torch.tensor([[0, 255]], dtype=torch.uint8).expand(3, 2, 2)[None]
    torch.testing.assert_close(resize_to_model(small, 4)[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


@pytest.mark.parametrize("scale_first", [True, False])
def test_resize_is_opencv_bit_for_bit(scale_first):
    cv2 = pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is the reference here")
    rng = np.random.default_rng(1)
    for height, width in [(375, 500), (480, 640), (500, 333)]:  # VOC and COCO shapes, up and down
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        ours = resize_to_model(torch.from_numpy(image).permute(2, 0, 1)[None], 512, scale_first)[0]
        if scale_first:  # the official VOC loader
            reference = cv2.resize(image.astype(np.float32) / 255.0, dsize=(512, 512))
        else:  # its COCO loader
            reference = cv2.resize(image.astype(np.float32), dsize=(512, 512)) / 255.0
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), reference), (height, width)
        # torch's bilinear (the old resize) rounds w0 * a + w1 * b: other last bits
        plain = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0, size=(512, 512),
                              mode="bilinear", align_corners=False)[0]
        assert not torch.equal(plain, ours)


def test_official_head_order_names_the_layers_heads_in_forward_order(tiny_model):
    from pipeline.segment.capture import CaptureSpec
    from pipeline.segment.methods.iseg import official_head_order

    specs = [CaptureSpec("up_blocks.1.attentions.0", "cross", [1]),  # runs after the down blocks
             CaptureSpec("down_blocks.2.attentions.0", "cross", [0, 19]),
             CaptureSpec("down_blocks.1.attentions.1", "cross", [5])]  # side 32
    order = official_head_order(tiny_model.unet, specs, {16: [21, 19, 0], 32: [5]}, 64)
    assert order == {16: [("up_blocks.1.attentions.0:cross", 1), ("down_blocks.2.attentions.0:cross", 19),
                          ("down_blocks.2.attentions.0:cross", 0)],
                     32: [("down_blocks.1.attentions.1:cross", 5)]}
    with pytest.raises(ConfigError, match=r"head_order\[16\] does not name the heads .* or set head_order to null"):
        official_head_order(tiny_model.unet, specs, {16: [21, 19, 1]}, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["iseg", "diffseg", "goca", "diffsegmenter"])
def test_early_exit_gives_the_same_maps_and_skips_the_rest_of_the_unet(method, dtype):
    model = load_model("tiny", device="cpu", dtype=dtype)
    calls = []
    model.unet.conv_out.register_forward_hook(lambda *args: calls.append("conv_out"))
    last_block = model.unet.up_blocks[3].resnets[2]
    last_block.register_forward_hook(lambda *args: calls.append("up_blocks.3.resnets.2"))
    image = image_tensor(synthetic_image(48, 64, seed=3))
    results, ran = {}, {}
    for early_exit in (False, True):
        calls.clear()
        config = load_config(FAST_CONFIG).model_copy(update={"method": method, "early_exit": early_exit})
        (results[early_exit],) = Segmenter(model, config).segment([image], [[2, 14]])
        ran[early_exit] = list(calls)
    assert torch.equal(results[True].maps, results[False].maps)
    assert ran[False] == ["up_blocks.3.resnets.2", "conv_out"]
    if method == "iseg":  # reads up_blocks.3.attentions.1 last: the blocks after it do not run
        assert ran[True] == []


def test_fused_kernel_gives_the_official_kernels_maps_up_to_rounding():
    # float64 and the float32 KL distance: no float16 ties, so only rounding separates the two
    model = load_model("tiny", device="cpu", dtype=torch.float64)
    image = image_tensor(synthetic_image(48, 64, seed=5))
    maps = {}
    for kernel in ("official", "fused"):
        config = load_config(FAST_CONFIG).model_copy(update={"attention_kernel": kernel})
        config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"distance_dtype": "float32"})})
        (maps[kernel],) = Segmenter(model, config).segment([image], [[2, 14]])
    torch.testing.assert_close(maps["fused"].maps, maps["official"].maps, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def half_model():
    return load_model("tiny", device="cpu", dtype=torch.float16)


@pytest.mark.parametrize("method, kernel", [("iseg", "official"), ("iseg", "fused"), ("diffseg", "official"),
                                            ("goca", "official"), ("diffsegmenter", "official")])
def test_a_float16_model_runs_every_method_to_float32_maps(tiny_model, half_model, method, kernel):
    # float16 is the model's dtype on a GPU: every method and kernel runs on a float16 model
    # here, so a dtype mix-up shows on the CPU, not first on a GPU.
    images = [image_tensor(synthetic_image(48, 64, seed=i)) for i in range(2)]
    labels = [[2, 14], [7]]
    config = load_config(FAST_CONFIG).model_copy(update={"method": method, "attention_kernel": kernel})
    results = {dtype: Segmenter(model, config).segment(images, labels)
               for dtype, model in ((torch.float32, tiny_model), (torch.float16, half_model))}
    for full, reduced in zip(results[torch.float32], results[torch.float16]):
        assert reduced.classes == full.classes
        assert reduced.maps.dtype == torch.float32 and reduced.maps.shape == full.maps.shape
        assert torch.isfinite(reduced.maps).all()
        assert (reduced.background is None) == (full.background is None)
        if method in ("iseg", "diffsegmenter"):  # no min-max of near-flat maps to magnify float16 rounding
            torch.testing.assert_close(reduced.maps, full.maps, rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_noise_is_the_official_draw_in_the_latents_dtype(tiny_model, dtype):
    # The official code seeds and calls randn_like on the latents (on their device, in their
    # dtype); a float64 draw is not a float32 draw widened.
    segmenter = Segmenter(tiny_model, SegmenterConfig())
    noise = segmenter._noise(3, (4, 8, 8), torch.device("cpu"), dtype)
    torch.manual_seed(SegmenterConfig().noise_seed)
    official = torch.randn_like(torch.zeros(1, 4, 8, 8, dtype=dtype))
    assert noise.dtype == dtype and all(torch.equal(row, official[0]) for row in noise)


def test_float16_enhancement_rounds_once_as_the_official_in_place_multiply(half_model):
    segmenter = Segmenter(half_model, SegmenterConfig())
    embeddings, (prompt,) = segmenter.encode_prompts([[7, 17]])
    ids = half_model.tokenizer([prompt.text], padding="max_length", max_length=half_model.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        official = half_model.text_encoder(ids)[0]
        official[:, prompt.all_columns] *= SegmenterConfig().enhancement
    assert embeddings.dtype == torch.float16 and torch.equal(embeddings, official)
