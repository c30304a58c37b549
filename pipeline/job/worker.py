"""One shard through the segmenter: decode -> batch -> segment -> post-process -> samples + rows.

`ShardWorker` is the stateful class that a Ray actor wraps (one per GPU or CPU slot): it loads
the model once and then processes whole shards. Decoding runs in a prefetch thread and
post-processing (upsampling, background rule, CRF, PNG encoding, statistics) is handed to a
`finish` callable (Ray CPU tasks in a job), so the model never waits on either. A job runs
two shards at a time on each worker (a threaded actor): while one waits for its post-processing
the other feeds the model; a lock keeps the segmenter to launching one batch at a time, and a
batch is waited for outside it, so one shard's batch runs on the GPU while the other shard's
next batch is queued behind it. A bad image or label fails that image only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import ImageError
from pipeline.job.allocator import allocator_of, startup_malloc_settings
from pipeline.config import ConfigError, SegmenterConfig
from pipeline.mask.codec import ImageDecodeError, decode_image, encode_confidence, encode_mask
from pipeline.mask.postprocess import finish_mask
from pipeline.data.safe_paths import UnsafeKeyError, check_key
from pipeline.data.shards import encode_json, input_fingerprint, read_shard, sample_classes, sample_image
from pipeline.mask.stats import failed_row, mask_statistics
from pipeline.segment.segmenter import ClassScores, Segmenter


# Images per post-processing task: with CRF on (about a second of CPU per image) a batch's
# images spread over that many tasks, and so over the CPUs.
FINISH_CHUNK = 4


@dataclass
class FinishItem:
    """What post-processing needs for one image (picklable, small)."""

    id: str
    jpg: bytes
    maps: np.ndarray  # float32 [C, s, s]
    classes: list[int]
    refinement_delta: float
    model_seconds: float
    background: np.ndarray | None = None  # float32 [s, s] for methods that score the background


def finish_images(config_json: str, shard: str, items: list[FinishItem]) -> list[tuple[str, dict, dict]]:
    """Post-process images: (id, {"png": mask PNG, "conf.png": confidence PNG}, statistics row) each."""
    config = SegmenterConfig.model_validate_json(config_json)
    out = []
    for item in items:
        start = time.perf_counter()
        image = decode_image(item.jpg, item.id, config.max_image_pixels)
        background = torch.tensor(item.background) if item.background is not None else None
        result = finish_mask(torch.tensor(item.maps), item.classes, image, config, background)
        files = {"png": encode_mask(result.labels), "conf.png": encode_confidence(result.confidence)}
        row = {"id": item.id, "shard": shard, "status": "ok", "error": None,
               **mask_statistics(result, config.class_names), "refinement_delta": item.refinement_delta}
        row["seconds"] = item.model_seconds + time.perf_counter() - start
        out.append((item.id, files, row))
    return out


def start_post_processing_worker() -> int:
    """A no-op whose only effect is that the Ray worker running it imports this module (and
    torch) now, while the segmenter workers load their model, instead of during the first
    post-processing task. Returns the worker's pid."""
    return os.getpid()


@dataclass
class ShardResult:
    """A processed shard: mask samples (ok images, input order) and one row per image."""

    shard: str
    mask_samples: list[dict]
    rows: list[dict]
    peak_rss_mb: float = 0.0  # the worker process's peak resident memory so far
    peak_device_mb: float = 0.0  # the worker's peak accelerator memory so far (0 on CPU)
    model_seconds: float = 0.0  # wall time the segmenter ran this shard's batches (overlaps counted once)
    queueing_seconds: float = 0.0  # of which the host spent queueing them (all of it on a CPU)
    input_fingerprint: dict | None = None  # the shard file read (`shards.input_fingerprint`)

    @property
    def failed(self) -> int:
        return sum(row["status"] != "ok" for row in self.rows)

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(id, error) of each failed image, in shard order."""
        return [(row["id"], row["error"]) for row in self.rows if row["status"] != "ok"]


def warm_up_batch_sizes(batch_size: int, compiled: bool) -> list[int]:
    """The batch sizes a worker warms up with: the configured one; compiled, also one smaller
    size (torch.compile then makes the batch dimension dynamic, which covers 2 .. batch_size)
    and 1 (a size torch always compiles on its own), so that no shard's last batch compiles."""
    if not compiled:
        return [batch_size]
    return [batch_size] + ([batch_size - 1] if batch_size > 2 else []) + ([1] if batch_size > 1 else [])


@dataclass
class SegmentedImage:
    """One image of a batch after the model: its class scores, or the error that failed it."""

    key: str
    sample: dict
    seconds: float  # the image's share of its batch's model time
    scores: ClassScores | None = None
    error: str | None = None  # "Type: message", set instead of scores


@dataclass
class ModelClock:
    """Seconds of a shard's batches: model, from launch to results (overlaps with the other
    shard's batches counted once); queueing, the host launching them (Segmenter.launch). On
    a GPU, queueing close to model means the host, not the GPU, sets the pace."""

    model: float = 0.0
    queueing: float = 0.0


class ShardPrefetch:
    """Samples of a shard decoded in a background thread: iterating yields (sample, image or
    exception); a sample whose key is unsafe (`safe_paths.check_key`) is not decoded, its
    exception says why. Once the iteration ends, `input_fingerprint` holds the sha256 of the
    bytes read (hashed by the same thread as it reads them) and, for a local file, its size and
    time (`shards.input_fingerprint`)."""

    def __init__(self, url: str, depth: int, max_pixels: int | None = None):
        self.url, self.depth, self.max_pixels = url, depth, max_pixels
        self.input_fingerprint: dict | None = None

    def _produce(self, buffer: queue.Queue, done: object) -> None:
        try:
            digest = hashlib.sha256()
            for sample in read_shard(self.url, digest):
                try:
                    key = check_key(sample["__key__"])
                    image = decode_image(sample_image(sample), f"image {key}", self.max_pixels)
                except (ImageDecodeError, UnsafeKeyError) as exc:
                    image = exc
                buffer.put((sample, image))
            self.input_fingerprint = input_fingerprint(self.url, digest.hexdigest())
        except BaseException as exc:  # a broken shard: surface it in the consumer
            buffer.put(exc)
        buffer.put(done)

    def __iter__(self):
        done = object()
        buffer: queue.Queue = queue.Queue(maxsize=self.depth)
        threading.Thread(target=self._produce, args=(buffer, done), daemon=True).start()
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class ShardWorker:
    """A loaded segmenter that processes whole shards."""

    def __init__(self, model_spec: str, config_json: str, device: str | None = None, threads: int | None = None):
        from pipeline.segment.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.config_json = config_json
        self.model = load_model(model_spec, device=device)
        config = SegmenterConfig.model_validate_json(config_json)
        self.config = config.model_copy(update={"batch_size": config.batch_size_on(self.model.device.type)})
        self.segmenter = Segmenter(self.model, self.config)
        self._model_lock = threading.Lock()  # one batch launched at a time when shards run concurrently
        self._images_seen: dict[str, int] = {}  # shard in progress -> images segmented or failed so far
        self._busy_lock = threading.Lock()
        self._busy_until = 0.0  # when the last batch waited for finished (perf_counter seconds)
        # A process that keeps freed memory (a CPU worker's default) holds one heap at its peak;
        # trimming it after a shard only makes the next shard fault it in again.
        self.trims_after_shard = allocator_of(startup_malloc_settings()) != "keep-freed"
        if self.model.device.type == "cuda" or self.config.compile:
            self.warm_up()

    def warm_up(self) -> float:
        """Run batches of blank images (`warm_up_batch_sizes`) and return their seconds.

        A GPU pays one-time costs on its first batch (kernel loading, convolution and
        attention plan selection: seconds); paid here, they belong to the worker's start
        like the model load, and a batch size the device cannot hold fails the start with a
        clear error instead of failing shards. With `compile` on, the first batch of each size
        compiles the model's blocks: paid here too, once per worker, for every size a shard's
        last batch can have. CPU workers skip it otherwise: they have no such costs and a
        full-size batch takes a minute there."""
        blank = torch.full((3, 375, 500), 128, dtype=torch.uint8)
        start = time.perf_counter()
        for size in warm_up_batch_sizes(self.config.batch_size, self.config.compile):
            try:
                self.segmenter.segment([blank] * size, [[0]] * size)
            except torch.OutOfMemoryError as exc:
                raise RuntimeError(f"a batch of {size} images does not fit in the memory of {self.model.device}: "
                                   f"set batch_size below {size} in the config") from exc
        return time.perf_counter() - start

    def ready(self) -> dict:
        """Where this worker runs: pid, device, its node (`node_id`), the glibc allocator
        settings its process started with (`startup_malloc_settings`), its batch size, its
        torch CPU threads, and the method's notes on this model (`Plan.notes`)."""
        return {"pid": os.getpid(), "device": str(self.model.device), "node": self.node_id(),
                "malloc": startup_malloc_settings(), "batch_size": self.config.batch_size,
                "threads": torch.get_num_threads(), "notes": list(self.segmenter.notes)}

    # What a job runner (job/runner.py) overrides to run the worker as a Ray actor.

    def node_id(self) -> str | None:
        """The cluster node this worker runs on (None in-process)."""
        return None

    def submit_finish(self, config_json: str, shard: str, items: list["FinishItem"]):
        """Start the post-process of items; returns a handle for `collect` (here: the result)."""
        return finish_images(config_json, shard, items)

    def collect(self, handle) -> list[tuple[str, dict, dict]]:
        """The result of a `submit_finish` handle."""
        return handle

    def on_device_failure(self, exc: BaseException, shard: str) -> None:
        """Called when a shard fails with an error that leaves the device unusable
        (`is_device_failure`); in-process the error propagates."""

    def _segment(self, batch: list[tuple[str, dict, np.ndarray, list[int]]], clock: ModelClock):
        """Run one batch; when the batch fails on one image's prompt, run images alone so
        only that image fails. Yields a SegmentedImage per image; adds the batch's times to clock.

        The batch is launched under the model lock and waited for outside it: on a GPU the
        other shard's thread queues its next batch while this one runs, so the device does
        not idle between batches while the host prepares and launches the next one."""
        images = [torch.from_numpy(image).permute(2, 0, 1) for _, _, image, _ in batch]
        try:
            with self._model_lock:
                start = time.perf_counter()
                pending = self.segmenter.launch(images, [classes for *_, classes in batch])
                clock.queueing += time.perf_counter() - start
            scores = pending.wait()
            model_seconds = self._busy_seconds(start, time.perf_counter())
            clock.model += model_seconds
        except ImageError as exc:  # one image's fault: it fails alone; anything else fails the shard
            if len(batch) == 1:
                key, sample, _, _ = batch[0]
                yield SegmentedImage(key, sample, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
                return
            for one in batch:
                yield from self._segment([one], clock)
            return
        for (key, sample, _, _), score in zip(batch, scores):
            yield SegmentedImage(key, sample, model_seconds / len(batch), scores=score)

    def _busy_seconds(self, start: float, end: float) -> float:
        """Seconds of [start, end] (a batch from its launch to its results) not already counted
        for an earlier batch: batches of the two shards in flight overlap on the device."""
        with self._busy_lock:
            seconds = max(0.0, end - max(start, self._busy_until))
            self._busy_until = max(self._busy_until, end)
        return seconds

    def process_shard(self, url: str, shard: str) -> ShardResult:
        """Process every sample of a shard, post-processing through `submit_finish`. A device
        failure (CUDA error, out of memory) goes to `on_device_failure` before it propagates.
        Either way the C heap the shard freed goes back to the system, unless this process
        keeps freed memory for reuse (`trims_after_shard`)."""
        self._images_seen[shard] = 0
        try:
            return self._process_shard(url, shard)
        except Exception as exc:
            if is_device_failure(exc):
                self.on_device_failure(exc, shard)
            raise
        finally:
            self._images_seen.pop(shard, None)
            if self.trims_after_shard:
                release_free_memory()

    def progress(self) -> dict[str, int]:
        """Images of each shard in progress that were segmented or failed so far (the driver's
        progress bar polls it between shard results)."""
        return dict(self._images_seen)

    def _process_shard(self, url: str, shard: str) -> ShardResult:
        pending, rows = [], {}
        order: list[str] = []
        batch: list[tuple[str, dict, np.ndarray, list[int]]] = []
        clock = ModelClock()

        def flush():
            items = []
            for image in self._segment(batch, clock):
                if image.scores is None:
                    rows[image.key] = failed_row(image.key, shard, image.error)
                    continue
                scores = image.scores
                background = scores.background.numpy() if scores.background is not None else None
                items.append(FinishItem(image.key, sample_image(image.sample), scores.maps.numpy(), scores.classes,
                                        scores.refinement_delta, image.seconds, background))
            for index in range(0, len(items), FINISH_CHUNK):  # small tasks spread CRF over the CPUs
                pending.append(self.submit_finish(self.config_json, shard, items[index : index + FINISH_CHUNK]))
            self._images_seen[shard] += len(batch)  # segmented (on a GPU: launched and waited for)
            batch.clear()

        samples = ShardPrefetch(url, 2 * self.config.batch_size, self.config.max_image_pixels)
        for sample, image in samples:
            key = sample["__key__"]
            order.append(key)
            if isinstance(image, Exception):
                rows[key] = failed_row(key, shard, str(image))
                self._images_seen[shard] += 1
                continue
            try:
                classes = sample_classes(sample, self.config)
            except ConfigError as exc:
                rows[key] = failed_row(key, shard, str(exc), height=image.shape[0], width=image.shape[1])
                self._images_seen[shard] += 1
                continue
            batch.append((key, sample, image, classes))
            if len(batch) == self.config.batch_size:
                flush()
        if batch:
            flush()

        masks = {}
        for handle in pending:
            for key, files, row in self.collect(handle):
                masks[key] = files
                rows[key] = row
        mask_samples = [{"__key__": k, **masks[k], "json": encode_json(rows[k])} for k in order if k in masks]
        return ShardResult(shard=shard, mask_samples=mask_samples, rows=[rows[k] for k in order],
                           peak_rss_mb=peak_rss_mb(), peak_device_mb=peak_device_mb(self.model.device),
                           model_seconds=clock.model, queueing_seconds=clock.queueing,
                           input_fingerprint=samples.input_fingerprint)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc's malloc_trim(0)); False
    where the C library cannot. A shard's decoded images and results are freed when it ends,
    but glibc keeps freed memory in the arenas of the threads that used it, so without this a
    worker's resident memory creeps up shard after shard. Takes milliseconds."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_device_mb(device: torch.device) -> float:
    """Peak memory allocated by torch on a CUDA device in MiB (0 elsewhere)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def is_device_failure(exc: BaseException) -> bool:
    """Whether an exception leaves the accelerator unusable for this process (out of memory,
    CUDA / accelerator errors)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and ("CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc))
