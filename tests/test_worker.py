"""ShardWorker on its own (no Ray): the warm-up batch a GPU worker runs at start, busy time,
and the heap it hands back after each shard (CPU, tiny model)."""

import platform
import threading

import numpy as np
import psutil
import pytest
import torch

from conftest import FAST_CONFIG, image_tensor, synthetic_image
from pipeline.job import worker as worker_module
from pipeline.results.bench import write_benchmark_shards
from pipeline.config import load_config
from pipeline.data.shards import ShardReadError
from pipeline.job.worker import ShardWorker, release_free_memory


@pytest.fixture(scope="module")
def worker(tiny_model):
    return ShardWorker("tiny", load_config(FAST_CONFIG).model_dump_json(), device="cpu")


def _maps(worker):
    images = [image_tensor(synthetic_image(48, 64, seed)) for seed in (1, 2)]
    return [s.maps for s in worker.segmenter.segment(images, [[7, 17], [11]])]


def test_a_worker_reports_the_methods_notes_on_its_model_and_the_driver_prints_each_once(worker, tiny_model):
    from pipeline.segment.plan import note_lines

    config = load_config(FAST_CONFIG).model_copy(update={"head_layout": [8, 8, 8, 8]})
    other = ShardWorker("tiny", config.model_dump_json(), device="cpu")
    assert worker.ready()["notes"] == [] and len(other.ready()["notes"]) == 1
    lines = note_lines(note for where in [worker.ready(), other.ready(), other.ready()] for note in where["notes"])
    assert lines == [f"note: {other.segmenter.plan.notes[0]}"] and "head subsets are left out" in lines[0]


def test_cpu_worker_starts_without_warm_up(tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr(ShardWorker, "warm_up", lambda self: calls.append(self))
    ShardWorker("tiny", load_config(FAST_CONFIG).model_dump_json(), device="cpu")
    assert calls == []


def test_warm_up_runs_one_full_batch_and_changes_no_later_result(worker, monkeypatch):
    before = _maps(worker)
    batches = []
    segment = worker.segmenter.segment
    monkeypatch.setattr(worker.segmenter, "segment", lambda images, labels: batches.append(len(images))
                        or segment(images, labels))
    assert worker.warm_up() > 0.0
    assert batches == [worker.config.batch_size]
    monkeypatch.undo()
    for a, b in zip(before, _maps(worker)):  # the warm-up changes no later result
        assert torch.equal(a, b)


def test_batch_size_the_device_cannot_hold_fails_the_start_with_the_fix(worker, monkeypatch):
    def out_of_memory(images, labels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(worker.segmenter, "segment", out_of_memory)
    with pytest.raises(RuntimeError, match=r"a batch of 2 images does not fit .*: set batch_size below 2 in the config"):
        worker.warm_up()


def test_busy_time_counts_overlapping_batches_once(worker):
    worker._busy_until = 0.0
    # a batch from its launch to its results; the second overlaps the first by one second
    assert worker._busy_seconds(10.0, 12.0) == 2.0
    assert worker._busy_seconds(11.0, 13.0) == 1.0
    assert worker._busy_seconds(12.5, 12.8) == 0.0  # inside time already counted
    assert worker._busy_seconds(20.0, 21.5) == 1.5  # after an idle gap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_memory_hands_a_threads_freed_heap_back_to_the_system():
    # A thread fills its malloc arena with 64 KiB arrays (256 MiB) and frees every other one:
    # glibc keeps such holes, counted in the resident size, until the heap is trimmed.
    kept = []

    def fill():
        arrays = [np.ones(16384, np.float32) for _ in range(4096)]
        kept.extend(arrays[1::2])

    thread = threading.Thread(target=fill)
    thread.start()
    thread.join()
    before = psutil.Process().memory_info().rss
    assert release_free_memory()
    assert before - psutil.Process().memory_info().rss > 64 * 2**20  # most of the 128 MiB freed


def test_worker_releases_free_memory_after_every_shard_it_ran_unless_it_keeps_freed_memory(worker, tmp_path,
                                                                                           monkeypatch):
    releases = []
    monkeypatch.setattr(worker_module, "release_free_memory", lambda: releases.append(True))
    pattern = write_benchmark_shards(tmp_path, n_images=2, per_shard=2)
    # glibc's defaults: per-thread arenas would creep up shard after shard
    monkeypatch.setattr(worker, "trims_after_shard", True)
    result = worker.process_shard(pattern.replace("*", "000000"), "bench-000000")
    assert [row["status"] for row in result.rows] == ["ok", "ok"] and releases == [True]
    with pytest.raises(ShardReadError, match="missing.tar: FileNotFoundError"):
        worker.process_shard(str(tmp_path / "missing.tar"), "missing")
    assert releases == [True, True]  # a failed shard's memory too
    # keep-freed: one heap at its peak, which the next shard reuses
    monkeypatch.setattr(worker, "trims_after_shard", False)
    worker.process_shard(pattern.replace("*", "000000"), "bench-000000")
    assert releases == [True, True]


def test_a_worker_started_with_the_keep_freed_settings_does_not_trim(tiny_model, monkeypatch):
    from pipeline.job.allocator import KEEP_FREED_MEMORY

    config = load_config(FAST_CONFIG).model_dump_json()
    monkeypatch.setattr(worker_module, "startup_malloc_settings", lambda: dict(KEEP_FREED_MEMORY))
    assert not ShardWorker("tiny", config, device="cpu").trims_after_shard
    monkeypatch.setattr(worker_module, "startup_malloc_settings", dict)
    assert ShardWorker("tiny", config, device="cpu").trims_after_shard


def test_an_image_error_fails_the_image_and_a_programming_error_fails_the_shard(worker, tmp_path, monkeypatch):
    from pipeline.segment.segmenter import LabelError

    pattern = write_benchmark_shards(tmp_path, n_images=2, per_shard=2)
    url = pattern.replace("*", "000000")
    real_launch = worker.segmenter.launch

    def label_error_for_a_batch(images, class_lists):
        if len(images) > 1:  # the batch fails on one image's labels; alone, the first image fails
            raise LabelError("class indices [99] are outside 0..19: use the config's classes")
        return real_launch(images, class_lists)

    monkeypatch.setattr(worker.segmenter, "launch", label_error_for_a_batch)
    rows = worker.process_shard(url, "bench-000000").rows
    assert [row["status"] for row in rows] == ["ok", "ok"]  # retried one by one, both pass alone

    def shape_bug(images, class_lists):
        raise ValueError("shapes [4, 64] and [8, 64] do not match")  # a bug, not an image's fault

    monkeypatch.setattr(worker.segmenter, "launch", shape_bug)
    with pytest.raises(ValueError, match="shapes"):
        worker.process_shard(url, "bench-000000")


def test_a_compiled_worker_warms_up_every_size_a_last_batch_can_have():
    from pipeline.job.worker import warm_up_batch_sizes

    assert warm_up_batch_sizes(16, compiled=False) == [16]
    assert warm_up_batch_sizes(16, compiled=True) == [16, 15, 1]
    assert warm_up_batch_sizes(2, compiled=True) == [2, 1]
    assert warm_up_batch_sizes(1, compiled=True) == [1]


def test_shards_of_other_webdataset_tools_may_carry_png_or_jpeg_images(worker, tmp_path):
    # Any of WebDataset's image extensions; a sample with no image fails alone, saying so.
    import io

    from PIL import Image

    from pipeline.data.shards import encode_json, tar_bytes

    samples = []
    for index, extension in enumerate(("png", "jpeg", "webp", "txt")):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_image(48, 64, seed=index)).save(buffer, format="PNG" if extension == "txt" else
                                                                  {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[extension])
        samples.append({"__key__": f"img{index}", extension: buffer.getvalue(),
                        "json": encode_json({"names": ["cat"]})})
    (tmp_path / "other-000000.tar").write_bytes(tar_bytes(samples))
    result = worker.process_shard(str(tmp_path / "other-000000.tar"), "other-000000")
    assert [row["status"] for row in result.rows] == ["ok", "ok", "ok", "failed"]
    assert result.rows[3]["error"].startswith("sample 'img3' has no image (no file ending in .jpg, "
                                              ".jpeg, .png")
    assert [sample["__key__"] for sample in result.mask_samples] == ["img0", "img1", "img2"]
