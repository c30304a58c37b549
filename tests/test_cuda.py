"""The CUDA-only paths: pinned copies, the results' event, a batch queued without the host
waiting, compiled blocks on the GPU, a job on a GPU worker. Skipped without a GPU; on a GPU machine run them with
`jobs/gpu_bench.sh cudatests` (or `python -m pytest tests/test_cuda.py`)."""

import os

import pytest
import torch

from conftest import FAST_CONFIG, image_tensor, synthetic_image
from pipeline.config import SegmenterConfig, load_config
from pipeline.segment.models import load_model
from pipeline.segment.segmenter import Segmenter
from pipeline.segment.transfer import stack_to_device, start_copy_to_host, to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch():
    """Five decoded-like images of two sizes with 1-3 labels each."""
    sizes = [(96, 128), (128, 96), (96, 128), (128, 96), (96, 128)]
    images = [image_tensor(synthetic_image(h, w, seed=i)) for i, (h, w) in enumerate(sizes)]
    return images, [[7, 17], [0], [10, 15, 19], [14], [3, 8]]


def _queue_seconds_of_gpu_work(device: str = "cuda") -> torch.Tensor:
    """Queue about two seconds of matmuls on device's current stream (a fraction of a ms of
    host time); returns their last product, [8192, 8192], ready when they are done."""
    square = torch.randn(8192, 8192, device=device) / 8192**0.5
    product = torch.empty_like(square)
    for _ in range(100):
        torch.matmul(square, square, out=product)
    return product


def test_small_tensors_reach_the_device_and_results_come_back_through_pinned_memory():
    device = torch.device("cuda")
    indices = torch.arange(1000, dtype=torch.int64)
    assert torch.equal(to_device(indices, device).cpu(), indices)
    result = _queue_seconds_of_gpu_work().sum(dim=0)  # the copy has to wait for the matmuls
    host, wait = start_copy_to_host(result)
    assert host.device.type == "cpu" and host.is_pinned()
    wait()
    got = host.clone()  # before anything else waits for the device
    torch.testing.assert_close(got, result.cpu())


def test_images_cross_to_the_device_without_waiting_for_queued_work():
    images = [torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8) for _ in range(32)]  # 18 MB
    stack_to_device(images, torch.device("cuda"))  # the pinned block is allocated once
    torch.cuda.synchronize()
    _queue_seconds_of_gpu_work()
    stacked = stack_to_device(images, torch.device("cuda"))
    assert not torch.cuda.current_stream().query(), "the host waited for the queued matmuls"
    assert torch.equal(stacked.cpu(), torch.stack(images))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_the_results_event_waits_for_a_copy_from_a_device_that_is_not_the_current_one():
    with torch.cuda.device(0):
        result = _queue_seconds_of_gpu_work("cuda:1").sum(dim=0)
        host, wait = start_copy_to_host(result)
        wait()
        got = host.clone()  # before anything else waits for cuda:1
    torch.testing.assert_close(got, result.cpu())


@pytest.fixture(scope="module")
def cuda_segmenter():
    return Segmenter(load_model("tiny", device="cuda", dtype=torch.float32), SegmenterConfig())


def test_a_batch_is_queued_without_the_host_waiting_for_the_gpu(cuda_segmenter):
    images, labels = _batch()
    # prompts, noise and kept-head indices are made once per process, in the first batch
    expected = cuda_segmenter.segment(images, labels)
    torch.cuda.set_sync_debug_mode("error")  # any call that synchronises raises
    try:
        pending = cuda_segmenter.launch(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = pending.wait()
    for want, have in zip(expected, got):
        assert have.classes == want.classes
        torch.testing.assert_close(have.maps, want.maps)


def test_a_batch_is_queued_behind_running_work_without_waiting_for_it(cuda_segmenter):
    # what a worker does: the next batch is launched while the last one runs; copies staged by
    # the driver (pageable memory) could wait without counting as a sync in the debug mode
    images, labels = _batch()
    cuda_segmenter.segment(images, labels)
    torch.cuda.synchronize()
    _queue_seconds_of_gpu_work()
    pending = cuda_segmenter.launch(images, labels)
    assert not torch.cuda.current_stream().query(), "launch waited for the work queued before it"
    assert [s.classes for s in pending.wait()] == [sorted(set(x)) for x in labels]


def test_batches_launched_ahead_on_the_gpu_give_their_own_results(cuda_segmenter):
    images, labels = _batch()
    first, second = (images[:2], labels[:2]), (images[2:], labels[2:])
    expected = [cuda_segmenter.segment(*first), cuda_segmenter.segment(*second)]
    pending = [cuda_segmenter.launch(*first), cuda_segmenter.launch(*second)]
    got = [pending[1].wait(), pending[0].wait()][::-1]
    for want_batch, got_batch in zip(expected, got):
        for want, have in zip(want_batch, got_batch):
            assert have.classes == want.classes
            torch.testing.assert_close(have.maps, want.maps)
            assert have.refinement_delta == pytest.approx(want.refinement_delta, rel=1e-5)


def test_the_gpu_gives_the_cpu_results_in_float64():
    # float64 so that the only differences are rounding far below k-means' near-ties
    images, labels = _batch()
    on_cpu = Segmenter(load_model("tiny", device="cpu", dtype=torch.float64), SegmenterConfig())
    on_gpu = Segmenter(load_model("tiny", device="cuda", dtype=torch.float64), SegmenterConfig())
    wanted = on_cpu.segment(images, labels)
    # the CPU's noise on the GPU too: a GPU's generator draws other numbers, as the official code's does
    for (shape, _, dtype), noise in on_cpu._noise_cache.items():
        on_gpu._noise_cache[(shape, torch.device("cuda", torch.cuda.current_device()), dtype)] = noise.cuda()
    for want, have in zip(wanted, on_gpu.segment(images, labels)):
        assert have.classes == want.classes
        torch.testing.assert_close(have.maps, want.maps, rtol=1e-4, atol=1e-7)
        assert have.refinement_delta == pytest.approx(want.refinement_delta, rel=1e-4)


def test_compiled_blocks_on_the_gpu_give_the_eager_maps_within_rounding():
    model = load_model("tiny", device="cuda", dtype=torch.float32)
    images, labels = _batch()
    config = load_config(FAST_CONFIG)
    eager = Segmenter(model, config).segment(images, labels)
    compiled = Segmenter(model, config.model_copy(update={"compile": True})).segment(images, labels)
    for a, b in zip(eager, compiled):
        assert float((a.maps - b.maps).abs().max() / a.maps.abs().max()) < 1e-3
        assert (a.maps.argmax(0) == b.maps.argmax(0)).float().mean() >= 0.99


def test_a_job_on_a_gpu_worker_writes_every_mask(tmp_path):
    import ray

    from pipeline.results.bench import write_benchmark_shards
    from pipeline.job.runner import run_job

    pattern = write_benchmark_shards(tmp_path / "shards", 12, 4)
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        summary = run_job(pattern, tmp_path / "out", load_config(FAST_CONFIG), "tiny",
                          workers=1, progress=False)
    finally:
        ray.shutdown()
    assert (summary.images_ok, summary.images_failed, summary.shards_done) == (12, 0, 3)
    assert 0.0 < summary.model_seconds <= summary.processing_seconds
    assert 0.0 < summary.queueing_seconds <= summary.model_seconds * 1.05
    assert summary.peak_worker_device_mb > 0  # the worker's model was on the GPU
    assert len(list((tmp_path / "out" / "masks").glob("*.tar"))) == 3


def test_the_gpu_noise_is_the_official_gpu_draw():
    # the official code: torch.cuda.manual_seed(seed); torch.randn_like(latents) on the GPU, in float16
    segmenter = Segmenter(load_model("tiny", device="cuda"), SegmenterConfig())
    device = torch.device("cuda", torch.cuda.current_device())
    noise = segmenter._noise(2, (4, 64, 64), device, torch.float16)
    torch.cuda.manual_seed(SegmenterConfig().noise_seed)
    official = torch.randn_like(torch.zeros(1, 4, 64, 64, device=device, dtype=torch.float16))
    assert torch.equal(noise[0], official[0]) and torch.equal(noise[1], official[0])
