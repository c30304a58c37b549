"""`compile: true`: the VAE encoder's and the UNet's attention-free blocks compiled, in the model
only while its segmenter runs. The inductor test compiles for about a minute on a CPU, so it is
marked `compile` and left out of the default run: `python -m pytest -q -m compile`."""

import pytest
import torch

from conftest import FAST_CONFIG, image_tensor, synthetic_image
from pipeline.config import load_config
from pipeline.job.runner import config_hash
from pipeline.segment.models import COMPILED_BLOCKS, CompiledBlocks, load_model
from pipeline.segment.segmenter import Segmenter


def _images():
    return [image_tensor(synthetic_image(48, 64, seed=3)), image_tensor(synthetic_image(64, 48, seed=4))]


def _block_types(model) -> list[str]:
    return [type(m).__name__ for root in (model.vae.encoder, model.unet) for m in root.modules()]


def test_compiled_blocks_are_in_the_model_only_while_its_segmenter_runs():
    model = load_model("tiny", device="cpu", dtype=torch.float32)
    config = load_config(FAST_CONFIG)
    eager = Segmenter(model, config).segment(_images(), [[2, 14], [7]])
    compiled = Segmenter(model, config.model_copy(update={"compile": True}))
    compiled.compiled = CompiledBlocks(model, backend="eager")  # the swap without inductor's minute
    assert len(compiled.compiled.swaps) == sum(t in COMPILED_BLOCKS for t in _block_types(model)) > 20
    seen_inside = []
    hook = model.unet.conv_in.register_forward_hook(lambda *args: seen_inside.append(_block_types(model)))
    results = compiled.segment(_images(), [[2, 14], [7]])
    hook.remove()
    assert "OptimizedModule" in seen_inside[0]  # compiled stand-ins during the forward
    assert "OptimizedModule" not in _block_types(model)  # the eager blocks back afterwards
    for a, b in zip(eager, results):
        assert torch.equal(a.maps, b.maps)
    again = Segmenter(model, config).segment(_images(), [[2, 14], [7]])
    assert all(torch.equal(a.maps, b.maps) for a, b in zip(eager, again))


def test_compile_is_a_run_setting_outside_the_config_hash():
    config = load_config(FAST_CONFIG)
    assert config_hash(config, "tiny") == config_hash(config.model_copy(update={"compile": True}), "tiny")


@pytest.mark.compile
def test_inductor_maps_equal_the_eager_maps_within_rounding():
    model = load_model("tiny", device="cpu", dtype=torch.float32)
    config = load_config(FAST_CONFIG)
    eager = Segmenter(model, config).segment(_images(), [[2, 14], [7]])
    compiled = Segmenter(model, config.model_copy(update={"compile": True})).segment(_images(), [[2, 14], [7]])
    for a, b in zip(eager, compiled):
        # inductor fuses group norms and activations (another summation order); random weights
        # magnify the last bits through the near-uniform attention: measured 6e-5 relative
        assert float((a.maps - b.maps).abs().max() / a.maps.abs().max()) < 1e-3
        assert (a.maps.argmax(0) == b.maps.argmax(0)).float().mean() >= 0.99


@pytest.mark.compile
def test_bench_prints_the_compiled_segmenter_and_its_first_batch(capsys):
    import re

    from pipeline.cli import main

    assert main(["bench", "--model", "tiny", "--config", FAST_CONFIG, "--device", "cpu", "--num-images", "2",
                 "--batch-sizes", "2", "--no-pipeline"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"compiled +\d+\.\d+ images/s \(the segmenter with compile true: compiled/bare=\d+\.\d\d; "
                     r"its first batches took \d+\.\d s against \d+\.\d s eager", out)
    assert re.fullmatch(r"segmenter/bare=\d+\.\d\d pipeline/bare=n/a", out.strip().splitlines()[-1])
