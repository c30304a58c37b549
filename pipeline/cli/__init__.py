"""The `pseudolabel` command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.config import VOC_CLASS_NAMES, ConfigError, SegmenterConfig, load_config
from pipeline.data.shards import InputError
from pipeline.errors import PipelineError
from pipeline.job.runner import JobInterrupted
from pipeline.segment.models import DEFAULT_MODEL

USER_ERRORS = (PipelineError, FileNotFoundError)


def parse_labels(text: str, config: SegmenterConfig) -> list[int]:
    """Comma-separated class names (dataset names or prompt words) -> sorted 0-based indices."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--labels is empty: give at least one class name, e.g. --labels cat,sofa")
    return sorted({config.class_index(n) for n in names})


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id, local diffusers folder, `tiny` (offline toy model) or `sd21-random` "
                             f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--config", default=None, help="YAML config file, or a built-in name: voc (the default) or coco")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1 or cpu (default: cuda if available)")


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from pipeline.mask.codec import overlay, read_image, write_mask
    from pipeline.segment.models import load_model
    from pipeline.mask.postprocess import finish_mask
    from pipeline.segment.segmenter import Segmenter

    config = load_config(args.config)
    if args.crf:
        config = config.with_crf(True)
    classes = parse_labels(args.labels, config)
    image = read_image(args.image)
    started = time.perf_counter()
    model = load_model(args.model, device=args.device)
    segmenter = Segmenter(model, config)
    loaded = time.perf_counter()
    scores = segmenter.segment([torch.from_numpy(image).permute(2, 0, 1)], [classes])[0]
    result = finish_mask(scores.maps, scores.classes, image, config, scores.background)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_mask(result.labels, args.out)
    if args.overlay:
        Path(args.overlay).parent.mkdir(parents=True, exist_ok=True)
        overlay(image, result.labels).save(args.overlay)
    values, counts = np.unique(result.labels, return_counts=True)
    names = ["background"] + config.class_names
    shares = ", ".join(
        f"{'ignore' if v == 255 else names[v]} {c / result.labels.size:.1%}" for v, c in zip(values, counts)
    )
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]}): {shares}")
    if args.overlay:
        print(f"wrote {args.overlay}")
    print(f"model load {loaded - started:.1f} s, segment {time.perf_counter() - loaded:.1f} s on {model.device}")
    return 0


def _print_sharding(report, out_dir) -> None:
    samples = sum(s["samples"] for s in report.shards)
    print(f"wrote {len(report.shards)} shard(s), {samples} images, to {out_dir} (manifest.json lists them)")
    if report.problems:
        kinds: dict[str, int] = {}
        for problem in report.problems:
            kinds[problem["problem"]] = kinds.get(problem["problem"], 0) + 1
        print("problems (all listed in manifest.json): " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        for problem in report.problems[:10]:
            print(f"  {problem['id']}: {problem['problem']}: {problem['detail']}")


def cmd_shard_voc(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.data.shards import ShardingReport, voc_sources, write_image_shards

    report = ShardingReport()
    sources = voc_sources(args.voc_root, args.split, args.labels_file, report)
    prefix = f"voc-{Path(args.split).stem}"
    with tqdm(total=len(sources), unit="img", desc="sharding") as bar:
        write_image_shards(sources, args.out, prefix, args.shard_size, list(VOC_CLASS_NAMES), report, bar)
    _print_sharding(report, args.out)
    return 0


def cmd_shard_coco(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.data.coco import coco_sources
    from pipeline.data.shards import ShardingReport, write_image_shards

    class_names = load_config("coco").class_names
    report = ShardingReport()
    sources = coco_sources(args.coco_root, args.split, args.annotations, class_names, report)
    with tqdm(total=len(sources), unit="img", desc="sharding") as bar:
        write_image_shards(sources, args.out, f"coco-{args.split}", args.shard_size, class_names, report, bar)
    _print_sharding(report, args.out)
    return 0


def cmd_shard_folder(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.data.shards import ShardingReport, folder_sources, write_image_shards

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not classes:
        raise ConfigError("--classes is empty: give the class list in label order, e.g. --classes cat,dog")
    report = ShardingReport()
    sources = folder_sources(args.images, args.labels, report)
    with tqdm(total=len(sources), unit="img", desc="sharding") as bar:
        write_image_shards(sources, args.out, args.prefix, args.shard_size, classes, report, bar)
    _print_sharding(report, args.out)
    return 0


def _require_positive(args: argparse.Namespace, *names: str) -> None:
    """ConfigError naming the first of these optional integer options that is set below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _run(args: argparse.Namespace, input_pattern: str, config: SegmenterConfig, model: str, retry_failed: bool) -> int:
    from pipeline.job.runner import run_job

    _require_positive(args, "cpu_threads", "workers", "batch_size")
    if args.retries < 0:
        raise ConfigError(f"--retries must be 0 or more, got {args.retries}")
    if args.batch_size is not None:
        config = config.model_copy(update={"batch_size": args.batch_size})
    try:
        summary = run_job(input_pattern, args.output, config, model, address=args.address, workers=args.workers,
                          retry_failed=retry_failed, force=getattr(args, "force", False), retries=args.retries,
                          device=args.device, progress=not args.no_progress, cpu_threads=args.cpu_threads)
    except JobInterrupted as stop:
        done = stop.summary
        print(f"interrupted: {done.shards_done} shard(s) done this run ({done.images_ok} images ok, "
              f"{done.images_failed} failed), {len(stop.interrupted)} in flight marked interrupted; "
              f"resume with: pseudolabel resume {Path(args.output).absolute()}", file=sys.stderr)
        return 128 + stop.signum
    print(summary.line)
    if summary.failed_line:
        print(summary.failed_line)
    print(f"masks in {Path(args.output) / 'masks'}, statistics in {Path(args.output) / 'stats'}, "
          f"ledger in {Path(args.output) / 'ledger'}")
    return 0 if summary.shards_failed == 0 else 1


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.crf:
        config = config.with_crf(True)
    return _run(args, args.input, config, args.model, args.retry_failed)


def cmd_resume(args: argparse.Namespace) -> int:
    from pipeline.data.ledger import Ledger

    job = Ledger(args.output).job()
    if job is None:
        raise InputError(f"{args.output} has no job.json: start the job with pseudolabel run")
    config = SegmenterConfig.model_validate(job["config"])
    return _run(args, job["input"], config, job["model"], retry_failed=True)


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.data.ledger import Ledger
    from pipeline.data.outputs import failed_image_ids
    from pipeline.job.runner import name_failed

    ledger = Ledger(args.output)
    job = ledger.job()
    if job is None:
        raise InputError(f"{args.output} has no job.json: no job has run there")
    entries = ledger.entries()
    print(f"job: model {job['model']}, config {job['config_hash'][:12]}, input {job['input']}")
    print(f"{'shard':32} {'state':12} {'attempts':>8} {'images':>7} {'failed':>7} {'seconds':>8}  error")
    for e in entries:
        print(f"{e.shard:32} {e.state:12} {e.attempts:8d} {e.samples:7d} {e.failed_samples:7d} {e.seconds:8.1f}  "
              f"{e.error or ''}")
    states = [e.state for e in entries]
    print(f"{states.count('done')} done, {states.count('failed')} failed, {states.count('interrupted')} "
          f"interrupted, {states.count('in_progress')} in progress (interrupted unless a job is running)")
    failed = failed_image_ids(args.output)
    if failed:
        print(f"{len(failed)} failed image(s): {name_failed(failed, len(failed))} "
              "(errors in stats/, status column 'failed')")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from importlib import resources

    from pipeline.job.runner import run_job
    from pipeline.data.shards import ShardingReport, voc_sources, write_image_shards

    dest = Path(args.dest)
    sample = Path(str(resources.files("pipeline") / "sample" / "VOC2012"))
    report = ShardingReport()
    sources = voc_sources(sample, "train", None, report)
    shards = dest / "shards"
    write_image_shards(sources, shards, "voc-sample", 2, list(VOC_CLASS_NAMES), report)
    print(f"1. sharded {len(sources)} PASCAL VOC sample images into {shards}")
    config = load_config(args.config)
    summary = run_job(str(shards), dest / "out", config, args.model, workers=1, device=args.device,
                      force=True, progress=not args.no_progress)
    print(f"2. ran the job: {summary.line}")
    print(f"   masks: {dest / 'out' / 'masks'}  statistics: {dest / 'out' / 'stats'}  ledger: {dest / 'out' / 'ledger'}")
    written = write_overlays(dest / "out" / "masks", sample, dest / "overlays")
    print(f"3. overlays (image with mask | mask) of {written} images in {dest / 'overlays'}")
    from pipeline.results.evaluate import evaluate_job, write_json
    from pipeline.results.export import export_voc
    from pipeline.data.outputs import JobOutput
    from pipeline.results.report import write_report

    job = JobOutput(dest / "out")
    exported = export_voc(job, dest / "export", split="train", with_images=True, replace=True)
    print(f"4. exported {exported.exported} masks in the VOC layout to {dest / 'export'}")
    scores, conf = evaluate_job(job)
    write_json(scores, conf, list(VOC_CLASS_NAMES), dest / "out" / "eval.json")
    print(f"5. evaluated against the VOC ground truth: mIoU {scores.miou:.1f}, pixel accuracy "
          f"{scores.pixel_accuracy:.1f}, coverage {scores.coverage:.1f} ({dest / 'out' / 'eval.json'})")
    if args.model == "tiny":
        print("   (the tiny model has random weights: these figures only show the wiring)")
    print(f"6. report: {write_report(job, dest / 'report')}")
    return 0 if summary.shards_failed == 0 else 1


def write_overlays(masks_dir: Path, voc_root: Path, dest: Path) -> int:
    """An overlay PNG per mask of the mask shards in masks_dir, images from voc_root/JPEGImages."""
    from pipeline.mask.codec import decode_mask, overlay, read_image
    from pipeline.data.safe_paths import file_in
    from pipeline.data.shards import read_shard

    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for tar in sorted(masks_dir.glob("*.tar")):
        for sample in read_shard(str(tar)):
            image = read_image(file_in(voc_root / "JPEGImages", sample["__key__"], ".jpg"))
            overlay(image, decode_mask(sample["png"])).save(file_in(dest, sample["__key__"], ".png"))
            count += 1
    return count


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.results.export import ExportFilter, export_voc
    from pipeline.data.outputs import JobOutput

    keep = ExportFilter(min_mean_confidence=args.min_confidence, require_all_labels=args.require_all_labels,
                        ignore_below=args.ignore_below)
    summary = export_voc(JobOutput(args.output), args.dest, split=args.split, keep=keep, with_images=args.images,
                         replace=args.force)
    dropped = ", ".join(f"{n} for {why}" for why, n in summary.dropped.items()) or "none"
    print(f"exported {summary.exported} masks to {Path(args.dest) / 'SegmentationClassPseudo'} "
          f"(dropped: {dropped}); split list {summary.split_file}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.results.evaluate import evaluate_job, format_table, write_json
    from pipeline.data.outputs import JobOutput

    job = JobOutput(args.output)
    scores, conf = evaluate_job(job, gt_dir=args.gt)
    if not scores.images:
        raise InputError("no image has ground truth: pass --gt with the SegmentationClass(Aug) folder")
    names = job.class_names
    print(format_table(scores, names))
    json_path = Path(args.json) if args.json else Path(args.output) / "eval.json"
    write_json(scores, conf, names, json_path)
    print(f"wrote {json_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.data.outputs import JobOutput
    from pipeline.results.report import write_report

    path = write_report(JobOutput(args.output), args.dest)
    print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.results.compare import comparison_rows, compare_methods, format_comparison, parse_methods, parse_sweep
    from pipeline.segment.models import load_model

    methods = parse_methods(args.methods)
    config = load_config(args.config)
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if sweep is not None:
        comparison_rows(methods, config, sweep)  # a bad key or value fails before the model loads
    model = load_model(args.model, device=args.device)
    with tqdm(unit="img", desc="compare", disable=args.no_progress) as bar:
        tallies = compare_methods(args.input, methods, config, model, gt_dir=args.gt, limit=args.limit, progress=bar,
                                  sweep=sweep)
    print(format_comparison(tallies))
    if args.model in ("tiny", "sd21-random"):
        print("(random weights: the figures show the wiring and the cost, not the quality)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.results.bench import LABEL_SETS, format_report, run_benchmark
    from pipeline.segment.models import load_model

    config = load_config(args.config)
    sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    if not sizes or min(sizes) < 1:
        raise ConfigError("--batch-sizes takes positive integers, e.g. 1,2,4")
    _require_positive(args, "pipeline_images", "shard_size", "workers", "cpu_threads", "label_sets")
    label_sets = args.label_sets or LABEL_SETS
    model = load_model(args.model, device=args.device)
    crf_modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.crf]
    result = run_benchmark(model, args.model, config, args.images, sizes, args.device,
                           with_pipeline=not args.no_pipeline, pipeline_images=args.pipeline_images,
                           shard_size=args.shard_size, crf_modes=crf_modes, workers=args.workers,
                           cpu_threads=args.cpu_threads, label_sets=label_sets)
    print(format_report(result, args.model, model.device, args.images, label_sets))
    return 0


def _job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: auto, host:6379 or ray://host:10001; local starts a private "
                             "Ray (default: RAY_ADDRESS, else the cluster `ray start` runs on this machine, "
                             "else a private Ray)")
    parser.add_argument("--workers", type=int, default=None,
                        help="segmenter actors (default: one per GPU, or 1 on a CPU-only cluster)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per UNet forward, overriding the config's batch_size (not part of the "
                             "config hash: a job resumes with another batch size)")
    parser.add_argument("--retries", type=int, default=2,
                        help="times a shard is retried on a restarted worker after the worker dies (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _cpu_threads_arg(parser)


def _cpu_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch threads of each CPU worker (default: its share of the machine's CPUs)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pseudolabel")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pseudolabel",
        description="Training-free pixel pseudo masks from image-level labels, read from Stable Diffusion "
                    "attention (iSeg).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the whole job on the bundled sample images",
                          description="Shard the bundled VOC sample images and run the job on them.")
    demo.add_argument("--dest", default="demo", help="folder for shards and outputs (default: ./demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_args(demo)
    demo.set_defaults(func=cmd_demo)

    seg = sub.add_parser("segment", help="segment one image given its class labels",
                         description="Write the iSeg pseudo mask of one image as a VOC-palette PNG.")
    seg.add_argument("image", help="image file (JPEG, PNG, ...)")
    seg.add_argument("--labels", required=True, help="comma-separated class names present in the image, e.g. cat,sofa")
    seg.add_argument("--out", required=True, help="output mask PNG (palette, indices 0..20, 255 ignore)")
    seg.add_argument("--overlay", default=None, help="also write an overlay picture (image with mask | mask)")
    seg.add_argument("--crf", action="store_true", help="refine edges with a dense CRF (config crf.preset)")
    _model_args(seg)
    seg.set_defaults(func=cmd_segment)

    voc = sub.add_parser("shard-voc", help="write WebDataset shards of a VOC split",
                         description="Write WebDataset image shards (jpg, json labels, gt.png) of a VOC split.")
    voc.add_argument("--voc-root", required=True, help="the VOC2012 folder (with JPEGImages/)")
    voc.add_argument("--split", default="train_aug", help="train, train_aug, val, or a file of ids (default train_aug)")
    voc.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    voc.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    voc.add_argument("--labels-file", default=None,
                     help="image-level labels: cls_labels.npy (IRN) or JSON {id: [names]} (default: Annotations/*.xml, "
                          "else the segmentation masks)")
    voc.set_defaults(func=cmd_shard_voc)

    coco = sub.add_parser("shard-coco", help="write WebDataset shards of a COCO split",
                          description="Write WebDataset image shards (jpg, json labels, gt.png) of a COCO split: "
                                      "labels and semantic ground truth from the official instance annotations "
                                      "(docs/training.md says how crowd regions and overlaps count).")
    coco.add_argument("--coco-root", required=True, help="the COCO folder (with train2014/ ... and annotations/)")
    coco.add_argument("--split", required=True, help="train2014, val2014, train2017 or val2017")
    coco.add_argument("--annotations", default=None,
                      help="instances JSON (default: <coco-root>/annotations/instances_<split>.json)")
    coco.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    coco.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    coco.set_defaults(func=cmd_shard_coco)

    folder = sub.add_parser("shard-folder", help="write WebDataset shards of a labelled image folder",
                            description="Write WebDataset image shards of any image folder with a label file.")
    folder.add_argument("--images", required=True, help="image folder")
    folder.add_argument("--labels", required=True,
                        help="CSV with columns image,labels (labels separated by ';') or JSONL {image, labels}")
    folder.add_argument("--classes", required=True, help="the class list, comma-separated, in label order")
    folder.add_argument("--out", required=True, help="output folder")
    folder.add_argument("--prefix", default="images", help="shard name prefix (default images)")
    folder.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    folder.set_defaults(func=cmd_shard_folder)

    run = sub.add_parser("run", help="segment every shard on Ray; resumable",
                         description="Run the job over image shards. Re-running skips shards already done.")
    run.add_argument("--input", required=True,
                     help="shards: a brace pattern 'shards/voc-train_aug-{000000..000041}.tar', a glob, "
                          "or a folder with manifest.json")
    run.add_argument("--output", required=True, help="output folder (masks/, stats/, ledger/, job.json)")
    run.add_argument("--crf", action="store_true", help="dense CRF on CPU workers")
    run.add_argument("--retry-failed", action="store_true", help="also redo shards that failed before")
    run.add_argument("--force", action="store_true", help="accept an output folder made with another config/model")
    _model_args(run)
    _job_args(run)
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="redo the failed and interrupted shards of a job",
                            description="Resume a job with its recorded input, config and model.")
    resume.add_argument("output", help="the job's output folder")
    resume.add_argument("--device", default=None, help="torch device for the workers")
    _job_args(resume)
    resume.set_defaults(func=cmd_resume)

    export = sub.add_parser("export", help="write a job's masks in the VOC layout for training",
                            description="Write DEST/SegmentationClassPseudo/<id>.png and a split list, as "
                                        "mmsegmentation's PascalVOCDataset and DeepLab-style loaders read them.")
    export.add_argument("output", help="the job's output folder")
    export.add_argument("--format", choices=["voc"], default="voc", help="layout (voc)")
    export.add_argument("--dest", required=True, help="destination folder")
    export.add_argument("--split", default="train_aug", help="name of the split list (default train_aug)")
    export.add_argument("--min-confidence", type=float, default=None,
                        help="drop images whose mean winning score is below this")
    export.add_argument("--require-all-labels", action="store_true",
                        help="drop images where a labelled class received no pixel")
    export.add_argument("--ignore-below", type=float, default=None,
                        help="turn pixels whose winning score is below this into 255")
    export.add_argument("--images", action="store_true", help="also write JPEGImages/ from the input shards")
    export.add_argument("--force", action="store_true", help="replace DEST if it exists")
    export.set_defaults(func=cmd_export)

    evaluate = sub.add_parser("eval", help="score a job's masks against ground truth",
                              description="Confusion matrix, per-class IoU, mIoU, pixel accuracy and coverage.")
    evaluate.add_argument("output", help="the job's output folder")
    evaluate.add_argument("--gt", default=None,
                          help="ground-truth folder of <id>.png (default: the gt.png in the input shards)")
    evaluate.add_argument("--json", default=None, help="where to write the scores (default OUTPUT/eval.json)")
    evaluate.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="write an HTML quality report of a job",
                            description="Overlays of the worst, median and best images, plots of the "
                                        "statistics and the evaluation table, in one HTML file.")
    report.add_argument("output", help="the job's output folder")
    report.add_argument("--dest", required=True, help="folder for index.html")
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser("compare", help="run several methods on the same shards and print one table",
                             description="Compare segmenter methods on the same shards with one model load: "
                                         "mIoU (where ground truth exists), mean confidence, seconds per image.")
    compare.add_argument("--methods", default="iseg,diffseg,goca,diffsegmenter",
                         help="comma-separated: iseg, iseg-naive, iseg-no-cat-cross, diffseg, goca, diffsegmenter")
    compare.add_argument("--input", required=True, help="shards: brace pattern, glob, or folder with manifest.json")
    compare.add_argument("--gt", default=None, help="ground-truth folder of <id>.png (default: the shards' gt.png)")
    compare.add_argument("--limit", type=int, default=None, help="compare on the first N usable images only")
    compare.add_argument("--sweep", default=None, metavar="KEY=START:STOP:STEP",
                         help="one row per value of a config key, as the reference papers tune a constant "
                              "against ground truth, e.g. goca.background_offset=-0.4:0.4:0.1 or "
                              "diffsegmenter.background_score=0.3:0.74:0.04 (post-process keys segment once)")
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_args(compare)
    compare.set_defaults(func=cmd_compare)

    bench = sub.add_parser("bench", help="throughput of the bare model, the segmenter and the pipeline",
                           description="Images/s of the bare model (VAE + UNet), the segmenter in-process and "
                                       "the pipeline over shards, on the same images and model. The last line "
                                       "is `segmenter/bare=R1 pipeline/bare=R2`.")
    bench.add_argument("--images", type=int, default=8, help="images per measurement (default 8)")
    bench.add_argument("--batch-sizes", default="1,2,4", help="bare-model batch sizes to try (default 1,2,4)")
    bench.add_argument("--no-pipeline", action="store_true", help="skip the pipeline measurements (no Ray)")
    bench.add_argument("--pipeline-images", type=int, default=None,
                       help="images for the pipeline measurement (default: --images)")
    bench.add_argument("--shard-size", type=int, default=None,
                       help="images per shard in the pipeline measurement (default: half of them)")
    bench.add_argument("--crf", choices=("both", "off", "on"), default="both",
                       help="pipeline measured with CRF off, on, or both (default both)")
    bench.add_argument("--workers", type=int, default=None,
                       help="pipeline workers (default: one per GPU, else one)")
    bench.add_argument("--label-sets", type=int, default=None,
                       help="distinct label sets among the images, cycled (default 100); a worker encodes "
                            "each set's prompt once, at the cost the `prompts` line prints")
    _cpu_threads_arg(bench)
    bench.add_argument("--model", default="tiny", help="tiny (default), sd21-random (full size, random weights) or a path")
    bench.add_argument("--config", default=None, help="YAML config file, or a built-in name: voc (the default) or coco")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench.set_defaults(func=cmd_bench)

    status = sub.add_parser("status", help="print a job's ledger", description="Print a job's per-shard state.")
    status.add_argument("output", help="the job's output folder")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"pseudolabel: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
