"""`pseudolabel export | eval | report | compare | bench`: what a job's masks are worth and
cost, and the hand-off to training."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.options import (CLASSES_HELP, add_classes, add_command, add_cpu_allocator, add_cpu_threads,
                                  add_input_shards, add_job_folder, add_model_options, add_no_progress, add_output,
                                  file_in_output, in_process_allocator, input_config, require_fraction,
                                  require_gt_folder, require_positive, user_path)
from pipeline.config import ConfigError, load_config, random_weights_note


def register(sub) -> None:
    _register_export(sub)
    _register_eval(sub)
    _register_report(sub)
    _register_compare(sub)
    _register_bench(sub)


def _register_export(sub) -> None:
    export = add_command(
        sub, "export", help="write a job's masks in the VOC layout for training",
        description="Write OUTPUT/SegmentationClassPseudo/<id>.png and a split list, as mmsegmentation's "
                    "PascalVOCDataset and DeepLab-style loaders read them.",
        examples=["pseudolabel export out/ -o pseudo-voc/ --with-images",
                  "pseudolabel export out/ -o pseudo-voc/ --min-confidence 0.5 --ignore-below 0.3 --force",
                  "pseudolabel export out/ -o pseudo-voc/ --with-images --list pairs"])
    add_job_folder(export.add_argument_group("input"))
    outputs = export.add_argument_group("output")
    add_output(outputs, "the folder to write the VOC layout into")
    outputs.add_argument("--format", choices=["voc"], default="voc", help="layout (voc)")
    outputs.add_argument("--split", default="train_aug",
                         help="the split the list names: ImageSets/Segmentation/<split>.txt (default train_aug)")
    outputs.add_argument("--list", choices=["ids", "pairs"], default="ids", dest="list_lines",
                         help="what a line of the split list holds: ids (<id>, as mmsegmentation reads it) or pairs "
                              "(/JPEGImages/<id>.jpg /SegmentationClassPseudo/<id>.png, as DeepLab-style loaders "
                              "read train_aug.txt); default ids")
    outputs.add_argument("--with-images", action="store_true", help="also write JPEGImages/ from the input shards")
    outputs.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    add_no_progress(outputs)
    keep = export.add_argument_group("which masks and pixels")
    keep.add_argument("--min-confidence", type=float, default=None,
                      help="drop images whose mean winning score (0 to 1) is below this")
    keep.add_argument("--require-all-labels", action="store_true",
                      help="drop images where a labelled class received no pixel")
    keep.add_argument("--ignore-below", type=float, default=None,
                      help="turn pixels whose winning score (0 to 1) is below this into 255")
    export.set_defaults(func=run_export)


def _register_eval(sub) -> None:
    evaluate = add_command(
        sub, "eval", help="score a job's masks against ground truth",
        description="Confusion matrix, per-class IoU, mIoU, pixel accuracy and coverage.",
        examples=["pseudolabel eval out/", "pseudolabel eval out/ --gt VOCdevkit/VOC2012/SegmentationClassAug "
                                           "-o out/eval-aug.json"])
    inputs = evaluate.add_argument_group("input")
    add_job_folder(inputs)
    inputs.add_argument("--gt", type=user_path, default=None,
                        help="ground-truth folder of <id>.png (default: the gt.png in the input shards)")
    output = evaluate.add_argument_group("output")
    add_output(output, "the JSON file of the scores, or a folder to write eval.json into (default JOB/eval.json)",
               required=False)
    add_processes(output)
    add_no_progress(output)
    evaluate.set_defaults(func=run_eval)


def _register_report(sub) -> None:
    report = add_command(
        sub, "report", help="write an HTML quality report of a job",
        description="Overlays of the worst, median and best images, plots of the statistics and the "
                    "evaluation table, in one HTML file.",
        examples=["pseudolabel report out/ -o report/"])
    add_job_folder(report.add_argument_group("input"))
    output = report.add_argument_group("output")
    add_output(output, "the folder for index.html, or the .html file to write")
    add_processes(output)
    add_no_progress(output)
    report.set_defaults(func=run_report)


def _register_compare(sub) -> None:
    compare = add_command(
        sub, "compare", help="run several methods on the same shards and print one table",
        description="Compare segmenter methods on the same shards with one model load: mIoU (where ground "
                    "truth exists), mean confidence, seconds per image (each method's first batch is run once "
                    "untimed before it is timed, so the figure is what a long job pays per image).",
        examples=["pseudolabel compare --input shards/ --num-images 50",
                  "pseudolabel compare --input shards/ --methods goca "
                  "--sweep goca.background_offset=-0.4:0.4:0.1"])
    inputs = compare.add_argument_group("input")
    add_input_shards(inputs)
    add_classes(inputs, help=CLASSES_HELP)
    inputs.add_argument("--gt", type=user_path, default=None,
                        help="ground-truth folder of <id>.png (default: the shards' gt.png)")
    inputs.add_argument("--num-images", type=int, default=None,
                        help="compare on the first N usable images only (default: all)")
    methods = compare.add_argument_group("methods")
    methods.add_argument("--methods", default="iseg,diffseg,goca,diffsegmenter",
                         help="comma-separated: iseg, iseg-naive, iseg-no-cat-cross, diffseg, goca, diffsegmenter")
    methods.add_argument("--sweep", default=None, metavar="KEY=START:STOP:STEP",
                         help="one row per value of a config key, as the reference papers tune a constant "
                              "against ground truth, e.g. goca.background_offset=-0.4:0.4:0.1 or "
                              "diffsegmenter.background_score=0.3:0.74:0.04 (post-process keys segment once; a "
                              "method whose masks the key cannot change gets one row)")
    add_model_options(compare)
    add_cpu_allocator(compare.add_argument_group("host memory"), in_process=True)
    add_no_progress(compare.add_argument_group("display"))
    compare.set_defaults(func=run_compare)


def _register_bench(sub) -> None:
    bench = add_command(
        sub, "bench", help="throughput of the bare model, the segmenter and the pipeline",
        description="Images/s of the bare model (VAE + UNet), the segmenter in-process and the pipeline "
                    "over shards, on the same images and model. The last line is "
                    "`segmenter/bare=R1 pipeline/bare=R2`.",
        examples=["pseudolabel bench --model sd21-random --num-images 8 --batch-sizes 1,2,4,8 --rounds 3",
                  "pseudolabel bench --model sd21-random --device cuda --num-images 128 --batch-sizes 1,4,8,16,32 "
                  "--pipeline-num-images 1024 --shard-size 128"])
    model = bench.add_argument_group("segmenter and bare model")
    model.add_argument("--num-images", type=int, default=8, help="images per measurement (default 8)")
    model.add_argument("--batch-sizes", default="1,2,4", help="bare-model batch sizes to try (default 1,2,4)")
    model.add_argument("--label-sets", type=int, default=None,
                       help="distinct label sets among the images, cycled (default 100); a worker encodes "
                            "each set's prompt once, at the cost the `prompts` line prints")
    model.add_argument("--rounds", type=int, default=1,
                       help="time the bare model and each segmenter pass in turn this many times and print "
                            "medians (default 1); on a machine whose speed drifts, 3 or more")
    model.add_argument("--no-compile", action="store_true",
                       help="skip the measurement with `compile` switched (compiling the model takes a minute "
                            "or more on a CPU)")
    pipeline = bench.add_argument_group("pipeline")
    pipeline.add_argument("--no-pipeline", action="store_true", help="skip the pipeline measurements (no Ray)")
    pipeline.add_argument("--pipeline-num-images", type=int, default=None,
                          help="images for the pipeline measurement (default: --num-images)")
    pipeline.add_argument("--shard-size", type=int, default=None,
                          help="images per shard in the pipeline measurement (default: half of them)")
    pipeline.add_argument("--pipeline-crf", choices=("both", "off", "on"), default="both",
                          help="pipeline measured with CRF off, on, or both (default both)")
    pipeline.add_argument("--workers", type=int, default=None, help="pipeline workers (default: one per GPU, else one)")
    add_cpu_threads(pipeline)
    add_cpu_allocator(bench.add_argument_group("host memory"), in_process=True)
    add_model_options(bench, default_model="tiny")
    bench.set_defaults(func=run_bench)


def add_processes(group) -> None:
    group.add_argument("--processes", type=int, default=None,
                       help="processes scoring the mask shards at once (default: one per CPU core this "
                            "command may use)")


def image_bar(job, desc: str, args: argparse.Namespace):
    """A progress bar over the job's masks (shown after half a second of work)."""
    from pipeline.progress import progress_bar

    return progress_bar(total=job.masks_written(), unit="img", desc=desc, delay=0.5, disable=args.no_progress)


def process_count(args: argparse.Namespace) -> int:
    """--processes, checked; by default the CPU cores this command may use."""
    from pipeline.results.parallel import usable_cpus

    require_positive(args, "processes")
    return args.processes or usable_cpus()


def finished_part(job_dir: str):
    """The job's outputs (a JobOutput), saying first what they cover when that is not the whole
    input: a job still running there, or input shards not done (not started, failed,
    interrupted, stale), with the command that finishes them."""
    from pipeline.data.ledger import STALE, Ledger, count_states
    from pipeline.data.outputs import JobOutput
    from pipeline.data.shards import InputError

    ledger = Ledger(job_dir)
    running = ledger.running_job()
    if running:
        print(f"a job is still running on {job_dir} ({running}): this reads the shards done so far")
    output = JobOutput(job_dir)
    shards, left = ledger.unfinished()
    if not ledger.done_shards():
        raise InputError(f"{job_dir} has no shard done yet" + (f" ({count_states(left)})" if left else "")
                         + (": wait for the running job's first shard" if running else
                            f": run `pseudolabel resume {job_dir}`"))
    if left and not running:
        print(f"the job is not complete: {shards - sum(left.values())} of {shards} input shards done "
              f"({count_states(left)}), and this reads those"
              + (" (stale: done under an earlier config or model)" if STALE in left else "") + "; "
              f"`pseudolabel resume {job_dir}` runs the rest")
    return output


def run_export(args: argparse.Namespace) -> int:
    from pipeline.data.outputs import MaskFilter
    from pipeline.results.export import export_voc

    require_fraction(args, "min_confidence", "ignore_below")
    keep = MaskFilter(min_mean_confidence=args.min_confidence, require_all_labels=args.require_all_labels,
                      ignore_below=args.ignore_below)
    job = finished_part(args.job)
    with image_bar(job, "export", args) as bar:
        summary = export_voc(job, args.output, split=args.split, keep=keep, with_images=args.with_images,
                             replace=args.force, progress=bar, list_lines=args.list_lines)
    print(f"exported {summary.exported} masks to {Path(args.output) / 'SegmentationClassPseudo'} "
          f"(dropped: {summary.dropped_text() or 'none'}); split list {summary.split_file}")
    if args.list_lines == "pairs" and not args.with_images:
        print(f"its lines name /JPEGImages/<id>.jpg under {Path(args.output)}, which holds no images: export with "
              "--with-images, or link the dataset's JPEGImages folder there")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from pipeline.data.atomic import check_file_can_be_written
    from pipeline.data.shards import InputError
    from pipeline.results.evaluate import evaluate_job, format_table, write_json

    require_gt_folder(args)
    pool_size = process_count(args)
    job = finished_part(args.job)
    json_path = Path(file_in_output(args.output, "eval.json")) if args.output else Path(args.job) / "eval.json"
    check_file_can_be_written(json_path)
    with image_bar(job, "eval", args) as bar:
        scores, conf = evaluate_job(job, gt_dir=args.gt, processes=pool_size, progress=bar)
    if not scores.images:
        example = next((record.id for record in job.masks()), None)
        if example is None:
            raise InputError(f"job {args.job} has no mask to score: every image failed (see `pseudolabel status "
                             f"{args.job}` and the stats' error column)")
        if args.gt:
            raise InputError(f"no image has ground truth: its shards carry no gt.png and --gt {args.gt} holds no "
                             f"<id>.png of its ids (such as {example}.png): pass the folder of this dataset's masks")
        raise InputError("no image has ground truth: its shards carry no gt.png; pass --gt with the folder of "
                         "<id>.png masks (VOC: SegmentationClassAug)")
    names = job.class_names
    print(format_table(scores, names))
    note = random_weights_note(str(job.job().get("model")))
    if note:
        print(f"({note})")
    write_json(scores, conf, names, json_path)
    print(f"wrote {json_path}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from pipeline.results.report import write_report

    pool_size = process_count(args)
    job = finished_part(args.job)
    with image_bar(job, "report", args) as bar:
        path = write_report(job, args.output, processes=pool_size, progress=bar)
    print(f"wrote {path}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from pipeline.data.shards import check_shard_classes, expand_input, manifests_beside
    from pipeline.progress import progress_bar
    from pipeline.results.compare import comparison_rows, compare_methods, format_comparison, parse_methods, parse_sweep
    from pipeline.segment.models import load_model

    require_positive(args, "num_images")
    require_gt_folder(args)
    methods = parse_methods(args.methods)
    config = input_config(args.config, args.input, args.classes)
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if sweep is not None:
        comparison_rows(methods, config, sweep)  # a bad key or value fails before the model loads
    # so do missing shards and shards made for other classes
    check_shard_classes(manifests_beside(expand_input(args.input)), config.class_names)
    model = load_model(args.model, device=args.device)
    in_process_allocator(args, model.device)
    with progress_bar(unit="img", desc="compare", disable=args.no_progress) as bar:
        tallies = compare_methods(args.input, methods, config, model, gt_dir=args.gt, limit=args.num_images,
                                  progress=bar, sweep=sweep)
    print(format_comparison(tallies))
    note = random_weights_note(args.model)
    if note:
        print(f"({note})")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from pipeline.mask.crf import densecrf_modules
    from pipeline.results.bench import LABEL_SETS, format_report, run_benchmark
    from pipeline.segment.models import load_model

    config = load_config(args.config)
    try:
        sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError("--batch-sizes takes positive integers, e.g. 1,2,4")
    require_positive(args, "num_images", "pipeline_num_images", "shard_size", "workers", "cpu_threads", "label_sets",
                     "rounds")
    label_sets = args.label_sets or LABEL_SETS
    crf_modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.pipeline_crf]
    if not args.no_pipeline and True in crf_modes:
        densecrf_modules()  # the module missing: one line naming the install (or --pipeline-crf off), before timing
    model = load_model(args.model, device=args.device)
    allocator = in_process_allocator(args, model.device)
    result = run_benchmark(model, args.model, config, args.num_images, sizes, args.device,
                           with_pipeline=not args.no_pipeline, pipeline_images=args.pipeline_num_images,
                           shard_size=args.shard_size, crf_modes=crf_modes, workers=args.workers,
                           cpu_threads=args.cpu_threads, label_sets=label_sets, with_compile=not args.no_compile,
                           rounds=args.rounds, allocator=allocator)
    print(format_report(result, args.model, model.device, args.num_images, label_sets))
    return 0
