"""`pseudolabel shard-voc | shard-coco | shard-folder`: image shards (jpg, json labels, gt.png)
from a dataset, ready for `pseudolabel run`."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.options import add_command, add_output, user_path
from pipeline.config import VOC_CLASS_NAMES, ConfigError, is_background, load_config, repeated_names

OUTPUT_HELP = "folder for the shards and manifest.json"


def register(sub) -> None:
    voc = add_command(
        sub, "shard-voc", help="write WebDataset shards of a VOC split",
        description="Write WebDataset image shards (jpg, json labels, gt.png) of a VOC split.",
        examples=["pseudolabel shard-voc --voc-root VOCdevkit/VOC2012 --split train_aug -o shards/",
                  "pseudolabel shard-voc --voc-root VOCdevkit/VOC2012 --split train_aug "
                  "--labels-file cls_labels.npy -o shards/"])
    inputs = voc.add_argument_group("input")
    inputs.add_argument("--voc-root", type=user_path, required=True,
                        help="the VOC2012 folder (with JPEGImages/)")
    inputs.add_argument("--split", default="train_aug",
                        help="train, train_aug, val, or a file of ids (default train_aug)")
    inputs.add_argument("--labels-file", type=user_path, default=None,
                        help="image-level labels: cls_labels.npy (IRN) or JSON {id: [names]} (default: the "
                             "classes in each image's SegmentationClassAug/ or SegmentationClass/ mask, as the "
                             "official iSeg code; Annotations/*.xml for images without a mask)")
    _shard_outputs(voc)
    voc.set_defaults(func=run_shard_voc)

    coco = add_command(
        sub, "shard-coco", help="write WebDataset shards of a COCO split",
        description="Write WebDataset image shards (jpg, json labels, gt.png) of a COCO split: labels and "
                    "semantic ground truth from the official instance annotations (docs/training.md says how "
                    "crowd regions and overlaps count).",
        examples=["pseudolabel shard-coco --coco-root coco/ --split train2014 -o coco-shards/"])
    inputs = coco.add_argument_group("input")
    inputs.add_argument("--coco-root", type=user_path, required=True,
                        help="the COCO folder (with train2014/ ... and annotations/)")
    inputs.add_argument("--split", required=True,
                        help="the folder of images under --coco-root: train2014, val2014, train2017, val2017, or "
                             "that of a COCO-format dataset of your own")
    inputs.add_argument("--annotations", type=user_path, default=None,
                        help="instances JSON (default: <coco-root>/annotations/instances_<split>.json)")
    inputs.add_argument("--config", type=user_path, default="coco",
                        help="the config whose classes the annotation file's categories are, by name: coco (the "
                             "default, COCO's 80) or a YAML file listing your own (the run's --config)")
    _shard_outputs(coco)
    coco.set_defaults(func=run_shard_coco)

    folder = add_command(
        sub, "shard-folder", help="write WebDataset shards of a labelled image folder",
        description="Write WebDataset image shards of any image folder with a label file.",
        examples=["pseudolabel shard-folder --image-dir photos/ --labels-file labels.csv --classes cat,dog,sofa "
                  "-o shards/",
                  "pseudolabel shard-folder --image-dir photos/ --labels-file labels.csv --config voc -o shards/"])
    inputs = folder.add_argument_group("input")
    inputs.add_argument("--image-dir", type=user_path, required=True, help="the folder of images")
    inputs.add_argument("--labels-file", type=user_path, required=True,
                        help="CSV or TSV (.csv, .tsv) with columns image,labels (labels separated by ';', ',' or "
                             "'|'; columns by ',', a tab or ';'), JSONL {image, labels}, or .json {image: [names]}")
    classes = inputs.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", help="the class list, comma-separated, in label order")
    classes.add_argument("--config", type=user_path,
                         help="or the config whose classes the labels name: voc, coco or a YAML file "
                              "(the run's --config)")
    outputs = _shard_outputs(folder)
    outputs.add_argument("--prefix", default="images", help="shard name prefix (default images)")
    folder.set_defaults(func=run_shard_folder)


def _shard_outputs(parser: argparse.ArgumentParser):
    outputs = parser.add_argument_group("output")
    add_output(outputs, OUTPUT_HELP)
    outputs.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    return outputs


def _write(sources, args: argparse.Namespace, prefix: str, class_names: list[str], report) -> int:
    """Write the shards with a progress bar and print what was written and what was wrong."""
    from pipeline.data.shards import check_shard_prefix, write_image_shards
    from pipeline.progress import progress_bar

    check_shard_prefix(prefix)
    Path(args.output).mkdir(parents=True, exist_ok=True)  # a path that cannot be a folder fails before the bar
    # delay: the bar shows from its first update after half a second, so a command that fails
    # before writing anything prints its error alone
    with progress_bar(total=len(sources), unit="img", desc="sharding", delay=0.5) as bar:
        write_image_shards(sources, args.output, prefix, args.shard_size, class_names, report, bar)
    samples = sum(s["samples"] for s in report.shards)
    print(f"wrote {len(report.shards)} shard(s), {samples} images, to {args.output} (manifest.json lists them)")
    if report.replaced:
        print(f"removed {len(report.replaced)} shard(s) of the sharding there before, which this one does not "
              f"write again: {', '.join(report.replaced[:3])}{', ...' if len(report.replaced) > 3 else ''}")
    origins = {"mask": "the ground-truth masks", "xml": "Annotations XML", "labels-file": "the labels file",
               "none": "nowhere (no labels)"}
    print("image-level labels from " + ", ".join(f"{origins.get(k, k)} for {n}" for k, n in
                                                  sorted(report.label_sources.items())))
    if report.turned_upright:
        print(f"turned {len(report.turned_upright)} image(s) upright by their EXIF orientation: the shards hold "
              "them upright, re-encoded, so masks, exports and every image loader agree (manifest.json: "
              "turned_upright)")
    if report.problems:
        kinds: dict[str, int] = {}
        for problem in report.problems:
            kinds[problem["problem"]] = kinds.get(problem["problem"], 0) + 1
        print("problems (all listed in manifest.json): " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        for problem in report.problems[:10]:
            print(f"  {problem['id']}: {problem['problem']}: {problem['detail']}")
    return 0


def run_shard_voc(args: argparse.Namespace) -> int:
    from pipeline.data.shards import ShardingReport, voc_sources

    report = ShardingReport()
    sources = voc_sources(args.voc_root, args.split, args.labels_file, report)
    return _write(sources, args, f"voc-{Path(args.split).stem}", list(VOC_CLASS_NAMES), report)


def run_shard_coco(args: argparse.Namespace) -> int:
    from pipeline.data.coco import coco_sources
    from pipeline.data.shards import ShardingReport, config_source
    from pipeline.progress import progress_bar

    class_names = load_config(args.config).class_names
    report = ShardingReport(classes_from=config_source(args.config))
    sources = coco_sources(args.coco_root, args.split, args.annotations, class_names, report,
                           lambda ids: progress_bar(ids, unit="img", desc="ground truth", delay=0.5))
    return _write(sources, args, f"coco-{args.split}", class_names, report)


def run_shard_folder(args: argparse.Namespace) -> int:
    from pipeline.data.shards import CLASSES_OPTION, ShardingReport, config_source, folder_sources

    if args.config is not None:
        classes = load_config(args.config).class_names
    else:
        classes = _class_list(args.classes)
    report = ShardingReport(classes_from=CLASSES_OPTION if args.config is None else config_source(args.config))
    sources = folder_sources(args.image_dir, args.labels_file, report)
    return _write(sources, args, args.prefix, classes, report)


def _class_list(text: str) -> list[str]:
    """--classes as a list of names; a ConfigError where it is empty, holds the background or
    names a class twice."""
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if not classes:
        raise ConfigError("--classes is empty: give the class list in label order, e.g. --classes cat,dog")
    if any(is_background(name) for name in classes):
        raise ConfigError("--classes lists the background: every mask has it as value 0 and the classes are 1, 2, "
                          "... in list order; give only the object classes")
    repeated = repeated_names(classes)
    if repeated:
        raise ConfigError(f"--classes names one class more than once ({', '.join(repeated)}; case, spaces, '_' and "
                          "'-' are ignored): give each class once, in label order")
    return classes
