"""`pseudolabel run | resume | status | demo`: the job over shards on Ray, its ledger, and the
whole path on the bundled sample images."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from pipeline.cli.options import (CLASSES_HELP, add_classes, add_command, add_device, add_input_shards, add_job_folder,
                                  add_job_options, add_model_options, add_no_progress, add_output, input_config,
                                  job_after_input, require_positive)
from pipeline.config import (VOC_CLASS_NAMES, ConfigError, SegmenterConfig, load_config, random_weights_note,
                             recorded_config)
from pipeline.errors import PipelineError


def register_demo(sub) -> None:
    demo = add_command(
        sub, "demo", help="the whole job on the bundled sample images",
        description="Shard the bundled VOC sample images, run the job on them, and write overlays, a VOC "
                    "export, the evaluation and the report.",
        examples=["pseudolabel demo --model tiny -o demo",
                  "pseudolabel demo --model path/to/stable-diffusion-2-1-base --device cuda -o demo"])
    outputs = demo.add_argument_group("output")
    add_output(outputs, "folder for shards and outputs (default: ./demo)", required=False, default="demo")
    add_no_progress(outputs)
    add_model_options(demo)
    demo.set_defaults(func=run_demo)


def register(sub) -> None:
    run = add_command(
        sub, "run", help="segment every shard on Ray; resumable",
        description="Run the job over image shards. Re-running skips shards already done.",
        examples=["pseudolabel run --input shards/ -o out/",
                  "pseudolabel run --input 'shards/voc-train_aug-{000000..000041}.tar' -o out/ --crf "
                  "--address auto --batch-size 16",
                  "pseudolabel run --input photo-shards/ --classes cat,dog,sofa -o out/",
                  "pseudolabel run --input shards/ --method goca -o out-goca/"])
    inputs = run.add_argument_group("input and output")
    add_input_shards(inputs)
    add_classes(inputs, help=CLASSES_HELP)
    add_output(inputs, "the job's folder: masks/, stats/, ledger/, job.json")
    inputs.add_argument("--crf", action="store_true", help="dense CRF on CPU workers")
    inputs.add_argument("--retry-failed", action="store_true", help="also redo shards that failed before")
    inputs.add_argument("--force", action="store_true",
                        help="overwrite the job in the output folder when it was made with another config or "
                             "model (every shard is redone)")
    add_model_options(run, with_method=True)
    add_job_options(run)
    run.set_defaults(func=run_run)

    resume = add_command(
        sub, "resume", help="redo the failed and interrupted shards of a job",
        description="Resume a job with its recorded input, config and model.",
        examples=["pseudolabel resume out/", "pseudolabel resume out/ --batch-size 8 --address auto",
                  "pseudolabel resume out/ --input '/new/place/voc-train_aug-{000000..000041}.tar'"])
    resume_inputs = resume.add_argument_group("input")
    add_job_folder(resume_inputs, before_input=True)
    add_input_shards(resume_inputs, required=False,
                     help="the job's shards where they are now, if they moved (default: the input the job "
                          "recorded); done shards are recognised by name")
    add_device(resume.add_argument_group("model"))
    add_job_options(resume)
    resume.set_defaults(func=run_resume,
                        unrecognized_hint="resume redoes the job's failed and interrupted shards with the config and "
                                          "model it recorded (for others: pseudolabel run with --force)")

    status = add_command(sub, "status", help="print a job's ledger",
                         description=f"Print a job's per-shard state: every shard of a job of up to {LISTED_SHARDS} "
                                     "shards, else those not done (--all: every shard), then the counts.",
                         examples=["pseudolabel status out/", "pseudolabel status out/ --all"])
    add_job_folder(status)
    status.add_argument("--all", action="store_true", help="list every shard, the done ones too")
    status.set_defaults(func=run_status)


def _run_job(args: argparse.Namespace, input_pattern: str, out_dir: Path, config: SegmenterConfig, model: str,
             retry_failed: bool, force: bool, rejoin: bool = False) -> int:
    from pipeline.job.runner import run_job
    from pipeline.job.summary import JobInterrupted

    require_positive(args, "cpu_threads", "workers", "batch_size")
    if args.retries < 0:
        raise ConfigError(f"--retries must be 0 or more, got {args.retries}")
    if args.batch_size is not None:
        config = config.model_copy(update={"batch_size": args.batch_size})
    try:
        summary = run_job(input_pattern, out_dir, config, model, address=args.address, workers=args.workers,
                          retry_failed=retry_failed, force=force, retries=args.retries, device=args.device,
                          progress=not args.no_progress, cpu_threads=args.cpu_threads,
                          cpu_allocator=args.cpu_allocator, rejoin=rejoin)
    except JobInterrupted as stop:
        done = stop.summary
        with contextlib.suppress(OSError):  # a terminal that hung up (SIGHUP): none to tell, the ledger says it
            print(f"interrupted: {done.shards_done} shard(s) done this run ({done.images_ok} images ok, "
                  f"{done.images_failed} failed), {len(stop.interrupted)} in flight marked interrupted; "
                  f"resume with: {_resume_command(out_dir, args.address)}", file=sys.stderr)
        return 128 + stop.signum
    print(summary.line)
    for line in summary.failed_lines:
        print(line)
    if summary.shards_failed:
        print(f"{summary.shards_failed} shard(s) failed (errors above and in `pseudolabel status "
              f"{out_dir.absolute()}`): once the cause is fixed, `{_resume_command(out_dir, args.address)}` "
              "redoes them")
    print(f"masks in {out_dir / 'masks'}, statistics in {out_dir / 'stats'}, ledger in {out_dir / 'ledger'}")
    return 0 if summary.succeeded else 1


def _resume_command(out_dir: Path, address: str | None) -> str:
    """The command that resumes the job in out_dir on the Ray this run was given (an --address
    left out would resume on a private Ray where no RAY_ADDRESS names the cluster)."""
    return f"pseudolabel resume {out_dir.absolute()}" + (f" --address {address}" if address else "")


def run_run(args: argparse.Namespace) -> int:
    config = input_config(args.config, args.input, args.classes, args.method)
    if args.crf:
        config = config.with_crf(True)
    return _run_job(args, args.input, Path(args.output), config, args.model, args.retry_failed, args.force)


def run_resume(args: argparse.Namespace) -> int:
    from pipeline.data.ledger import Ledger
    from pipeline.data.shards import MissingInputError

    job_after_input(args)
    job = Ledger(args.job).recorded_job()
    config = recorded_config(job["config"])
    try:
        return _run_job(args, args.input or job["input"], Path(args.job), config, job["model"], retry_failed=True,
                        force=False, rejoin=True)
    except MissingInputError as exc:
        if args.input:
            raise
        raise MissingInputError(f"{exc}; if the shards moved: pseudolabel resume {args.job} --input "
                                "NEW_PATTERN") from exc


# A job of more shards lists only those not done unless `status --all` (COCO's train2014 is 321).
LISTED_SHARDS = 20


def run_status(args: argparse.Namespace) -> int:
    from collections import Counter

    from pipeline.data.ledger import DONE, FAILED, IN_PROGRESS, INTERRUPTED, STALE, Ledger
    from pipeline.data.outputs import failed_image_ids
    from pipeline.data.shards import describe_input
    from pipeline.job.summary import name_first

    ledger = Ledger(args.job)
    job = ledger.recorded_job()
    entries = ledger.entries()
    print(f"job: model {job['model']}, config {job['config_hash'][:12]}, input {describe_input(job['input'])}"
          + (f", Ray at {job['ray_address']} (resume joins it again)" if job.get("ray_address") else ""))
    states = ledger.states()
    listed = [e for e in entries if args.all or len(entries) <= LISTED_SHARDS or states[e.shard] != DONE]
    if listed:
        print(f"{'shard':32} {'state':12} {'attempts':>8} {'images':>7} {'failed':>7} {'seconds':>8}  error")
    for e in listed:
        print(f"{e.shard:32} {states[e.shard]:12} {e.attempts:8d} {e.samples:7d} {e.failed_samples:7d} "
              f"{e.seconds:8.1f}  {e.error or ''}")
    if len(listed) < len(entries):
        print(f"({len(entries) - len(listed)} done shards not listed: --all lists them)")
    counts = Counter(states.values())
    done = [e for e in entries if states[e.shard] == DONE]
    if done:
        print(f"{sum(e.samples for e in done)} images in the done shards, {sum(e.failed_samples for e in done)} "
              "of them failed")
    running = ledger.running_job()
    print(f"{counts[DONE]} done, {counts[FAILED]} failed, {counts[INTERRUPTED]} interrupted, {counts[IN_PROGRESS]} "
          "in progress" + (f", {counts[STALE]} stale (done under an earlier config or model; redone on resume)"
                           if counts[STALE] else "")
          + (f"; a job is running here ({running})" if running else "; no job is running here"))
    unfinished = counts[INTERRUPTED] + counts[IN_PROGRESS]
    if unfinished and not running:  # in_progress: the job was killed, or the terminal closed before SIGHUP stopped it
        print(f"{unfinished} shard(s) left unfinished by a job that stopped (interrupted, or in progress when it was "
              f"killed): `pseudolabel resume {args.job}` redoes them")
    if counts[FAILED] and not running:
        print(f"{counts[FAILED]} shard(s) failed (their errors above): once the cause is fixed, "
              f"`pseudolabel resume {args.job}` redoes them")
    print(_not_started_line(ledger, args.job))
    changed = _changed_inputs(ledger, done)
    if changed:
        print(f"{len(changed)} done shard(s) hold other bytes in their input shard now (first: {changed[0]}): "
              f"`pseudolabel resume {args.job}` redoes them")
    failed = failed_image_ids(args.job)
    if failed:
        print(f"{len(failed)} failed image(s): {name_first(failed, len(failed))} "
              "(errors in stats/, status column 'failed')")
    return 0


def _changed_inputs(ledger, done: list) -> list[str]:
    """The done shards whose input shard holds other bytes now, as far as telling costs no
    read of the shards (`input_changed` without reading: their size, time and manifest)."""
    from pipeline.data.shards import expand_input, input_changed, manifest_listing, manifests_beside, shard_name

    try:
        urls = expand_input(ledger.recorded_job()["input"])
    except PipelineError:
        return []  # the not-started line has said why
    checksums = manifest_listing(manifests_beside(urls), "sha256", str)
    by_name = {shard_name(url): url for url in urls}
    return [entry.shard for entry in done if entry.shard in by_name
            and input_changed(entry.input_fingerprint, by_name[entry.shard], checksums.get(by_name[entry.shard]),
                              read=False)]


def _not_started_line(ledger, job_folder) -> str:
    """How many of the job's input shards have no ledger entry yet, and the command that runs them."""
    from pipeline.data.ledger import NOT_STARTED

    try:
        states = ledger.input_states()
    except PipelineError as exc:
        return f"input shards not listed: {exc}"
    waiting = [name for name, state in states.items() if state == NOT_STARTED]
    return (f"{len(waiting)} of {len(states)} input shard(s) not started"
            + (f" (first: {waiting[0]}): `pseudolabel resume {job_folder}` runs them" if waiting else ""))


def run_demo(args: argparse.Namespace) -> int:
    from importlib import resources

    from pipeline.data.outputs import JobOutput
    from pipeline.data.shards import ShardingReport, voc_sources, write_image_shards
    from pipeline.job.runner import run_job
    from pipeline.results.evaluate import evaluate_job, write_json
    from pipeline.results.export import export_voc
    from pipeline.results.report import write_overlays, write_report

    dest = Path(args.output)
    sample = Path(str(resources.files("pipeline") / "sample" / "VOC2012"))
    report = ShardingReport()
    sources = voc_sources(sample, "train", None, report)
    shards = dest / "shards"
    write_image_shards(sources, shards, "voc-sample", 2, list(VOC_CLASS_NAMES), report)
    print(f"1. sharded {len(sources)} PASCAL VOC sample images into {shards}")
    config = load_config(args.config)
    # on a private Ray always: the sample's shards are in a folder of this machine only, and a cluster running
    # here (or one RAY_ADDRESS names) is the user's own
    summary = run_job(str(shards), dest / "out", config, args.model, address="local", workers=1,
                      device=args.device, force=True, progress=not args.no_progress)
    print(f"2. ran the job: {summary.line}")
    print(f"   masks: {dest / 'out' / 'masks'}  statistics: {dest / 'out' / 'stats'}  ledger: {dest / 'out' / 'ledger'}")
    job = JobOutput(dest / "out")
    written = write_overlays(job, dest / "overlays")
    print(f"3. overlays (image with mask | mask | ground truth) of {written} images in {dest / 'overlays'}")
    exported = export_voc(job, dest / "export", split="train", with_images=True, replace=True)
    print(f"4. exported {exported.exported} masks in the VOC layout to {dest / 'export'}")
    scores, conf = evaluate_job(job)
    write_json(scores, conf, list(VOC_CLASS_NAMES), dest / "out" / "eval.json")
    print(f"5. evaluated against the VOC ground truth: mIoU {scores.miou:.1f}, pixel accuracy "
          f"{scores.pixel_accuracy:.1f}, coverage {scores.coverage:.1f} ({dest / 'out' / 'eval.json'})")
    note = random_weights_note(args.model)
    if note:
        print(f"   ({note})")
    print(f"6. report: {write_report(job, dest / 'report')}")
    return 0 if summary.succeeded else 1
