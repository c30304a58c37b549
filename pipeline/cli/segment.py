"""`pseudolabel segment`: one image and its labels to a mask PNG, in-process (no Ray)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from pipeline.cli.options import (add_classes, add_command, add_cpu_allocator, add_model_options, add_output,
                                  file_in_output, in_process_allocator, local_path, with_classes_option,
                                  user_path, with_method_option)
from pipeline.config import ConfigError, SegmenterConfig, is_background, load_config


def register(sub) -> None:
    parser = add_command(
        sub, "segment", help="segment one image given its class labels",
        description="Write the pseudo mask of one image as a VOC-palette PNG.",
        examples=["pseudolabel segment photo.jpg --labels cat,sofa -o mask.png --overlay overlay.png",
                  "pseudolabel segment photo.jpg --labels dog --crf --model path/to/sd21 -o mask.png",
                  "pseudolabel segment street.jpg --classes 'red car,street lamp,bicycle' -o mask.png"])
    inputs = parser.add_argument_group("input")
    inputs.add_argument("image", type=user_path,
                        help="image file (JPEG, PNG, ...); a photo with an EXIF orientation is segmented "
                             "upright, as a viewer shows it, and its mask is laid out upright")
    inputs.add_argument("--labels", default=None,
                        help="comma-separated class names present in the image, e.g. cat,sofa (with --classes: "
                             "all of those by default)")
    add_classes(inputs, help="names of your own in place of the config's classes, comma-separated, each its own "
                             "prompt (open vocabulary: 'red car,street lamp'); the mask numbers them 1, 2, ...")
    outputs = parser.add_argument_group("output")
    add_output(outputs, "the mask PNG to write (palette, indices 0 background, 1.. the classes, 255 ignore), or a "
                        "folder to write <image name>.png into")
    outputs.add_argument("--overlay", default=None, type=local_path,
                         help="also write an overlay picture (image with mask | mask)")
    outputs.add_argument("--crf", action="store_true", help="refine edges with a dense CRF (config crf.preset)")
    add_model_options(parser, with_method=True)
    add_cpu_allocator(parser.add_argument_group("host memory"), in_process=True)
    parser.set_defaults(func=run_segment,
                        unrecognized_hint="segment reads one image (a glob the shell expanded gives several): for a "
                                          "folder of images, shard them with their labels (pseudolabel shard-folder) "
                                          "and run the job on the shards (pseudolabel run)")


def parse_labels(text: str, config: SegmenterConfig) -> list[int]:
    """Comma-separated class names (dataset names or prompt words) -> sorted 0-based indices;
    `background` is left out (every mask has it)."""
    names = [n.strip() for n in text.split(",") if n.strip() and not is_background(n)]
    if not names:
        raise ConfigError(f"--labels {text!r} names no class: give at least one, e.g. --labels cat,sofa (the "
                          "background is in every mask)")
    try:
        return sorted({config.class_index(n) for n in names})
    except ConfigError as exc:
        raise ConfigError(f"{exc} (or name classes of your own with --classes)") from None


def run_segment(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from PIL import Image

    from pipeline.mask.codec import exif_orientation, overlay, read_image, write_mask
    from pipeline.mask.crf import densecrf_modules
    from pipeline.mask.postprocess import finish_mask
    from pipeline.segment.models import load_model
    from pipeline.segment.plan import note_lines
    from pipeline.segment.segmenter import Segmenter

    args.output = file_in_output(args.output, Path(args.image).stem + ".png")
    if args.overlay:
        args.overlay = file_in_output(args.overlay, Path(args.image).stem + ".png")
        if os.path.abspath(args.overlay) == os.path.abspath(args.output):
            raise ConfigError(f"-o and --overlay both name {args.output}: the overlay would replace the mask; give "
                              "it another name or folder")
    if Path(args.output).suffix.lower() != ".png":
        raise ConfigError(f"-o {args.output}: the mask is written as a PNG of class indices (a JPEG would change "
                          "them): pass a path ending in .png")
    if args.overlay and Path(args.overlay).suffix.lower() not in Image.registered_extensions():
        raise ConfigError(f"--overlay {args.overlay}: name a picture file (.png, .jpg, ...)")
    config = load_config(args.config)
    if args.crf:
        config = config.with_crf(True)
    if config.crf.enabled:
        densecrf_modules()  # the module missing: one line naming the install, before the model loads
    config = with_method_option(with_classes_option(config, args.classes), args.method)
    if args.labels is None and args.classes is None:
        raise ConfigError("--labels is needed: the classes present in the image, e.g. --labels cat,sofa (or "
                          "--classes for names of your own)")
    classes = parse_labels(args.labels, config) if args.labels is not None else list(range(len(config.classes)))
    image = read_image(args.image, upright=True)
    with Image.open(args.image) as img:
        orientation = exif_orientation(img)
    for written in filter(None, (args.output, args.overlay)):  # a folder that cannot be made fails before the model
        Path(written).parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_model(args.model, device=args.device)
    in_process_allocator(args, model.device)
    segmenter = Segmenter(model, config)
    for line in note_lines(segmenter.notes):
        print(line)
    loaded = time.perf_counter()
    scores = segmenter.segment([torch.from_numpy(image).permute(2, 0, 1)], [classes])[0]
    result = finish_mask(scores.maps, scores.classes, image, config, scores.background)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_mask(result.labels, args.output)
    if args.overlay:
        Path(args.overlay).parent.mkdir(parents=True, exist_ok=True)
        overlay(image, result.labels).save(args.overlay)
    values, counts = np.unique(result.labels, return_counts=True)
    names = ["background"] + config.class_names
    shares = ", ".join(
        f"{'ignore' if v == 255 else names[v]} {c / result.labels.size:.1%}" for v, c in zip(values, counts)
    )
    turned = f", upright by its EXIF orientation {orientation}" if orientation != 1 else ""
    print(f"wrote {args.output} ({image.shape[1]}x{image.shape[0]}{turned}): {shares}")
    if args.overlay:
        print(f"wrote {args.overlay}")
    print(f"model load {loaded - started:.1f} s, segment {time.perf_counter() - loaded:.1f} s on {model.device}")
    return 0
