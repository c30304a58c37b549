"""What a job did, for the CLI and the bench: counts, rates, the failed images by id, and the
interruption that stops a job on a signal. No Ray, no torch: the CLI imports it to answer fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.data.safe_paths import key_problem


class JobInterrupted(Exception):
    """The job was stopped by a signal (SIGINT, SIGTERM) after marking its shards in flight
    interrupted; summary holds what was done."""

    def __init__(self, signum: int, summary: JobSummary, interrupted: list[str]):
        super().__init__(f"stopped by signal {signum}")
        self.signum, self.summary, self.interrupted = signum, summary, interrupted


NAMES_SHOWN = 5


def name_first(ids: list[str], total: int) -> str:
    """The first NAMES_SHOWN of `total` image ids or shard names for one output line ("a, b
    and 3 more"); an id that is not a safe key is quoted, so a crafted one cannot break the line."""
    shown = [repr(i) if key_problem(i) else i for i in ids[:NAMES_SHOWN]]
    more = total - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def workers_line(started_on: list[dict], configured: int | str) -> str:
    """One line on the segmenter workers from their `ready()` reports: how many on which
    devices and nodes, a CPU worker's torch threads, and the batch size each runs
    (`configured`: the config's batch_size)."""
    devices = sorted({where["device"] for where in started_on})
    nodes = len({where["node"] for where in started_on})
    sizes = ", ".join(str(size) for size in sorted({where["batch_size"] for where in started_on}))
    threads = ", ".join(str(n) for n in sorted({where["threads"] for where in started_on if where["device"] == "cpu"}))
    return (f"{len(started_on)} segmenter worker(s) on {', '.join(devices)}"
            + (f" over {nodes} nodes" if nodes > 1 else "") + (f" ({threads} torch threads each)" if threads else "")
            + f"; {sizes} image(s) per batch" + (" (batch_size: auto)" if configured == "auto" else ""))


def fewer_workers_line(asked: int | None, started: int, shards: int) -> str | None:
    """The line saying why fewer workers start than --workers asked: one works a shard at a
    time, so a job starts no more than it has shards to do. None where nothing was cut."""
    if asked is None or started >= asked:
        return None
    return (f"--workers {asked}: starting {started}, one for each of the {shards} shard(s) to do (a shard goes to one "
            "worker: shard with a smaller --shard-size for more)")


@dataclass
class JobSummary:
    shards_done: int
    shards_failed: int
    shards_skipped: int
    images_ok: int
    images_failed: int
    seconds: float
    processing_seconds: float = 0.0  # from the workers being ready (model loaded, GPU warmed up) to the end
    peak_worker_rss_mb: float = 0.0
    peak_worker_device_mb: float = 0.0
    workers: int = 0
    worker_nodes: int = 0  # Ray nodes the workers started on
    model_seconds: float = 0.0  # summed over workers: wall time their segmenter ran batches
    queueing_seconds: float = 0.0  # of which their host threads spent queueing the batches
    failed_ids: list[str] = field(default_factory=list)  # the first NAMES_SHOWN failed images
    first_error: str | None = None  # the error of the first of them

    def add_failed(self, failures: list[tuple[str, str]]) -> None:
        """Note a shard's failed images, (id, error) each."""
        self.failed_ids.extend(key for key, _ in failures[: max(0, NAMES_SHOWN - len(self.failed_ids))])
        if failures and self.first_error is None:
            self.first_error = failures[0][1]

    @property
    def failed_lines(self) -> list[str]:
        """The failed images, the first few by id, and the first one's error (none when none failed)."""
        if not self.images_failed:
            return []
        return [f"failed images: {name_first(self.failed_ids, self.images_failed)} (errors in stats/, status column "
                "'failed')"] + ([f"  {self.failed_ids[0]}: {self.first_error}"] if self.first_error else [])

    @property
    def succeeded(self) -> bool:
        """No shard failed, and some image got a mask unless none was segmented (the exit status 0)."""
        return not self.shards_failed and (self.images_ok > 0 or not self.images_failed)

    @property
    def model_busy(self) -> float:
        """Fraction of the processing time the workers' models were running batches (1.0: the
        model never waited for decoding, post-processing or writing)."""
        wall = self.processing_seconds * self.workers
        return self.model_seconds / wall if wall else 0.0

    @property
    def host_queueing(self) -> float:
        """Fraction of the model time the workers' host threads spent queueing batches: near
        1.0 on a GPU, the host sets the pace (on a CPU the work is done while queueing)."""
        return self.queueing_seconds / self.model_seconds if self.model_seconds else 0.0

    @property
    def line(self) -> str:
        if self.shards_skipped and not (self.shards_done or self.shards_failed):
            return (f"nothing to run: the {self.shards_skipped} input shard(s) were done before (or failed before "
                    "and are skipped)")
        total = self.images_ok + self.images_failed
        rate = total / self.seconds if self.seconds > 0 else 0.0
        return (f"{total} images: {self.images_ok} ok, {self.images_failed} failed; "
                f"shards {self.shards_done} done, {self.shards_failed} failed, {self.shards_skipped} skipped; "
                f"{self.seconds:.1f} s, {rate:.2f} images/s"
                + (f"; model busy {self.model_busy:.0%} of the processing time" if self.model_seconds else ""))
