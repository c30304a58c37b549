"""Run the official iSeg code and this project on the same weights, images, labels and noise,
and print how far their masks agree.

    python jobs/check_official.py --official ~/src/iseg.code --input 'shards/voc-train-*.tar' \
        --model tiny [--config configs/voc.yaml] [--num-images 48]

--official is a checkout of github.com/linsun449/iseg.code (checked at commit 2e8fb321) that
you fetched yourself; nothing of it is part of this project. Its code is imported from that
path at run time, in a child process (it vendors its own `diffusers`, which cannot share a
process with the installed one), with import shims only: huggingface_hub names that newer
releases dropped, a `pytorch_lightning.LightningModule` stand-in where Lightning is not
installed, `Tensor.cuda()` as a no-op (everything runs on the CPU), and its model loading
pointed at the weights given here instead of the hub. Its maths run as written, with `half=False`
(float32; `--half`: its default half=True, and this project's model in float16, as both run on
a GPU) and the argument defaults of its `wsss/arguments.py` for the dataset.

Both sides read the same shard samples (the image bytes and the image-level labels in each
sample's .json). The official side gets the labels as a mask holding one pixel per label, so
its `test_step` picks the same classes; it prepares the image as its own dataset classes do
(VOC: scaled to [0, 1], then OpenCV bilinear to 512; COCO: OpenCV bilinear, then scaled).

Per image: the class maps' largest difference (both bilinear to 512 px and min-max scaled)
and the share of mask pixels that agree; last line `official agreement: X% of pixels`.
This project segments one image at a time, as the official code does and a job does on a CPU
(`batch_size: auto`); `--batch-size 16` measures the masks a GPU job writes at `auto`, whose
batched kernels round differently. `--job OUT` also compares the masks a `pseudolabel run` over
the same shards wrote into OUT (what a user of the job gets).
Needs `pip install -e ".[official]"` (opencv-python-headless, imageio, texttable: the
official code's imports).
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(_REPO))

# VAE attention weights were renamed after the diffusers release the official code vendors.
_SD2_HEADS = [5, 10, 20, 20]
_VAE_ATTENTION_NAMES = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}


def read_samples(pattern: str, limit: int | None) -> list[dict]:
    """[{key, jpg: bytes, names: [str]}] from the shards, in shard order, at most `limit`."""
    from pipeline.data.shards import expand_input
    from pipeline.data.shards import read_shard

    samples = []
    for url in expand_input(pattern):
        for sample in read_shard(url):
            meta = json.loads(sample["json"])
            samples.append({"key": sample["__key__"], "jpg": sample["jpg"], "names": meta["names"]})
            if limit is not None and len(samples) >= limit:
                return samples
    return samples


# --- the official side (child process) ----------------------------------------------------------

def _shim_old_huggingface_hub() -> None:
    """Names the vendored diffusers 0.16 imports and current huggingface_hub no longer has."""
    import re

    import huggingface_hub
    import huggingface_hub.constants as constants
    import huggingface_hub.file_download as file_download

    if not hasattr(constants, "hf_cache_home"):
        constants.hf_cache_home = constants.HF_HOME
    if not hasattr(huggingface_hub, "HfFolder"):
        huggingface_hub.HfFolder = type("HfFolder", (), {"get_token": staticmethod(lambda: None)})
    if not hasattr(huggingface_hub, "cached_download"):
        huggingface_hub.cached_download = huggingface_hub.hf_hub_download
    if not hasattr(file_download, "REGEX_COMMIT_HASH"):
        file_download.REGEX_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


def _shim_lightning() -> None:
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        module = types.ModuleType("pytorch_lightning")

        class LightningModule(torch.nn.Module):
            device = torch.device("cpu")

            def save_hyperparameters(self, *args, **kwargs):
                pass

        module.LightningModule = LightningModule
        sys.modules["pytorch_lightning"] = module


def _vendored_diffusers(official: Path):
    """The official checkout's own diffusers package, imported without its __init__ (whose
    pipelines need a transformers of 2023); returns the package with the three model classes."""
    for name in [n for n in sys.modules if n == "diffusers" or n.startswith("diffusers.")]:
        del sys.modules[name]
    _shim_old_huggingface_hub()
    package = types.ModuleType("diffusers")
    package.__path__ = [str(official / "diffusers")]
    package.__version__ = "0.16.0.dev0"
    sys.modules["diffusers"] = package
    from diffusers.models.autoencoder_kl import AutoencoderKL
    from diffusers.models.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    package.AutoencoderKL, package.UNet2DConditionModel, package.DDIMScheduler = (
        AutoencoderKL, UNet2DConditionModel, DDIMScheduler)
    return package


def _point_loading_at(package, bundle) -> None:
    """The official StableDiffusion loads a hub id; hand it these weights instead, in the
    vendored classes (same parameters, the VAE's attention under its old names)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    def vendored(cls, config: dict, state: dict):
        accepted = set(inspect.signature(cls.__init__).parameters)
        model = cls(**{k: v for k, v in config.items() if k in accepted})
        model.load_state_dict(state, strict=True)
        return model.float().eval()

    vae_state = {}
    for key, value in bundle.vae.state_dict().items():
        if ".attentions." in key:
            for new, old in _VAE_ATTENTION_NAMES.items():
                key = key.replace(new, old)
        vae_state[key] = value
    unet = vendored(package.UNet2DConditionModel, dict(bundle.unet.config), bundle.unet.state_dict())
    vae = vendored(package.AutoencoderKL, dict(bundle.vae.config), vae_state)
    scheduler = package.DDIMScheduler(**{k: v for k, v in dict(bundle.scheduler.config).items()
                                         if k in inspect.signature(package.DDIMScheduler.__init__).parameters})
    package.UNet2DConditionModel.from_pretrained = classmethod(lambda cls, *a, **k: unet)
    package.AutoencoderKL.from_pretrained = classmethod(lambda cls, *a, **k: vae)
    package.DDIMScheduler.from_config = classmethod(lambda cls, *a, **k: scheduler)
    CLIPTextModel.from_pretrained = classmethod(lambda cls, *a, **k: bundle.text_encoder)
    CLIPTokenizer.from_pretrained = classmethod(lambda cls, *a, **k: bundle.tokenizer)


def _official_image(jpg: bytes, dataset: str) -> np.ndarray:
    """float32 [3, 512, 512] as the official dataset classes prepare an image (crop_method
    'interpolate'): VOC scales to [0, 1] before OpenCV's resize, COCO after it."""
    import cv2
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float32)
    if dataset == "voc":
        image = cv2.resize(image / 255.0, dsize=(512, 512))
    else:
        image = cv2.resize(image, dsize=(512, 512)) / 255.0
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def _maps_at_512(maps: torch.Tensor) -> np.ndarray:
    """Class maps [C, s, s] -> float32 [C, 512, 512], bilinear and min-max scaled per class."""
    import torch.nn.functional as F

    from pipeline.segment.maps import minmax

    grid = F.interpolate(maps[None].float(), size=(512, 512), mode="bilinear", align_corners=False)
    return minmax(grid, (2, 3))[0].numpy()


def _ours_on_official_attention(cross: dict, self_attn: torch.Tensor, sample: dict, config, tokenizer) -> tuple:
    """This project's stages after the UNet (pipeline.segment.methods.iseg.iseg_class_maps, then the mask) on
    the official code's own head-averaged attention: cross side -> [1, side*side, T], self
    [1, N, N]. Returns (mask uint8 [H, W], maps at 512 px)."""
    from pipeline.segment.methods import iseg
    from pipeline.mask.codec import decode_image
    from pipeline.mask.postprocess import finish_mask
    from pipeline.segment.prompts import build_class_prompt

    prompt = build_class_prompt(tokenizer, [config.classes[c] for c in sample["classes"]],
                                config.background_context)
    maps, _ = iseg.iseg_class_maps(cross, self_attn, [prompt.columns], config)
    side = int(round(maps.shape[1] ** 0.5))
    grid = maps[0].T.reshape(-1, side, side)
    image = decode_image(bytes.fromhex(sample["jpg"]), sample["key"])
    return finish_mask(grid, sample["classes"], image, config).labels, _maps_at_512(grid)


def run_official(official: Path, model_spec: str, samples_file: Path, dataset: str, out: Path,
                 ours, half: bool) -> None:
    """Child process: the official iSeg over the samples (`half`: its default half=True, the
    model in float16; else half=False); writes per image its mask and class maps, and the mask
    and maps of this project's later stages on the official attention."""
    from pipeline.segment.models import load_model

    bundle = load_model(model_spec, device="cpu", dtype=torch.float32)
    samples = json.loads(samples_file.read_text())
    package = _vendored_diffusers(official)
    _point_loading_at(package, bundle)
    _shim_lightning()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # everything stays on the CPU
    os.chdir(official / "wsss")  # its dataset modules read ../data/... at import
    sys.path[:0] = [str(official / "wsss"), str(official), str(official / "base")]  # wsss/iSeg.py first
    import arguments
    from iSeg import iSeg

    parser = argparse.ArgumentParser()
    arguments.add_base_args(parser)
    (arguments.add_voc_dataset_args if dataset == "voc" else arguments.add_coco_object_dataset_args)(parser)
    for add in (arguments.add_train_args, arguments.add_test_args, arguments.add_shell_args):
        add(parser)
    config = parser.parse_args([])  # the official settings for the dataset
    # Its head subsets index SD 2.x's heads; on another layout (the tiny model) both sides
    # average every cross-attention head, as this project does there.
    config.att_mean = config.att_mean or bundle.heads_per_block != _SD2_HEADS
    model = iSeg(config, half=half)
    model.on_test_start()
    names = model.class_name

    def pooled_cross(cross_attention_maps):  # the heads the official selects, averaged
        pooled = {}
        for side, values in cross_attention_maps.items():
            if len(values) and side in (16, 32):
                heads = values[:, model.index[side]] if model.index is not None else values
                pooled[side] = heads.mean(1).flatten(-2).transpose(1, 2)  # [1, side*side, T], its dtype
        return pooled

    self_heads = ours.self_attention.layers[0].heads
    results = {}
    for sample in samples:
        maps, masks, attention = [], [], []
        get_masks, get_att_map = model.get_masks, model.get_att_map
        model.get_masks = lambda *a, **k: maps.append(get_masks(*a, **k)) or maps[-1]

        def recording_get_att_map(cross_maps, self_maps):
            self64 = self_maps[64][:, self_heads].mean(1).flatten(-2).transpose(1, 2)  # [1, query, key], its dtype
            attention.append((pooled_cross(cross_maps), self64))
            return get_att_map(cross_maps, self_maps)

        model.get_att_map = recording_get_att_map
        model.showsegmentresult.add_prediction = lambda gt, pred: masks.append(pred)
        image = torch.from_numpy(_official_image(bytes.fromhex(sample["jpg"]), dataset))[None]
        carrier = torch.zeros(1, *sample["size"])  # the labels, as the mask test_step reads them from
        for pixel, index in enumerate(sample["classes"]):
            carrier.view(-1)[pixel] = index + 1
        with torch.no_grad():
            model.test_step((image, carrier, [sample["key"]]), 0)
        model.get_masks, model.get_att_map = get_masks, get_att_map
        results[sample["key"] + ".mask"] = masks[0].astype(np.uint8)
        results[sample["key"] + ".maps"] = maps[0][1][sample["classes"]].numpy()
        mask, our_maps = _ours_on_official_attention(*attention[0], sample, ours, bundle.tokenizer)
        results[sample["key"] + ".ours_on_official_attention.mask"] = mask
        results[sample["key"] + ".ours_on_official_attention.maps"] = our_maps
    np.savez_compressed(out, classes=np.array(names), **results)


# --- this project's side and the comparison -----------------------------------------------------

def official_class_words(official: Path, dataset: str) -> list[str]:
    """The official class table's words, in its class order (read from the checkout)."""
    source = official / "data" / ("voc/voc_name20.py" if dataset == "voc" else "coco14/coco_name80.py")
    scope: dict = {}
    exec(compile(source.read_text(), str(source), "exec"), scope)  # a dict literal, nothing else
    table = scope["VOC12_NAME" if dataset == "voc" else "COCO14_NAME"]
    return list(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of linsun449/iseg.code")
    parser.add_argument("--input", required=True, help="shards: a brace pattern, a glob or a shard folder")
    parser.add_argument("--model", default="tiny", help="tiny, sd21-random, a diffusers folder or a hub id")
    parser.add_argument("--config", default=None, help="this project's config (default: the VOC settings)")
    parser.add_argument("--dataset", choices=("voc", "coco"), default=None,
                        help="the official settings to run (default: coco for a config with 80 classes)")
    parser.add_argument("--num-images", type=int, default=None, help="at most this many images")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="this project's images per segmenter call (default 1, as the official code runs; "
                             "a GPU job's batch_size auto is 16, and batched kernels round differently)")
    parser.add_argument("--job", type=Path, default=None,
                        help="also compare the masks a `pseudolabel run` over the same shards wrote into this folder")
    parser.add_argument("--half", action="store_true",
                        help="both sides in float16, as a GPU runs them (the official code's default half=True; "
                             "slow on a CPU)")
    parser.add_argument("--official-side", nargs=2, metavar=("SAMPLES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    from pipeline.config import load_config

    config = load_config(args.config)
    dataset = args.dataset or ("coco" if len(config.classes) == 80 else "voc")
    official = args.official.expanduser().resolve()
    if args.official_side:
        run_official(official, args.model, Path(args.official_side[0]), dataset, Path(args.official_side[1]),
                     config, args.half)
        return 0
    if not (official / "wsss" / "iSeg.py").is_file():
        print(f"error: {official} is not a checkout of linsun449/iseg.code (no wsss/iSeg.py): "
              "pass the folder you cloned it into", file=sys.stderr)
        return 2

    from PIL import Image

    from pipeline.mask.codec import decode_image
    from pipeline.segment.models import load_model
    from pipeline.mask.postprocess import finish_mask
    from pipeline.segment.segmenter import Segmenter

    words = official_class_words(official, dataset)
    if len(words) != len(config.classes):
        print(f"error: the config has {len(config.classes)} classes, the official {dataset} table "
              f"{len(words)}: pass --config configs/coco.yaml for COCO", file=sys.stderr)
        return 2
    samples = read_samples(args.input, args.num_images)
    job_masks = {}
    if args.job:
        from pipeline.data.outputs import JobOutput
        from pipeline.data.shards import InputError

        try:
            job_masks = {record.id: record.labels for record in JobOutput(args.job).masks()}
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        missing = [sample["key"] for sample in samples if sample["key"] not in job_masks]
        if missing:
            print(f"error: {args.job} has no mask of {len(missing)} of the images (first: {missing[0]}): "
                  "pass the output folder of a job over the same --input", file=sys.stderr)
            return 2
    records = []
    for sample in samples:
        classes = sorted({config.class_index(name) for name in sample["names"]})
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            width, height = image.size
        records.append({"key": sample["key"], "jpg": sample["jpg"].hex(), "size": [height, width],
                        "classes": classes})

    with tempfile.TemporaryDirectory(prefix="check-official-") as work:
        samples_file, out = Path(work) / "samples.json", Path(work) / "official.npz"
        samples_file.write_text(json.dumps(records))
        print(f"running the official code on {len(records)} images ({args.model}, {dataset}, "
              f"{'float16' if args.half else 'float32'}) ...", flush=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--official", str(official), "--input",
                   args.input, "--model", args.model, "--dataset", dataset,
                   "--official-side", str(samples_file), str(out)]
        if args.config:
            command += ["--config", args.config]
        if args.half:
            command.append("--half")
        subprocess.run(command, check=True)
        reference = dict(np.load(out))

    model = load_model(args.model, device="cpu", dtype=torch.float16 if args.half else torch.float32)
    segmenter = Segmenter(model, config)
    totals = {"end to end": [0, 0, 1.0], "same attention": [0, 0, 1.0]}  # agreeing, pixels, worst share
    if args.job:
        totals["job's masks"] = [0, 0, 1.0]
    pairs = list(zip(records, samples))
    for start in range(0, len(pairs), args.batch_size):
        chunk = pairs[start:start + args.batch_size]
        images = [decode_image(sample["jpg"], record["key"]) for record, sample in chunk]
        batch = segmenter.segment([torch.from_numpy(image).permute(2, 0, 1) for image in images],
                                  [record["classes"] for record, _ in chunk])
        for (record, _), image, scores in zip(chunk, images, batch):
            theirs = reference[record["key"] + ".mask"]
            their_maps = reference[record["key"] + ".maps"]
            compared = {
                "end to end": (finish_mask(scores.maps, scores.classes, image, config).labels,
                               _maps_at_512(scores.maps)),
                "same attention": (reference[record["key"] + ".ours_on_official_attention.mask"],
                                   reference[record["key"] + ".ours_on_official_attention.maps"]),
            }
            if args.job:
                compared["job's masks"] = (job_masks[record["key"]], None)
            parts = []
            for what, (ours, our_maps) in compared.items():
                share = float((ours == theirs).mean())
                total = totals[what]
                total[0], total[1] = total[0] + int((ours == theirs).sum()), total[1] + ours.size
                total[2] = min(total[2], share)
                maps = "" if our_maps is None else f"maps max|diff| {np.abs(our_maps - their_maps).max():.1e}, "
                parts.append(f"{what}: {maps}mask {100 * share:.2f}%")
            names = ",".join(config.classes[c].name for c in record["classes"])
            print(f"{record['key']} [{names}]  " + "; ".join(parts), flush=True)
    agreement = {what: 100 * t[0] / max(t[1], 1) for what, t in totals.items()}
    worst = {what: 100 * t[2] for what, t in totals.items()}
    print(f"images {len(records)} (this project at batch size {args.batch_size}); worst image: "
          + ", ".join(f"{what} {share:.2f}%" for what, share in worst.items()))
    if args.job:
        job_agreement = agreement["job's masks"]
        print(f"official agreement of the job's masks ({args.job}): {job_agreement:.2f}% of pixels")
    print(f"official agreement on the official attention maps: {agreement['same attention']:.2f}% of pixels")
    print(f"official agreement: {agreement['end to end']:.2f}% of pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
