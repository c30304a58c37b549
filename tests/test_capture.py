"""Capture processors: stock outputs unchanged, probabilities right, only named layers touched."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from pipeline.segment.capture import (AttentionCaptureProcessor, CaptureSpec, CapturedAttention, Record, UNetStopped,
                                      capturing, classic_attention, install_capture)
from pipeline.segment.models import load_model

SELF_LAYER = "up_blocks.3.attentions.1"
CROSS_LAYER = "down_blocks.2.attentions.0"
SPECS = [CaptureSpec(CROSS_LAYER, "cross", [0, 3, 19]), CaptureSpec(SELF_LAYER, "self", [1, 2])]


@pytest.fixture()
def fresh_model():
    return load_model("tiny", device="cpu")


def _inputs(batch=2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, 64, 64, generator=g), torch.tensor([100] * batch),
            torch.randn(batch, 77, 64, generator=g))


def _record_outputs(unet, names):
    outputs, hooks = {}, []
    for name in names:
        module = unet.get_submodule(name)
        hooks.append(module.register_forward_hook(lambda m, a, k, out, name=name: outputs.__setitem__(name, out.clone()),
                                                  with_kwargs=True))
    return outputs, hooks


@pytest.mark.parametrize("kernel", ["official", "fused"])
def test_capture_leaves_every_output_bit_identical(fresh_model, kernel):
    # fused: the same outputs as a plain (SDPA) UNet; official: as the UNet with diffusers'
    # classic attention on the captured layers, the official code's recording processor.
    unet = fresh_model.unet
    watched = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1",
               "up_blocks.3.attentions.2.transformer_blocks.0.attn2",
               f"{SELF_LAYER}.transformer_blocks.0.attn1"]
    latents, t, context = _inputs()
    with torch.inference_mode():
        outputs, hooks = _record_outputs(unet, watched)
        if kernel == "official":
            with classic_attention(unet, SPECS):
                stock = unet(latents, t, encoder_hidden_states=context).sample
        else:
            stock = unet(latents, t, encoder_hidden_states=context).sample
        stock_layers = dict(outputs)
        handle = install_capture(unet, SPECS, kernel)
        captured = unet(latents, t, encoder_hidden_states=context).sample
    for h in hooks:
        h.remove()
    assert torch.equal(stock, captured)
    for name in watched:
        assert torch.equal(stock_layers[name], outputs[name]), name
    assert set(handle.store.sums) == {f"{CROSS_LAYER}:cross", f"{SELF_LAYER}:self"}


def test_only_named_layers_get_capture_processors_and_get_theirs_back(fresh_model):
    classic = fresh_model.unet.get_submodule(f"{SELF_LAYER}.transformer_blocks.0.attn1")
    classic.set_processor(AttnProcessor())
    handle = install_capture(fresh_model.unet, SPECS)
    capturing = [n for n, m in fresh_model.unet.named_modules()
                 if isinstance(m, Attention) and isinstance(m.processor, AttentionCaptureProcessor)]
    assert capturing == [f"{CROSS_LAYER}.transformer_blocks.0.attn2", f"{SELF_LAYER}.transformer_blocks.0.attn1"]
    others = [m for m in fresh_model.unet.modules() if isinstance(m, Attention)
              and not isinstance(m.processor, AttentionCaptureProcessor)]
    assert others and all(isinstance(m.processor, AttnProcessor2_0) for m in others)
    handle.remove()
    assert not any(isinstance(m.processor, AttentionCaptureProcessor)
                   for m in fresh_model.unet.modules() if isinstance(m, Attention))
    assert isinstance(classic.processor, AttnProcessor)  # the processor it had, not a stock one


def test_classic_attention_is_undone_after_the_block(fresh_model):
    vae = fresh_model.vae
    before = [type(m.processor) for m in vae.modules() if isinstance(m, Attention)]
    with classic_attention(vae):
        assert all(isinstance(m.processor, AttnProcessor) for m in vae.modules() if isinstance(m, Attention))
    assert [type(m.processor) for m in vae.modules() if isinstance(m, Attention)] == before


def test_captured_probabilities_are_the_kept_heads_softmax(fresh_model):
    unet = fresh_model.unet
    seen = {}
    for layer, attr in ((CROSS_LAYER, "attn2"), (SELF_LAYER, "attn1")):
        module = unet.get_submodule(f"{layer}.transformer_blocks.0.{attr}")
        module.register_forward_pre_hook(
            lambda m, args, kwargs, key=layer: seen.__setitem__(key, (m, args[0] if args else kwargs["hidden_states"],
                                                                   kwargs.get("encoder_hidden_states"))),
            with_kwargs=True)
    handle = install_capture(unet, SPECS)
    latents, t, context = _inputs()
    with torch.inference_mode():
        unet(latents, t, encoder_hidden_states=context)
        for spec in SPECS:
            module, hidden, ctx = seen[spec.layer]
            ctx = hidden if ctx is None else ctx
            b, heads = hidden.shape[0], module.heads
            q = module.to_q(hidden).view(b, -1, heads, module.inner_dim // heads).transpose(1, 2)
            k = module.to_k(ctx).view(b, -1, heads, module.inner_dim // heads).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) * module.scale).softmax(dim=-1)
            expected = probs[:, spec.heads].mean(dim=1)
            key = f"{spec.layer}:{spec.kind}"
            got = handle.store.sums[key] / handle.store.heads[key]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got.sum(dim=-1), torch.ones(got.shape[:2]))


def test_official_kernel_keeps_each_head_and_averages_them_in_the_given_order(fresh_model):
    unet = fresh_model.unet
    specs = [CaptureSpec(CROSS_LAYER, "cross", [0, 3, 19], (Record(keep_heads=True),)),
             CaptureSpec("down_blocks.2.attentions.1", "cross", [2], (Record(keep_heads=True),))]
    handle = install_capture(unet, specs, "official")
    latents, t, context = _inputs()
    with torch.inference_mode():
        unet(latents, t, encoder_hidden_states=context)
    maps = handle.store.head_maps
    assert list(maps) == [f"{CROSS_LAYER}:cross", "down_blocks.2.attentions.1:cross"]
    assert list(maps[f"{CROSS_LAYER}:cross"]) == [0, 3, 19]
    order = [("down_blocks.2.attentions.1:cross", 2), (f"{CROSS_LAYER}:cross", 19),
             (f"{CROSS_LAYER}:cross", 0), (f"{CROSS_LAYER}:cross", 3)]
    pooled = handle.store.pooled_by_side([s.layer + ":cross" for s in specs], {16: order})[16]
    stacked = torch.stack([maps[key][head] for key, head in order], dim=1)
    # The official code's layout: the mean of [B, heads, keys, queries], seen as [B, queries, keys].
    assert pooled.stride()[1:] == (1, pooled.shape[1])
    assert torch.equal(pooled, stacked.transpose(-1, -2).mean(dim=1).transpose(-1, -2))
    torch.testing.assert_close(pooled.sum(dim=-1), torch.ones(pooled.shape[:2]))
    with pytest.raises(KeyError, match="names heads not recorded"):
        handle.store.pooled_by_side([s.layer + ":cross" for s in specs], {16: order + [(f"{CROSS_LAYER}:cross", 5)]})


def test_the_layer_the_unet_stops_at_scores_only_its_kept_heads_and_keeps_their_bits(fresh_model, monkeypatch):
    # Early exit: nothing reads the last layer's output, so the official kernel computes the
    # scores and softmax of its kept heads only; each kept map is the same bits as with all heads.
    unet = fresh_model.unet
    specs = [CaptureSpec(SELF_LAYER, "self", [1, 2], (Record(keep_heads=True),))]
    scored = []
    original = Attention.get_attention_scores
    monkeypatch.setattr(Attention, "get_attention_scores",
                        lambda self, query, key, mask=None: scored.append(query.shape[0]) or original(self, query, key, mask))
    latents, t, context = _inputs(batch=2)
    maps = {}
    with torch.inference_mode():
        for stop in (False, True):
            scored.clear()
            with capturing(unet, specs, "official", stop_early=stop) as store:
                try:
                    unet(latents, t, encoder_hidden_states=context)
                except UNetStopped:
                    assert stop
                maps[stop] = dict(store.head_maps[f"{SELF_LAYER}:self"])
            # the captured layer is the only classic one here: batch 2 x its heads
            assert scored == ([2 * 2] if stop else [2 * unet.get_submodule(SELF_LAYER).transformer_blocks[0].attn1.heads])
    assert list(maps[True]) == [1, 2]
    for head in (1, 2):
        assert torch.equal(maps[True][head], maps[False][head])


def test_row_major_head_mean_sums_left_to_right_and_equals_the_key_major_mean_for_two_heads():
    store = CapturedAttention()
    torch.manual_seed(0)
    heads = [torch.rand(2, 16, 16).softmax(dim=-1) for _ in range(3)]
    store.add_head_maps("two:self", dict(enumerate(heads[:2])))
    store.add_head_maps("three:self", dict(enumerate(heads)))
    key_major = store.pooled_by_side(["two:self"])[4]
    row_major = store.pooled_by_side(["two:self"], key_major=False)[4]
    assert row_major.is_contiguous() and not key_major.is_contiguous()
    assert torch.equal(row_major, key_major)  # a mean of two rounds once, whatever the layout
    three = store.pooled_by_side(["three:self"], key_major=False)[4]
    assert three.is_contiguous()
    assert torch.equal(three, (heads[0] + heads[1] + heads[2]) / 3)
    assert torch.equal(store.head_maps["three:self"][0], heads[0])  # the kept maps are not summed into


def test_float16_head_maps_are_kept_and_averaged_in_float16_as_torchs_float16_mean():
    # A float16 model (a GPU) records float16 probabilities; the official code averages them in
    # float16 (torch sums in float32 and rounds once), and so must both layouts here.
    store = CapturedAttention()
    torch.manual_seed(1)
    heads = [torch.rand(1, 64, 64).softmax(dim=-1).half() for _ in range(3)]
    store.add_head_maps("a:self", dict(enumerate(heads)))
    assert store.head_maps["a:self"][0].dtype == torch.float16
    official = torch.stack(heads, dim=1).mean(dim=1)  # the official `values.mean(1)` in float16
    for key_major in (True, False):
        mean = store.pooled_by_side(["a:self"], key_major=key_major)[8]
        assert mean.dtype == torch.float16 and torch.equal(mean, official)
    sequential_in_float16 = (heads[0] + heads[1] + heads[2]) / 3
    assert not torch.equal(sequential_in_float16, official)  # what rounding at every step would give


def test_pooled_by_side_is_the_mean_over_all_kept_heads():
    store = CapturedAttention()
    store.add("a", torch.full((1, 4, 3), 6.0), 3)   # three heads summing to 6 -> mean 2
    store.add("b", torch.full((1, 4, 3), 1.0), 1)   # one head of 1
    store.add("c", torch.full((1, 16, 3), 4.0), 2)
    pooled = store.pooled_by_side(["a", "b", "c"])
    assert sorted(pooled) == [2, 4]
    torch.testing.assert_close(pooled[2], torch.full((1, 4, 3), 7.0 / 4))
    torch.testing.assert_close(pooled[4], torch.full((1, 16, 3), 2.0))


def test_bad_layer_names_and_heads_are_clear_errors(fresh_model):
    with pytest.raises(ValueError, match="not in the UNet; layers with attention: .*up_blocks.3.attentions.1"):
        install_capture(fresh_model.unet, [CaptureSpec("up_blocks.9.attentions.0", "cross")])
    with pytest.raises(ValueError, match="has 5 heads; head index 7 does not exist: give heads 0..4 in the config"):
        install_capture(fresh_model.unet, [CaptureSpec(SELF_LAYER, "self", [7])])


@pytest.mark.parametrize("update, key", [
    ({"method": "goca", "goca": {"reference_layer": "up_blocks.0.attentions.0"}},  # SD's up block 0 has none
     "goca.reference_layer"),
    ({"self_attention": {"layers": [{"name": "up_blocks.3.attentions.1.transformer_blocks.0"}]}},
     "self_attention.layers.0"),
    ({"classic_attention_layers": ["mid_block.attentions.1:self"]}, "classic_attention_layers.0"),
])
def test_a_config_naming_a_layer_the_unet_lacks_fails_as_the_segmenter_is_built(fresh_model, update, key):
    from pipeline.config import ConfigError, SegmenterConfig
    from pipeline.segment.segmenter import Segmenter

    config = SegmenterConfig.model_validate(SegmenterConfig().model_dump() | update)
    with pytest.raises(ConfigError, match=rf"^config key {key}: layer '.*' is not in the UNet; layers with attention: "
                                          r"down_blocks.0.attentions.0, .*: name one of those$"):
        Segmenter(fresh_model, config)
    # a method is held only to the layers it reads: GoCA's do not concern iSeg
    Segmenter(fresh_model, SegmenterConfig.model_validate({"goca": {"reference_layer": "up_blocks.0.attentions.0"}}))


@pytest.mark.parametrize("update, message", [
    ({"cross_attention": {"resolution_weights": {16: 1.0}}},
     "cross_attention.resolution_weights has no weight for side 32, which cross_attention.layers read: add `32: "
     "<weight>` to it, or name layers of the sides it weighs"),
    ({"self_attention": {"layers": [{"name": "up_blocks.3.attentions.1"}, {"name": "up_blocks.2.attentions.1"}]}},
     "self_attention.layers must share one resolution, but up_blocks.3.attentions.1 is 64 px, "
     "up_blocks.2.attentions.1 is 32 px: name layers of one side"),
    ({"method": "goca", "goca": {"propagation_layers": ["up_blocks.3.attentions.0", "up_blocks.2.attentions.0"]}},
     "goca.propagation_layers must share one resolution, but up_blocks.3.attentions.0 is 64 px, "
     "up_blocks.2.attentions.0 is 32 px: name layers of one side"),
    ({"method": "diffsegmenter", "diffsegmenter": {"resolution_weights": {64: 1.0}}},
     "diffsegmenter.resolution_weights has no weight for side 8, 16, 32, which DiffSegmenter's layers (every "
     "attention layer) read: add `8: <weight>` to it"),
])
def test_layers_a_method_cannot_combine_fail_as_the_segmenter_is_built(fresh_model, update, message):
    # each failed at the first image before (a ValueError or a tensor size mismatch), every image of a job
    from pipeline.config import ConfigError, SegmenterConfig
    from pipeline.segment.segmenter import Segmenter

    with pytest.raises(ConfigError) as error:
        Segmenter(fresh_model, SegmenterConfig.model_validate(SegmenterConfig().model_dump() | update))
    assert str(error.value) == message
