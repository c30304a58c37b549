"""The `pseudolabel` command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import ConfigError, SegmenterConfig, load_config
from .masks import ImageDecodeError
from .models import DEFAULT_MODEL, ModelLoadError
from .prompts import PromptError

USER_ERRORS = (ConfigError, ModelLoadError, ImageDecodeError, PromptError, FileNotFoundError)


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
    parser.add_argument("--config", default=None, help="YAML config (default: built-in VOC settings, configs/voc.yaml)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1 or cpu (default: cuda if available)")


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .masks import overlay, read_image, write_mask
    from .models import load_model
    from .postprocess import finish_mask
    from .segmenter import Segmenter

    config = load_config(args.config)
    if args.crf:
        config = config.model_copy(update={"crf": config.crf.model_copy(update={"enabled": True})})
    classes = parse_labels(args.labels, config)
    image = read_image(args.image)
    started = time.perf_counter()
    model = load_model(args.model, device=args.device)
    segmenter = Segmenter(model, config)
    loaded = time.perf_counter()
    scores = segmenter.segment([torch.from_numpy(image).permute(2, 0, 1)], [classes])[0]
    result = finish_mask(scores.maps, scores.classes, image, config)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pseudolabel",
        description="Training-free pixel pseudo masks from image-level labels, read from Stable Diffusion "
                    "attention (iSeg).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = sub.add_parser("segment", help="segment one image given its class labels",
                         description="Write the iSeg pseudo mask of one image as a VOC-palette PNG.")
    seg.add_argument("image", help="image file (JPEG, PNG, ...)")
    seg.add_argument("--labels", required=True, help="comma-separated class names present in the image, e.g. cat,sofa")
    seg.add_argument("--out", required=True, help="output mask PNG (palette, indices 0..20, 255 ignore)")
    seg.add_argument("--overlay", default=None, help="also write an overlay picture (image with mask | mask)")
    seg.add_argument("--crf", action="store_true", help="refine edges with a dense CRF (config crf.preset)")
    _model_args(seg)
    seg.set_defaults(func=cmd_segment)
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
