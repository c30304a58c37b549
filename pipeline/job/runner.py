"""The batch job on Ray: actors own a model each, the driver streams shards through them.

The driver is the only writer: for each finished shard it writes the mask shard, the Parquet
statistics and the ledger entry, each by atomic rename. Actors are restarted by Ray when
their process dies (`max_restarts`), and the shard call they were running is retried on the
new process (`max_task_retries`); past that the shard is marked failed and the job goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import signal
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.config import SegmenterConfig, unchanging_added_keys
from pipeline.segment.models import absolute_model, check_model_available, resolve_device
from pipeline.segment.plan import note_lines
from pipeline.data.ledger import DONE, FAILED, IN_PROGRESS, INTERRUPTED, Ledger, ShardEntry
from pipeline.data.outputs import write_shard_outputs
from pipeline.data.shards import (INPUT_SEPARATOR, InputError, check_shard_classes, checksum_problem, expand_input,
                                  is_stream, manifest_listing, manifests_beside, sample_count_problem, shard_name,
                                  split_inputs)
from pipeline.mask.crf import densecrf_modules
from pipeline.job.allocator import cpu_allocator_line, cpu_worker_env
from pipeline.job.cluster import check_nodes_have_this_package, given_address, init_ray
from pipeline.job.summary import JobInterrupted, JobSummary, fewer_workers_line, name_first, workers_line


class WorkerStartError(PipelineError, RuntimeError):
    """The segmenter actors failed while loading the model."""


class _Stop(BaseException):
    """Raised in the driver loop once one of STOP_SIGNALS came (`_stop_on_signals.check`)."""

    def __init__(self, signum: int):
        self.signum = signum


# Config keys that say how a job runs, not what a mask is: left out of the config hash, so a
# job resumes with other values (a larger batch on a GPU, say).
RUN_SETTINGS = frozenset({"batch_size", "max_image_pixels", "early_exit", "compile"})


def config_hash(config: SegmenterConfig, model: str) -> str:
    """sha256 of what decides a mask: the config but RUN_SETTINGS and the added keys that change
    nothing under it (`unchanging_added_keys`), and the model."""
    dump = config.model_dump(mode="json", exclude=set(RUN_SETTINGS))
    for section, key in unchanging_added_keys(config):
        del dump[section][key]
    payload = json.dumps({"config": dump, "model": model}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def absolute_input(inputs: str) -> str:
    """The --input patterns (INPUT_SEPARATOR between several) each anchored at the current
    folder, `..` resolved (URLs and pipes unchanged), so that a job's recorded input works from
    any folder."""
    return INPUT_SEPARATOR.join(pattern if is_stream(pattern) else os.path.abspath(pattern)
                                for pattern in split_inputs(inputs))


def ray_shard_worker_class():
    """ShardWorker as a Ray actor: post-processing as Ray CPU tasks, and a device failure ends
    the process so that Ray restarts the actor and retries the shard on a fresh device context."""
    import ray

    from pipeline.job import worker

    class ShardWorker(worker.ShardWorker):  # the same name: Ray's dashboard and process titles show it
        def __init__(self, *args):
            # The project's own errors (a model that cannot load, a config this UNet cannot run)
            # name the thing and the fix: `ready` hands one to the driver, which stops with it,
            # rather than Ray printing the constructor's traceback from every node.
            self.start_error = None
            try:
                super().__init__(*args)
            except PipelineError as exc:
                self.start_error = str(exc)

        def ready(self) -> dict:
            return {"error": self.start_error} if self.start_error is not None else super().ready()

        def node_id(self) -> str | None:
            return ray.get_runtime_context().get_node_id()

        def submit_finish(self, config_json, shard, items):
            if not hasattr(self, "_finish_task"):
                self._finish_task = ray.remote(num_cpus=1)(worker.finish_images)
            return self._finish_task.remote(config_json, shard, items)

        def collect(self, handle):
            return ray.get(handle)

        def on_device_failure(self, exc, shard):
            print(f"worker {os.getpid()}: {type(exc).__name__} on shard {shard}; exiting for a restart", flush=True)
            os._exit(1)

    ShardWorker.__qualname__ = "ShardWorker"  # not ray_shard_worker_class.<locals>.ShardWorker
    return ShardWorker


# Shards in flight on each worker: the next shard is queued (and its decoding under way) while
# the last one's post-processing finishes, so the model does not wait between shards.
SHARDS_PER_WORKER = 2


def _actor_options(ray, workers: int | None, retries: int, cpu_threads: int | None = None,
                   device: str | None = None, cpu_env: Mapping[str, str] | None = None,
                   shards: int | None = None) -> tuple[int, dict, int]:
    """(workers, actor options, torch threads per actor): one GPU each where the cluster has
    GPUs (unless device is "cpu"), else CPU slots; no more workers than `shards` to do, as a
    worker takes a shard at a time. CPU workers together reserve all but at
    least one CPU (fractions allowed), so post-processing tasks can always be scheduled, and
    each no more than lets all of them be placed on the nodes as they are (`_placeable_share`);
    the reservation schedules Ray tasks, it does not pin cores. A CPU worker runs torch on
    cpu_threads threads, by default on its whole share of the CPUs: the model is idle while
    its results are post-processed. CPU workers start with the environment variables cpu_env
    (`cpu_worker_env`); a GPU worker's large tensors live on the GPU."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    # One concurrency slot beyond the shards, for the driver's progress polls.
    fault = dict(max_restarts=-1, max_task_retries=retries, max_concurrency=SHARDS_PER_WORKER + 1)
    if gpus and device != "cpu":
        n = min(workers or gpus, shards or math.inf)
        if n > gpus:
            raise InputError(f"--workers {n} asks for one GPU each but the cluster has {gpus}: "
                             f"use --workers {gpus} or fewer, or --device cpu for CPU workers")
        return n, dict(num_gpus=1, num_cpus=1, **fault), 0
    n = min(workers or 1, shards or math.inf)
    node_cpus = _node_cpus(ray) or [cpus]
    share = min(max(cpus - n, 1) / n,  # leaves one CPU per worker, and at least one, for post-processing
                _placeable_share(node_cpus, n))
    reserved = min(cpu_threads, share) if cpu_threads else share
    # Spread over the nodes: each worker gets a machine's memory bandwidth and cores of its own.
    options = dict(num_cpus=math.floor(reserved * 100) / 100, scheduling_strategy="SPREAD", **fault)
    if cpu_env:
        options["runtime_env"] = {"env_vars": dict(cpu_env)}
    # Threads: the share and one more (the model idles while its results are post-processed), no
    # more than a node has CPUs, nor than n workers on the cluster's CPUs each have.
    return n, options, cpu_threads or max(1, min(cpus // n, int(max(node_cpus)), math.floor(share) + 1))


def _node_cpus(ray) -> list[float]:
    """The CPUs of each live node that has some (a head started with --num-cpus 0 has none)."""
    try:
        return [cpus for node in ray.nodes() if node.get("Alive") and (cpus := node.get("Resources", {}).get("CPU", 0))]
    except Exception:  # a client without the node table: the caller takes the cluster's total
        return []


def _placeable_share(node_cpus: list[float], n: int) -> float:
    """The most CPUs each of n workers can ask for with all n placed at once, each on one node:
    the largest of a node's CPUs over k workers (k <= n) at which the nodes hold n. Asking for a
    share of the cluster's total, two workers on nodes of 8 and 3 CPUs asked for 4.5 each: one
    started on the first node, and the other waited, silently, for ever."""
    def holds(share: float) -> int:
        return sum(math.floor(cpus / share + 1e-9) for cpus in node_cpus)

    return max(cpus / k for cpus in node_cpus for k in range(1, n + 1) if holds(cpus / k) >= n)


def worker_device(device: str | None, options: Mapping) -> str | None:
    """The device segmenter workers are given: `device`, else `cuda` where Ray gives each a GPU
    (a worker whose torch has no CUDA then stops with the reason instead of running on its CPU),
    else None (the worker's own default)."""
    return "cuda" if device is None and options.get("num_gpus") else device


def run_job(input_pattern: str, out_dir: str | Path, config: SegmenterConfig, model: str,
            address: str | None = None, workers: int | None = None, retry_failed: bool = False,
            force: bool = False, retries: int = 2, device: str | None = None, progress: bool = True,
            cpu_threads: int | None = None, cpu_allocator: str = "keep-freed", rejoin: bool = False) -> JobSummary:
    """Run (or resume) a job: every shard of input_pattern not yet done under this config.
    The output folder, the input's paths and a local model folder are recorded absolute, and
    so is the Ray address it was given (--address or RAY_ADDRESS), which a resume (`rejoin`)
    given neither joins again.
    cpu_threads: torch threads of each CPU worker (default: its share of the machine);
    cpu_allocator: glibc settings of CPU workers, one of CPU_ALLOCATORS (`cpu_worker_env`)."""
    from pipeline.progress import progress_bar

    cpu_env = cpu_worker_env(cpu_allocator, os.environ)  # a bad value fails before anything starts
    if device is not None and device.startswith("cuda:"):
        raise InputError(f"--device {device}: Ray gives each of a job's workers one GPU, which it sees as cuda: pass "
                         f"--device cuda, and limit the GPUs Ray hands out with CUDA_VISIBLE_DEVICES="
                         f"{device.split(':', 1)[1]} before the command (or before `ray start`)")
    started = time.perf_counter()
    out_dir = Path(os.path.abspath(out_dir))
    input_pattern = absolute_input(input_pattern)
    model = absolute_model(model)
    urls = expand_input(input_pattern)
    manifests = manifests_beside(urls)
    check_shard_classes(manifests, config.class_names)
    names = [shard_name(u) for u in urls]
    first_url: dict[str, str] = {}
    for name, url in zip(names, urls):
        if first_url.setdefault(name, url) != url:
            raise InputError(f"input shards {first_url[name]} and {url} share the name {name!r}, which names their "
                             "outputs: rename one of them, or run them as two jobs")
    check_model_available(model)
    if config.crf.enabled:
        densecrf_modules()  # the module missing here: one line naming the install, before anything runs
    digest = config_hash(config, model)
    ledger = Ledger(out_dir)
    with ledger.locked():  # one running job per output folder
        last_run = (ledger.job() or {}).get("ray_address") if rejoin else None
        address, address_source = given_address(address, os.environ.get("RAY_ADDRESS"), last_run)
        ledger.claim({"config": config.model_dump(mode="json"), "config_hash": digest, "model": model,
                      "input": input_pattern, "ray_address": None if address == "local" else address}, force=force)
        by_name = dict(zip(names, urls))
        sample_counts = manifest_listing(manifests, "samples", int)
        checksums = manifest_listing(manifests, "sha256", str)
        plan = ledger.plan(names, digest, retry_failed, by_name, checksums)
        todo = list(plan["run"])
        if plan["changed"]:
            print(f"{len(plan['changed'])} shard(s) done before hold other bytes now (a new shard or a new copy), "
                  f"so they are redone: {name_first(plan['changed'], len(plan['changed']))}")
        summary = JobSummary(0, 0, len(plan["done"]) + len(plan["failed"]), 0, 0, 0.0)
        if plan["failed"]:
            print(f"{len(plan['failed'])} shard(s) failed before and are skipped: add --retry-failed to redo them")
        if not todo:
            summary.seconds = time.perf_counter() - started
            return summary

        in_flight: dict = {}
        dispatched: dict[str, int] = {}  # shard sent to a worker and not yet recorded -> attempt
        finished_images = 0  # images of shards whose results are in
        seen_in_flight: dict[str, int] = {}  # shard in flight -> images its worker has handled

        def show_progress() -> None:
            bar.n = finished_images + sum(seen_in_flight.get(entry.shard, 0) for entry, *_ in in_flight.values())
            elapsed = time.perf_counter() - processing_start
            bar.set_postfix_str(f"{bar.n / elapsed if elapsed > 0 else 0.0:.2f} images/s", refresh=True)

        def poll_workers() -> None:
            try:
                live = [actor for slot, actor in enumerate(actors)
                        if slot not in lost.handed_off and slot not in restarting]
                for report in ray.get([actor.progress.remote() for actor in live], timeout=5.0):
                    seen_in_flight.update(report)
            except (ray.exceptions.RayError, TimeoutError):
                pass  # a worker restarting: the bar catches up at its next report

        def dispatch(slot: int) -> None:
            if not todo:
                return
            name = todo.pop(0)
            entry = ledger.get(name)
            attempts = (entry.attempts if entry and entry.config_hash == digest else 0) + 1
            dispatched[name] = attempts
            entry = ShardEntry(shard=name, url=by_name[name], state=IN_PROGRESS, config_hash=digest, model=model,
                               attempts=attempts)
            ledger.put(entry)
            ref = actors[slot].process_shard.remote(by_name[name], name)
            in_flight[ref] = (entry, slot, time.perf_counter())

        def shards_held(slot: int) -> int:
            return sum(held == slot for _, held, _ in in_flight.values())

        def fill(slot: int) -> None:
            """Shards to this worker until it holds SHARDS_PER_WORKER."""
            while todo and shards_held(slot) < SHARDS_PER_WORKER:
                dispatch(slot)

        # Workers that died on a shard with its retries spent, by slot: the ready() call that says
        # Ray has restarted them (or a new one where a worker is gone for good), or None where it
        # found them still restarting (asked again at the next look); they take shards once it
        # answers. Not waited for in place: where the worker fits on no node, the job looked at
        # nothing else and took no Ctrl-C, for ever.
        restarting: dict[int, object | None] = {}

        def restarted(slot: int) -> None:
            """A restarting worker's ready() answered: it takes shards, or is asked again."""
            try:
                where = ray.get(restarting[slot])
            except ray.exceptions.ActorUnavailableError:  # still restarting
                restarting[slot] = None
                return
            except ray.exceptions.RayActorError:  # gone for good: a new worker in its place
                actors[slot] = actor_class.options(**options).remote(model, config_json, device, threads)
                restarting[slot] = actors[slot].ready.remote()
                return
            del restarting[slot]
            if "error" in where:
                raise WorkerStartError(f"a restarted segmenter worker could not start: {where['error']}")
            fill(slot)

        lost = LostWorkers()

        def look_for_lost_workers() -> None:
            """Workers Ray restarts where no node has their share free (`LostWorkers`): their shards go
            to the workers that are ready, if any (else the job says that it waits); ready again, they
            take shards again."""
            for slot, asked in restarting.items():
                if asked is None:
                    restarting[slot] = actors[slot].ready.remote()
            handed, waited = lost.ready_again(actors)
            for slot in waited:
                goes_on = "goes on with its shards" if shards_held(slot) else "takes shards"
                bar.write(f"segmenter worker {slot + 1} of {len(actors)} is ready again and {goes_on}")
            for slot in handed:
                bar.write(f"segmenter worker {slot + 1} of {len(actors)} is ready again and takes shards")
                fill(slot)
            holding = {slot for _, slot, _ in in_flight.values()} | set(restarting)
            newly_lost, ready = lost.look(ray, actors, sorted(holding), options)
            if not newly_lost:
                return
            moved = [ref for ref, (_, slot, _) in in_flight.items() if slot in newly_lost] if ready else []
            for ref in moved:
                entry, _, _ = in_flight.pop(ref)
                seen_in_flight.pop(entry.shard, None)
                todo.insert(0, entry.shard)
                with contextlib.suppress(Exception):  # a call that ended meanwhile: its result is dropped
                    ray.cancel(ref)
            bar.write(lost.notice(ray, newly_lost, len(actors), options, len(moved), len(ready)))
            for slot in ready:
                fill(slot)

        # Ctrl-C, `kill` or `ray job stop` from here on marks the shards in flight and says how to resume, also
        # while Ray and the workers start (Ray's own handler exited silently, or dumped a stack and aborted the
        # driver); a signal that comes while Ray starts or the nodes are checked is acted on after
        with _stop_on_signals() as stop, contextlib.ExitStack() as closing:
            try:
                with stop.around_ray_init():
                    ray, private = init_ray(address, address_source)
                stop.check()
                n_workers, options, threads = _actor_options(ray, workers, retries, cpu_threads, device, cpu_env,
                                                             shards=len(todo))
                device = worker_device(device, options)
                if private:  # its workers run this torch: a device it cannot use fails here, in one line
                    resolve_device(device)
                else:
                    check_nodes_have_this_package(ray)
                summary.workers = n_workers
                cut_line = fewer_workers_line(workers, n_workers, len(todo))
                if cut_line:
                    print(cut_line)
                config_json = config.model_dump_json()
                actor_class = ray.remote(ray_shard_worker_class())
                actors = [actor_class.options(**options).remote(model, config_json, device, threads)
                          for _ in range(n_workers)]
                try:
                    started_on = _wait_for_workers(ray, actors, options, stop)  # model-loading errors once
                except ray.exceptions.RayActorError as exc:
                    raise WorkerStartError(f"segmenter workers could not start: {_start_error(exc)}") from exc
                start_error = next((where["error"] for where in started_on if "error" in where), None)
                if start_error is not None:
                    raise WorkerStartError(f"segmenter workers could not start: {start_error}")
                summary.worker_nodes = len({where["node"] for where in started_on})
                print(workers_line(started_on, config.batch_size))
                for line in note_lines(note for where in started_on for note in where["notes"]):
                    print(line)
                allocator_line = cpu_allocator_line(cpu_env, started_on)
                if allocator_line:
                    print(allocator_line)

                processing_start = time.perf_counter()
                total_images = _count_images([by_name[name] for name in todo], sample_counts)
                bar = closing.enter_context(progress_bar(
                    total=total_images, unit="img", disable=not progress, smoothing=0.1, dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"))
                lost.note_alive(actors)
                for _ in range(SHARDS_PER_WORKER):
                    for slot in range(len(actors)):
                        dispatch(slot)
                next_look = time.monotonic() + LOST_WORKER_LOOK_S
                while in_flight or (todo and restarting):
                    if time.monotonic() >= next_look:
                        look_for_lost_workers()
                        next_look = time.monotonic() + LOST_WORKER_LOOK_S
                    asked = {ref: slot for slot, ref in restarting.items() if ref is not None}
                    ready, _ = ray.wait(list(in_flight) + list(asked), num_returns=1, timeout=1.0)
                    stop.check()  # a signal is acted on within a second
                    if not ready:
                        if progress:
                            poll_workers()
                            show_progress()
                        continue
                    ref = ready[0]
                    if ref in asked:
                        restarted(asked[ref])
                        continue
                    entry, slot, shard_start = in_flight.pop(ref)
                    seen_in_flight.pop(entry.shard, None)
                    entry.state, entry.seconds = FAILED, time.perf_counter() - shard_start
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:  # includes ActorUnavailableError
                        # Ray already re-ran the shard `retries` times on restarted workers. The worker takes
                        # more once restarted: a call sent mid-restart would fail too.
                        died = "once" if retries == 0 else f"{retries + 1} times"
                        entry.error = f"worker died {died} on this shard: {str(exc).splitlines()[0]}"
                        if slot not in restarting:
                            restarting[slot] = actors[slot].ready.remote()
                    except ray.exceptions.RayTaskError as exc:
                        entry.error = _first_line(exc)
                    else:
                        entry.input_fingerprint = result.input_fingerprint
                        entry.error = (checksum_problem(entry.url, result.input_fingerprint, checksums)
                                       or sample_count_problem(entry.url, len(result.rows), sample_counts))
                    if entry.error is None:
                        entry.outputs = write_shard_outputs(out_dir, result.shard, result.mask_samples, result.rows)
                        entry.state, entry.samples, entry.failed_samples = DONE, len(result.rows), result.failed
                        summary.peak_worker_rss_mb = max(summary.peak_worker_rss_mb, result.peak_rss_mb)
                        summary.peak_worker_device_mb = max(summary.peak_worker_device_mb, result.peak_device_mb)
                        summary.model_seconds += result.model_seconds
                        summary.queueing_seconds += result.queueing_seconds
                        summary.add_failed(result.failures)
                    ledger.put(entry)
                    dispatched.pop(entry.shard, None)
                    if entry.state == DONE:
                        summary.shards_done += 1
                        summary.images_ok += entry.samples - entry.failed_samples
                        summary.images_failed += entry.failed_samples
                        finished_images += entry.samples
                    else:
                        summary.shards_failed += 1
                        bar.write(f"shard {entry.shard} failed: {entry.error}")
                    show_progress()
                    if slot not in restarting:
                        dispatch(slot)
            except _Stop as stop:
                interrupted = sorted(dispatched)
                for name, attempts in dispatched.items():
                    ledger.put(ShardEntry(shard=name, url=by_name[name], state=INTERRUPTED, config_hash=digest,
                                          model=model, attempts=attempts, error=f"interrupted by signal {stop.signum}"))
                # The job's workers end with this driver (Ray ends a job's actors when it leaves).
                summary.seconds = time.perf_counter() - started
                raise JobInterrupted(stop.signum, summary, interrupted) from None
        summary.processing_seconds = time.perf_counter() - processing_start
        summary.seconds = time.perf_counter() - started
        return summary


# What stops a job's driver: Ctrl-C, `kill` (and `ray job stop`), and the terminal closing (an SSH
# session that ends; without a handler the job died on the spot, its shards left in_progress and
# its private Ray's agents left running for a minute or two).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _stop_on_signals:
    """Within the block, the first of STOP_SIGNALS in the driver (main thread only) is
    recorded, and `check()` then raises _Stop, so the job can mark its shards in flight and say
    how to resume. The handler does not raise itself: an exception raised while Ray's blocking
    calls run signal handlers comes out of them as a SystemError. After the first signal the
    previous handlers are back (a second Ctrl-C stops at once); they are on exit too."""

    def __enter__(self):
        self.previous, self.signum = {}, None
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._record)
        return self

    @contextmanager
    def around_ray_init(self):
        """Around `ray.init`, which sets Ray's own SIGTERM handler (it exits with status 15, saying
        nothing): a SIGTERM that met it is taken as this block's, and this block's handler is put
        back after, with Ray's as the one restored on exit."""
        try:
            yield
        except SystemExit as exc:
            if exc.code != signal.SIGTERM:
                raise
            raise _Stop(signal.SIGTERM) from None
        rays = signal.getsignal(signal.SIGTERM)
        if self.signum is None and signal.SIGTERM in self.previous and rays != self._record:  # Ray Client sets none
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._record)

    def _record(self, signum, frame):
        self.signum = signum
        self._restore()

    def check(self) -> None:
        """Raise _Stop if a signal came."""
        if self.signum is not None:
            raise _Stop(self.signum)

    def _restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def __exit__(self, *exc):
        self._restore()
        return False


# Seconds the workers may take to be placed on the cluster's nodes before the job says that they wait
# (and, for workers Ray restarts, hands their shards to the others: `LostWorkers`).
PLACEMENT_NOTICE_S = 20.0
# Seconds between two looks at the actor table for lost workers during a job.
LOST_WORKER_LOOK_S = 5.0


def start_post_processing_workers(ray) -> None:
    """One task a cluster CPU (`start_post_processing_worker`, not waited for), so that the Ray
    workers that will post-process the images import torch now. Only once the segmenter workers
    are placed: submitted with them, these tasks held the CPUs of the nodes the workers were to
    spread over, and both workers of a three-node cluster started on one node now and then."""
    from pipeline.job.worker import start_post_processing_worker

    starter = ray.remote(num_cpus=1)(start_post_processing_worker)
    for _ in range(int(ray.cluster_resources().get("CPU", 1))):
        starter.remote()


def _wait_for_workers(ray, actors: list, options: Mapping, stop: "_stop_on_signals") -> list[dict]:
    """The segmenter workers' `ready()` answers, once every one has loaded its model; a stop
    signal is acted on within a second (`stop.check`). From PLACEMENT_NOTICE_S on, every few
    seconds, asks whether some wait for the cluster's resources (`placement_notice`) and says
    so once: on a shared cluster whose GPUs or CPUs other jobs held, the job printed nothing
    after `joining` for as long as it waited. Once every worker is placed on a node (or at once
    where the actor table cannot be read), starts the post-processing workers
    (`start_post_processing_workers`), so that they import torch while the models load."""
    answers = [actor.ready.remote() for actor in actors]
    ask_at = time.monotonic() + PLACEMENT_NOTICE_S
    pending, post_processing_started = answers, False
    while True:
        if not post_processing_started and (not pending or not _unplaced(actors)):
            start_post_processing_workers(ray)
            post_processing_started = True
        if not pending:
            return ray.get(answers)
        _, pending = ray.wait(answers, num_returns=len(answers), timeout=1.0 if post_processing_started else 0.1)
        stop.check()
        if ask_at is not None and time.monotonic() >= ask_at:
            notice = placement_notice(_unplaced(actors), len(pending), len(actors), options,
                                      ray.available_resources(), ray.cluster_resources(), _free_by_node())
            if notice:
                print(notice, flush=True)
            ask_at = None if notice else time.monotonic() + 5.0


def placement_notice(unplaced: int | None, pending: int, workers: int, options: Mapping, free: Mapping,
                     total: Mapping, free_by_node: list[Mapping] | None = None,
                     restarting: bool = False, then: str | None = None) -> str | None:
    """What to say of `pending` workers not ready after PLACEMENT_NOTICE_S: that `unplaced` of
    them wait for the cluster's resources, where one worker's share (`options`) is not free on
    one node (`free_by_node`; the cluster's `free` where that is not known); nothing where each
    has a process on a node (loading its model) or a share is free (a process starting); where
    the actor table could not be read (unplaced None), that they load or wait. `restarting`:
    they are workers Ray restarts, their node or process lost, and `then` what the job does
    meanwhile (default: it waits)."""
    if unplaced is None:
        return (f"{pending} of {workers} segmenter worker(s) not ready after {PLACEMENT_NOTICE_S:g} s: loading the "
                "model, or waiting for the cluster's resources (`ray status` shows them)")
    if not unplaced or any(_holds_a_share(node, options) for node in (free_by_node or [free])):
        return None
    asked = _share(options)
    each = " and ".join(f"{amount:g} {name}" for amount, name in asked if amount)
    has = ", ".join(f"{free.get(name, 0):g} of {total.get(name, 0):g} {name}s free" for amount, name in asked
                    if amount) + (", but not a share on one node" if _holds_a_share(free, options) else "")
    if restarting:
        return (f"{unplaced} of {workers} segmenter worker(s) restarting (a node or process was lost) not ready after "
                f"{PLACEMENT_NOTICE_S:g} s, and no node has the {each} each asks free ({has}; `ray status` shows what "
                "holds them): " + (then or "the job waits for them, or Ctrl-C stops it"))
    return (f"waiting for the cluster's resources: {unplaced} of {workers} segmenter worker(s) not placed yet, each "
            f"asking {each} ({has}; `ray status` shows what holds them): the job goes on once they are free, or "
            "Ctrl-C stops it")


def _share(options: Mapping) -> list[tuple[float, str]]:
    """What one worker asks of a node: [(amount, resource name)] for GPUs and CPUs."""
    return [(options.get(key, 0), name) for key, name in (("num_gpus", "GPU"), ("num_cpus", "CPU"))]


def _holds_a_share(resources: Mapping, options: Mapping) -> bool:
    """Whether these free resources (a node's, or the cluster's) hold one worker's share."""
    return all(resources.get(name, 0) >= amount for amount, name in _share(options))


class LostWorkers:
    """Segmenter workers that Ray restarts (their node or process lost) and that have no new
    process for PLACEMENT_NOTICE_S while no node has their share free. A job on a cluster that
    lost a GPU node (or the CPUs a worker's share needs) waited at its end, saying nothing, for
    as long as that lasted: for ever where no node came back. Their shards go to the workers
    that are ready; `handed_off` holds the workers whose shards went so, until they are ready
    again. Reads the cluster's actor table, where a restarting actor (its restart counted) keeps
    the pid it had alive until Ray gives it a new process, which then loads its model: a worker
    whose last life the job did not see is taken as one without a process. Through Ray Client,
    which has no such table, it sees none."""

    def __init__(self):
        self.unplaceable_since: dict[int, float] = {}  # slot -> when first seen so (time.monotonic)
        self.alive: dict[int, tuple[int, int]] = {}  # slot -> (restarts, pid) of its worker last seen alive
        self.handed_off: set[int] = set()
        self.said: set[int] = set()  # lost with no worker ready to take their shards: said once, until one is

    def look(self, ray, actors: list, holding: list[int], options: Mapping) -> tuple[list[int], list[int]]:
        """(slots of `holding` lost, the other slots whose worker is ready): the lost ones whose
        shards go to those ready now, which includes any the job said it waits for; with none
        ready, the lost ones not said so before. Ready ones are looked up only where some are lost."""
        now, free_by_node = time.monotonic(), None
        self.unplaceable_since = {slot: since for slot, since in self.unplaceable_since.items() if slot in holding}
        for slot in holding:
            if slot in self.handed_off:
                continue
            state = self._state(actors, slot)
            if state is None or state[0] == "ALIVE" or self._has_a_new_process(slot, state):
                # the table unread, alive, or a new process loading its model
                self.unplaceable_since.pop(slot, None)
                continue
            if free_by_node is None:
                free_by_node = _free_by_node() or [ray.available_resources()]
            if any(_holds_a_share(node, options) for node in free_by_node):
                self.unplaceable_since.pop(slot, None)  # placed soon
            else:
                self.unplaceable_since.setdefault(slot, now)
        lost = [slot for slot, since in self.unplaceable_since.items()
                if now - since >= PLACEMENT_NOTICE_S and slot not in self.handed_off]
        if not lost:
            return [], []
        ready = [slot for slot in range(len(actors)) if slot not in self.unplaceable_since
                 and slot not in self.handed_off and self._ready(actors, slot)]
        if ready:
            self.handed_off.update(lost)
            self.said.difference_update(lost)
            return lost, ready
        lost = [slot for slot in lost if slot not in self.said]
        self.said.update(lost)
        return lost, []

    def note_alive(self, actors: list) -> None:
        """Records the pid of each worker alive now (at the job's start, so that a worker lost
        before the first look is told from one loading its model too)."""
        for slot in range(len(actors)):
            self._state(actors, slot)

    def ready_again(self, actors: list) -> tuple[list[int], list[int]]:
        """Lost workers ready again: (slots whose shards were handed off, which take shards again;
        slots the job said it waits for, which go on with their own)."""
        handed = [slot for slot in sorted(self.handed_off) if self._ready(actors, slot)]
        waited = [slot for slot in sorted(self.said) if self._ready(actors, slot)]
        for slot in handed + waited:
            self.handed_off.discard(slot)
            self.said.discard(slot)
            self.unplaceable_since.pop(slot, None)
        return handed, waited

    def _state(self, actors: list, slot: int) -> tuple[str, int, int] | None:
        """`_actor_state` of a slot's worker, its restarts and pid recorded where it is alive."""
        state = _actor_state(actors[slot])
        if state is not None and state[0] == "ALIVE":
            self.alive[slot] = state[1:]
        return state

    def _has_a_new_process(self, slot: int, state: tuple[str, int, int]) -> bool:
        """Whether a restarting worker has a process other than its last life's (seen alive)."""
        _, restarts, pid = state
        seen = self.alive.get(slot)
        return seen is not None and seen[0] == restarts - 1 and seen[1] != pid

    def _ready(self, actors: list, slot: int) -> bool:
        state = self._state(actors, slot)
        return state is not None and state[0] == "ALIVE"

    @staticmethod
    def notice(ray, lost: list[int], workers: int, options: Mapping, moved: int, ready: int) -> str:
        """The line that says `lost` workers wait to be restarted, and where their `moved`
        shards went (to the `ready` others), or that the job waits for them."""
        whose, they = ("its", "it takes") if len(lost) == 1 else ("their", "they take")
        gone = f"{whose} {moved} shard(s) go to" if moved else "the shards go to"
        then = f"{gone} the other {ready} worker(s), and {they} shards again once ready" if ready else None
        line = placement_notice(len(lost), len(lost), workers, options, ray.available_resources(),
                                ray.cluster_resources(), _free_by_node(), restarting=True, then=then)
        return line or (f"{len(lost)} of {workers} segmenter worker(s) restarting (a node or process was lost) not "
                        f"ready after {PLACEMENT_NOTICE_S:g} s: " + (then or "the job waits for them"))


def _free_by_node() -> list[Mapping] | None:
    """The resources free on each node, from the cluster's resource table; None where that
    cannot be read (through Ray Client)."""
    try:
        from ray._private.state import available_resources_per_node

        return list(available_resources_per_node().values())
    except Exception:  # an internal table: another Ray release, or a client without it
        return None


def _unplaced(actors: list) -> int | None:
    """How many of these actors Ray has not yet given a worker process on a node (waiting for
    resources, or the process starting), from the cluster's actor table; None where that table
    cannot be read (through Ray Client)."""
    rows = [_actor_row(actor) for actor in actors]
    if None in rows:
        return None
    return sum(not (row.get("Address") or {}).get("IPAddress") for row in rows)


def _actor_state(actor) -> tuple[str, int, int] | None:
    """(state, restarts, pid) of this actor in the cluster's actor table (ALIVE, RESTARTING,
    ...; the restarts counted from its process's death on; the pid of its process, or of its
    last one while Ray has given it none); None where that table cannot be read (Ray Client)."""
    row = _actor_row(actor)
    if row is None or "State" not in row:
        return None
    return row["State"], row.get("NumRestarts", 0), row.get("Pid")


def _actor_row(actor) -> Mapping | None:
    """This actor's row in the cluster's actor table (State, NumRestarts, Pid, Address, ...);
    None where that table cannot be read (through Ray Client)."""
    try:
        from ray._private.state import actors as actor_table

        return actor_table(actor._actor_id.hex())
    except Exception:  # an internal table: another Ray release, or a client without it
        return None


def _first_line(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _start_error(exc: Exception) -> str:
    """The error a worker raised while starting (the last line of the traceback Ray reports
    for a failed actor constructor), else the first line of exc. The project's own errors do
    not come here: the worker hands them to `ready`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and "creation task" in lines[0]:
        return lines[-1]
    return _first_line(exc)


def _count_images(urls: list[str], counts: dict[str, int]) -> int | None:
    """Images in these shards, from their manifests' counts (`manifest_listing`) when every
    one is listed there."""
    if all(u in counts for u in urls):
        return sum(counts[u] for u in urls)
    return None
