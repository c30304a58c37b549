"""The options several commands share, each with one name and one meaning everywhere:

- `-o/--output`: where the command writes (a file or a folder, as its help says);
- `JOB` (positional): a job's folder, the `-o/--output` of `pseudolabel run`;
- `--input`: image shards (a brace pattern, a glob, or a folder of shards);
- `--model`, `--config`, `--device`: what segments, with which settings, where;
- `--address`, `--workers`, `--batch-size`, `--retries`, `--cpu-threads`, `--cpu-allocator`: how a job
  runs on Ray;
- `--num-images`: how many images a command uses; `--no-progress`: no progress bar.

This module imports nothing heavy, so that `pseudolabel --help` answers at once: each command
imports what it runs inside its function.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from pipeline.config import BUILT_IN_CONFIGS, DEFAULT_MODEL, METHOD_VARIANTS, ConfigError, load_config


EXAMPLES = "examples:\n"


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, but the examples keep one command line each."""

    def _fill_text(self, text, width, indent):
        if text.startswith(EXAMPLES):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_command(sub, name: str, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its examples, one command line each."""
    epilog = EXAMPLES + "\n".join(f"  {line}" for line in examples)
    return sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=_HelpFormatter)


def add_output(group, help: str, required: bool = True, default: str | None = None) -> None:
    group.add_argument("-o", "--output", required=required, default=default, type=local_path, help=help)


def user_path(value: str) -> str:
    """argparse type of a path: `~` and `~user` expanded, as the shell leaves them inside quotes
    (a quoted brace pattern `'~/shards/voc-{000000..000041}.tar'`); else a folder `~` is made here."""
    return os.path.expanduser(value)


def local_path(value: str) -> str:
    """argparse type of an output path: a path on this machine (or a mounted share), `~`
    expanded. A URL is refused: it would silently become a local folder named after its scheme
    (`s3:/bucket/out`)."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value):
        raise argparse.ArgumentTypeError(
            f"{value} is a URL, and this command writes to this machine's file system (on a cluster, a shared one): "
            f"{Path(value)} would be made here instead; pass a local path, then copy what it writes (aws s3 sync, "
            "gsutil rsync, ...), or mount the bucket and pass its path")
    return user_path(value)


def file_in_output(output: str, name: str) -> str:
    """An -o/--output given as a folder (one that exists, or a path ending in /) holds the file
    `name`; any other path is the file itself."""
    if Path(output).is_dir() or output.endswith(("/", os.sep)):
        return str(Path(output) / name)
    return output


def add_job_folder(group, before_input: bool = False) -> None:
    """JOB; before_input: in a command with --input, which takes every word after it, so that
    `resume --input new/ out/` leaves JOB to `job_after_input`."""
    group.add_argument("job", metavar="JOB", nargs="?" if before_input else None, type=user_path,
                       help="the job's folder (the -o/--output of pseudolabel run)")


def job_after_input(args: argparse.Namespace) -> None:
    """Where --input took the words after it, the last of them as JOB if it is a job's folder
    (it holds job.json, so it is no shard input); else a ConfigError naming the order."""
    if args.job is not None:
        return
    if args.input is None:
        raise ConfigError("JOB is missing: the job's folder, e.g. pseudolabel resume out/")
    from pipeline.data.shards import join_inputs, split_inputs

    *inputs, last = split_inputs(args.input)
    if not inputs or not (Path(last) / "job.json").is_file():
        raise ConfigError("JOB is missing: name the job's folder before --input, which takes every word after it "
                          "(pseudolabel resume out/ --input NEW_PATTERN)")
    args.job, args.input = last, join_inputs(inputs)


class _ShardInputs(argparse.Action):
    """--input with one or more patterns (a glob the shell expanded gives several), repeatable:
    kept as one input string, WebDataset's `::` between them (shards.join_inputs), each path's
    `~` expanded (`user_path`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from pipeline.data.shards import join_inputs, split_inputs

        patterns = [user_path(pattern) for value in values for pattern in split_inputs(value)]
        previous = getattr(namespace, self.dest)
        setattr(namespace, self.dest, join_inputs(([previous] if previous else []) + patterns))


def add_input_shards(group, required: bool = True, help: str | None = None) -> None:
    group.add_argument("--input", required=required, nargs="+", action=_ShardInputs, metavar="SHARDS",
                       help=help or "image shards: a brace pattern 'shards/voc-train_aug-{000000..000041}.tar', a "
                                    "glob, a folder of shards (those its manifest.json lists; without one, its .tar "
                                    "files), a served one ('https://host/shards/': its manifest.json's), URLs or "
                                    "'pipe:COMMAND's as WebDataset reads them, or several of these")


def input_config(config: str | None, inputs: str, classes: str | None = None, method: str | None = None):
    """The SegmenterConfig of --config with --classes (comma-separated names, each its own
    prompt) as its classes and --method as its method where given. Without --config and
    --classes, from the input shards' manifest.json (each said in a line): the built-in config
    of the classes it lists (COCO shards: coco); the config file the shards were made with
    (`shard-folder --config my.yaml`), where it still lists those classes; for shards of classes
    given as `shard-folder --classes`, the default config with those classes, as --classes
    gives them; else the default (voc), which check_shard_classes then holds against them."""
    from pipeline.data.shards import (CLASSES_OPTION, built_in_config_listed, classes_listed, expand_input,
                                      first_names, manifests_beside)

    if config is None and classes is None:
        manifests = manifests_beside(expand_input(inputs))
        config = built_in_config_listed(manifests)
        if config is not None and config != BUILT_IN_CONFIGS[0]:
            print(f"config: {config}, the built-in config of the classes the shards' manifest.json lists "
                  "(--config to choose another)")
        listed = classes_listed(manifests) if config is None else None
        if listed is not None:
            names, made_with = listed
            if made_with == CLASSES_OPTION:
                print(f"classes: the {len(names)} the shards' manifest.json lists ({first_names(names, 5)}), given "
                      f"to shard-folder as --classes, each its own prompt, with the {BUILT_IN_CONFIGS[0]} config's "
                      "settings (--classes or --config to choose others)")
                return with_method_option(load_config(None).with_classes(names, "the shards' manifest.json"), method)
            made = load_config(made_with) if made_with is not None and Path(made_with).is_file() else None
            if made is not None and made.class_names == names:
                print(f"config: {made_with}, the config the shards were made with (their manifest.json; --config "
                      "to choose another)")
                return with_method_option(made, method)
    return with_method_option(with_classes_option(load_config(config), classes), method)


def add_method(group) -> None:
    group.add_argument("--method", default=None, choices=list(METHOD_VARIANTS),
                       help="the method, in place of the config's (default: the config's, iseg): iSeg, a peer, or "
                            "one of the paper's two iSeg ablations, as compare --methods names them")


def with_method_option(config, method: str | None):
    """config running --method, where given."""
    return config if method is None else config.with_method(method)


# --classes of the commands that read shards: the names shard-folder --classes wrote them with.
CLASSES_HELP = ("the shards' class list, comma-separated, in label order, each name its own prompt (the --classes "
                "of shard-folder), in place of the config's classes")


def add_classes(group, help: str) -> None:
    group.add_argument("--classes", default=None, help=help)


def with_classes_option(config, classes: str | None):
    """config with --classes (comma-separated names, each its own prompt) as its classes, where
    given; a ConfigError names --classes where they are no class list."""
    if classes is None:
        return config
    return config.with_classes([name.strip() for name in classes.split(",") if name.strip()], "--classes")


def add_model_options(parser: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL,
                      with_config: bool = True, with_method: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, type=user_path,
                       help=f"hub id, local diffusers folder, `tiny` (offline toy model) or `sd21-random` "
                            f"(full size, random weights) (default: {default_model})")
    if with_config:
        group.add_argument("--config", default=None, type=user_path,
                           help="YAML config file, or a built-in name: voc or coco (default: voc; for shards "
                                "whose manifest.json lists COCO's classes, coco; for shard-folder shards, the "
                                "--classes or config they were made with)")
    if with_method:
        add_method(group)
    add_device(group)


def add_device(group) -> None:
    group.add_argument("--device", default=None, help="torch device: cuda or cpu; cuda:1 where the model runs in this "
                       "process (a job's workers each get a GPU from Ray) (default: cuda if available)")


def add_cpu_threads(group) -> None:
    group.add_argument("--cpu-threads", type=int, default=None,
                       help="torch threads of each CPU worker (default: its share of the machine's CPUs)")


def add_cpu_allocator(group, in_process: bool = False) -> None:
    """--cpu-allocator: of the job's CPU workers, or (in_process) of this command's own process
    where it runs the model on the CPU, and of the bench's pipeline workers."""
    from pipeline.job.allocator import CPU_ALLOCATORS, KEEP_FREED_MEMORY, as_shell

    settings = as_shell(KEEP_FREED_MEMORY)
    if in_process:
        help_text = ("glibc settings where the model runs on the CPU (this process; the bench's pipeline workers "
                     "too). keep-freed (the default): freed memory is kept for reuse, as a job's CPU workers do "
                     f"({settings}, applied here with mallopt; a variable set in this shell keeps its value); "
                     "unchanged: glibc's defaults, 0.5-0.7x the images/s on the development CPU "
                     "(docs/performance.md)")
    else:
        help_text = (f"glibc settings of CPU workers. keep-freed (the default): they start with {settings} (a "
                     "variable set in this shell keeps its value): jobs ran at 1.24-2.03x the images/s of glibc's "
                     "defaults on the development CPU, for 0.5-1.9 GB more memory per worker "
                     "(docs/performance.md); unchanged: the environment Ray starts workers with")
    group.add_argument("--cpu-allocator", choices=CPU_ALLOCATORS, default="keep-freed", help=help_text)


def in_process_allocator(args: argparse.Namespace, device) -> str:
    """Apply --cpu-allocator to this process if the model runs on the CPU here (segment,
    compare, bench); the allocator it then runs under ("unchanged" on a GPU)."""
    from pipeline.job.allocator import keep_freed_memory_here

    return keep_freed_memory_here(args.cpu_allocator) if device.type == "cpu" else "unchanged"


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """How a job runs on Ray (run and resume)."""
    group = parser.add_argument_group("Ray job")
    group.add_argument("--address", default=None,
                       help="Ray cluster to join: auto, host:6379 or ray://host:10001; local starts a private "
                            "Ray (default: RAY_ADDRESS, else for resume the address the job's last run was given, "
                            "else the cluster `ray start` runs on this machine, else a private Ray)")
    group.add_argument("--workers", type=int, default=None,
                       help="segmenter actors (default: one per GPU, or 1 on a CPU-only cluster)")
    group.add_argument("--batch-size", type=_batch_size, default=None,
                       help="images per UNet forward, or auto, overriding the config's batch_size (default auto: "
                            "1 on a CPU, 16 on a GPU; not part of the config hash: a job resumes with another one)")
    group.add_argument("--retries", type=int, default=2,
                       help="times a shard is retried on a restarted worker after the worker dies (default 2)")
    add_cpu_threads(group)
    add_cpu_allocator(group)
    add_no_progress(group)


def add_no_progress(group) -> None:
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _batch_size(text: str) -> int | str:
    """--batch-size: a number, or `auto` as the config takes it."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number of images or auto, not {text!r}") from None


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """ConfigError naming the first of these optional integer options that is set below 1."""
    for name in names:
        value = getattr(args, name)
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def require_fraction(args: argparse.Namespace, *names: str) -> None:
    """ConfigError naming the first of these optional score options set outside 0..1 (a pixel's
    winning score and an image's mean confidence lie there)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} takes a score from 0 to 1, got {value}")


def require_gt_folder(args: argparse.Namespace) -> None:
    """ConfigError when --gt is given and is not a folder, or is VOC's folder of instance masks."""
    if args.gt is not None and not Path(args.gt).is_dir():
        what = "is a file" if Path(args.gt).exists() else "does not exist"
        raise ConfigError(f"--gt {args.gt} {what}: pass the folder of <id>.png ground-truth masks, "
                          "e.g. VOCdevkit/VOC2012/SegmentationClassAug")
    if args.gt is not None and Path(args.gt).name == "SegmentationObject":  # same palette and sizes: no error would come
        raise ConfigError(f"--gt {args.gt} holds VOC's instance masks (a value per object, not per class): pass "
                          "SegmentationClass or SegmentationClassAug, beside it")
